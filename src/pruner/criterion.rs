//! Pruning criteria: how important each output channel (structured) or each weight
//! (unstructured) of a layer is.

use crate::error::{Error, Result};
use ndarray::{ArrayD, ArrayView1, ArrayViewD, Axis};

/// What a criterion sees of one Conv2d or Linear layer.
#[derive(Clone, Debug)]
pub struct LayerParams<'a> {
    /// Layer name.
    pub name: &'a str,
    /// Weight `[out, ...]`.
    pub weight: ArrayViewD<'a, f32>,
    /// γ of the BatchNorm right after the layer, if there is one.
    pub bn_gamma: Option<ArrayView1<'a, f32>>,
    /// Gradient of the loss with respect to the weight (summed over some batches), when the
    /// caller computed one (see [`super::accumulate_gradients`]).
    pub weight_grad: Option<ArrayViewD<'a, f32>>,
    /// The layer's output `[N, out, ...]` on a sample batch, when the pruner was given one
    /// ([`super::StructuredPruner::with_sample`]).
    pub activation: Option<ArrayViewD<'a, f32>>,
}

impl LayerParams<'_> {
    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.shape().first().copied().unwrap_or(0)
    }
}

/// Scores the parts of a layer: higher means more important, the lowest go first.
///
/// # Examples
/// A user criterion: a channel's largest absolute weight.
/// ```
/// use nncompress::pruner::{LayerParams, PruningCriterion, StructuredPruner};
/// use nncompress::Result;
/// struct MaxAbs;
/// impl PruningCriterion for MaxAbs {
///     fn name(&self) -> &str { "max |w|" }
///     fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
///         Ok(layer.weight.outer_iter()
///             .map(|c| c.iter().fold(0.0f32, |m, v| m.max(v.abs())))
///             .collect())
///     }
/// }
/// let net = nncompress::model::zoo::digits_cnn(1)?;
/// let (smaller, _) = StructuredPruner::new(MaxAbs).with_ratio(0.25)?.prune(&net, None)?;
/// assert!(smaller.param_count() < net.param_count());
/// # Ok::<(), nncompress::Error>(())
/// ```
pub trait PruningCriterion {
    /// A short name for reports.
    fn name(&self) -> &str;

    /// One score per output channel.
    ///
    /// # Errors
    /// When the criterion lacks what it needs (e.g. gradients, a BatchNorm).
    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>>;

    /// One score per weight, in the weight's shape (unstructured pruning). By default
    /// unsupported.
    ///
    /// # Errors
    /// [`Error::Unsupported`] unless the criterion scores single weights.
    fn weight_scores(&self, layer: &LayerParams) -> Result<ArrayD<f32>> {
        Err(Error::Unsupported(format!(
            "criterion `{}` scores channels, not single weights (layer `{}`)",
            self.name(),
            layer.name
        )))
    }
}

fn per_channel(layer: &LayerParams, f: impl Fn(ArrayViewD<f32>) -> f32) -> Vec<f32> {
    layer.weight.axis_iter(Axis(0)).map(f).collect()
}

/// L1 norm of each output channel's weights (Li et al. 2017).
#[derive(Clone, Copy, Debug, Default)]
pub struct L1Norm;

impl PruningCriterion for L1Norm {
    fn name(&self) -> &str {
        "L1"
    }
    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
        Ok(per_channel(layer, |c| c.iter().map(|v| v.abs()).sum()))
    }
}

/// L2 norm of each output channel's weights.
#[derive(Clone, Copy, Debug, Default)]
pub struct L2Norm;

impl PruningCriterion for L2Norm {
    fn name(&self) -> &str {
        "L2"
    }
    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
        Ok(per_channel(layer, |c| {
            c.iter().map(|v| v * v).sum::<f32>().sqrt()
        }))
    }
}

/// FPGM (He et al. 2019): a filter close to the geometric median of the layer's filters is
/// replaceable by the others; its score is its summed Euclidean distance to all filters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fpgm;

