//! Structured pruning: remove whole channels from every layer they live in, giving a smaller
//! dense graph that runs faster on the same kernels.

use super::criterion::{checked_scores, LayerParams, PruningCriterion};
use super::deps::{dependency_groups, ChannelGroup, DependencyGraph, Member};
use crate::error::{Error, Result};
use crate::model::{Gradients, Graph, Mode, Op};
use crate::tensor::Tensor;
use crate::train::{batch_indices, softmax_cross_entropy, Dataset};
use ndarray::Axis;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

/// Channels to remove, by group id ([`super::ChannelGroup::id`]).
pub type Removals = BTreeMap<usize, Vec<usize>>;

/// Per node: output channels (rows) and input features (columns) to remove.
#[derive(Default, Debug)]
struct Cuts {
    rows: BTreeSet<usize>,
    cols: BTreeSet<usize>,
}

fn check_removals(deps: &DependencyGraph, removals: &Removals) -> Result<()> {
    for (&id, channels) in removals {
        let g = deps.groups.get(id).ok_or_else(|| {
            Error::config(
                "channel removal",
                format!(
                    "no channel group {id} (the graph has {})",
                    deps.groups.len()
                ),
            )
        })?;
        if channels.is_empty() {
            continue;
        }
        if let Some(why) = &g.blocked {
            return Err(Error::config(
                format!("channel group {id} (`{}`)", g.name()),
                format!("cannot be pruned: {why}"),
            ));
        }
        let unique: BTreeSet<usize> = channels.iter().copied().collect();
        if let Some(&bad) = unique.iter().find(|&&c| c >= g.channels) {
            return Err(Error::config(
                format!("channel group {id} (`{}`)", g.name()),
                format!("channel {bad} is out of range ({} channels)", g.channels),
            ));
        }
        if unique.len() >= g.channels {
            return Err(Error::config(
                format!("channel group {id} (`{}`)", g.name()),
                format!("removing all {} channels would cut the network", g.channels),
            ));
        }
    }
    Ok(())
}

fn cuts(deps: &DependencyGraph, removals: &Removals) -> HashMap<String, Cuts> {
    let mut out: HashMap<String, Cuts> = HashMap::new();
    for (&id, channels) in removals {
        for m in &deps.groups[id].members {
            match m {
                Member::Producer(node) => out
                    .entry(node.clone())
                    .or_default()
                    .rows
                    .extend(channels.iter().copied()),
                Member::Norm { node, offset } | Member::Depthwise { node, offset } => out
                    .entry(node.clone())
                    .or_default()
                    .rows
                    .extend(channels.iter().map(|c| offset + c)),
                Member::Consumer {
                    node,
                    offset,
                    repeat,
                } => out.entry(node.clone()).or_default().cols.extend(
                    channels
                        .iter()
                        .flat_map(|c| offset + c * repeat..offset + (c + 1) * repeat),
                ),
            }
        }
    }
    out
}

fn kept(len: usize, cut: &BTreeSet<usize>) -> Vec<usize> {
    (0..len).filter(|i| !cut.contains(i)).collect()
}

fn select<D: ndarray::RemoveAxis>(
    a: &ndarray::Array<f32, D>,
    axis: usize,
    cut: &BTreeSet<usize>,
) -> ndarray::Array<f32, D> {
    if cut.is_empty() {
        a.clone()
    } else {
        a.select(Axis(axis), &kept(a.len_of(Axis(axis)), cut))
    }
}

