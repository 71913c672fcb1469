//! Deep compression of LeNet-300-100 and LeNet-5 on MNIST (Han, Mao and Dally 2016): iterative
//! magnitude pruning with retraining, k-means weight sharing with trained centroids,
//! relative-index storage and Huffman coding into a `.nndc` file, which is then loaded,
//! decompressed and evaluated.
//!
//! ```text
//! cargo run --release --example deep_compression_mnist -- [--model mlp|lenet5|both] [--seed N] [--out DIR]
//! ```
//! Defaults: both models, seed 1, files in `target/`. Starts from the `train_mnist` fixtures.

mod common;

use nncompress::model::{zoo, Graph};
use nncompress::pruner::deep_compression::{Compressed, DeepCompressionConfig, SharedWeights};
use nncompress::pruner::{sparsity_table, Magnitude, UnstructuredPruner};
use nncompress::train::{
    evaluate, load_mnist, InMemoryDataset, LrSchedule, MnistSplit, Sgd, TrainConfig, Trainer,
};
use std::path::PathBuf;
use std::time::Instant;

struct Recipe {
    name: &'static str,
    build: fn(u64) -> nncompress::Result<Graph>,
    /// Fraction of each layer's weights pruned (Han et al.'s per-layer shape).
    sparsity: &'static [(&'static str, f32)],
    /// Per-layer cluster bits overriding the defaults (8 conv, 5 fc).
    bits: &'static [(&'static str, u32)],
    rounds: usize,
    epochs_per_round: usize,
    lr: f32,
    centroid_lr: f32,
}

const RECIPES: [Recipe; 2] = [
    Recipe {
        name: "lenet_300_100",
        build: zoo::lenet_300_100,
        sparsity: &[("fc1", 0.925), ("fc2", 0.92), ("fc3", 0.75)],
        bits: &[],
        rounds: 4,
        epochs_per_round: 3,
        lr: 0.02,
        centroid_lr: 1e-4,
    },
    Recipe {
        name: "lenet5",
        build: zoo::lenet5,
        sparsity: &[
            ("conv1", 0.34),
            ("conv2", 0.88),
            ("fc1", 0.935),
            ("fc2", 0.81),
        ],
        // conv1 keeps 330 weights: a 255-entry codebook would outweigh them.
        bits: &[("conv1", 5)],
        rounds: 4,
        epochs_per_round: 2,
        lr: 0.01,
        centroid_lr: 5e-5,
    },
];

fn run(
    r: &Recipe,
    train: &InMemoryDataset,
    test: &InMemoryDataset,
    seed: u64,
    out: &std::path::Path,
) -> nncompress::Result<Vec<String>> {
    let start = Instant::now();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let mut net =
        Graph::from_safetensors(format!("{fixture}{}.safetensors", r.name), (r.build)(0)?)?;
    let dense_err = evaluate(&net, test, 1000)?.error_percent();
    println!("\n== {}: dense test error {dense_err:.2} %", r.name);

    // 1. Prune + retrain, the masks re-applied after every optimizer step.
    let mut pruner = UnstructuredPruner::new(Magnitude, 0.0)?
        .only(&r.sparsity.iter().map(|(n, _)| *n).collect::<Vec<_>>());
    for (n, s) in r.sparsity {
        pruner = pruner.with_layer_sparsity(n, *s)?;
    }
    pruner.iterative(&mut net, r.rounds, |g, masks, round| {
        let keep = masks.clone();
        Trainer::new(
            TrainConfig::new(r.epochs_per_round, 64, seed + round as u64)
                .with_schedule(LrSchedule::Cosine),
            Sgd::new(r.lr).with_momentum(0.9).with_weight_decay(5e-4),
        )
        .on_progress(common::progress_bar(&format!("prune round {round}")))
        .after_step(move |g| keep.apply(g))
        .fit(g, train, None)
        .map(|_| ())
    })?;
    println!("{}", sparsity_table(&net));
    let pruned_err = evaluate(&net, test, 1000)?.error_percent();

    // 2. Weight sharing, then centroid fine-tuning.
    let config = DeepCompressionConfig {
        layer_bits: r.bits.iter().map(|(n, b)| (n.to_string(), *b)).collect(),
        ..DeepCompressionConfig::default()
    };
    let mut shared = SharedWeights::from_graph(&net, &config)?;
    shared.apply(&mut net)?;
    let shared_err = evaluate(&net, test, 1000)?.error_percent();
    shared.fine_tune(
        &mut net,
        train,
        TrainConfig::new(1, 64, seed).with_schedule(LrSchedule::Cosine),
        r.centroid_lr,
        common::progress_bar("centroid fine-tune"),
    )?;
    let tuned_err = evaluate(&net, test, 1000)?.error_percent();

    // 3. Encode, save, load, decompress, evaluate what came back.
    let compressed = shared.compress(&net, false)?;
    let path = out.join(format!("{}.nndc", r.name));
    compressed.save(&path)?;
    let restored = Compressed::load(&path)?.decompress(&(r.build)(0)?)?;
    let final_err = evaluate(&restored, test, 1000)?.error_percent();
    println!("{}", compressed.report_table());
    println!(
        "test error: dense {dense_err:.2} %, pruned {pruned_err:.2} %, shared {shared_err:.2} %, \
         centroids tuned {tuned_err:.2} %, loaded from {} {final_err:.2} %",
        path.display()
    );
    Ok(vec![
        r.name.to_string(),
        format!("{dense_err:.2} %"),
        format!("{final_err:.2} %"),
        format!("{}", compressed.float_bytes),
        format!("{}", compressed.file_bytes()),
        format!("{:.1}x", compressed.ratio()),
        format!("{:.0} s", start.elapsed().as_secs_f32()),
    ])
}

fn main() -> nncompress::Result<()> {
    let which = common::arg("--model").unwrap_or_else(|| "both".into());
    let seed: u64 = common::arg("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let out = PathBuf::from(
        common::arg("--out")
            .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string()),
    );
    std::fs::create_dir_all(&out).map_err(|e| nncompress::Error::Io {
        path: out.clone(),
        source: e,
    })?;
    let train = load_mnist(common::data_dir().join("mnist"), MnistSplit::Train)?;
    let test = load_mnist(common::data_dir().join("mnist"), MnistSplit::Test)?;
    let mut rows = Vec::new();
    for r in RECIPES.iter().filter(|r| match which.as_str() {
        "both" => true,
        "mlp" => r.name == "lenet_300_100",
        other => r.name == other,
    }) {
        rows.push(run(r, &train, &test, seed, &out)?);
    }
    println!("\nseed {seed}");
    common::print_table(
        &[
            "model",
            "dense error",
            "compressed error",
            "f32 bytes",
            ".nndc bytes",
            "smaller",
            "time",
        ],
        &rows,
    );
    Ok(())
}
