//! Quantization-aware training of LeNet-5 on MNIST, beside post-training quantization.
//!
//! Starts from the float LeNet-5 that `train_mnist` trained (`tests/fixtures/lenet5.safetensors`,
//! 99.30 % test accuracy) and compares, on the full 10,000-image test set:
//! - post-training quantization (KLD calibration on 512 training images), int8 and with 4-bit
//!   weights;
//! - the same after fine-tuning the float model for the QAT budget (same seed, same epochs,
//!   same optimizer), so that QAT is not credited for the extra training alone;
//! - quantization-aware training for that budget, converted to the integer model.
//!
//! ```text
//! cargo run --release --example qat_mnist -- [--epochs N] [--seed N] [--lsq]
//! ```
//! Defaults: 2 epochs, seed 1; `--lsq` learns the scales (LSQ) instead of tracking ranges.

mod common;

use nncompress::model::{zoo, Graph};
use nncompress::quantizer::{
    convert, prepare_qat, qat_report, Granularity, QatOptions, QuantConfig, QuantDtype,
    QuantScheme, QuantizedModel, Quantizer,
};
use nncompress::tensor::Tensor;
use nncompress::train::{
    argmax_rows, evaluate, load_mnist, Dataset, InMemoryDataset, LrSchedule, MnistSplit, Sgd,
    TrainConfig, Trainer,
};
use std::time::Instant;

const LAYERS: [&str; 4] = ["conv1", "conv2", "fc1", "fc2"];

/// The quantization settings compared: int8 everywhere, 4-bit weights per channel, 4-bit
/// weights per tensor (one scale per layer: what PTQ finds hardest), activations 8-bit.
fn settings() -> Vec<(&'static str, QuantConfig)> {
    let w4 = QuantScheme::int8_weights().with_dtype(QuantDtype::Int4);
    let w4_tensor = w4.with_granularity(Granularity::PerTensor);
    let with = |scheme: QuantScheme| {
        LAYERS.iter().fold(QuantConfig::int8(), |cfg, l| {
            cfg.with_layer_weights(l, scheme)
        })
    };
    vec![
        ("w8 a8", QuantConfig::int8()),
        ("w4 a8", with(w4)),
        ("w4/tensor a8", with(w4_tensor)),
    ]
}

fn int8_accuracy(q: &QuantizedModel, test: &InMemoryDataset) -> nncompress::Result<f32> {
    let mut correct = 0;
    for start in (0..test.len()).step_by(1000) {
        let idx: Vec<usize> = (start..(start + 1000).min(test.len())).collect();
        let (x, y) = test.batch(&idx)?;
        let pred = argmax_rows(&q.forward(&x)?)?;
        correct += pred.iter().zip(&y).filter(|(a, b)| a == b).count();
    }
    Ok(correct as f32 / test.len() as f32)
}

/// Fine-tunes `graph` (float or QAT) for `epochs` with the recipe every row shares.
fn fine_tune(
    graph: &mut Graph,
    train: &InMemoryDataset,
    epochs: usize,
    seed: u64,
    label: &str,
) -> nncompress::Result<f32> {
    let start = Instant::now();
    let cfg = TrainConfig::new(epochs, 64, seed).with_schedule(LrSchedule::Cosine);
    let mut trainer = Trainer::new(cfg, Sgd::new(0.01).with_momentum(0.9))
        .on_progress(common::progress_bar(label));
    trainer.fit(graph, train, None)?;
    Ok(start.elapsed().as_secs_f32())
}

fn main() -> nncompress::Result<()> {
    let epochs: usize = common::arg("--epochs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seed: u64 = common::arg("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let lsq = common::has_flag("--lsq");

    let train = load_mnist(common::data_dir().join("mnist"), MnistSplit::Train)?;
    let test = load_mnist(common::data_dir().join("mnist"), MnistSplit::Test)?;
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/lenet5.safetensors"
    );
    let float = Graph::from_safetensors(fixture, zoo::lenet5(0)?)?;
    let calib: Vec<Tensor> = (0..8)
        .map(|b| Ok(train.batch(&(b * 64..(b + 1) * 64).collect::<Vec<_>>())?.0))
        .collect::<nncompress::Result<_>>()?;
    let float_acc = evaluate(&float, &test, 1000)?.accuracy;

    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |method: &str, bits: &str, acc: f32, secs: Option<f32>| {
        rows.push(vec![
            method.to_string(),
            bits.to_string(),
            format!("{:.2}", 100.0 * acc),
            format!("{:+.2}", 100.0 * (acc - float_acc)),
            secs.map_or("-".into(), |s| format!("{s:.0}")),
        ]);
    };
    row("float (fixture)", "f32", float_acc, None);

    // Post-training quantization of the fixture, and of the fixture fine-tuned in float for
    // the same budget as QAT.
    let mut tuned = float.clone();
    let tune_secs = fine_tune(&mut tuned, &train, epochs, seed, "float fine-tune")?;
    row(
        &format!("float fine-tuned {epochs} ep"),
        "f32",
        evaluate(&tuned, &test, 1000)?.accuracy,
        Some(tune_secs),
    );
    for (k, (bits, cfg)) in settings().into_iter().enumerate() {
        for (name, net) in [("PTQ (KLD)", &float), ("fine-tune + PTQ", &tuned)] {
            let start = Instant::now();
            let q = Quantizer::new(cfg.clone()).calibrate(net, &calib)?;
            let secs = start.elapsed().as_secs_f32();
            row(name, bits, int8_accuracy(&q, &test)?, Some(secs));
        }
        let qat_cfg = cfg.with_qat(QatOptions {
            learned_scales: lsq,
            ..QatOptions::default()
        });
        let mut qat = prepare_qat(&float, &qat_cfg)?;
        if k == 0 {
            println!("QAT plan:");
            for r in qat_report(&qat) {
                println!("  {:<8} {:<10} {}", r.name, r.op, r.treatment);
            }
        }
        let secs = fine_tune(&mut qat, &train, epochs, seed, &format!("QAT {bits}"))?;
        let int8 = convert(&qat)?;
        let name = if lsq {
            "QAT (LSQ) → convert"
        } else {
            "QAT → convert"
        };
        row(name, bits, int8_accuracy(&int8, &test)?, Some(secs));
    }
    println!();
    common::print_table(
        &["method", "bits", "test acc %", "vs float", "seconds"],
        &rows,
    );
    Ok(())
}
