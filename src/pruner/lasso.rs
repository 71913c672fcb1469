//! Channel pruning by LASSO channel selection and least-squares reconstruction (He, Zhang and
//! Sun 2017).
//!
//! For a channel group read by one Conv2d or Linear (the consumer): sample the consumer's
//! input patches on data, write its output as the sum of each input channel's contribution
//! `Z_c`, pick the channels by LASSO on the contributions (`min ½‖Y − Σ β_c Z_c‖² + λ‖β‖₁`,
//! λ searched until the wanted number of channels is left), then refit the consumer's weights
//! on the kept channels by least squares against the original model's output.

use super::deps::{dependency_groups, ChannelGroup, Member};
use super::structured::{prune_channels, Removals};
use crate::error::{Error, Result};
use crate::model::{Graph, Op};
use crate::tensor::{im2col, Tensor};
use ndarray::{s, Array1, Array2, ArrayView2, Axis, Ix4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The channel-selection and reconstruction pruner.
#[derive(Clone, Debug)]
pub struct LassoPruner {
    ratio: f32,
    samples_per_image: usize,
    seed: u64,
    round_to: usize,
}

/// What pruning one group did.
#[derive(Clone, Debug, PartialEq)]
pub struct LassoReport {
    /// The group's producer.
    pub group: String,
    /// The consumer whose weights were refit.
    pub consumer: String,
    /// Channels before and after.
    pub channels: (usize, usize),
    /// Relative error `‖Y − Ŷ‖² / ‖Y‖²` of the consumer's output on the samples: with the
    /// LASSO-selected channels and the original weights, and after least squares.
    pub error: (f64, f64),
}

impl LassoPruner {
    /// Removes `ratio` of each group's channels (`0 ≤ ratio < 1`), sampling 10 output
    /// positions per image.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a ratio outside `[0, 1)`.
    pub fn new(ratio: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&ratio) {
            return Err(Error::config(
                "LASSO channel pruning",
                format!("pruning ratio {ratio} is outside [0, 1)"),
            ));
        }
        Ok(LassoPruner {
            ratio,
            samples_per_image: 10,
            seed: 0,
            round_to: 1,
        })
    }

    /// Output positions sampled per image (convolutional consumers).
    pub fn samples_per_image(mut self, n: usize) -> Self {
        self.samples_per_image = n.max(1);
        self
    }

    /// Seed of the position sampling.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Rounds kept channel counts up to a multiple of `m`.
    pub fn round_to(mut self, m: usize) -> Self {
        self.round_to = m.max(1);
        self
    }

    /// The number of channels a group of `channels` keeps.
    pub fn kept(&self, channels: usize) -> usize {
        let remove = (self.ratio * channels as f32).floor() as usize;
        let kept = channels.saturating_sub(remove).max(1);
        (kept.div_ceil(self.round_to) * self.round_to).min(channels)
    }

    /// Prunes the group produced by `producer` in `current` (a model being pruned layer by
    /// layer) with targets from `original` (the unpruned model, same node names): LASSO
    /// selection, then least-squares refit of the consumer. With `reconstruct` false, only
    /// the selection is done (the ablation).
    ///
    /// # Errors
    /// [`Error::Empty`] without batches; [`Error::UnknownNode`] for a producer that starts no
    /// group; [`Error::Unsupported`] when the group is blocked or is not read by exactly one
    /// Conv2d (one group) or Linear with one feature per channel.
    pub fn prune_group(
        &self,
        original: &Graph,
        current: &Graph,
        producer: &str,
        batches: &[Tensor],
        reconstruct: bool,
    ) -> Result<(Graph, LassoReport)> {
        if batches.is_empty() {
            return Err(Error::Empty("LASSO calibration batches".into()));
        }
        let deps = dependency_groups(current)?;
        let group = deps.group_of(producer)?;
        let consumer = single_consumer(group)?;
        let keep = self.kept(group.channels);
        let (x_cur, x_orig) = (
            consumer_inputs(current, &consumer, batches)?,
            consumer_inputs(original, &consumer, batches)?,
        );
        let w_cur = weight_2d(current, &consumer)?;
        let w_orig = weight_2d(original, &consumer)?;
        let k = w_cur.ncols() / group.channels;
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut cols_cur = Vec::new();
        let mut cols_orig = Vec::new();
        for (a, b) in x_cur.iter().zip(&x_orig) {
            let picks = self.positions(current, &consumer, a, &mut rng)?;
            cols_cur.push(patches(current, &consumer, a)?.select(Axis(1), &picks));
            cols_orig.push(patches(original, &consumer, b)?.select(Axis(1), &picks));
        }
        // The current model's input patches `[c·k, samples]` at the sampled positions.
        let cur = concat_cols(&cols_cur)?;
        let target = w_orig.dot(&concat_cols(&cols_orig)?); // [out, samples]
        let kept = select_channels(&cur, &w_cur, &target, group.channels, k, keep);
        let removed: Vec<usize> = (0..group.channels).filter(|c| !kept.contains(c)).collect();
        let rows: Vec<usize> = kept.iter().flat_map(|&c| c * k..(c + 1) * k).collect();
        let x_kept = cur.select(Axis(0), &rows); // [kept·k, samples]
        let w_sel = w_cur.select(Axis(1), &rows);
        let err_sel = rel_error(&target, &w_sel.dot(&x_kept));
        let w_new = if reconstruct {
            least_squares(&x_kept, &target)?
        } else {
            w_sel
        };
        let err_ls = rel_error(&target, &w_new.dot(&x_kept));
        let mut removals = Removals::new();
        removals.insert(group.id, removed);
        let mut pruned = prune_channels(current, &deps, &removals)?;
        set_weight_2d(&mut pruned, &consumer, &w_new)?;
        Ok((
            pruned,
            LassoReport {
                group: producer.to_string(),
                consumer,
                channels: (group.channels, keep),
                error: (err_sel, err_ls),
            },
        ))
    }

    /// Prunes every prunable group read by a single Conv2d / Linear consumer, one after the
    /// other in graph order, each against the original model; `progress(done, total, report)`
    /// after each.
    ///
    /// # Errors
    /// As [`LassoPruner::prune_group`].
    pub fn prune_model(
        &self,
        graph: &Graph,
        batches: &[Tensor],
        mut progress: impl FnMut(usize, usize, &LassoReport),
    ) -> Result<(Graph, Vec<LassoReport>)> {
        if batches.is_empty() {
            return Err(Error::Empty("LASSO channel selection batches".into()));
        }
        let deps = dependency_groups(graph)?;
        let producers: Vec<String> = deps
            .prunable()
            .filter(|g| single_consumer(g).is_ok())
            .map(|g| g.name().to_string())
            .collect();
        let mut current = graph.clone();
        let mut reports = Vec::new();
        for (i, p) in producers.iter().enumerate() {
            let (next, r) = self.prune_group(graph, &current, p, batches, true)?;
            progress(i + 1, producers.len(), &r);
            reports.push(r);
            current = next;
        }
        Ok((current, reports))
    }

    /// Sampled column indices of one batch's patches.
    fn positions(
        &self,
        g: &Graph,
        consumer: &str,
        x: &Tensor,
        rng: &mut StdRng,
    ) -> Result<Vec<usize>> {
        let n = x.shape()[0];
        let per_image = match &g.node(g.id(consumer)?).op {
            Op::Conv2d(c) => {
                let [oh, ow] = c.geometry(x.shape()[2], x.shape()[3]).output_hw()?;
                oh * ow
            }
            _ => 1,
        };
        let take = self.samples_per_image.min(per_image);
        Ok((0..n)
            .flat_map(|b| {
                let mut all: Vec<usize> = (0..per_image).collect();
                for i in 0..take {
                    let j = rng.random_range(i..per_image);
                    all.swap(i, j);
                }
                all.truncate(take);
                all.into_iter().map(move |p| b * per_image + p)
            })
            .collect())
    }
}

