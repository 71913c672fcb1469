//! all-MiniLM-L6-v2 latency in float (the harness behind issue 15's figures in
//! `docs/benchmarks.md`; `scripts/ort_minilm_bench.py` puts ONNX Runtime beside it).
//!
//! ```text
//! bash scripts/fetch_minilm.sh
//! RAYON_NUM_THREADS=1 cargo run --release --example minilm_latency -- --batch 1 --seq 128
//! ```
//!
//! `--batch N` (default 1), `--seq N` tokens per sentence (default 128, no padding),
//! `--iters N` calls per repetition (default: about 0.5 s of work), `--precision f32 |
//! dynamic | dynamic-tensor` (dynamic int8 Linears, activations per token or per tensor),
//! `--tsv` prints `PRECISION<TAB>median µs<TAB>fastest µs`, `--embeddings PATH` writes the timed batch's
//! sentence embeddings as little-endian f32, `--profile` prints the time per op kind
//! (a Linear by its shape) averaged over five taps-on passes. The ids are a fixed pseudo-random draw from
//! the vocabulary, framed by `[CLS]` and `[SEP]`.

mod common;

use ndarray::ArrayD;
use nncompress::io::load_hf_bert;
use nncompress::model::zoo::{bert_names as names, BertConfig};
use nncompress::quantizer::{dynamic_int8, DynamicInt8};
use nncompress::tensor::Value;
use std::path::PathBuf;
use std::time::Instant;

/// The token ids the bench (and `scripts/ort_minilm_bench.py`) feeds: `[CLS]`, then
/// `(n·7919 + t·104729) mod 28000 + 1000`, then `[SEP]`.
fn ids(batch: usize, seq: usize) -> ArrayD<i64> {
    ArrayD::from_shape_fn(vec![batch, seq], |d| match d[1] {
        0 => 101,
        t if t == seq - 1 => 102,
        t => ((d[0] * 7919 + t * 104_729) % 28_000 + 1000) as i64,
    })
}

fn main() -> nncompress::Result<()> {
    let parse = |flag: &str| common::arg(flag).and_then(|v| v.parse::<usize>().ok());
    let n = parse("--batch").unwrap_or(1).max(1);
    let seq = parse("--seq").unwrap_or(128).clamp(2, 512);
    let dir = std::env::var_os("NNCOMPRESS_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models"));
    let float = load_hf_bert(
        &BertConfig::minilm_l6_h384(),
        dir.join("all-minilm-l6-v2/model.safetensors"),
    )?;
    // `--precision f32 | dynamic (int8, activations per token) | dynamic-tensor`.
    let precision = common::arg("--precision").unwrap_or_else(|| "f32".into());
    let model = match precision.as_str() {
        "f32" => float,
        "dynamic" => dynamic_int8(&float, &DynamicInt8::per_row())?.0,
        "dynamic-tensor" => dynamic_int8(&float, &DynamicInt8::per_tensor())?.0,
        other => {
            return Err(nncompress::Error::InvalidConfig {
                what: "--precision".into(),
                reason: format!("`{other}`: f32, dynamic or dynamic-tensor"),
            })
        }
    };
    let input_ids = Value::I64(ids(n, seq));
    let mask = Value::I64(ArrayD::ones(vec![n, seq]));
    let types = Value::I64(ArrayD::zeros(vec![n, seq]));
    let feeds = [
        (names::INPUT_IDS, &input_ids),
        (names::ATTENTION_MASK, &mask),
        (names::TOKEN_TYPE_IDS, &types),
    ];
    let run = || model.run(&feeds);
    if let Some(path) = common::arg("--embeddings") {
        let out = run()?;
        let at = model
            .output_names()
            .iter()
            .position(|o| *o == names::SENTENCE_EMBEDDING)
            .unwrap_or(0);
        let bytes: Vec<u8> = out[at]
            .as_f32()
            .into_iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(&path, bytes).map_err(|source| nncompress::Error::Io {
            path: path.into(),
            source,
        })?;
    }
    if common::has_flag("--profile") {
        return profile(&model, &feeds);
    }
    let start = Instant::now();
    for _ in 0..3 {
        run()?;
    }
    let per_call = start.elapsed().as_secs_f64() / 3.0;
    let iters = parse("--iters").unwrap_or(((0.5 / per_call) as usize).clamp(2, 10_000));
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                run()?;
            }
            Ok(t.elapsed().as_secs_f64() / iters as f64 * 1e6)
        })
        .collect::<nncompress::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    if common::has_flag("--tsv") {
        println!("{precision}\t{:.1}\t{:.1}", times[2], times[0]);
        return Ok(());
    }
    println!(
        "all-MiniLM-L6-v2, batch {n} × {seq} tokens, {} threads",
        rayon::current_num_threads()
    );
    common::print_table(
        &[
            "precision",
            "median µs",
            "fastest µs",
            "calls per repetition",
        ],
        &[vec![
            precision.clone(),
            format!("{:.1}", times[2]),
            format!("{:.1}", times[0]),
            iters.to_string(),
        ]],
    );
    Ok(())
}

/// Milliseconds per op kind: the time from one node's output to the next's, through the
/// tap (which adds a clock read per node), averaged over five passes after a warm-up.
fn profile(model: &nncompress::model::Graph, feeds: &[(&str, &Value)]) -> nncompress::Result<()> {
    use nncompress::model::Op;
    let mut by_kind: std::collections::BTreeMap<String, f64> = Default::default();
    for pass in 0..6 {
        let mut last = Instant::now();
        model.run_with(feeds, &mut |_, node, _| {
            let now = Instant::now();
            if pass > 0 {
                let kind = match &node.op {
                    Op::Linear(l) => format!("linear {}→{}", l.in_features(), l.out_features()),
                    Op::DynamicLinear(l) => {
                        format!("dynamic linear {}→{}", l.in_features(), l.out_features())
                    }
                    op => op.kind().to_string(),
                };
                *by_kind.entry(kind).or_default() += (now - last).as_secs_f64() * 1e3 / 5.0;
            }
            last = Instant::now();
        })?;
    }
    let mut rows: Vec<_> = by_kind.into_iter().filter(|(_, ms)| *ms >= 0.01).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(k, ms)| vec![k, format!("{ms:.2}")])
        .collect();
    common::print_table(&["op", "ms per pass"], &rows);
    Ok(())
}
