//! Pruning on MNIST: structured channel pruning and network slimming of a small VGG with
//! BatchNorm, LASSO channel selection with least-squares reconstruction against L1 selection,
//! Deep-Compression-style unstructured pruning of LeNet-300-100 to 8 % of its weights, and a
//! sensitivity table.
//!
//! ```text
//! cargo run --release --example prune_mnist -- [--part all|structured|slimming|lasso|unstructured|sensitivity] [--seed N]
//! ```
//! Needs the fixtures of `train_mnist` (`tests/fixtures/vgg_small.safetensors`,
//! `lenet_300_100.safetensors`). Writes the sensitivity CSV to `target/sensitivity.csv`.

mod common;

use nncompress::model::{zoo, Graph};
use nncompress::pruner::{
    macs, sensitivity, slimming_penalty, sparsity_table, BnScale, L1Norm, LassoPruner, Magnitude,
    Masks, Scope, StructuredPruner, UnstructuredPruner,
};
use nncompress::tensor::Tensor;
use nncompress::train::{
    evaluate, load_mnist, Dataset, InMemoryDataset, LrSchedule, MnistSplit, Sgd, TrainConfig,
    Trainer,
};
use std::time::{Duration, Instant};

const VGG_WIDTHS: [usize; 3] = [32, 64, 128];

fn fixture(name: &str, arch: Graph) -> nncompress::Result<Graph> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    Graph::from_safetensors(format!("{dir}{name}"), arch)
}

/// The MNIST VGG that `train_mnist --model vgg` trained.
fn vgg_fixture() -> nncompress::Result<Graph> {
    fixture(
        "vgg_small.safetensors",
        zoo::vgg_small([1, 28, 28], &VGG_WIDTHS, 10, 0)?,
    )
}