impl PruningCriterion for Fpgm {
    fn name(&self) -> &str {
        "FPGM"
    }
    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
        let filters: Vec<Vec<f32>> = layer
            .weight
            .axis_iter(Axis(0))
            .map(|c| c.iter().copied().collect())
            .collect();
        Ok(filters
            .iter()
            .map(|a| {
                filters
                    .iter()
                    .map(|b| {
                        a.iter()
                            .zip(b)
                            .map(|(x, y)| ((x - y) as f64).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .sum::<f64>() as f32
            })
            .collect())
    }
}

/// |γ| of the BatchNorm after the layer (network slimming, Liu et al. 2017).
#[derive(Clone, Copy, Debug, Default)]
pub struct BnScale;

impl PruningCriterion for BnScale {
    fn name(&self) -> &str {
        "BN |γ|"
    }
    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
        let g = layer.bn_gamma.ok_or_else(|| {
            Error::Unsupported(format!(
                "the BN-scale criterion needs a BatchNorm after `{}`",
                layer.name
            ))
        })?;
        Ok(g.iter().map(|v| v.abs()).collect())
    }
}

/// |w| of each weight (unstructured); per channel, the L1 norm.
#[derive(Clone, Copy, Debug, Default)]
pub struct Magnitude;

impl PruningCriterion for Magnitude {
    fn name(&self) -> &str {
        "magnitude"
    }
    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
        L1Norm.channel_scores(layer)
    }
    fn weight_scores(&self, layer: &LayerParams) -> Result<ArrayD<f32>> {
        Ok(layer.weight.mapv(f32::abs))
    }
}

/// First-order Taylor expansion of the loss (Molchanov et al. 2019): the loss change from
/// removing a weight is ≈ `|g·w|`; a channel's score is `(Σ g·w)²` over its weights.
#[derive(Clone, Copy, Debug, Default)]
pub struct Taylor;

impl Taylor {
    fn grad<'a>(layer: &'a LayerParams) -> Result<&'a ArrayViewD<'a, f32>> {
        let g = layer.weight_grad.as_ref().ok_or_else(|| {
            Error::Unsupported(format!(
                "the Taylor criterion needs the weight gradient of `{}` (accumulate_gradients)",
                layer.name
            ))
        })?;
        if g.shape() != layer.weight.shape() {
            return Err(Error::shape(
                "taylor criterion",
                Some(layer.name),
                format!("{:?}", layer.weight.shape()),
                g.shape(),
            ));
        }
        Ok(g)
    }
}

impl PruningCriterion for Taylor {
    fn name(&self) -> &str {
        "Taylor"
    }
    fn channel_scores(&self, layer: &LayerParams) -> Result<Vec<f32>> {
        let g = Self::grad(layer)?;
        Ok(layer
            .weight
            .axis_iter(Axis(0))
            .zip(g.axis_iter(Axis(0)))
            .map(|(w, g)| {
                let s: f64 = w.iter().zip(g.iter()).map(|(a, b)| (a * b) as f64).sum();
                (s * s) as f32
            })
            .collect())
    }
    fn weight_scores(&self, layer: &LayerParams) -> Result<ArrayD<f32>> {
        let g = Self::grad(layer)?;
        Ok((&layer.weight * g).mapv(f32::abs))
    }
}

/// Checks a criterion's channel scores: one finite value per channel.
pub(crate) fn checked_scores(
    criterion: &dyn PruningCriterion,
    layer: &LayerParams,
) -> Result<Vec<f32>> {
    let s = criterion.channel_scores(layer)?;
    if s.len() != layer.out_channels() {
        return Err(Error::shape(
            "pruning criterion",
            Some(layer.name),
            format!(
                "{} scores (one per output channel) from `{}`",
                layer.out_channels(),
                criterion.name()
            ),
            &[s.len()],
        ));
    }
    if s.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "scores of `{}` from criterion `{}`",
            layer.name,
            criterion.name()
        )));
    }
    Ok(s)
}
