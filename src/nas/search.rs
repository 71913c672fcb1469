//! Evaluators, the search runner with its trial log, and the Pareto front.

use super::controller::{Candidate, Controller};
use super::space::{code_from_string, code_to_string, SearchSpace};
use crate::error::{Error, Result};
use crate::model::Graph;
use crate::quantizer::{Calibration, QuantConfig, Quantizer};
use crate::tensor::Tensor;
use crate::train::{evaluate, Dataset, InMemoryDataset, Sgd, TrainConfig, Trainer};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What an evaluation measured: the score the controller maximises, and named metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    /// Higher is better.
    pub score: f64,
    /// Named measurements (`accuracy`, `params`, `macs`, `latency_ms`, ...).
    pub values: BTreeMap<String, f64>,
}

/// Scores a built graph.
pub trait Evaluator: Sync {
    /// Measures `graph`, built from `candidate` (its id seeds any training; its code lets an
    /// evaluator read what the graph alone does not show, e.g. a bit-width policy).
    ///
    /// # Errors
    /// Any; the search records the failure and goes on.
    fn evaluate(&self, graph: &Graph, candidate: &Candidate) -> Result<Metrics>;
}

/// A cost the objective can weigh.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cost {
    /// Trainable parameters.
    Params,
    /// Multiply-accumulates per sample.
    Macs,
    /// Median float forward time at this batch size, in ms.
    FloatLatency(usize),
    /// Median forward time of the full-integer int8 model at this batch size, in ms.
    Int8Latency(usize),
}

/// How accuracy and cost combine into the score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Objective {
    /// Accuracy alone.
    Accuracy,
    /// Accuracy when the cost is within `budget`, else `accuracy − 1` (infeasible).
    UnderBudget {
        /// The cost.
        cost: Cost,
        /// Its budget.
        budget: f64,
    },
    /// MnasNet's `accuracy · (cost/target)^w` (`w` negative, e.g. −0.07).
    MnasNet {
        /// The cost.
        cost: Cost,
        /// Target cost.
        target: f64,
        /// Exponent.
        w: f64,
    },
}

/// Proxy evaluation: a few epochs of training on a subset, accuracy on held-out data, and
/// the costs the objective needs (latencies measured on this machine, median of `repeats`).
pub struct ProxyEvaluator<'a> {
    /// Training data (a subset keeps proxies cheap).
    pub train: &'a InMemoryDataset,
    /// Held-out data.
    pub eval: &'a InMemoryDataset,
    /// Epochs, batch size and seed of the proxy training (the seed is offset by the trial).
    pub config: TrainConfig,
    /// SGD learning rate (momentum 0.9).
    pub lr: f32,
    /// The objective.
    pub objective: Objective,
    /// Timed runs per latency (median).
    pub repeats: usize,
}

impl ProxyEvaluator<'_> {
    fn cost(&self, graph: &Graph, cost: Cost) -> Result<(String, f64)> {
        let shape = |n: usize| {
            let mut s = vec![n];
            s.extend(graph.input_shape());
            s
        };
        let batch = |n: usize| -> Result<Tensor> {
            let idx: Vec<usize> = (0..n.min(self.eval.len())).collect();
            let (x, _) = self.eval.batch(&idx)?;
            if x.shape()[0] == n {
                Ok(x)
            } else {
                Ok(Tensor::zeros(shape(n)))
            }
        };
        let median = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            f()?;
            let mut t: Vec<Duration> = Vec::new();
            for _ in 0..self.repeats.max(1) {
                let s = Instant::now();
                f()?;
                t.push(s.elapsed());
            }
            t.sort();
            Ok(t[t.len() / 2].as_secs_f64() * 1e3)
        };
        Ok(match cost {
            Cost::Params => ("params".into(), graph.param_count() as f64),
            Cost::Macs => ("macs".into(), crate::pruner::macs(graph) as f64),
            Cost::FloatLatency(n) => {
                let x = batch(n)?;
                let ms = median(&mut || graph.forward(&x).map(|_| ()))?;
                (format!("float_ms_b{n}"), ms)
            }
            Cost::Int8Latency(n) => {
                let x = batch(n)?;
                let q = Quantizer::new(QuantConfig::int8().calibration(Calibration::MinMax))
                    .calibrate(graph, std::slice::from_ref(&x))?;
                let ms = median(&mut || q.forward(&x).map(|_| ()))?;
                (format!("int8_ms_b{n}"), ms)
            }
        })
    }
}