/// Removes the given channels of each group from every layer they live in (producers' output
/// rows and biases, BatchNorm entries, depthwise filters, consumers' input columns) and
/// returns the smaller graph. Node names and everything else stay.
///
/// # Errors
/// [`Error::InvalidConfig`] for an unknown group, a blocked group (the message says what
/// blocks it), a channel out of range, or removing every channel of a group.
pub fn prune_channels(graph: &Graph, deps: &DependencyGraph, removals: &Removals) -> Result<Graph> {
    check_removals(deps, removals)?;
    let cuts = cuts(deps, removals);
    let none = Cuts::default();
    let mut specs = graph.to_specs();
    for spec in &mut specs {
        let c = cuts.get(&spec.name).unwrap_or(&none);
        if c.rows.is_empty() && c.cols.is_empty() {
            continue;
        }
        spec.op = match &spec.op {
            Op::Conv2d(conv) => {
                let mut conv = conv.clone();
                let depthwise = conv.groups > 1;
                conv.weight = select(&select(&conv.weight, 0, &c.rows), 1, &c.cols);
                conv.bias = conv.bias.as_ref().map(|b| select(b, 0, &c.rows));
                if depthwise {
                    conv.groups = conv.weight.shape()[0];
                }
                Op::Conv2d(conv)
            }
            Op::Linear(l) => {
                let mut l = l.clone();
                l.weight = select(&select(&l.weight, 0, &c.rows), 1, &c.cols);
                l.bias = l.bias.as_ref().map(|b| select(b, 0, &c.rows));
                Op::Linear(l)
            }
            Op::BatchNorm2d(bn) => {
                let mut bn = bn.clone();
                bn.gamma = select(&bn.gamma, 0, &c.rows);
                bn.beta = select(&bn.beta, 0, &c.rows);
                bn.running_mean = select(&bn.running_mean, 0, &c.rows);
                bn.running_var = select(&bn.running_var, 0, &c.rows);
                Op::BatchNorm2d(bn)
            }
            op => op.clone(),
        };
    }
    Graph::from_specs_with_outputs(specs, &graph.output_names())
}

/// Zeroes the given channels instead of removing them: producers' rows and biases, BatchNorm
/// γ and β, depthwise filters. The result computes what [`prune_channels`] gives ("soft"
/// pruning, and the check that pruning is exact).
///
/// # Errors
/// As [`prune_channels`].
pub fn zero_channels(graph: &Graph, deps: &DependencyGraph, removals: &Removals) -> Result<Graph> {
    check_removals(deps, removals)?;
    let cuts = cuts(deps, removals);
    let mut out = graph.clone();
    for spec_name in cuts.keys() {
        let rows = &cuts[spec_name].rows;
        if rows.is_empty() {
            continue;
        }
        for (kind, mut p) in out.params_of_mut(spec_name)? {
            use crate::model::ParamKind;
            if matches!(kind, ParamKind::Weight | ParamKind::Bias) {
                for &r in rows {
                    p.index_axis_mut(Axis(0), r).fill(0.0);
                }
            }
        }
    }
    Ok(out)
}

/// Sums the loss gradient over `batches` batches of `data` (inference-mode BatchNorm), for
/// gradient-based criteria ([`super::Taylor`]).
///
/// # Errors
/// [`Error::Empty`] for an empty data set, or the model's errors.
pub fn accumulate_gradients(
    graph: &Graph,
    data: &dyn Dataset,
    batches: usize,
    batch_size: usize,
    seed: u64,
) -> Result<Gradients> {
    if data.is_empty() {
        return Err(Error::Empty("data for gradients".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut g = graph.clone();
    let mut total = Gradients::default();
    for idx in batch_indices(data.len(), batch_size, Some(&mut rng))
        .into_iter()
        .take(batches.max(1))
    {
        let (x, y) = data.batch(&idx)?;
        let trace = g.trace(&x, Mode::Inference, &mut rng)?;
        let (_, grad) = softmax_cross_entropy(trace.value(g.output_id()), &y)?;
        for (name, v) in graph.backward(&trace, &grad)?.iter() {
            total.accumulate(name, v.clone())?;
        }
    }
    Ok(total)
}

/// How many channels a group keeps, and which scope picks them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scope {
    /// Each group loses its own fraction.
    PerGroup,
    /// One threshold over all groups' scores (comparable scores only, e.g. BatchNorm γ).
    Global,
}

/// Before / after of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupChange {
    /// The group's name (its first producer).
    pub name: String,
    /// Channels before.
    pub before: usize,
    /// Channels after.
    pub after: usize,
}

/// What [`StructuredPruner::prune`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneReport {
    /// Per prunable group.
    pub groups: Vec<GroupChange>,
    /// Trainable parameters before and after.
    pub params: (u64, u64),
    /// Multiply-accumulates per sample before and after.
    pub macs: (u64, u64),
    /// Groups that could not be pruned, with the reason.
    pub blocked: Vec<(String, String)>,
}

