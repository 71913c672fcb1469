//! Unstructured pruning: masks over single weights, kept apart from the weights and applied
//! again after every optimizer step, with one-shot, iterative and AGP schedules.

use super::criterion::{LayerParams, PruningCriterion};
use crate::error::{Error, Result};
use crate::model::{Gradients, Graph, Op};
use ndarray::ArrayD;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// 0/1 masks by parameter name (`fc1.weight`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Masks {
    masks: BTreeMap<String, ArrayD<f32>>,
}

impl Masks {
    /// Multiplies each masked parameter by its mask (pruned weights become 0).
    ///
    /// # Errors
    /// [`Error::MissingTensor`] when a masked parameter is not in the graph,
    /// [`Error::TensorShape`] when its shape changed.
    pub fn apply(&self, graph: &mut Graph) -> Result<()> {
        let mut seen = 0;
        let mut err = None;
        graph.map_params(|name, _, mut p| {
            if let Some(m) = self.masks.get(name) {
                seen += 1;
                if m.shape() == p.shape() {
                    p *= m;
                } else if err.is_none() {
                    err = Some(Error::TensorShape {
                        name: name.to_string(),
                        expected: m.shape().to_vec(),
                        got: p.shape().to_vec(),
                    });
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if seen != self.masks.len() {
            let missing = self
                .masks
                .keys()
                .find(|k| {
                    let mut found = false;
                    graph.visit_params(|n, _, _| found |= n == k.as_str());
                    !found
                })
                .cloned()
                .unwrap_or_default();
            return Err(Error::MissingTensor(missing));
        }
        Ok(())
    }

    /// The mask of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.masks.get(name)
    }

    /// Masked parameter names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.masks.keys().map(String::as_str)
    }

    /// Fraction of masked-out weights over all masks.
    pub fn sparsity(&self) -> f64 {
        let (zeros, total) = self.masks.values().fold((0usize, 0usize), |a, m| {
            (a.0 + m.iter().filter(|&&v| v == 0.0).count(), a.1 + m.len())
        });
        zeros as f64 / total.max(1) as f64
    }
}

/// How sparsity grows over training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// The final sparsity at once.
    OneShot,
    /// `rounds` equal steps (prune, retrain, prune more, ...): after round `r` of `rounds`
    /// the sparsity is `r/rounds` of the target.
    Iterative {
        /// Number of pruning rounds.
        rounds: usize,
    },
    /// Automated gradual pruning (Zhu & Gupta 2017): from 0 at step `start` to the target at
    /// step `end`, `s_t = s_f·(1 − (1 − p)³)` with `p = (t − start)/(end − start)`, updated
    /// every `every` steps.
    Agp {
        /// First step that prunes.
        start: usize,
        /// Step at which the target is reached.
        end: usize,
        /// Steps between mask updates.
        every: usize,
    },
}

impl Schedule {
    /// The fraction of the target sparsity at `step` (a round number for
    /// [`Schedule::Iterative`], an optimizer step for [`Schedule::Agp`]).
    pub fn fraction(&self, step: usize) -> f32 {
        match *self {
            Schedule::OneShot => 1.0,
            Schedule::Iterative { rounds } => {
                (step.min(rounds.max(1)) as f32) / rounds.max(1) as f32
            }
            Schedule::Agp { start, end, every } => {
                if step < start {
                    return 0.0;
                }
                let t = step - (step - start) % every.max(1);
                let p = ((t - start) as f32 / (end.saturating_sub(start)).max(1) as f32).min(1.0);
                1.0 - (1.0 - p).powi(3)
            }
        }
    }
}

/// Where thresholds are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threshold {
    /// Each layer reaches its own sparsity.
    PerLayer,
    /// One threshold over all layers' scores.
    Global,
}

/// Unstructured pruning of the Conv2d and Linear weights of a graph.
///
/// # Examples
/// ```
/// use nncompress::model::zoo;
/// use nncompress::pruner::{Magnitude, UnstructuredPruner};
/// let mut net = zoo::lenet_300_100(1)?;
/// let pruner = UnstructuredPruner::new(Magnitude, 0.9)?;
/// let masks = pruner.masks(&net, 1.0, None, None)?;
/// masks.apply(&mut net)?;
/// assert!((masks.sparsity() - 0.9).abs() < 1e-3);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub struct UnstructuredPruner {
    criterion: Box<dyn PruningCriterion>,
    sparsity: f32,
    layer_sparsity: Vec<(String, f32)>,
    layers: Option<Vec<String>>,
    threshold: Threshold,
}

fn check_sparsity(s: f32, what: &str) -> Result<()> {
    if (0.0..1.0).contains(&s) {
        Ok(())
    } else {
        Err(Error::config(
            what.to_string(),
            format!("sparsity {s} is outside [0, 1)"),
        ))
    }
}