/// The one Conv2d / Linear that reads the group, if that is the only reader.
fn single_consumer(group: &ChannelGroup) -> Result<String> {
    let readers: Vec<&Member> = group
        .members
        .iter()
        .filter(|m| matches!(m, Member::Consumer { .. } | Member::Depthwise { .. }))
        .collect();
    match readers.as_slice() {
        [Member::Consumer {
            node,
            offset: 0,
            repeat: 1,
        }] => Ok(node.clone()),
        _ => Err(Error::Unsupported(format!(
            "LASSO pruning of group `{}` needs exactly one Conv2d or Linear reading its channels \
             directly (it has {} readers)",
            group.name(),
            readers.len()
        ))),
    }
}

/// The consumer's input on each batch.
fn consumer_inputs(g: &Graph, consumer: &str, batches: &[Tensor]) -> Result<Vec<Tensor>> {
    let id = g.id(consumer)?;
    let src = g.node(id).inputs[0];
    batches
        .iter()
        .map(|b| {
            let mut out = None;
            g.forward_with(b, &mut |nid, _, v| {
                if nid == src {
                    out = Some(v.clone());
                }
            })?;
            out.ok_or_else(|| Error::Unsupported(format!("no input reached `{consumer}`")))
        })
        .collect()
}

/// The consumer's weight as `[out, c·k]` (Linear: `[out, in]`).
fn weight_2d(g: &Graph, consumer: &str) -> Result<Array2<f32>> {
    match &g.node(g.id(consumer)?).op {
        Op::Conv2d(c) if c.groups == 1 => {
            let out = c.out_channels();
            let rest = c.weight.len() / out.max(1);
            c.weight
                .as_standard_layout()
                .into_owned()
                .into_shape_with_order((out, rest))
                .map_err(|e| Error::Unsupported(e.to_string()))
        }
        Op::Linear(l) => Ok(l.weight.clone()),
        op => Err(Error::Unsupported(format!(
            "LASSO pruning refits a Conv2d (one group) or Linear, not `{consumer}` ({})",
            op.kind()
        ))),
    }
}