impl Evaluator for ProxyEvaluator<'_> {
    fn evaluate(&self, graph: &Graph, candidate: &Candidate) -> Result<Metrics> {
        let mut g = graph.clone();
        let mut cfg = self.config;
        cfg.seed = cfg.seed.wrapping_add(candidate.id as u64);
        Trainer::new(cfg, Sgd::new(self.lr).with_momentum(0.9)).fit(&mut g, self.train, None)?;
        let accuracy = evaluate(&g, self.eval, 500)?.accuracy as f64;
        let mut values = BTreeMap::from([("accuracy".to_string(), accuracy)]);
        let score = match self.objective {
            Objective::Accuracy => accuracy,
            Objective::UnderBudget { cost, budget } => {
                let (name, c) = self.cost(&g, cost)?;
                values.insert(name, c);
                if c <= budget {
                    accuracy
                } else {
                    accuracy - 1.0
                }
            }
            Objective::MnasNet { cost, target, w } => {
                let (name, c) = self.cost(&g, cost)?;
                values.insert(name, c);
                accuracy * (c / target).powf(w)
            }
        };
        values.insert("params".into(), g.param_count() as f64);
        values.insert("macs".into(), crate::pruner::macs(&g) as f64);
        Ok(Metrics { score, values })
    }
}

/// One evaluated (or failed) candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Trial {
    /// Trial number.
    pub id: usize,
    /// The architecture's code.
    pub code: Vec<usize>,
    /// The score, `None` when the trial failed.
    pub score: Option<f64>,
    /// Named metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Why the trial failed.
    pub error: Option<String>,
    /// Wall time of the evaluation in seconds.
    pub seconds: f64,
}

impl Trial {
    fn to_csv(&self) -> String {
        let metrics: Vec<String> = self
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{},{},{},{},{},{}",
            self.id,
            code_to_string(&self.code),
            self.score.map_or("".into(), |s| s.to_string()),
            self.seconds,
            metrics.join(";"),
            self.error
                .as_deref()
                .unwrap_or("")
                .replace([',', '\n'], " ")
        )
    }

    fn from_csv(line: &str) -> Result<Trial> {
        let bad = || Error::config("search log", format!("malformed line `{line}`"));
        let f: Vec<&str> = line.splitn(6, ',').collect();
        if f.len() != 6 {
            return Err(bad());
        }
        let metrics = f[4]
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').ok_or_else(bad)?;
                Ok((k.to_string(), v.parse::<f64>().map_err(|_| bad())?))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Trial {
            id: f[0].parse().map_err(|_| bad())?,
            code: code_from_string(f[1])?,
            score: if f[2].is_empty() {
                None
            } else {
                Some(f[2].parse().map_err(|_| bad())?)
            },
            seconds: f[3].parse().map_err(|_| bad())?,
            metrics,
            error: (!f[5].is_empty()).then(|| f[5].to_string()),
        })
    }
}

const LOG_HEADER: &str = "id,code,score,seconds,metrics,error";

/// Runs a search: asks the controller for candidates, evaluates up to `parallel` at a time
/// on rayon's threads, tells the scores back in trial order once the whole round is in (so
/// the same seed and the same `parallel` give the same trials whatever the thread timing;
/// a learning controller sees fewer results per ask with more in flight), appends every
/// trial to a CSV log, and resumes from that log.
pub struct Search<'a, S: SearchSpace> {
    space: &'a S,
    controller: Box<dyn Controller + 'a>,
    evaluator: &'a dyn Evaluator,
    trials: usize,
    parallel: usize,
    log: Option<PathBuf>,
}

impl<'a, S: SearchSpace> Search<'a, S> {
    /// A search of `trials` evaluations, one at a time, without a log.
    pub fn new(
        space: &'a S,
        controller: impl Controller + 'a,
        evaluator: &'a dyn Evaluator,
        trials: usize,
    ) -> Self {
        Search {
            space,
            controller: Box::new(controller),
            evaluator,
            trials,
            parallel: 1,
            log: None,
        }
    }

    /// Evaluates up to `n` candidates at once.
    pub fn parallel(mut self, n: usize) -> Self {
        self.parallel = n.max(1);
        self
    }