impl PruneReport {
    /// Fraction of channels removed over the pruned groups.
    pub fn channels_removed(&self) -> f64 {
        let (b, a) = self
            .groups
            .iter()
            .fold((0, 0), |s, g| (s.0 + g.before, s.1 + g.after));
        1.0 - a as f64 / b.max(1) as f64
    }

    /// Fraction of multiply-accumulates removed.
    pub fn macs_removed(&self) -> f64 {
        1.0 - self.macs.1 as f64 / self.macs.0.max(1) as f64
    }

    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = format!("{:<28} {:>8} {:>8}\n", "group", "before", "after");
        for g in &self.groups {
            let _ = writeln!(s, "{:<28} {:>8} {:>8}", g.name, g.before, g.after);
        }
        let _ = writeln!(
            s,
            "channels removed {:.1} %, parameters {} → {}, MACs {} → {} ({:.1} % fewer)",
            100.0 * self.channels_removed(),
            self.params.0,
            self.params.1,
            self.macs.0,
            self.macs.1,
            100.0 * self.macs_removed()
        );
        for (g, why) in &self.blocked {
            let _ = writeln!(s, "not pruned: {g} ({why})");
        }
        s
    }
}

/// Multiply-accumulates per sample.
pub fn macs(graph: &Graph) -> u64 {
    graph.cost().iter().map(|c| c.macs).sum()
}

/// Removes the least important channels of every prunable group.
///
/// # Examples
/// ```
/// use nncompress::model::zoo;
/// use nncompress::pruner::{L1Norm, StructuredPruner};
/// let net = zoo::vgg_small([1, 16, 16], &[8, 16], 10, 1)?;
/// let (small, report) = StructuredPruner::new(L1Norm).with_ratio(0.5)?.prune(&net, None)?;
/// assert_eq!(report.groups[0].after, 4);
/// assert!(small.param_count() < net.param_count());
/// # Ok::<(), nncompress::Error>(())
/// ```
pub struct StructuredPruner {
    criterion: Box<dyn PruningCriterion>,
    ratio: f32,
    layer_ratios: Vec<(String, f32)>,
    round_to: usize,
    scope: Scope,
    sample: Option<Tensor>,
    min_keep: f32,
}

fn check_ratio(r: f32, what: &str) -> Result<()> {
    if (0.0..1.0).contains(&r) {
        Ok(())
    } else {
        Err(Error::config(
            what.to_string(),
            format!("pruning ratio {r} is outside [0, 1)"),
        ))
    }
}

impl StructuredPruner {
    /// A pruner with `criterion`, ratio 0 (nothing removed), no rounding, per-group scope.
    pub fn new(criterion: impl PruningCriterion + 'static) -> Self {
        StructuredPruner {
            criterion: Box::new(criterion),
            ratio: 0.0,
            layer_ratios: Vec::new(),
            round_to: 1,
            scope: Scope::PerGroup,
            sample: None,
            min_keep: 0.0,
        }
    }

