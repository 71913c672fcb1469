//! Trains LeNet-300-100, LeNet-5 and a small VGG with BatchNorm (`vgg_small([1, 28, 28],
//! [32, 64, 128])`) on the full MNIST training set, reports test error, and saves the weights
//! as safetensors (the fixtures later issues load instead of retraining).
//!
//! ```text
//! cargo run --release --example train_mnist -- [--model mlp|lenet5|vgg|both|all] [--out DIR] [--seed N]
//! ```
//! Defaults: all three models (`both`: the two LeNets), `tests/fixtures/`, seed 1.

mod common;

use nncompress::model::{zoo, Graph};
use nncompress::train::{evaluate, load_mnist, LrSchedule, MnistSplit, Sgd, TrainConfig, Trainer};
use std::path::PathBuf;
use std::time::Instant;

struct Recipe {
    name: &'static str,
    build: fn(u64) -> nncompress::Result<Graph>,
    epochs: usize,
    lr: f32,
}

fn main() -> nncompress::Result<()> {
    let which = common::arg("--model").unwrap_or_else(|| "all".into());
    let out = PathBuf::from(
        common::arg("--out")
            .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures").to_string()),
    );
    let seed: u64 = common::arg("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    std::fs::create_dir_all(&out).map_err(|e| nncompress::Error::Io {
        path: out.clone(),
        source: e,
    })?;

    let train = load_mnist(common::data_dir().join("mnist"), MnistSplit::Train)?;
    let test = load_mnist(common::data_dir().join("mnist"), MnistSplit::Test)?;
    let recipes = [
        Recipe {
            name: "lenet_300_100",
            build: zoo::lenet_300_100,
            epochs: 20,
            lr: 0.05,
        },
        Recipe {
            name: "lenet5",
            build: zoo::lenet5,
            epochs: 12,
            lr: 0.05,
        },
        Recipe {
            name: "vgg_small",
            build: |seed| zoo::vgg_small([1, 28, 28], &[32, 64, 128], 10, seed),
            epochs: 4,
            lr: 0.05,
        },
    ];
    let mut rows = Vec::new();
    let chosen = |name: &str| match which.as_str() {
        "all" => true,
        "both" => name != "vgg_small",
        "mlp" => name == "lenet_300_100",
        "vgg" => name == "vgg_small",
        other => name == other,
    };
    for r in recipes.iter().filter(|r| chosen(r.name)) {
        let mut net = (r.build)(seed)?;
        let start = Instant::now();
        let config = TrainConfig::new(r.epochs, 64, seed).with_schedule(LrSchedule::Cosine);
        let optimizer = Sgd::new(r.lr).with_momentum(0.9).with_weight_decay(5e-4);
        let mut trainer = Trainer::new(config, optimizer)
            .on_progress(common::progress_bar(r.name))
            .on_epoch(|e| {
                if let Some(ev) = e.eval {
                    eprintln!(
                        "  epoch {:>2}: train loss {:.4}, test error {:.2}% ({:.1} s)",
                        e.epoch,
                        e.train_loss,
                        ev.error_percent(),
                        e.seconds
                    );
                }
            });
        trainer.fit(&mut net, &train, Some(&test))?;
        let seconds = start.elapsed().as_secs_f32();
        let eval = evaluate(&net, &test, 500)?;
        let path = out.join(format!("{}.safetensors", r.name));
        net.save_safetensors(&path)?;
        rows.push(vec![
            r.name.to_string(),
            net.param_count().to_string(),
            r.epochs.to_string(),
            format!("{:.2}%", eval.error_percent()),
            format!("{}", eval.errors),
            format!("{seconds:.0} s"),
            path.display().to_string(),
        ]);
    }
    println!(
        "\nMNIST, seed {seed}, batch 64, SGD momentum 0.9, weight decay 5e-4, cosine schedule"
    );
    common::print_table(
        &[
            "model",
            "params",
            "epochs",
            "test error",
            "errors",
            "train time",
            "weights",
        ],
        &rows,
    );
    Ok(())
}
