//! A LeNet-5 quantized by ONNX Runtime (`quantize_static`, QDQ) on the crate's int8
//! kernels beside ORT itself on the same file, at batch 1 and 64 on 1 and 2 threads
//! (issue 16).
//!
//! ```text
//! bash scripts/fetch_onnx_testdata.sh          # the venv with onnxruntime
//! cargo test --release --test onnx_quantized   # writes target/onnx-ort-qdq/ort_qdq.onnx
//! NNCOMPRESS_ORT_PYTHON=target/models/venv/bin/python cargo bench --bench onnx_qdq
//! ```
//!
//! On each configuration ORT is timed (`scripts/ort_qdq_bench.py`, its own median), then
//! criterion times the crate's `QuantizedModel::forward` on the same input, then ORT
//! again; the run ends with a table of the crate's median, the mean of ORT's two, and
//! their ratio. Without `NNCOMPRESS_ORT_PYTHON`
//! only the crate is timed; without the model file the bench says so and does nothing
//! (and fails under `CI=true`).

use criterion::{BenchmarkId, Criterion};
use ndarray::ArrayD;
use nncompress::onnx::{import_qdq, ImportOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BATCHES: [usize; 2] = [1, 64];
const THREADS: [usize; 2] = [1, 2];

/// The input `scripts/ort_qdq_bench.py` feeds.
fn input(batch: usize) -> ArrayD<f32> {
    let v = (0..batch * 784)
        .map(|i| ((i as u64 * 7919) % 1000) as f32 / 1000.0)
        .collect();
    ArrayD::from_shape_vec(vec![batch, 1, 28, 28], v).expect("input")
}

/// ORT's median µs, `None` without `NNCOMPRESS_ORT_PYTHON`.
fn ort_baseline(root: &Path, model: &Path, batch: usize, threads: usize) -> Option<f64> {
    let python = std::env::var_os("NNCOMPRESS_ORT_PYTHON")?;
    let out = Command::new(python)
        .arg(root.join("scripts/ort_qdq_bench.py"))
        .arg(model)
        .args(["--batch", &batch.to_string()])
        .args(["--threads", &threads.to_string()])
        .output()
        .expect("running scripts/ort_qdq_bench.py");
    assert!(
        out.status.success(),
        "ORT baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .split('\t')
        .nth(2)?
        .parse()
        .ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("target/onnx-ort-qdq/ort_qdq.onnx");
    let Ok(bytes) = std::fs::read(&model) else {
        let msg = format!(
            "SKIPPED: {} missing (run cargo test --release --test onnx_quantized)",
            model.display()
        );
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("{msg}");
        return;
    };
    let q = import_qdq(&bytes, &ImportOptions::default()).expect("import");
    if std::env::var_os("NNCOMPRESS_ORT_PYTHON").is_none() {
        eprintln!("NNCOMPRESS_ORT_PYTHON not set: timing the crate only, no ORT baseline");
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut ours: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut ort = BTreeMap::new();
    for threads in THREADS {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let mut group = c.benchmark_group(format!("ort_qdq_lenet5_t{threads}"));
        for batch in BATCHES {
            let x = input(batch);
            // ORT right before and right after the crate on each configuration (the mean
            // of its two medians), so both see the same moments of a shared, noisy host.
            let before = ort_baseline(&root, &model, batch, threads);
            let times = ours.entry((batch, threads)).or_default();
            group.bench_with_input(BenchmarkId::new("batch", batch), &x, |b, x| {
                b.iter_custom(|iters| {
                    pool.install(|| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            let t = Instant::now();
                            std::hint::black_box(q.forward(x).expect("forward"));
                            times.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        start.elapsed()
                    })
                })
            });
            if let (Some(a), Some(b)) = (before, ort_baseline(&root, &model, batch, threads)) {
                ort.insert((batch, threads), (a + b) / 2.0);
            }
        }
        group.finish();
    }
    c.final_summary();
    println!("\n| model | batch | threads | crate µs | ORT µs | crate / ORT |");
    println!("|---|---|---|---|---|---|");
    for ((batch, threads), times) in ours {
        let mine = median(times);
        let theirs = ort.get(&(batch, threads)).copied().unwrap_or(f64::NAN);
        println!(
            "| ORT-quantized LeNet-5 | {batch} | {threads} | {mine:.1} | {theirs:.1} | {:.2} |",
            mine / theirs
        );
    }
}
