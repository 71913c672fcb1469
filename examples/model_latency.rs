//! Whole-model latency of the float graph and its full-integer and dynamic-range int8 forms,
//! on the committed MNIST fixtures' weights (the harness behind issue 23's figures in
//! `docs/benchmarks.md`).
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release --example model_latency -- --model mlp --batch 64
//! ```
//!
//! `--model mlp | lenet5` (LeNet-300-100 or LeNet-5), `--batch N` (default 64), `--iters N`
//! calls per repetition (default: about 0.2 s of work). Calibration is min-max on four
//! synthetic batches (latency does not depend on the ranges' quality). Each precision is
//! warmed up, then timed in 5 repetitions; the table gives the median and the fastest.
//!
//! `--precision f32 | int8 | dynamic` times only that one (for profiling). `--tsv` prints `precision<TAB>median µs<TAB>fastest µs` lines instead of the table, and
//! `--logits PATH` writes each precision's output on the timed batch as little-endian f32
//! (`PATH.f32`, `PATH.int8`, `PATH.dynamic`): `scripts/ort_bench.py` reads both to put
//! ONNX Runtime beside the crate on the same weights and inputs.

mod common;

use nncompress::model::{zoo, Graph};
use nncompress::quantizer::{Calibration, QuantConfig, Quantizer};
use std::time::Instant;

fn batch(shape: &[usize], seed: usize) -> ndarray::ArrayD<f32> {
    ndarray::ArrayD::from_shape_fn(shape.to_vec(), |d| {
        (((d[0] + seed) * 31 + d[1] * 7 + d[2] * 3 + d[3]) % 97) as f32 / 97.0
    })
}

fn main() -> nncompress::Result<()> {
    let model = common::arg("--model").unwrap_or_else(|| "mlp".into());
    let parse = |flag: &str| common::arg(flag).and_then(|v| v.parse::<usize>().ok());
    let n = parse("--batch").unwrap_or(64).max(1);
    let (file, arch) = match model.as_str() {
        "lenet5" => ("lenet5.safetensors", zoo::lenet5(0)?),
        _ => ("lenet_300_100.safetensors", zoo::lenet_300_100(0)?),
    };
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let net = Graph::from_safetensors(path, arch)?;
    let calib: Vec<_> = (0..4).map(|s| batch(&[64, 1, 28, 28], s)).collect();
    let int8 = Quantizer::new(QuantConfig::int8().calibration(Calibration::MinMax))
        .calibrate(&net, &calib)?;
    let dynamic = Quantizer::new(QuantConfig::dynamic_int8()).calibrate(&net, &calib)?;
    let x = batch(&[n, 1, 28, 28], 9);
    type Run<'a> = Box<dyn Fn() -> nncompress::Result<()> + 'a>;
    let runs: Vec<(&str, Run)> = vec![
        ("f32", Box::new(|| net.forward(&x).map(drop))),
        ("int8", Box::new(|| int8.forward(&x).map(drop))),
        ("dynamic", Box::new(|| dynamic.forward(&x).map(drop))),
    ];
    if let Some(path) = common::arg("--logits") {
        let outputs = [
            ("f32", net.forward(&x)?),
            ("int8", int8.forward(&x)?),
            ("dynamic", dynamic.forward(&x)?),
        ];
        for (name, y) in outputs {
            let bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
            let file = std::path::PathBuf::from(format!("{path}.{name}"));
            std::fs::write(&file, bytes).map_err(|source| nncompress::Error::Io {
                path: file.clone(),
                source,
            })?;
        }
    }
    let only = common::arg("--precision");
    let mut rows = Vec::new();
    for (name, run) in runs
        .iter()
        .filter(|(name, _)| only.as_deref().is_none_or(|p| p == *name))
    {
        let start = Instant::now();
        for _ in 0..20 {
            run()?;
        }
        let per_call = start.elapsed().as_secs_f64() / 20.0;
        let iters = parse("--iters").unwrap_or(((0.2 / per_call) as usize).clamp(5, 100_000));
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
        rows.push(vec![
            name.to_string(),
            format!("{:.2}", times[2]),
            format!("{:.2}", times[0]),
            iters.to_string(),
        ]);
    }
    if common::has_flag("--tsv") {
        for row in &rows {
            println!("{}\t{}\t{}", row[0], row[1], row[2]);
        }
        return Ok(());
    }
    println!(
        "{model}, batch {n}, {} threads",
        rayon::current_num_threads()
    );
    common::print_table(
        &[
            "precision",
            "median µs",
            "fastest µs",
            "calls per repetition",
        ],
        &rows,
    );
    Ok(())
}
