//! Knowledge distillation on MNIST.
//!
//! 1. Logit KD: a LeNet-5 teacher (the `train_mnist` fixture, 0.70 % test error) and a
//!    784-100-10 MLP student, trained alone and with KD (T = 4, α = 1) for the same 10
//!    epochs, three seeds (`--hidden`, `--temperature`, `--alpha`, `--seeds` change them).
//! 2. Hints on a CNN pair: the VGG fixture (`[32, 64, 128]`) teaches a thin VGG (`[8, 16,
//!    32]`) by FitNet (hints through a 1×1 regressor, then KD: the two-stage recipe) and by
//!    attention transfer, and a two-stage VGG (`[32, 64]`) by FSP matrices; each beside the
//!    same student trained alone with the same budget.
//!
//! ```text
//! cargo run --release --example distill_mnist -- [--part all|kd|hints] [--epochs N] [--hidden N]
//!     [--temperature T] [--alpha A] [--seeds N]
//! ```

mod common;

use nncompress::distiller::{AttentionTransfer, Distiller, FitNet, Fsp, LogitKd};
use nncompress::model::{zoo, Graph, GraphBuilder};
use nncompress::train::{
    evaluate, load_mnist, InMemoryDataset, LrSchedule, MnistSplit, Sgd, TrainConfig, Trainer,
};
use std::time::Instant;

fn fixture(name: &str, arch: Graph) -> nncompress::Result<Graph> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    Graph::from_safetensors(format!("{dir}{name}"), arch)
}

/// The 784-`hidden`-10 student.
fn mlp(hidden: usize, seed: u64) -> nncompress::Result<Graph> {
    let mut b = GraphBuilder::new(seed);
    b.input("input", &[1, 28, 28])
        .flatten("flatten", "input")
        .linear("fc1", "flatten", 784, hidden, true)
        .relu("relu1", "fc1")
        .linear("fc2", "relu1", hidden, 10, true);
    b.build("fc2")
}

/// `--hidden`, `--temperature`, `--alpha`, `--seeds` of the KD part.
struct KdArgs {
    hidden: usize,
    temperature: f32,
    alpha: f32,
    seeds: u64,
}

fn sgd() -> Sgd {
    Sgd::new(0.05).with_momentum(0.9).with_weight_decay(5e-4)
}

