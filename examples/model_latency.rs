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
        ("dynamic int8", Box::new(|| dynamic.forward(&x).map(drop))),
    ];
    let mut rows = Vec::new();
    for (name, run) in &runs {
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
            format!("{:.1} µs", times[2]),
            format!("{:.1} µs", times[0]),
            iters.to_string(),
        ]);
    }
    println!(
        "{model}, batch {n}, {} threads",
        rayon::current_num_threads()
    );
    common::print_table(
        &["precision", "median", "fastest", "calls per repetition"],
        &rows,
    );
    Ok(())
}
