//! Architecture search: spaces, controllers, the runner's determinism, log and resume,
//! failures recorded, the Pareto front, and a proxy evaluation with int8 latency.

use ndarray::ArrayD;
use nncompress::model::Graph;
use nncompress::nas::{
    best, code_to_string, pareto_front, CnnSpace, Controller, Cost, Evaluator, Metrics, Objective,
    ProxyEvaluator, RandomSearch, RegularizedEvolution, Reinforce, Search, SearchSpace, Trial,
};
use nncompress::train::{load_digits, TrainConfig};
use nncompress::{Error, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A cheap, deterministic evaluator: the score is how close the architecture's MACs are to
/// a target (a stand-in for "accurate and fast" with a known optimum).
struct MacsTarget(f64);

impl Evaluator for MacsTarget {
    fn evaluate(&self, graph: &Graph, _: &nncompress::nas::Candidate) -> Result<Metrics> {
        let macs = nncompress::pruner::macs(graph) as f64;
        Ok(Metrics {
            score: -(macs.ln() - self.0.ln()).abs(),
            values: BTreeMap::from([("macs".to_string(), macs)]),
        })
    }
}

fn space() -> CnnSpace {
    CnnSpace::new([1, 16, 16], 10, 2)
}

fn controllers(seed: u64) -> Vec<Box<dyn Controller>> {
    let c = space().choices();
    vec![
        Box::new(RandomSearch::new(&c, seed).unwrap()),
        Box::new(RegularizedEvolution::new(&c, 8, 3, seed).unwrap()),
        Box::new(Reinforce::new(&c, 0.5, seed).unwrap()),
    ]
}

struct Boxed(Box<dyn Controller>);
impl Controller for Boxed {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn ask(&mut self) -> Result<nncompress::nas::Candidate> {
        self.0.ask()
    }
    fn tell(&mut self, c: &nncompress::nas::Candidate, s: Option<f64>) {
        self.0.tell(c, s)
    }
}

fn run(controller: Box<dyn Controller>, trials: usize, parallel: usize) -> Vec<Trial> {
    let s = space();
    let eval = MacsTarget(200_000.0);
    Search::new(&s, Boxed(controller), &eval, trials)
        .parallel(parallel)
        .run(|_, _, _| {})
        .unwrap()
}

fn strip(t: &[Trial]) -> Vec<(usize, Vec<usize>, Option<f64>)> {
    t.iter().map(|t| (t.id, t.code.clone(), t.score)).collect()
}

#[test]
fn same_seed_same_trials() {
    for k in 0..3 {
        for parallel in [1, 3] {
            let a = run(controllers(7).remove(k), 24, parallel);
            let b = run(controllers(7).remove(k), 24, parallel);
            assert_eq!(strip(&a), strip(&b), "controller {k}, {parallel} in flight");
        }
        let a = run(controllers(7).remove(k), 24, 1);
        let c = run(controllers(8).remove(k), 24, 1);
        assert_ne!(
            strip(&a),
            strip(&c),
            "controller {k}: another seed, other trials"
        );
    }
    // Random search does not learn, so its trials do not depend on how many are in flight.
    assert_eq!(
        strip(&run(controllers(7).remove(0), 24, 1)),
        strip(&run(controllers(7).remove(0), 24, 4))
    );
}

#[test]
fn every_candidate_builds_and_runs() {
    let s = space();
    let x = ArrayD::zeros(vec![2, 1, 16, 16]);
    for mut c in controllers(3) {
        for _ in 0..40 {
            let cand = c.ask().unwrap();
            let arch = s.decode(&cand.code).unwrap();
            assert_eq!(s.encode(&arch), cand.code);
            let g = s.build(&arch).unwrap();
            assert_eq!(g.forward(&x).unwrap().shape(), &[2, 10]);
            c.tell(&cand, Some(-(cand.id as f64)));
        }
    }
    // sample / mutate stay in the space too.
    let mut rng = StdRng::seed_from_u64(1);
    let a = s.sample(&mut rng).unwrap();
    let m = s.mutate(&a, &mut rng).unwrap();
    let (ca, cm) = (s.encode(&a), s.encode(&m));
    assert_eq!(ca.iter().zip(&cm).filter(|(x, y)| x != y).count(), 1);
}

#[test]
fn resuming_from_the_log_gives_the_same_trials() {
    let dir = std::env::temp_dir().join(format!("nncompress_nas_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("trials.csv");
    let _ = std::fs::remove_file(&log);
    let s = space();
    let eval = MacsTarget(200_000.0);
    let c = s.choices();
    let first = Search::new(
        &s,
        RegularizedEvolution::new(&c, 6, 2, 5).unwrap(),
        &eval,
        9,
    )
    .log(&log)
    .run(|_, _, _| {})
    .unwrap();
    assert_eq!(first.len(), 9);
    let mut evaluated = 0;
    let resumed = Search::new(
        &s,
        RegularizedEvolution::new(&c, 6, 2, 5).unwrap(),
        &eval,
        20,
    )
    .log(&log)
    .run(|_, _, _| evaluated += 1)
    .unwrap();
    assert_eq!(
        evaluated, 11,
        "the 9 logged trials are replayed, not evaluated"
    );
    let straight = Search::new(
        &s,
        RegularizedEvolution::new(&c, 6, 2, 5).unwrap(),
        &eval,
        20,
    )
    .run(|_, _, _| {})
    .unwrap();
    assert_eq!(strip(&resumed), strip(&straight));
    // A log from another seed is refused.
    let other = Search::new(
        &s,
        RegularizedEvolution::new(&c, 6, 2, 99).unwrap(),
        &eval,
        25,
    )
    .log(&log)
    .run(|_, _, _| {});
    assert!(matches!(other, Err(Error::InvalidConfig { .. })));
    std::fs::remove_dir_all(&dir).ok();
}

/// Fails on some architectures, returns NaN on others.
struct Flaky;

impl Evaluator for Flaky {
    fn evaluate(&self, graph: &Graph, c: &nncompress::nas::Candidate) -> Result<Metrics> {
        match c.id % 3 {
            0 => Err(Error::Unsupported("the device is busy".into())),
            1 => Ok(Metrics {
                score: f64::NAN,
                values: BTreeMap::new(),
            }),
            _ => Ok(Metrics {
                score: graph.param_count() as f64,
                values: BTreeMap::new(),
            }),
        }
    }
}

#[test]
fn failures_are_recorded_and_the_search_goes_on() {
    // Four halving stages do not fit a 4×4 input when a stage pools a 1×1 map: those builds
    // fail, are recorded, and the search goes on.
    let too_deep = CnnSpace::new([1, 4, 4], 10, 4);
    let c = too_deep.choices();
    let trials = Search::new(
        &too_deep,
        RandomSearch::new(&c, 1).unwrap(),
        &MacsTarget(1e5),
        12,
    )
    .run(|_, _, _| {})
    .unwrap();
    assert_eq!(trials.len(), 12);
    let failed: Vec<&Trial> = trials.iter().filter(|t| t.error.is_some()).collect();
    assert!(!failed.is_empty());
    assert!(failed.iter().all(|t| t.score.is_none()));
    let s = space();
    let trials = Search::new(
        &s,
        RegularizedEvolution::new(&s.choices(), 4, 2, 1).unwrap(),
        &Flaky,
        9,
    )
    .run(|_, _, _| {})
    .unwrap();
    assert_eq!(trials.len(), 9);
    assert_eq!(trials.iter().filter(|t| t.score.is_some()).count(), 3);
    assert!(trials[1].error.as_ref().unwrap().contains("score"));
    assert!(best(&trials).is_some());
    // An empty space is a typed error.
    assert!(matches!(RandomSearch::new(&[], 1), Err(Error::Empty(_))));
    assert!(matches!(
        RandomSearch::new(&[3, 0], 1),
        Err(Error::Empty(_))
    ));
    assert!(matches!(
        CnnSpace::new([1, 8, 8], 10, 0).sample(&mut StdRng::seed_from_u64(0)),
        Err(Error::Empty(_))
    ));
    assert!(RegularizedEvolution::new(&[2], 0, 1, 1).is_err());
}

#[test]
fn evolution_beats_random_search_on_a_known_objective() {
    let mean_best = |make: &dyn Fn(u64) -> Box<dyn Controller>| {
        (1..=3u64)
            .map(|seed| best(&run(make(seed), 40, 1)).unwrap().score.unwrap())
            .sum::<f64>()
            / 3.0
    };
    let c = space().choices();
    let random = mean_best(&|s| Box::new(RandomSearch::new(&c, s).unwrap()));
    let evolution = mean_best(&|s| Box::new(RegularizedEvolution::new(&c, 10, 4, s).unwrap()));
    // Measured: random −0.110, evolution −0.033 (40 trials, mean of 3 seeds).
    assert!(
        evolution > random,
        "evolution {evolution} vs random {random}"
    );
}

#[test]
fn reinforce_moves_its_policy_toward_what_scores() {
    // Decision 0 scores when it takes option 2; the others do not matter.
    let mut r = Reinforce::new(&[4, 3, 3], 0.5, 1).unwrap();
    for _ in 0..200 {
        let c = r.ask().unwrap();
        r.tell(&c, Some(if c.code[0] == 2 { 1.0 } else { 0.0 }));
    }
    let p = r.policy();
    assert!(p[0][2] > 0.8, "{:?}", p[0]);
    // Failed trials (None) teach nothing.
    let before = r.policy();
    let c = r.ask().unwrap();
    r.tell(&c, None);
    assert_eq!(r.policy(), before);
}

#[test]
fn pareto_front_keeps_the_undominated() {
    let t = |id: usize, acc: f64, ms: f64| Trial {
        id,
        code: vec![id],
        score: Some(acc),
        metrics: BTreeMap::from([("accuracy".to_string(), acc), ("ms".to_string(), ms)]),
        error: None,
        seconds: 0.0,
    };
    let trials = vec![
        t(0, 0.9, 5.0),
        t(1, 0.95, 8.0),
        t(2, 0.85, 6.0),
        t(3, 0.97, 20.0),
        t(4, 0.9, 4.0),
    ];
    let front: Vec<usize> = pareto_front(&trials, &[("accuracy", true), ("ms", false)])
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(front, vec![1, 3, 4]);
    assert_eq!(code_to_string(&[2, 0, 1]), "2-0-1");
}

#[test]
fn proxy_evaluation_trains_and_measures_int8_latency() {
    let digits =
        load_digits(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/digits/digits.csv.gz"))
            .unwrap();
    let (train, eval) = digits.split(1400, &mut StdRng::seed_from_u64(1)).unwrap();
    let s = CnnSpace::new([1, 8, 8], 10, 2);
    let evaluator = ProxyEvaluator {
        train: &train,
        eval: &eval,
        config: TrainConfig::new(3, 32, 1),
        lr: 0.05,
        objective: Objective::MnasNet {
            cost: Cost::Int8Latency(16),
            target: 0.05,
            w: -0.07,
        },
        repeats: 3,
    };
    let trials = Search::new(
        &s,
        RandomSearch::new(&s.choices(), 2).unwrap(),
        &evaluator,
        2,
    )
    .run(|_, _, _| {})
    .unwrap();
    for t in &trials {
        assert!(t.error.is_none(), "{:?}", t.error);
        assert!(t.metrics["accuracy"] > 0.3, "{:?}", t.metrics);
        assert!(t.metrics["int8_ms_b16"] > 0.0);
        assert!(t.metrics.contains_key("macs"));
    }
}

#[test]
fn the_compression_policy_space_prunes_and_quantizes_as_it_says() {
    use nncompress::nas::{CompressionPolicySpace, PolicyEvaluator};
    use nncompress::train::{load_mnist, InMemoryDataset, MnistSplit};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lenet = Graph::from_safetensors(
        root.join("tests/fixtures/lenet5.safetensors"),
        nncompress::model::zoo::lenet5(0).unwrap(),
    )
    .unwrap();
    let space =
        CompressionPolicySpace::new(&lenet, &[0.0, 0.25, 0.5, 0.75], &[2, 3, 4, 8]).unwrap();
    assert_eq!(space.groups, vec!["conv1", "conv2", "fc1"]);
    assert_eq!(space.layers, vec!["conv1", "conv2", "fc1", "fc2"]);
    assert_eq!(space.choices(), vec![4, 4, 4, 4, 4, 4, 4]);
    // Uniform: half the channels, 3-bit weights (at most 7 distinct values per output row).
    let code = space.uniform(2, 1);
    let g = space.build(&code).unwrap();
    let policy = space.policy(&code).unwrap();
    let Some(nncompress::model::Op::Conv2d(c)) = g.find("conv2").map(|id| g.node(id).op.clone())
    else {
        panic!()
    };
    assert_eq!(c.weight.shape()[..2], [25, 10]);
    for row in c.weight.outer_iter() {
        let mut v: Vec<u32> = row.iter().map(|x| x.to_bits()).collect();
        v.sort_unstable();
        v.dedup();
        assert!(v.len() <= 7, "{} values", v.len());
    }
    // Size: 3-bit weights, 32-bit biases.
    let (mut weights, mut biases) = (0usize, 0usize);
    g.visit_params(|name, _, v| {
        if name.ends_with(".weight") {
            weights += v.len()
        } else {
            biases += v.len()
        }
    });
    let bytes = CompressionPolicySpace::size_bytes(&g, &policy);
    assert_eq!(bytes, (weights * 3 + biases * 32) as f64 / 8.0);
    // The evaluator scores within the budget, and penalises outside it.
    let train = load_mnist(root.join("data/mnist"), MnistSplit::Train).unwrap();
    let val: InMemoryDataset = train.subset(&(50_000..50_500).collect::<Vec<_>>()).unwrap();
    let cand = nncompress::nas::Candidate {
        id: 0,
        code: code.clone(),
    };
    let within = PolicyEvaluator {
        space: &space,
        eval: &val,
        max_bytes: Some(bytes),
        max_macs: None,
    };
    let over = PolicyEvaluator {
        space: &space,
        eval: &val,
        max_bytes: Some(bytes - 1.0),
        max_macs: None,
    };
    let (a, b) = (
        within.evaluate(&g, &cand).unwrap(),
        over.evaluate(&g, &cand).unwrap(),
    );
    assert!((a.score - b.score - 1.0).abs() < 1e-12);
    // Bad options and codes.
    assert!(CompressionPolicySpace::new(&lenet, &[1.0], &[4]).is_err());
    assert!(CompressionPolicySpace::new(&lenet, &[0.5], &[9]).is_err());
    assert!(space.decode(&[9, 0, 0, 0, 0, 0, 0]).is_err());
}

#[test]
fn a_searched_compression_policy_beats_the_uniform_one_at_the_same_size() {
    use nncompress::nas::{CompressionPolicySpace, PolicyEvaluator};
    use nncompress::train::{evaluate, load_mnist, InMemoryDataset, MnistSplit};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lenet = Graph::from_safetensors(
        root.join("tests/fixtures/lenet5.safetensors"),
        nncompress::model::zoo::lenet5(0).unwrap(),
    )
    .unwrap();
    let train = load_mnist(root.join("data/mnist"), MnistSplit::Train).unwrap();
    let test = load_mnist(root.join("data/mnist"), MnistSplit::Test).unwrap();
    let val: InMemoryDataset = train.subset(&(50_000..52_000).collect::<Vec<_>>()).unwrap();
    let space = CompressionPolicySpace::new(&lenet, &[0.0, 0.25, 0.5], &[2, 3, 4, 8]).unwrap();
    // Uniform: no pruning, 2-bit weights everywhere; the search gets the same weight bytes.
    let uniform_code = space.uniform(0, 0);
    let uniform = space.build(&uniform_code).unwrap();
    let budget =
        CompressionPolicySpace::size_bytes(&uniform, &space.policy(&uniform_code).unwrap());
    let evaluator = PolicyEvaluator {
        space: &space,
        eval: &val,
        max_bytes: Some(budget),
        max_macs: None,
    };
    let trials = Search::new(
        &space,
        RegularizedEvolution::new(&space.choices(), 12, 3, 1).unwrap(),
        &evaluator,
        60,
    )
    .run(|_, _, _| {})
    .unwrap();
    let found = best(&trials).unwrap();
    let chosen = space.build(&found.code).unwrap();
    let bytes = CompressionPolicySpace::size_bytes(&chosen, &space.policy(&found.code).unwrap());
    let (a_uniform, a_found) = (
        evaluate(&uniform, &test, 1000).unwrap().accuracy,
        evaluate(&chosen, &test, 1000).unwrap().accuracy,
    );
    // Measured: uniform 2-bit 87.34 % at 109,945 B; found (25 % of every group pruned, 3-bit
    // convs and fc1, 4-bit fc2) 99.15 % at 94,611 B.
    assert!(bytes <= budget);
    assert!(
        a_found > a_uniform,
        "searched {a_found} vs uniform {a_uniform}"
    );
}