fn kd(
    train: &InMemoryDataset,
    test: &InMemoryDataset,
    epochs: usize,
    args: &KdArgs,
    rows: &mut Vec<Vec<String>>,
) -> nncompress::Result<()> {
    let h = args.hidden;
    println!(
        "\n== Logit KD: LeNet-5 → 784-{h}-10 MLP, {epochs} epochs, T = {}, α = {}, seeds 1–{}",
        args.temperature, args.alpha, args.seeds
    );
    let teacher = fixture("lenet5.safetensors", zoo::lenet5(0)?)?;
    let t_err = evaluate(&teacher, test, 1000)?.errors;
    let (mut alone_sum, mut kd_sum) = (0usize, 0usize);
    let mut per_seed = Vec::new();
    for seed in 1..=args.seeds {
        let cfg = TrainConfig::new(epochs, 64, seed).with_schedule(LrSchedule::Cosine);
        let mut alone = mlp(h, seed)?;
        Trainer::new(cfg, sgd())
            .on_progress(common::progress_bar(&format!("alone seed {seed}")))
            .fit(&mut alone, train, None)?;
        let mut taught = mlp(h, seed)?;
        Distiller::new(&teacher, cfg, sgd())
            .with_loss(
                1.0,
                LogitKd::new("fc2", "fc2", args.temperature, args.alpha)?,
            )?
            .cache_teacher(true)
            .on_progress(common::progress_bar(&format!("KD seed {seed}")))
            .fit(&mut taught, train)?;
        let (a, k) = (
            evaluate(&alone, test, 1000)?.errors,
            evaluate(&taught, test, 1000)?.errors,
        );
        per_seed.push(format!("{a} → {k}"));
        alone_sum += a;
        kd_sum += k;
    }
    let n = args.seeds as f64;
    let (a, k) = (alone_sum as f64 / n, kd_sum as f64 / n);
    rows.push(vec![
        format!("KD (T = {}, α = {})", args.temperature, args.alpha),
        "LeNet-5".into(),
        format!("{t_err}"),
        format!("784-{h}-10 MLP"),
        format!("{a:.1}"),
        format!("{k:.1}"),
        format!("{:.1} %", 100.0 * (1.0 - k / a)),
        format!("mean of {} seeds ({})", args.seeds, per_seed.join(", ")),
    ]);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn hint_row(
    rows: &mut Vec<Vec<String>>,
    method: &str,
    student_name: &str,
    teacher_err: usize,
    alone: &Graph,
    taught: &Graph,
    test: &InMemoryDataset,
    note: &str,
) -> nncompress::Result<()> {
    let (a, k) = (
        evaluate(alone, test, 1000)?.errors,
        evaluate(taught, test, 1000)?.errors,
    );
    rows.push(vec![
        method.into(),
        "VGG [32, 64, 128]".into(),
        format!("{teacher_err}"),
        student_name.into(),
        format!("{a}"),
        format!("{k}"),
        format!("{:.1} %", 100.0 * (1.0 - k as f64 / a as f64)),
        note.into(),
    ]);
    Ok(())
}

fn hints(
    train: &InMemoryDataset,
    test: &InMemoryDataset,
    epochs: usize,
    rows: &mut Vec<Vec<String>>,
) -> nncompress::Result<()> {
    println!("\n== Hints on a CNN pair: FitNet, attention transfer, FSP ({epochs} epochs, 20,000 training images)");
    let teacher = fixture(
        "vgg_small.safetensors",
        zoo::vgg_small([1, 28, 28], &[32, 64, 128], 10, 0)?,
    )?;
    let t_err = evaluate(&teacher, test, 1000)?.errors;
    let subset = train.take(20_000);
    let cfg = TrainConfig::new(epochs, 64, 1).with_schedule(LrSchedule::Cosine);
    let thin = || zoo::vgg_small([1, 28, 28], &[8, 16, 32], 10, 1);

    let mut alone = thin()?;
    Trainer::new(cfg, sgd())
        .on_progress(common::progress_bar("thin alone"))
        .fit(&mut alone, &subset, None)?;

    // FitNet: stage 1, hints only (the student's first two stages learn to predict the
    // teacher's features.1 through a 1×1 regressor); stage 2, KD for the remaining epochs.
    let mut fitnet = thin()?;
    let stage1 = TrainConfig::new(1, 64, 1);
    Distiller::new(&teacher, stage1, sgd())
        .with_loss(
            1.0,
            FitNet::with_regressor("features.1.relu", "features.1.relu", 16, 64, 1),
        )?
        .on_progress(common::progress_bar("FitNet stage 1 (hints)"))
        .fit(&mut fitnet, &subset)?;
    let stage2 = TrainConfig::new(epochs - 1, 64, 2).with_schedule(LrSchedule::Cosine);
    Distiller::new(&teacher, stage2, sgd())
        .with_loss(1.0, LogitKd::new("classifier", "classifier", 4.0, 0.9)?)?
        .on_progress(common::progress_bar("FitNet stage 2 (KD)"))
        .fit(&mut fitnet, &subset)?;
    hint_row(
        rows,
        "FitNet (1 ep hints + KD)",
        "thin VGG [8, 16, 32]",
        t_err,
        &alone,
        &fitnet,
        test,
        "",
    )?;

    let mut kd_only = thin()?;
    Distiller::new(&teacher, cfg, sgd())
        .with_loss(1.0, LogitKd::new("classifier", "classifier", 4.0, 0.9)?)?
        .on_progress(common::progress_bar("KD only"))
        .fit(&mut kd_only, &subset)?;
    hint_row(
        rows,
        "KD only",
        "thin VGG [8, 16, 32]",
        t_err,
        &alone,
        &kd_only,
        test,
        "same budget",
    )?;

    // β = 50 per layer let the attention terms drown the labels (621 errors); 2 keeps them
    // at the scale of the cross-entropy.
    let beta = 2.0;
    let mut at = thin()?;
    Distiller::new(&teacher, cfg, sgd())
        .with_hard_labels(1.0)?
        .with_loss(
            1.0,
            AttentionTransfer::new("features.1.relu", "features.1.relu", beta),
        )?
        .with_loss(
            1.0,
            AttentionTransfer::new("features.2.relu", "features.2.relu", beta),
        )?
        .on_progress(common::progress_bar("attention transfer"))
        .fit(&mut at, &subset)?;
    hint_row(
        rows,
        &format!("AT (β = {beta}, 2 layers) + CE"),
        "thin VGG [8, 16, 32]",
        t_err,
        &alone,
        &at,
        test,
        "",
    )?;

    // FSP pairs layers of equal size and equal channel counts in both nets: a VGG with the
    // teacher's first two stages and no third.
    let two = || zoo::vgg_small([1, 28, 28], &[32, 64], 10, 1);
    let mut two_alone = two()?;
    Trainer::new(cfg, sgd())
        .on_progress(common::progress_bar("2-stage alone"))
        .fit(&mut two_alone, &subset, None)?;
    let mut fsp = two()?;
    Distiller::new(&teacher, cfg, sgd())
        .with_hard_labels(1.0)?
        .with_loss(
            1.0,
            Fsp::new(
                ("features.0.pool", "features.1.relu"),
                ("features.0.pool", "features.1.relu"),
            ),
        )?
        .on_progress(common::progress_bar("FSP"))
        .fit(&mut fsp, &subset)?;
    hint_row(
        rows,
        "FSP + CE",
        "VGG [32, 64]",
        t_err,
        &two_alone,
        &fsp,
        test,
        "",
    )?;
    Ok(())
}

fn main() -> nncompress::Result<()> {
    let part = common::arg("--part").unwrap_or_else(|| "all".into());
    let epochs: usize = common::arg("--epochs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let train = load_mnist(common::data_dir().join("mnist"), MnistSplit::Train)?;
    let test = load_mnist(common::data_dir().join("mnist"), MnistSplit::Test)?;
    let start = Instant::now();
    let mut rows = Vec::new();
    let parse = |flag: &str| common::arg(flag).and_then(|s| s.parse::<f32>().ok());
    let args = KdArgs {
        hidden: parse("--hidden").map_or(100, |v| v as usize),
        temperature: parse("--temperature").unwrap_or(4.0),
        alpha: parse("--alpha").unwrap_or(1.0),
        seeds: parse("--seeds").map_or(3, |v| v as u64),
    };
    if part == "all" || part == "kd" {
        kd(&train, &test, epochs, &args, &mut rows)?;
    }
    if part == "all" || part == "hints" {
        hints(&train, &test, 3, &mut rows)?;
    }
    println!();
    common::print_table(
        &[
            "method",
            "teacher",
            "teacher errors",
            "student",
            "errors alone",
            "errors distilled",
            "fewer",
            "note",
        ],
        &rows,
    );
    println!(
        "\n{:.0} s (test errors of 10,000)",
        start.elapsed().as_secs_f32()
    );
    Ok(())
}