impl UnstructuredPruner {
    /// Prunes every Conv2d / Linear weight to `sparsity` (per layer) by `criterion`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a sparsity outside `[0, 1)`.
    pub fn new(criterion: impl PruningCriterion + 'static, sparsity: f32) -> Result<Self> {
        check_sparsity(sparsity, "unstructured pruning")?;
        Ok(UnstructuredPruner {
            criterion: Box::new(criterion),
            sparsity,
            layer_sparsity: Vec::new(),
            layers: None,
            threshold: Threshold::PerLayer,
        })
    }

    /// A different target for layer `name` (per-layer thresholds).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a sparsity outside `[0, 1)`.
    pub fn with_layer_sparsity(mut self, name: &str, sparsity: f32) -> Result<Self> {
        check_sparsity(sparsity, &format!("layer `{name}`"))?;
        self.layer_sparsity.push((name.to_string(), sparsity));
        Ok(self)
    }

    /// Prunes only these layers.
    pub fn only(mut self, layers: &[&str]) -> Self {
        self.layers = Some(layers.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Sets where thresholds are taken.
    pub fn threshold(mut self, threshold: Threshold) -> Self {
        self.threshold = threshold;
        self
    }

    /// Masks at `fraction` of the targets (see [`Schedule::fraction`]); weights already
    /// masked out in `previous` stay out (they are pruned first, and never come back).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a fraction outside `[0, 1]` (or NaN),
    /// [`Error::UnknownNode`] for layer names not in the graph (or not Conv2d / Linear), the
    /// criterion's errors, [`Error::ShapeMismatch`] / [`Error::NonFinite`] for scores of the
    /// wrong shape or NaN.
    pub fn masks(
        &self,
        graph: &Graph,
        fraction: f32,
        gradients: Option<&Gradients>,
        previous: Option<&Masks>,
    ) -> Result<Masks> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::config(
                "unstructured pruning",
                format!("fraction {fraction} of the target is outside [0, 1]"),
            ));
        }
        let names: Vec<String> = match &self.layers {
            Some(l) => l.clone(),
            None => graph
                .nodes()
                .iter()
                .filter(|n| matches!(n.op, Op::Conv2d(_) | Op::Linear(_)))
                .map(|n| n.name.clone())
                .collect(),
        };
        for (n, _) in &self.layer_sparsity {
            graph.id(n)?;
        }
        let mut scores: Vec<(String, ArrayD<f32>, f32)> = Vec::new();
        for name in &names {
            let id = graph.id(name)?;
            let weight = match &graph.node(id).op {
                Op::Conv2d(c) => c.weight.view().into_dyn(),
                Op::Linear(l) => l.weight.view().into_dyn(),
                op => {
                    return Err(Error::UnknownNode {
                        node: format!("(unstructured pruning: `{name}` is {})", op.kind()),
                        input: name.clone(),
                    })
                }
            };
            let param = format!("{name}.weight");
            let layer = LayerParams {
                name,
                weight: weight.view(),
                bn_gamma: None,
                weight_grad: gradients.and_then(|g| g.get(&param)).map(|g| g.view()),
                activation: None,
            };
            let mut s = self.criterion.weight_scores(&layer)?;
            if s.shape() != weight.shape() {
                return Err(Error::shape(
                    "pruning criterion",
                    Some(name),
                    format!("{:?} (one score per weight)", weight.shape()),
                    s.shape(),
                ));
            }
            if s.iter().any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "scores of `{name}` from criterion `{}`",
                    self.criterion.name()
                )));
            }
            if let Some(m) = previous.and_then(|p| p.get(&param)) {
                if m.shape() == s.shape() {
                    ndarray::Zip::from(&mut s).and(m).for_each(|v, &k| {
                        if k == 0.0 {
                            *v = f32::NEG_INFINITY
                        }
                    });
                }
            }
            let target = self
                .layer_sparsity
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map_or(self.sparsity, |(_, t)| *t);
            scores.push((param, s, target * fraction));
        }
        let mut masks = BTreeMap::new();
        match self.threshold {
            Threshold::PerLayer => {
                for (param, s, target) in scores {
                    let k = (target * s.len() as f32).round() as usize;
                    let (t, mut ties) = kth_lowest(s.iter().copied(), k);
                    masks.insert(param, keep_top(&s, t, &mut ties));
                }
            }
            Threshold::Global => {
                let total: usize = scores.iter().map(|(_, s, _)| s.len()).sum();
                let k = (self.sparsity * fraction * total as f32).round() as usize;
                let (t, mut ties) =
                    kth_lowest(scores.iter().flat_map(|(_, s, _)| s.iter().copied()), k);
                for (param, s, _) in scores {
                    masks.insert(param, keep_top(&s, t, &mut ties));
                }
            }
        }
        if let Some(prev) = previous {
            for (name, m) in &mut masks {
                if let Some(p) = prev.get(name).filter(|p| p.shape() == m.shape()) {
                    *m *= p;
                }
            }
        }
        Ok(Masks { masks })
    }
}

