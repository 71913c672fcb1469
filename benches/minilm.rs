//! all-MiniLM-L6-v2 in float at batch 1 and 32 × 128 tokens on 1 and 2 threads, with
//! ONNX Runtime f32 on the same weights as the baseline in the same run (issue 15).
//!
//! ```text
//! bash scripts/fetch_minilm.sh
//! python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy safetensors
//! NNCOMPRESS_ORT_PYTHON=.venv/bin/python cargo bench --bench minilm
//! ```
//!
//! On each configuration ORT is timed first (`scripts/ort_minilm_bench.py --ort-only`,
//! its own median), then criterion times the crate; the run ends with a table of both
//! medians and their ratio. Without
//! `NNCOMPRESS_ORT_PYTHON` only the crate is timed. Without the model files the bench says
//! so and does nothing (and fails under `CI=true`).

use criterion::{BenchmarkId, Criterion};
use ndarray::ArrayD;
use nncompress::io::load_hf_bert;
use nncompress::model::zoo::{bert_names as names, BertConfig};
use nncompress::model::Graph;
use nncompress::tensor::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const SEQ: usize = 128;
const BATCHES: [usize; 2] = [1, 32];
const THREADS: [usize; 2] = [1, 2];

/// The ids `examples/minilm_latency.rs` and the ORT script feed.
fn ids(batch: usize, seq: usize) -> ArrayD<i64> {
    ArrayD::from_shape_fn(vec![batch, seq], |d| match d[1] {
        0 => 101,
        t if t == seq - 1 => 102,
        t => ((d[0] * 7919 + t * 104_729) % 28_000 + 1000) as i64,
    })
}

/// ORT's median µs at `batch` on `threads`, from the script's `--ort-only` line; `None`
/// without `NNCOMPRESS_ORT_PYTHON`.
fn ort_baseline(root: &std::path::Path, batch: usize, threads: usize) -> Option<f64> {
    let python = std::env::var_os("NNCOMPRESS_ORT_PYTHON")?;
    let out = Command::new(python)
        .arg(root.join("scripts/ort_minilm_bench.py"))
        .args(["--ort-only", "--seq", &SEQ.to_string()])
        .args([
            "--batches",
            &batch.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .output()
        .expect("running scripts/ort_minilm_bench.py");
    assert!(
        out.status.success(),
        "ORT baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().next()?;
    line.split('\t').nth(2)?.parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("NNCOMPRESS_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/models"));
    let weights = dir.join("all-minilm-l6-v2/model.safetensors");
    if !weights.exists() {
        let msg = format!(
            "SKIPPED: {} missing (run scripts/fetch_minilm.sh)",
            weights.display()
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("{msg}");
        return;
    }
    let model: Graph = load_hf_bert(&BertConfig::minilm_l6_h384(), &weights).expect("model");
    if std::env::var_os("NNCOMPRESS_ORT_PYTHON").is_none() {
        eprintln!("NNCOMPRESS_ORT_PYTHON not set: timing the crate only, no ORT baseline");
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2));
    let mut ours: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut ort = BTreeMap::new();
    for threads in THREADS {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let mut group = c.benchmark_group(format!("minilm_f32_t{threads}"));
        for batch in BATCHES {
            let input_ids = Value::I64(ids(batch, SEQ));
            let mask = Value::I64(ArrayD::ones(vec![batch, SEQ]));
            let types = Value::I64(ArrayD::zeros(vec![batch, SEQ]));
            let feeds = [
                (names::INPUT_IDS, &input_ids),
                (names::ATTENTION_MASK, &mask),
                (names::TOKEN_TYPE_IDS, &types),
            ];
            // ORT right before the crate on each configuration, so both see the same
            // moment of a shared, noisy host.
            if let Some(us) = ort_baseline(&root, batch, threads) {
                ort.insert((batch, threads), us);
            }
            group.measurement_time(Duration::from_secs(if batch > 1 { 15 } else { 5 }));
            let times = ours.entry((batch, threads)).or_default();
            group.bench_with_input(BenchmarkId::new("batch", batch), &feeds, |b, feeds| {
                // Each call's own time is kept too, for the ratio table's median.
                b.iter_custom(|iters| {
                    pool.install(|| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let t = Instant::now();
                            std::hint::black_box(model.run(feeds).expect("forward"));
                            times.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        start.elapsed()
                    })
                })
            });
        }
        group.finish();
    }
    c.final_summary();
    println!("\n| model | batch × tokens | threads | crate ms | ORT ms | crate / ORT |");
    println!("|---|---|---|---|---|---|");
    for ((batch, threads), times) in ours {
        let mine = median(times);
        let theirs = ort.get(&(batch, threads)).copied().unwrap_or(f64::NAN);
        println!(
            "| all-MiniLM-L6-v2 f32 | {batch} × {SEQ} | {threads} | {:.1} | {:.1} | **{:.2}** |",
            mine / 1e3,
            theirs / 1e3,
            mine / theirs
        );
    }
}