    /// Appends every trial to the CSV file at `path`; trials already in it are replayed to the
    /// controller (not evaluated again) when the search starts.
    pub fn log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Builds and evaluates one candidate; failures become failed trials.
    fn evaluate(space: &S, evaluator: &dyn Evaluator, c: &Candidate) -> Trial {
        let start = Instant::now();
        let result = space
            .decode(&c.code)
            .and_then(|arch| space.build(&arch))
            .and_then(|g| evaluator.evaluate(&g, c))
            .and_then(|m| {
                if m.score.is_finite() {
                    Ok(m)
                } else {
                    Err(Error::NonFinite(format!("score of trial {}", c.id)))
                }
            });
        let seconds = start.elapsed().as_secs_f64();
        match result {
            Ok(m) => Trial {
                id: c.id,
                code: c.code.clone(),
                score: Some(m.score),
                metrics: m.values,
                error: None,
                seconds,
            },
            Err(e) => Trial {
                id: c.id,
                code: c.code.clone(),
                score: None,
                metrics: BTreeMap::new(),
                error: Some(e.to_string()),
                seconds,
            },
        }
    }

    /// Runs the remaining trials; `progress(trial, done, total)` after each.
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty space (from the controller), [`Error::Io`] for the log,
    /// [`Error::InvalidConfig`] when the log does not match what the controller asks (another
    /// seed or space). Failed evaluations are not errors: they are recorded trials.
    pub fn run(mut self, mut progress: impl FnMut(&Trial, usize, usize)) -> Result<Vec<Trial>> {
        let mut trials: Vec<Trial> = Vec::new();
        if let Some(path) = &self.log {
            if path.exists() {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
                    let t = Trial::from_csv(line)?;
                    let c = self.controller.ask()?;
                    if c.id != t.id || c.code != t.code {
                        return Err(Error::config(
                            "search resume",
                            format!(
                                "the log's trial {} ({}) is not what the controller proposes ({}): another seed or space?",
                                t.id,
                                code_to_string(&t.code),
                                code_to_string(&c.code)
                            ),
                        ));
                    }
                    self.controller.tell(&c, t.score);
                    trials.push(t);
                }
            } else {
                std::fs::write(path, format!("{LOG_HEADER}\n")).map_err(|e| Error::io(path, e))?;
            }
        }
        while trials.len() < self.trials {
            let n = self.parallel.min(self.trials - trials.len());
            let batch: Vec<Candidate> = (0..n)
                .map(|_| self.controller.ask())
                .collect::<Result<_>>()?;
            let (space, evaluator) = (self.space, self.evaluator);
            let results: Vec<Trial> = if n > 1 {
                batch
                    .par_iter()
                    .map(|c| Self::evaluate(space, evaluator, c))
                    .collect()
            } else {
                batch
                    .iter()
                    .map(|c| Self::evaluate(space, evaluator, c))
                    .collect()
            };
            for (c, t) in batch.iter().zip(results) {
                self.controller.tell(c, t.score);
                if let Some(path) = &self.log {
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(path)
                        .map_err(|e| Error::io(path, e))?;
                    writeln!(f, "{}", t.to_csv()).map_err(|e| Error::io(path, e))?;
                }
                trials.push(t);
                progress(
                    trials.last().expect("just pushed"),
                    trials.len(),
                    self.trials,
                );
            }
        }
        Ok(trials)
    }
}

/// The best trial by score.
pub fn best(trials: &[Trial]) -> Option<&Trial> {
    trials.iter().filter(|t| t.score.is_some()).max_by(|a, b| {
        a.score
            .partial_cmp(&b.score)
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// The trials no other trial beats on every objective: `(metric, maximise)` pairs; trials
/// missing a metric are left out.
pub fn pareto_front<'t>(trials: &'t [Trial], objectives: &[(&str, bool)]) -> Vec<&'t Trial> {
    let value =
        |t: &Trial, (m, max): (&str, bool)| t.metrics.get(m).map(|v| if max { *v } else { -v });
    let scored: Vec<(&Trial, Vec<f64>)> = trials
        .iter()
        .filter_map(|t| {
            objectives
                .iter()
                .map(|&o| value(t, o))
                .collect::<Option<Vec<f64>>>()
                .map(|v| (t, v))
        })
        .collect();
    scored
        .iter()
        .filter(|(_, a)| {
            !scored.iter().any(|(_, b)| {
                b.iter().zip(a.iter()).all(|(x, y)| x >= y)
                    && b.iter().zip(a.iter()).any(|(x, y)| x > y)
            })
        })
        .map(|(t, _)| *t)
        .collect()
}

/// Trials as CSV (the log's format).
pub fn trials_csv(trials: &[&Trial]) -> String {
    let mut s = format!("{LOG_HEADER}\n");
    for t in trials {
        let _ = writeln!(s, "{}", t.to_csv());
    }
    s
}