impl UnstructuredPruner {
    /// Iterative pruning (Han et al. 2015): in each of `rounds` rounds, the masks rise to
    /// `round/rounds` of the targets (pruned weights stay pruned), are applied, and
    /// `retrain(graph, masks, round)` trains with them (typically a `Trainer` whose
    /// `after_step` applies the masks). Returns the final masks.
    ///
    /// # Errors
    /// As [`UnstructuredPruner::masks`], and `retrain`'s errors.
    pub fn iterative(
        &self,
        graph: &mut Graph,
        rounds: usize,
        mut retrain: impl FnMut(&mut Graph, &Masks, usize) -> Result<()>,
    ) -> Result<Masks> {
        let schedule = Schedule::Iterative { rounds };
        let mut masks: Option<Masks> = None;
        for round in 1..=rounds.max(1) {
            let m = self.masks(graph, schedule.fraction(round), None, masks.as_ref())?;
            m.apply(graph)?;
            retrain(graph, &m, round)?;
            masks = Some(m);
        }
        masks.ok_or_else(|| Error::config("iterative pruning", "no round ran"))
    }

    /// A [`crate::train::Trainer::after_step`] hook for gradual pruning: it counts optimizer
    /// steps, recomputes the masks at `schedule.fraction(step)` whenever that changes (AGP:
    /// every `every` steps), and applies the current masks after every step.
    ///
    /// # Examples
    /// ```
    /// # use nncompress::pruner::{Magnitude, Schedule, UnstructuredPruner};
    /// let pruner = UnstructuredPruner::new(Magnitude, 0.8)?;
    /// let hook = pruner.gradual(Schedule::Agp { start: 0, end: 100, every: 10 });
    /// // Trainer::new(config, optimizer).after_step(hook)
    /// # let _ = hook;
    /// # Ok::<(), nncompress::Error>(())
    /// ```
    pub fn gradual(self, schedule: Schedule) -> impl FnMut(&mut Graph) -> Result<()> {
        let mut step = 0usize;
        let mut fraction = 0.0f32;
        let mut masks: Option<Masks> = None;
        move |graph: &mut Graph| {
            step += 1;
            let f = schedule.fraction(step);
            if f != fraction || (masks.is_none() && f > 0.0) {
                fraction = f;
                masks = Some(self.masks(graph, f, None, masks.as_ref())?);
            }
            match &masks {
                Some(m) => m.apply(graph),
                None => Ok(()),
            }
        }
    }
}

/// The `k`-th lowest value and how many values equal to it are among the `k` lowest.
fn kth_lowest(values: impl Iterator<Item = f32>, k: usize) -> (f32, usize) {
    let mut v: Vec<f32> = values.collect();
    if k == 0 || v.is_empty() {
        return (f32::NEG_INFINITY, 0);
    }
    let k = k.min(v.len());
    v.sort_by(|a, b| a.total_cmp(b));
    let t = v[k - 1];
    let below = v.iter().take_while(|&&x| x < t).count();
    (t, k - below)
}

/// 1 for values above the threshold `t`, 0 below; of the values equal to it, the first
/// `equal_pruned` (in order, counted down across calls) are pruned.
fn keep_top(s: &ArrayD<f32>, t: f32, equal_pruned: &mut usize) -> ArrayD<f32> {
    s.mapv(|v| {
        if v < t {
            0.0
        } else if v == t && *equal_pruned > 0 {
            *equal_pruned -= 1;
            0.0
        } else {
            1.0
        }
    })
}

/// Zeros in one layer's weights.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSparsity {
    /// Parameter name.
    pub name: String,
    /// Weights.
    pub weights: usize,
    /// Exact zeros among them.
    pub zeros: usize,
}

/// Zero counts of every Conv2d / Linear weight, and a total.
pub fn sparsity_report(graph: &Graph) -> Vec<LayerSparsity> {
    let mut rows = Vec::new();
    for n in graph.nodes() {
        let w = match &n.op {
            Op::Conv2d(c) => c.weight.view().into_dyn(),
            Op::Linear(l) => l.weight.view().into_dyn(),
            _ => continue,
        };
        rows.push(LayerSparsity {
            name: format!("{}.weight", n.name),
            weights: w.len(),
            zeros: w.iter().filter(|&&v| v == 0.0).count(),
        });
    }
    rows
}

/// [`sparsity_report`] as a table.
pub fn sparsity_table(graph: &Graph) -> String {
    let rows = sparsity_report(graph);
    let mut s = format!(
        "{:<20} {:>10} {:>10} {:>8}\n",
        "weight", "total", "nonzero", "kept %"
    );
    let (mut t, mut z) = (0, 0);
    for r in &rows {
        let _ = writeln!(
            s,
            "{:<20} {:>10} {:>10} {:>8.2}",
            r.name,
            r.weights,
            r.weights - r.zeros,
            100.0 * (r.weights - r.zeros) as f64 / r.weights.max(1) as f64
        );
        t += r.weights;
        z += r.zeros;
    }
    let _ = writeln!(
        s,
        "{:<20} {:>10} {:>10} {:>8.2}",
        "total",
        t,
        t - z,
        100.0 * (t - z) as f64 / t.max(1) as f64
    );
    s
}