    /// Every group keeps at least this fraction of its channels (at least one channel is
    /// always kept). With [`Scope::Global`], channels a group may not lose are skipped and the
    /// threshold moves on to other groups, so the global ratio is still reached when it can be.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] outside `[0, 1]`.
    pub fn min_keep(mut self, fraction: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::config(
                "structured pruning",
                format!("minimum kept fraction {fraction} is outside [0, 1]"),
            ));
        }
        self.min_keep = fraction;
        Ok(self)
    }

    /// A batch the graph runs on before scoring, so that criteria see each producer's output
    /// ([`LayerParams::activation`]).
    pub fn with_sample(mut self, batch: Tensor) -> Self {
        self.sample = Some(batch);
        self
    }

    /// Removes this fraction of the channels of each group (or of all channels, globally).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] outside `[0, 1)`.
    pub fn with_ratio(mut self, ratio: f32) -> Result<Self> {
        check_ratio(ratio, "structured pruning")?;
        self.ratio = ratio;
        Ok(self)
    }

    /// A ratio for the group produced by layer `name` (per-group scope).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] outside `[0, 1)`.
    pub fn with_layer_ratio(mut self, name: &str, ratio: f32) -> Result<Self> {
        check_ratio(ratio, &format!("layer `{name}`"))?;
        self.layer_ratios.push((name.to_string(), ratio));
        Ok(self)
    }

    /// Rounds each group's kept channel count up to a multiple of `m` (8 or 16 keep the int8
    /// kernels' tiles full).
    pub fn round_to(mut self, m: usize) -> Self {
        self.round_to = m.max(1);
        self
    }

    /// Sets the scope.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The criterion's score of each channel of `group` (summed over its producers).
    ///
    /// # Errors
    /// The criterion's errors; [`Error::ShapeMismatch`] / [`Error::NonFinite`] for scores of
    /// the wrong length or NaN.
    pub fn group_scores(
        &self,
        graph: &Graph,
        group: &ChannelGroup,
        gradients: Option<&Gradients>,
    ) -> Result<Vec<f32>> {
        let activations = self.activations(graph)?;
        self.scores_with(graph, group, gradients, &activations)
    }

    /// Every producer's output on the sample batch (empty without one).
    fn activations(&self, graph: &Graph) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        if let Some(x) = &self.sample {
            graph.forward_with(x, &mut |_, node, v| {
                if matches!(node.op, Op::Conv2d(_) | Op::Linear(_)) {
                    out.insert(node.name.clone(), v.clone());
                }
            })?;
        }
        Ok(out)
    }

    fn scores_with(
        &self,
        graph: &Graph,
        group: &ChannelGroup,
        gradients: Option<&Gradients>,
        activations: &HashMap<String, Tensor>,
    ) -> Result<Vec<f32>> {
        let mut total = vec![0.0f32; group.channels];
        for p in group.producers() {
            let id = graph.id(p)?;
            let weight = match &graph.node(id).op {
                Op::Conv2d(c) => c.weight.view().into_dyn(),
                Op::Linear(l) => l.weight.view().into_dyn(),
                op => {
                    return Err(Error::Unsupported(format!(
                        "`{p}` ({}) is not a Conv2d or Linear",
                        op.kind()
                    )))
                }
            };
            let bn_gamma = match graph.consumers(id).as_slice() {
                [c] => match &graph.node(*c).op {
                    Op::BatchNorm2d(bn) => Some(bn.gamma.view()),
                    _ => None,
                },
                _ => None,
            };
            let grad_name = format!("{p}.weight");
            let layer = LayerParams {
                name: p,
                weight,
                bn_gamma,
                weight_grad: gradients.and_then(|g| g.get(&grad_name)).map(|g| g.view()),
                activation: activations.get(p).map(|a| a.view()),
            };
            for (t, s) in total
                .iter_mut()
                .zip(checked_scores(self.criterion.as_ref(), &layer)?)
            {
                *t += s;
            }
        }
        Ok(total)
    }

    /// The fewest channels a group of `channels` may keep.
    fn floor(&self, channels: usize) -> usize {
        ((self.min_keep * channels as f32).ceil() as usize).clamp(1, channels)
    }

    fn kept_count(&self, channels: usize, remove: usize) -> usize {
        let kept = channels.saturating_sub(remove).max(self.floor(channels));
        (kept.div_ceil(self.round_to) * self.round_to).min(channels)
    }

    /// Which channels each prunable group loses.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a layer ratio naming no group's producer, and the
    /// criterion's errors.
    pub fn plan(
        &self,
        graph: &Graph,
        deps: &DependencyGraph,
        gradients: Option<&Gradients>,
    ) -> Result<Removals> {
        for (name, _) in &self.layer_ratios {
            deps.group_of(name)?;
        }
        let activations = self.activations(graph)?;
        let mut scored: Vec<(usize, Vec<f32>)> = Vec::new();
        for g in deps.prunable() {
            scored.push((g.id, self.scores_with(graph, g, gradients, &activations)?));
        }
        let mut removals = Removals::new();
        match self.scope {
            Scope::PerGroup => {
                for (id, scores) in &scored {
                    let g = &deps.groups[*id];
                    let ratio = self
                        .layer_ratios
                        .iter()
                        .rev()
                        .find(|(n, _)| g.producers().any(|p| p == n))
                        .map_or(self.ratio, |(_, r)| *r);
                    let remove = (ratio * g.channels as f32).floor() as usize;
                    let keep = self.kept_count(g.channels, remove);
                    removals.insert(*id, lowest(scores, g.channels - keep));
                }
            }
            Scope::Global => {
                let mut all: Vec<(f32, usize, usize)> = scored
                    .iter()
                    .flat_map(|(id, s)| s.iter().enumerate().map(move |(c, &v)| (v, *id, c)))
                    .collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
                let target = (self.ratio * all.len() as f32).floor() as usize;
                let mut removed: BTreeMap<usize, usize> = BTreeMap::new();
                let mut total = 0;
                for (_, id, _) in &all {
                    if total == target {
                        break;
                    }
                    let c = deps.groups[*id].channels;
                    let r = removed.entry(*id).or_default();
                    if c - *r > self.floor(c) {
                        *r += 1;
                        total += 1;
                    }
                }
                for (id, scores) in &scored {
                    let g = &deps.groups[*id];
                    let keep = self.kept_count(g.channels, removed.get(id).copied().unwrap_or(0));
                    removals.insert(*id, lowest(scores, g.channels - keep));
                }
            }
        }
        Ok(removals)
    }

    /// Plans and removes channels; `gradients` feed gradient-based criteria.
    ///
    /// # Errors
    /// As [`StructuredPruner::plan`] and [`prune_channels`].
    pub fn prune(
        &self,
        graph: &Graph,
        gradients: Option<&Gradients>,
    ) -> Result<(Graph, PruneReport)> {
        let deps = dependency_groups(graph)?;
        let removals = self.plan(graph, &deps, gradients)?;
        let pruned = prune_channels(graph, &deps, &removals)?;
        let report = report(graph, &pruned, &deps, &removals);
        Ok((pruned, report))
    }
}