fn set_weight_2d(g: &mut Graph, consumer: &str, w: &Array2<f32>) -> Result<()> {
    let mut done = false;
    for (kind, mut p) in g.params_of_mut(consumer)? {
        if kind == crate::model::ParamKind::Weight {
            let shape = p.shape().to_vec();
            let v = w
                .clone()
                .into_shape_with_order(ndarray::IxDyn(&shape))
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            p.assign(&v);
            done = true;
        }
    }
    if done {
        Ok(())
    } else {
        Err(Error::MissingTensor(format!("{consumer}.weight")))
    }
}

/// The consumer's im2col patches `[c·k, n·oh·ow]` (Linear: the input transposed).
fn patches(g: &Graph, consumer: &str, x: &Tensor) -> Result<Array2<f32>> {
    match &g.node(g.id(consumer)?).op {
        Op::Conv2d(c) => {
            let x4 = x
                .view()
                .into_dimensionality::<Ix4>()
                .map_err(|_| Error::shape("lasso", Some(consumer), "[N, C, H, W]", x.shape()))?;
            im2col(x4, &c.geometry(x.shape()[2], x.shape()[3]), 0)
        }
        _ => {
            let x2 = x
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|_| Error::shape("lasso", Some(consumer), "[N, F]", x.shape()))?;
            Ok(x2.t().to_owned())
        }
    }
}

fn concat_cols(parts: &[Array2<f32>]) -> Result<Array2<f32>> {
    let views: Vec<ArrayView2<f32>> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(1), &views).map_err(|e| Error::Unsupported(e.to_string()))
}

fn rel_error(target: &Array2<f32>, approx: &Array2<f32>) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in target.iter().zip(approx.iter()) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    num / den.max(f64::MIN_POSITIVE)
}

