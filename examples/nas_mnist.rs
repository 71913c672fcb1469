//! Hardware-aware architecture search on MNIST: random search against regularized evolution
//! for the same budget of evaluations (three seeds), accuracy under an int8 latency budget
//! (LeNet-5's own int8 batch-1 latency on this machine); the best architecture found is then
//! trained on the full training set and compared with LeNet-5.
//!
//! ```text
//! cargo run --release --example nas_mnist -- [--trials N] [--seeds N]
//! ```
//! Defaults: 16 trials per controller and seed, 3 seeds; proxies train 1 epoch on 3,000
//! images and are scored on 2,000 held-out training images.
//! Trial logs go to `target/nas_<controller>_<seed>.csv` (a rerun resumes them; delete them
//! to start over), the Pareto front (accuracy vs int8 latency) to `target/nas_pareto.csv`.

mod common;

use nncompress::model::{zoo, Graph};
use nncompress::nas::{
    best, code_to_string, pareto_front, trials_csv, CnnSpace, Controller, Cost, Objective,
    ProxyEvaluator, RandomSearch, RegularizedEvolution, Search, SearchSpace, Trial,
};
use nncompress::quantizer::{Calibration, QuantConfig, Quantizer};
use nncompress::tensor::Tensor;
use nncompress::train::{
    evaluate, load_mnist, Dataset, InMemoryDataset, LrSchedule, MnistSplit, Sgd, TrainConfig,
    Trainer,
};
use std::time::{Duration, Instant};

/// Median int8 forward time (ms) of `g` on `x`.
fn int8_ms(g: &Graph, x: &Tensor) -> nncompress::Result<f64> {
    let q = Quantizer::new(QuantConfig::int8().calibration(Calibration::MinMax))
        .calibrate(g, std::slice::from_ref(x))?;
    let mut t: Vec<Duration> = (0..21)
        .map(|_| {
            let s = Instant::now();
            let _ = q.forward(x);
            s.elapsed()
        })
        .collect();
    t.sort();
    Ok(t[10].as_secs_f64() * 1e3)
}

struct Boxed(Box<dyn Controller>);
impl Controller for Boxed {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn ask(&mut self) -> nncompress::Result<nncompress::nas::Candidate> {
        self.0.ask()
    }
    fn tell(&mut self, c: &nncompress::nas::Candidate, s: Option<f64>) {
        self.0.tell(c, s)
    }
}

fn main() -> nncompress::Result<()> {
    let trials: usize = common::arg("--trials")
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let seeds: u64 = common::arg("--seeds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let start = Instant::now();
    let train = load_mnist(common::data_dir().join("mnist"), MnistSplit::Train)?;
    let test = load_mnist(common::data_dir().join("mnist"), MnistSplit::Test)?;
    let proxy_train: InMemoryDataset = train.take(3_000);
    let val: InMemoryDataset = train.subset(&(50_000..52_000).collect::<Vec<_>>())?;
    let x1 = test.batch(&[0])?.0;
    let x64 = test.batch(&(0..64).collect::<Vec<_>>())?.0;

    let lenet = Graph::from_safetensors(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/lenet5.safetensors"
        ),
        zoo::lenet5(0)?,
    )?;
    let budget = int8_ms(&lenet, &x1)?;
    println!("int8 latency budget: LeNet-5 at batch 1, {budget:.3} ms");

    // Widths up to 32: the 64-wide stride-1 stages cost 20 s per proxy and are far over the
    // latency budget anyway.
    let space = CnnSpace {
        widths: vec![8, 16, 32],
        ..CnnSpace::new([1, 28, 28], 10, 3)
    };
    let evaluator = ProxyEvaluator {
        train: &proxy_train,
        eval: &val,
        config: TrainConfig::new(1, 64, 1),
        lr: 0.05,
        objective: Objective::UnderBudget {
            cost: Cost::Int8Latency(1),
            budget,
        },
        repeats: 11,
    };
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
    let mut rows = Vec::new();
    let mut all: Vec<Trial> = Vec::new();
    let mut per_controller: Vec<(String, Vec<f64>)> = Vec::new();
    for name in ["random", "evolution"] {
        let mut bests = Vec::new();
        for seed in 1..=seeds {
            let c = space.choices();
            let controller: Box<dyn Controller> = match name {
                "random" => Box::new(RandomSearch::new(&c, seed)?),
                _ => Box::new(RegularizedEvolution::new(&c, 8, 3, seed)?),
            };
            let log = format!("{target}/nas_{name}_{seed}.csv");
            let t = Search::new(&space, Boxed(controller), &evaluator, trials)
                .log(&log)
                .run(|t, done, total| {
                    eprint!(
                        "\r{name} seed {seed}: {done}/{total}  last {}  score {}        ",
                        code_to_string(&t.code),
                        t.score.map_or("failed".into(), |s| format!("{s:.4}"))
                    )
                })?;
            eprintln!();
            let b = best(&t).and_then(|t| t.score).unwrap_or(f64::NAN);
            bests.push(b);
            all.extend(t);
        }
        per_controller.push((name.to_string(), bests));
    }
    for (name, bests) in &per_controller {
        let mean = bests.iter().sum::<f64>() / bests.len() as f64;
        rows.push(vec![
            name.clone(),
            format!("{trials} per seed"),
            bests
                .iter()
                .map(|b| format!("{b:.4}"))
                .collect::<Vec<_>>()
                .join(", "),
            format!("{mean:.4}"),
        ]);
    }
    println!();
    common::print_table(
        &["controller", "budget", "best score per seed", "mean"],
        &rows,
    );

    let front = pareto_front(&all, &[("accuracy", true), ("int8_ms_b1", false)]);
    let path = format!("{target}/nas_pareto.csv");
    std::fs::write(&path, trials_csv(&front)).map_err(|e| nncompress::Error::Io {
        path: path.clone().into(),
        source: e,
    })?;
    println!("Pareto front ({} trials) written to {path}", front.len());

    // The best feasible architecture, trained fully, against LeNet-5.
    let winner = best(&all).ok_or_else(|| nncompress::Error::Empty("successful trials".into()))?;
    let arch = space.decode(&winner.code)?;
    println!("best: {} {:?}", code_to_string(&winner.code), arch);
    let mut net = space.build(&arch)?;
    Trainer::new(
        TrainConfig::new(4, 64, 1).with_schedule(LrSchedule::Cosine),
        Sgd::new(0.05).with_momentum(0.9).with_weight_decay(5e-4),
    )
    .on_progress(common::progress_bar("train best"))
    .fit(&mut net, &train, None)?;
    let mut table = Vec::new();
    for (name, g) in [("LeNet-5 (fixture)", &lenet), ("NAS best", &net)] {
        table.push(vec![
            name.to_string(),
            format!("{}", g.param_count()),
            format!("{}", nncompress::pruner::macs(g)),
            format!("{:.2} %", evaluate(g, &test, 1000)?.error_percent()),
            format!("{:.3}", int8_ms(g, &x1)?),
            format!("{:.3}", int8_ms(g, &x64)?),
        ]);
    }
    println!();
    common::print_table(
        &[
            "model",
            "params",
            "MACs",
            "test error",
            "int8 ms b1",
            "int8 ms b64",
        ],
        &table,
    );
    println!("\n{:.0} s", start.elapsed().as_secs_f32());
    Ok(())
}