/// The `k` lowest-scored channels (ties: lower index first), sorted.
fn lowest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut out: Vec<usize> = order.into_iter().take(k).collect();
    out.sort_unstable();
    out
}

/// The report of a pruning from `before` to `after`.
pub fn report(
    before: &Graph,
    after: &Graph,
    deps: &DependencyGraph,
    removals: &Removals,
) -> PruneReport {
    PruneReport {
        groups: deps
            .prunable()
            .map(|g| GroupChange {
                name: g.name().to_string(),
                before: g.channels,
                after: g.channels - removals.get(&g.id).map_or(0, Vec::len),
            })
            .collect(),
        params: (before.param_count() as u64, after.param_count() as u64),
        macs: (macs(before), macs(after)),
        blocked: deps
            .groups
            .iter()
            .filter(|g| g.producers().next().is_some())
            .filter_map(|g| {
                g.blocked
                    .as_ref()
                    .map(|b| (g.name().to_string(), b.clone()))
            })
            .collect(),
    }
}

/// The network-slimming penalty (Liu et al. 2017) for [`crate::train::Trainer::with_penalty`]:
/// `λ·Σ|γ|` over every BatchNorm's γ, adding `λ·sign(γ)` to their gradients, so that
/// training drives unimportant channels' scales to zero; then prune with [`BnScale`] and a
/// global threshold ([`Scope::Global`]) and fine-tune.
///
/// [`BnScale`]: super::BnScale
///
/// # Errors
/// [`Error::InvalidConfig`] for a negative or non-finite `λ`.
pub fn slimming_penalty(lambda: f32) -> Result<impl FnMut(&Graph, &mut Gradients) -> Result<f32>> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(Error::config(
            "network slimming",
            format!("L1 strength {lambda} must be finite and ≥ 0"),
        ));
    }
    Ok(move |graph: &Graph, grads: &mut Gradients| {
        let mut value = 0.0f64;
        for node in graph.nodes() {
            if let Op::BatchNorm2d(bn) = &node.op {
                value += bn.gamma.iter().map(|g| g.abs() as f64).sum::<f64>();
                let g = bn.gamma.mapv(|v| lambda * v.signum()).into_dyn();
                grads.accumulate(&format!("{}.weight", node.name), g)?;
            }
        }
        Ok(lambda * value as f32)
    })
}