/// LASSO over the channels' contributions: returns the `keep` channels chosen, sorted.
fn select_channels(
    cur: &Array2<f32>,
    w: &Array2<f32>,
    target: &Array2<f32>,
    channels: usize,
    k: usize,
    keep: usize,
) -> Vec<usize> {
    // Gram matrix of the contributions Z_c = W_c · X_c (each [out, samples]) and their
    // products with the target, in f64.
    let z: Vec<Array2<f32>> = (0..channels)
        .map(|c| {
            w.slice(s![.., c * k..(c + 1) * k])
                .dot(&cur.slice(s![c * k..(c + 1) * k, ..]))
        })
        .collect();
    let dot = |a: &Array2<f32>, b: &Array2<f32>| -> f64 {
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum()
    };
    let mut gram = Array2::<f64>::zeros((channels, channels));
    let mut b = Array1::<f64>::zeros(channels);
    for c in 0..channels {
        b[c] = dot(&z[c], target);
        for d in c..channels {
            let v = dot(&z[c], &z[d]);
            gram[[c, d]] = v;
            gram[[d, c]] = v;
        }
    }
    let lasso = |lambda: f64, beta: &mut Array1<f64>| {
        for _ in 0..200 {
            let mut change = 0.0f64;
            for c in 0..channels {
                if gram[[c, c]] <= 0.0 {
                    beta[c] = 0.0;
                    continue;
                }
                let r = b[c] - gram.row(c).dot(beta) + gram[[c, c]] * beta[c];
                let v = r.signum() * (r.abs() - lambda).max(0.0) / gram[[c, c]];
                change = change.max((v - beta[c]).abs());
                beta[c] = v;
            }
            if change < 1e-9 {
                break;
            }
        }
    };
    let count = |beta: &Array1<f64>| beta.iter().filter(|v| v.abs() > 1e-12).count();
    // Bisect λ (log scale) for the smallest λ that leaves at most `keep` channels; rank the
    // channels by |β| at the densest solution above that count to fill up to `keep`.
    let lambda_max = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let (mut lo, mut hi) = (lambda_max * 1e-8, lambda_max);
    let mut sparse = Array1::<f64>::zeros(channels);
    let mut dense = Array1::<f64>::ones(channels);
    lasso(0.0, &mut dense);
    for _ in 0..40 {
        let mid = (lo * hi).sqrt();
        let mut beta = dense.clone();
        lasso(mid, &mut beta);
        if count(&beta) > keep {
            lo = mid;
            dense = beta;
        } else {
            hi = mid;
            sparse = beta;
        }
    }
    let mut order: Vec<usize> = (0..channels).collect();
    order.sort_by(|&a, &c| {
        let key = |i: usize| (sparse[i].abs() > 1e-12, dense[i].abs());
        key(c)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&c))
    });
    let mut kept: Vec<usize> = order.into_iter().take(keep).collect();
    kept.sort_unstable();
    kept
}

/// `argmin_W ‖target − W·x‖²` by the normal equations (Cholesky, a small ridge for
/// conditioning): `x` `[m, samples]`, `target` `[out, samples]`, result `[out, m]`.
fn least_squares(x: &Array2<f32>, target: &Array2<f32>) -> Result<Array2<f32>> {
    let m = x.nrows();
    let xd = x.mapv(f64::from);
    let td = target.mapv(f64::from);
    let mut a = xd.dot(&xd.t());
    let rhs = td.dot(&xd.t()); // [out, m]
    let trace = (0..m).map(|i| a[[i, i]]).sum::<f64>() / m.max(1) as f64;
    for i in 0..m {
        a[[i, i]] += 1e-6 * trace.max(1e-12);
    }
    // Cholesky: a = L·Lᵀ.
    let mut l = Array2::<f64>::zeros((m, m));
    for i in 0..m {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| l[[i, k]] * l[[j, k]]).sum();
            if i == j {
                let d = a[[i, i]] - sum;
                if d <= 0.0 || !d.is_finite() {
                    return Err(Error::NonFinite(
                        "least-squares reconstruction (singular patch matrix)".into(),
                    ));
                }
                l[[i, i]] = d.sqrt();
            } else {
                l[[i, j]] = (a[[i, j]] - sum) / l[[j, j]];
            }
        }
    }
    // Solve W·a = rhs row by row: a·wᵀ = rhsᵀ.
    let mut w = Array2::<f32>::zeros((target.nrows(), m));
    for (o, r) in rhs.outer_iter().enumerate() {
        let mut y = vec![0.0f64; m];
        for i in 0..m {
            let s: f64 = (0..i).map(|k| l[[i, k]] * y[k]).sum();
            y[i] = (r[i] - s) / l[[i, i]];
        }
        let mut v = vec![0.0f64; m];
        for i in (0..m).rev() {
            let s: f64 = (i + 1..m).map(|k| l[[k, i]] * v[k]).sum();
            v[i] = (y[i] - s) / l[[i, i]];
        }
        for i in 0..m {
            w[[o, i]] = v[i] as f32;
        }
    }
    Ok(w)
}
