//! The main job: train a small CNN on the bundled UCI digits and report its accuracy.
//!
//! Run with `cargo run --release --example quickstart`. Later pillars (quantize, prune,
//! distill, search) add their steps here.

mod common;

use nncompress::model::zoo;
use nncompress::train::{evaluate, load_digits, Adam, TrainConfig, Trainer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::time::Instant;

fn main() -> nncompress::Result<()> {
    let seed = 2026;
    let start = Instant::now();
    let digits = load_digits(common::data_dir().join("digits/digits.csv.gz"))?;
    let (train, test) = digits.split(1437, &mut StdRng::seed_from_u64(seed))?;
    println!(
        "UCI digits: {} training and {} test images of 8x8",
        train.labels().len(),
        test.labels().len()
    );

    // Step 1: a float model, trained by the crate.
    let mut net = zoo::digits_cnn(seed)?;
    println!("\n{}", net.summary());
    let mut trainer = Trainer::new(TrainConfig::new(15, 32, seed), Adam::new(2e-3))
        .on_progress(common::progress_bar("train"));
    trainer.fit(&mut net, &train, None)?;
    let eval = evaluate(&net, &test, 256)?;

    common::print_table(
        &["step", "model", "params", "test accuracy", "test errors"],
        &[vec![
            "1. train float".into(),
            "digits_cnn".into(),
            net.param_count().to_string(),
            format!("{:.2}%", 100.0 * eval.accuracy),
            format!("{}/{}", eval.errors, eval.samples),
        ]],
    );
    println!("\ndone in {:.1} s", start.elapsed().as_secs_f32());
    Ok(())
}