/// Median wall time of a batch-64 float forward pass.
fn forward_ms(g: &Graph, x: &Tensor) -> f64 {
    let mut times: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            let _ = g.forward(x);
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

fn fine_tune(
    g: &mut Graph,
    train: &InMemoryDataset,
    epochs: usize,
    lr: f32,
    seed: u64,
    label: &str,
    masks: Option<Masks>,
) -> nncompress::Result<()> {
    let cfg = TrainConfig::new(epochs, 64, seed).with_schedule(LrSchedule::Cosine);
    let mut t = Trainer::new(cfg, Sgd::new(lr).with_momentum(0.9).with_weight_decay(5e-4))
        .on_progress(common::progress_bar(label));
    if let Some(m) = masks {
        t = t.after_step(move |g| m.apply(g));
    }
    t.fit(g, train, None)?;
    Ok(())
}

struct Ctx {
    train: InMemoryDataset,
    test: InMemoryDataset,
    seed: u64,
    x64: Tensor,
    rows: Vec<Vec<String>>,
    slim_lambda: f32,
    slim_min_keep: f32,
}

impl Ctx {
    fn acc(&self, g: &Graph) -> nncompress::Result<f32> {
        Ok(evaluate(g, &self.test, 1000)?.accuracy)
    }
    #[allow(clippy::too_many_arguments)]
    fn row(&mut self, what: &str, g: &Graph, base: &Graph, acc: f32, base_acc: f32, note: &str) {
        let (m0, m1) = (macs(base) as f64, macs(g) as f64);
        self.rows.push(vec![
            what.to_string(),
            format!("{:.2}", 100.0 * acc),
            format!("{:+.2}", 100.0 * (acc - base_acc)),
            format!("{}", g.param_count()),
            format!("{:.1}", 100.0 * (1.0 - m1 / m0)),
            format!("{:.2}", forward_ms(g, &self.x64)),
            note.to_string(),
        ]);
    }
}

fn conv_widths(g: &Graph) -> Vec<usize> {
    g.nodes()
        .iter()
        .filter_map(|n| match &n.op {
            nncompress::model::Op::Conv2d(c) => Some(c.out_channels()),
            _ => None,
        })
        .collect()
}

fn structured(ctx: &mut Ctx) -> nncompress::Result<()> {
    println!(
        "\n== Structured L1 pruning of vgg_small {VGG_WIDTHS:?}: 50 % of every conv's channels"
    );
    let vgg = vgg_fixture()?;
    let base = ctx.acc(&vgg)?;
    ctx.row("vgg_small (fixture)", &vgg, &vgg, base, base, "");
    let pruner = StructuredPruner::new(L1Norm).with_ratio(0.5)?;
    prune_and_fine_tune(ctx, "L1 50 % + 2 ep", &vgg, base, pruner)
}

/// Prunes `net`, fine-tunes the result for 2 epochs and adds its row.
fn prune_and_fine_tune(
    ctx: &mut Ctx,
    label: &str,
    net: &Graph,
    base: f32,
    pruner: StructuredPruner,
) -> nncompress::Result<()> {
    let (mut pruned, report) = pruner.prune(net, None)?;
    println!("{}", report.table());
    let before = ctx.acc(&pruned)?;
    fine_tune(
        &mut pruned,
        &ctx.train,
        2,
        0.01,
        ctx.seed,
        "fine-tune",
        None,
    )?;
    let after = ctx.acc(&pruned)?;
    let note = format!(
        "widths {:?}; {:.2} % before fine-tuning",
        conv_widths(&pruned),
        100.0 * before
    );
    ctx.row(label, &pruned, net, after, base, &note);
    Ok(())
}

fn slimming(ctx: &mut Ctx) -> nncompress::Result<()> {
    println!(
        "\n== Network slimming: train with L1 (λ = {}) on BatchNorm γ, prune 50 % globally by |γ| \
         (each conv keeps ≥ {:.0} %)",
        ctx.slim_lambda,
        100.0 * ctx.slim_min_keep
    );
    let mut net = zoo::vgg_small([1, 28, 28], &VGG_WIDTHS, 10, ctx.seed)?;
    let cfg = TrainConfig::new(4, 64, ctx.seed).with_schedule(LrSchedule::Cosine);
    let mut trainer = Trainer::new(
        cfg,
        Sgd::new(0.05).with_momentum(0.9).with_weight_decay(5e-4),
    )
    .with_penalty(slimming_penalty(ctx.slim_lambda)?)
    .on_progress(common::progress_bar("slimming train"));
    trainer.fit(&mut net, &ctx.train, None)?;
    let base = ctx.acc(&net)?;
    let note = format!("trained with λ = {}", ctx.slim_lambda);
    ctx.row("vgg_small + L1(γ), 4 ep", &net, &net, base, base, &note);
    // A global threshold alone took conv 2 down to 2 of 64 channels (λ = 1e-4: 95.62 % after
    // fine-tuning): every group keeps a minimum share.
    let pruner = StructuredPruner::new(BnScale)
        .with_ratio(0.5)?
        .scope(Scope::Global)
        .min_keep(ctx.slim_min_keep)?;
    prune_and_fine_tune(ctx, "slimming 50 % + 2 ep", &net, base, pruner)
}

fn lasso(ctx: &mut Ctx) -> nncompress::Result<()> {
    println!("\n== LASSO + least squares vs L1 selection, 50 % of every group, no fine-tuning");
    let vgg = vgg_fixture()?;
    let base = ctx.acc(&vgg)?;
    let batches: Vec<Tensor> = (0..8)
        .map(|b| {
            Ok(ctx
                .train
                .batch(&(b * 64..(b + 1) * 64).collect::<Vec<_>>())?
                .0)
        })
        .collect::<nncompress::Result<_>>()?;
    let pruner = LassoPruner::new(0.5)?.seed(ctx.seed);
    let (lasso, reports) = pruner.prune_model(&vgg, &batches, |i, n, r| {
        eprintln!(
            "  [{i}/{n}] {} → {}: {} → {} channels, output error {:.4} (selection) → {:.4} (least squares)",
            r.group, r.consumer, r.channels.0, r.channels.1, r.error.0, r.error.1
        )
    })?;
    let acc = ctx.acc(&lasso)?;
    let worst = reports.iter().map(|r| r.error.1).fold(0.0, f64::max);
    ctx.row(
        "LASSO + LS 50 %, no ft",
        &lasso,
        &vgg,
        acc,
        base,
        &format!("worst layer output error {worst:.4}"),
    );
    let (l1, _) = StructuredPruner::new(L1Norm)
        .with_ratio(0.5)?
        .prune(&vgg, None)?;
    let l1_acc = ctx.acc(&l1)?;
    ctx.row("L1 50 %, no ft", &l1, &vgg, l1_acc, base, "");
    Ok(())
}

fn unstructured(ctx: &mut Ctx) -> nncompress::Result<()> {
    println!("\n== LeNet-300-100 to 8 % of its weights: iterative magnitude pruning + retraining");
    let mut net = fixture("lenet_300_100.safetensors", zoo::lenet_300_100(0)?)?;
    let dense = net.clone();
    let base = ctx.acc(&net)?;
    // Han et al.'s per-layer budget shape: the big first layer pruned hardest.
    let pruner = UnstructuredPruner::new(Magnitude, 0.925)?
        .with_layer_sparsity("fc2", 0.92)?
        .with_layer_sparsity("fc3", 0.75)?;
    let masks = pruner.iterative(&mut net, 4, |g, masks, round| {
        let label = format!("round {round}");
        let seed = ctx.seed + round as u64;
        fine_tune(g, &ctx.train, 3, 0.02, seed, &label, Some(masks.clone()))
    })?;
    println!("{}", sparsity_table(&net));
    let acc = ctx.acc(&net)?;
    let kept = 1.0 - masks.sparsity();
    ctx.row(
        "LeNet-300-100 sparse",
        &net,
        &dense,
        acc,
        base,
        &format!(
            "{:.2} % of weights kept; test error {:.2} %",
            100.0 * kept,
            100.0 * (1.0 - acc)
        ),
    );
    Ok(())
}

fn sensitivity_part(ctx: &mut Ctx) -> nncompress::Result<()> {
    println!("\n== Sensitivity of vgg_small (L1, no fine-tuning, 2,000 test images)");
    let vgg = vgg_fixture()?;
    let subset = ctx.test.take(2000);
    let s = sensitivity(
        &vgg,
        L1Norm,
        &[0.25, 0.5, 0.75, 0.9],
        &subset,
        500,
        |i, n| eprint!("\r  {i}/{n}"),
    )?;
    eprintln!();
    println!("{}", s.table());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/sensitivity.csv");
    std::fs::write(path, s.to_csv()).map_err(|e| nncompress::Error::Io {
        path: path.into(),
        source: e,
    })?;
    println!("CSV: {path}");
    let (ratios, reached) = s.ratios_for_macs(&vgg, 0.4)?;
    println!(
        "per-group ratios for 40 % of the MACs: {ratios:?} ({:.1} % reached)",
        100.0 * reached
    );
    Ok(())
}

fn main() -> nncompress::Result<()> {
    let part = common::arg("--part").unwrap_or_else(|| "all".into());
    let seed: u64 = common::arg("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let train = load_mnist(common::data_dir().join("mnist"), MnistSplit::Train)?;
    let test = load_mnist(common::data_dir().join("mnist"), MnistSplit::Test)?;
    let x64 = test.batch(&(0..64).collect::<Vec<_>>())?.0;
    let mut ctx = Ctx {
        train,
        test,
        seed,
        x64,
        rows: Vec::new(),
        slim_lambda: common::arg("--slim-lambda")
            .and_then(|s| s.parse().ok())
            .unwrap_or(5e-4),
        slim_min_keep: common::arg("--slim-min-keep")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.3),
    };
    let start = Instant::now();
    let all = part == "all";
    if all || part == "structured" {
        structured(&mut ctx)?;
    }
    if all || part == "slimming" {
        slimming(&mut ctx)?;
    }
    if all || part == "lasso" {
        lasso(&mut ctx)?;
    }
    if all || part == "unstructured" {
        unstructured(&mut ctx)?;
    }
    if all || part == "sensitivity" {
        sensitivity_part(&mut ctx)?;
    }
    println!();
    common::print_table(
        &[
            "model",
            "test acc %",
            "vs base",
            "params",
            "MACs cut %",
            "fwd b64 ms",
            "note",
        ],
        &ctx.rows,
    );
    println!("\n{:.0} s", start.elapsed().as_secs_f32());
    Ok(())
}
