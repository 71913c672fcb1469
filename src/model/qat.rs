//! Fake-quantization ops for quantization-aware training, with their forward and backward
//! passes.
//!
//! The quantizer decides where these go (`quantizer::prepare_qat`) and turns a trained graph
//! into an integer model (`quantizer::convert`); the graph only needs to run them. Rounding is
//! [`QuantGrid`]'s, the same code the quantizer's real quantization uses, so a fake-quantized
//! value equals quantize → dequantize bit for bit.

use super::layers::{self, LayerGrads};
use super::op::{BatchNorm2d, Conv2d, Linear, ParamKind};
use crate::error::{Error, Result};
use crate::tensor::{parallel, QuantGrid, Tensor};
use ndarray::{Array1, Array2, Array4, ArrayD, ArrayView2, ArrayView4, ArrayViewD, Axis, Zip};

/// Fake quantization of an activation (per tensor), placed on a node's output.
///
/// The range is a moving average of each training batch's min and max (the "static"
/// strategy: `r ← r + c·(batch − r)`, the first batch taken as is); after
/// `freeze_after` training steps it stops moving. With a learned scale (LSQ, Esser et al.
/// 2020) the scale is a trainable parameter initialised from the first batch's range, which
/// then stays fixed and places the zero point.
///
/// A range of `[0, 0]` means "no data seen yet". The range and a learned scale are parameters
/// (they save and load with the graph); the step counter is not.
#[derive(Clone, Debug, PartialEq)]
pub struct FakeQuant {
    /// The integer grid.
    pub grid: QuantGrid,
    /// Running `[min, max]` (a buffer).
    pub range: Array1<f32>,
    /// Weight `c` of a new batch in the moving average.
    pub averaging_constant: f32,
    /// The learned scale (LSQ), one value; `None` for scales from the range.
    pub learned_scale: Option<Array1<f32>>,
    /// Training steps seen (training-mode forward passes).
    pub steps: u64,
    /// Stop updating the range after this many steps.
    pub freeze_after: Option<u64>,
}

impl FakeQuant {
    /// A moving-average fake quantizer on `grid` with averaging constant `c` (PyTorch uses
    /// 0.01), range `[0, 0]` until the first training batch.
    pub fn new(grid: QuantGrid, averaging_constant: f32) -> Self {
        FakeQuant {
            grid,
            range: Array1::zeros(2),
            averaging_constant,
            learned_scale: None,
            steps: 0,
            freeze_after: None,
        }
    }

    /// The same quantizer with a learned scale (LSQ).
    pub fn with_learned_scale(mut self) -> Self {
        self.learned_scale = Some(Array1::ones(1));
        self
    }

    /// The (scale, zero point) in use now.
    pub fn qparams(&self) -> (f32, i32) {
        let (scale, zero) = self.grid.params(self.range[0], self.range[1]);
        match &self.learned_scale {
            Some(s) => (s[0].abs().max(f32::MIN_POSITIVE), zero),
            None => (scale, zero),
        }
    }

    /// Whether the quantizer has seen data (its range is not `[0, 0]`).
    pub fn observed(&self) -> bool {
        self.range[0] != 0.0 || self.range[1] != 0.0
    }

    /// Whether the range has stopped moving.
    pub fn frozen(&self) -> bool {
        self.freeze_after.is_some_and(|n| self.steps >= n)
    }

    /// One training step: updates the range (unless frozen; with a learned scale, only the
    /// first batch sets it, and the scale with it) and counts the step.
    fn observe(&mut self, x: &Tensor) -> Result<()> {
        let first = !self.observed();
        if first || (!self.frozen() && self.learned_scale.is_none()) {
            let (lo, hi) = min_max(x.iter().copied())
                .ok_or_else(|| Error::NonFinite("fake-quantized activation".into()))?;
            if first {
                self.range[0] = lo;
                self.range[1] = hi;
                if let Some(s) = &mut self.learned_scale {
                    s[0] = self.grid.params(lo, hi).0;
                }
            } else {
                let c = self.averaging_constant;
                self.range[0] += c * (lo - self.range[0]);
                self.range[1] += c * (hi - self.range[1]);
            }
        }
        self.steps += 1;
        Ok(())
    }
}

/// `(min, max)` of finite values, `None` for a NaN / infinity or no values.
fn min_max(values: impl Iterator<Item = f32>) -> Option<(f32, f32)> {
    let mut acc: Option<(f32, f32)> = None;
    for v in values {
        if !v.is_finite() {
            return None;
        }
        acc = Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))));
    }
    acc
}

/// Fake quantization of a layer's weights: per output channel (axis 0) or per tensor, the
/// scale taken from the current weights at every step (the "dynamic" strategy), or learned
/// (LSQ, symmetric grids only).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightFakeQuant {
    /// The integer grid.
    pub grid: QuantGrid,
    /// One scale per output channel instead of one per tensor.
    pub per_channel: bool,
    /// Learned scales (LSQ), one per output channel (or one); `None` for scales from the
    /// weights' range.
    pub learned_scale: Option<Array1<f32>>,
}

impl WeightFakeQuant {
    /// Scales from the weights' own range.
    pub fn new(grid: QuantGrid, per_channel: bool) -> Self {
        WeightFakeQuant {
            grid,
            per_channel,
            learned_scale: None,
        }
    }

    /// Learned scales initialised from the range of `weight` (`[out, ...]`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an affine grid (learned weight scales keep the zero point
    /// at the middle of the grid), [`Error::NonFinite`] for NaN weights.
    pub fn with_learned_scale(mut self, weight: ArrayViewD<f32>) -> Result<Self> {
        if !self.grid.symmetric {
            return Err(Error::config(
                "learned weight scales",
                "need a symmetric weight grid",
            ));
        }
        let params = self.range_params(weight)?;
        self.learned_scale = Some(params.iter().map(|p| p.0).collect());
        Ok(self)
    }

    fn range_params(&self, w: ArrayViewD<f32>) -> Result<Vec<(f32, i32)>> {
        let rows = if self.per_channel {
            w.shape()[0].max(1)
        } else {
            1
        };
        let w = w.as_standard_layout();
        let values = w.as_slice().unwrap_or_default();
        values
            .chunks((values.len() / rows).max(1))
            .map(|r| {
                let (lo, hi) = min_max(r.iter().copied())
                    .ok_or_else(|| Error::NonFinite("weights to fake-quantize".into()))?;
                Ok(self.grid.params(lo, hi))
            })
            .collect()
    }

    /// The (scale, zero point) of each channel (one pair per tensor when not per channel)
    /// for the weights `w` (`[out, ...]`, already BatchNorm-folded).
    ///
    /// # Errors
    /// [`Error::NonFinite`] for NaN or infinite weights, [`Error::ShapeMismatch`] when learned
    /// scales do not match the channels.
    pub fn qparams(&self, w: ArrayViewD<f32>) -> Result<Vec<(f32, i32)>> {
        match &self.learned_scale {
            None => self.range_params(w),
            Some(s) => {
                let channels = if self.per_channel { w.shape()[0] } else { 1 };
                if s.len() != channels {
                    return Err(Error::shape(
                        "weight fake quantization",
                        None,
                        format!("{channels} learned scales"),
                        &[s.len()],
                    ));
                }
                let z = self.grid.symmetric_zero();
                Ok(s.iter()
                    .map(|&v| (v.abs().max(f32::MIN_POSITIVE), z))
                    .collect())
            }
        }
    }
}

/// A Conv2d with fake-quantized weights and, optionally, the BatchNorm that follows it folded
/// in for training (Jacob et al. 2018, §3.2).
///
/// With BatchNorm, the weights that get fake-quantized are `W·γ/σ` per output channel and the
/// bias is `β + γ(b − μ)/σ`: during the first `freeze_bn_after` training steps `μ` and `σ` are
/// the batch's statistics (of the float convolution, computed by a first pass, gradients
/// flowing through them) and the running statistics are updated; afterwards, and at
/// inference, they are the frozen running statistics, which is exactly the folded layer the
/// integer model runs.
#[derive(Clone, Debug, PartialEq)]
pub struct QatConv2d {
    /// The float convolution (its parameters are what training updates).
    pub conv: Conv2d,
    /// The BatchNorm folded into it, if any.
    pub bn: Option<BatchNorm2d>,
    /// How the folded weights are fake-quantized.
    pub weight_quant: WeightFakeQuant,
    /// Training steps seen.
    pub steps: u64,
    /// Switch from batch to running statistics after this many steps (`None`: never).
    pub freeze_bn_after: Option<u64>,
}

/// A Linear layer with fake-quantized weights.
#[derive(Clone, Debug, PartialEq)]
pub struct QatLinear {
    /// The float layer.
    pub linear: Linear,
    /// How its weights are fake-quantized.
    pub weight_quant: WeightFakeQuant,
}

impl QatConv2d {
    /// Whether the folding uses the running statistics in training.
    pub fn bn_frozen(&self) -> bool {
        self.freeze_bn_after.is_some_and(|n| self.steps >= n)
    }

    /// Per-channel fold factors `γ/σ` and means from the running statistics (1 and 0 without
    /// BatchNorm).
    fn running_fold(&self) -> (Array1<f32>, Array1<f32>) {
        match &self.bn {
            Some(bn) => (
                Zip::from(&bn.gamma)
                    .and(&bn.running_var)
                    .map_collect(|&g, &v| g / (v + bn.eps).sqrt()),
                bn.running_mean.clone(),
            ),
            None => {
                let oc = self.conv.out_channels();
                (Array1::ones(oc), Array1::zeros(oc))
            }
        }
    }

    /// The weights and bias of the equivalent float convolution with the running statistics
    /// folded in (before fake quantization): what inference and conversion use.
    pub fn folded(&self) -> (Array4<f32>, Option<Array1<f32>>) {
        let (fold, mean) = self.running_fold();
        let weight = scale_rows4(&self.conv.weight, &fold);
        let bias = self.folded_bias(&fold, &mean);
        (weight, bias)
    }

    fn folded_bias(&self, fold: &Array1<f32>, mean: &Array1<f32>) -> Option<Array1<f32>> {
        match &self.bn {
            Some(bn) => {
                let oc = fold.len();
                Some(Array1::from_shape_fn(oc, |c| {
                    let b = self.conv.bias.as_ref().map_or(0.0, |b| b[c]);
                    bn.beta[c] + fold[c] * (b - mean[c])
                }))
            }
            None => self.conv.bias.clone(),
        }
    }

    fn with_weight(&self, weight: Array4<f32>, bias: Option<Array1<f32>>) -> Conv2d {
        Conv2d {
            weight,
            bias,
            ..self.conv.clone()
        }
    }
}

fn scale_rows4(w: &Array4<f32>, k: &Array1<f32>) -> Array4<f32> {
    let mut out = w.clone();
    for (mut row, &f) in out.outer_iter_mut().zip(k) {
        row.mapv_inplace(|v| v * f);
    }
    out
}

/// Fake-quantizes `w` (`[out, ...]`) row by row with `params` (one pair per row, or one).
fn fake_quantize_rows(grid: QuantGrid, w: ArrayViewD<f32>, params: &[(f32, i32)]) -> ArrayD<f32> {
    let mut out = w.as_standard_layout().into_owned();
    let rows = params.len();
    let inner = out.len() / rows.max(1);
    if let Some(s) = out.as_slice_mut() {
        for (r, chunk) in s.chunks_mut(inner.max(1)).enumerate() {
            let (scale, zero) = params[r.min(rows - 1)];
            for v in chunk {
                *v = grid.fake_quantize(*v, scale, zero);
            }
        }
    }
    out
}

/// Fake quantization of a whole tensor with one (scale, zero point).
pub(crate) fn fake_quantize_tensor(grid: QuantGrid, x: &Tensor, (s, z): (f32, i32)) -> Tensor {
    let mut y = x.to_owned();
    if parallel(y.len()) {
        y.par_mapv_inplace(|v| grid.fake_quantize(v, s, z));
    } else {
        y.mapv_inplace(|v| grid.fake_quantize(v, s, z));
    }
    y
}

/// Backward of fake quantization with (scale, zero point) per row of `x` (`[rows, inner]`
/// flattened): the straight-through estimator (gradient passed where `round(x/s) + z` lies in
/// the grid, zero where it was clamped) and the LSQ scale gradient per row,
/// `Σ g·(round(x/s) − x/s)` inside, `Σ g·(q_min − z)` / `Σ g·(q_max − z)` where clamped,
/// times `grad_scale`.
fn fake_quantize_backward_rows(
    grid: QuantGrid,
    x: ArrayViewD<f32>,
    g: &ArrayD<f32>,
    params: &[(f32, i32)],
    grad_scale: f32,
) -> (ArrayD<f32>, Array1<f32>) {
    let x = x.as_standard_layout();
    let mut dx = g.as_standard_layout().into_owned();
    let rows = params.len();
    let inner = (x.len() / rows.max(1)).max(1);
    let mut ds = Array1::<f32>::zeros(rows);
    if let (Some(xs), Some(ds_slice)) = (x.as_slice(), dx.as_slice_mut()) {
        for (r, (xc, gc)) in xs.chunks(inner).zip(ds_slice.chunks_mut(inner)).enumerate() {
            let (s, z) = params[r.min(rows - 1)];
            let mut acc = 0.0f64;
            for (&v, gv) in xc.iter().zip(gc.iter_mut()) {
                let rounded = QuantGrid::rounded(v, s);
                let q = rounded + z as f64;
                let d = if q < grid.qmin as f64 {
                    (grid.qmin - z) as f64
                } else if q > grid.qmax as f64 {
                    (grid.qmax - z) as f64
                } else {
                    acc += *gv as f64 * (rounded - f64::from(v / s));
                    continue;
                };
                acc += *gv as f64 * d;
                *gv = 0.0;
            }
            ds[r.min(rows - 1)] += acc as f32 * grad_scale;
        }
    }
    (dx, ds)
}

/// Gradients of an op's parameters, by kind.
pub(crate) type ParamGrads = Vec<(ParamKind, ArrayD<f32>)>;

/// Per-channel batch mean and biased variance.
type Moments = (Array1<f32>, Array1<f32>);

/// LSQ's gradient scale `1 / √(N·Q_P)` for a scale shared by `n` values (Esser et al. 2020).
fn lsq_grad_scale(grid: QuantGrid, zero: i32, n: usize) -> f32 {
    let qp = (grid.qmax - zero).max(1) as f32;
    1.0 / (n.max(1) as f32 * qp).sqrt()
}

/// What a fake-quant op kept for its backward pass: the (scale, zero point) it used.
#[derive(Clone, Debug)]
pub(crate) struct FakeQuantCache {
    params: (f32, i32),
}

/// Runs an activation fake quantizer; in training, first updates its range and step count.
pub(crate) fn fake_quant_forward(
    fq: &mut FakeQuant,
    x: &Tensor,
    training: bool,
) -> Result<(Tensor, FakeQuantCache)> {
    if training {
        fq.observe(x)?;
    }
    Ok(fake_quant_eval(fq, x))
}

/// Runs an activation fake quantizer without touching its state.
pub(crate) fn fake_quant_eval(fq: &FakeQuant, x: &Tensor) -> (Tensor, FakeQuantCache) {
    let params = fq.qparams();
    (
        fake_quantize_tensor(fq.grid, x, params),
        FakeQuantCache { params },
    )
}

/// Gradients of an activation fake quantizer: the input's (straight-through) and, with a
/// learned scale, the scale's.
pub(crate) fn fake_quant_backward(
    fq: &FakeQuant,
    x: &Tensor,
    cache: &FakeQuantCache,
    gy: &Tensor,
) -> (Tensor, ParamGrads) {
    let per_sample = x.len() / x.shape().first().copied().unwrap_or(1).max(1);
    let gs = lsq_grad_scale(fq.grid, cache.params.1, per_sample);
    let (dx, ds) = fake_quantize_backward_rows(fq.grid, x.view(), gy, &[cache.params], gs);
    let mut grads = Vec::new();
    if fq.learned_scale.is_some() {
        grads.push((ParamKind::Scale, ds.into_dyn()));
    }
    (dx, grads)
}

/// Batch statistics of the float convolution, kept for the backward pass.
#[derive(Clone, Debug)]
struct BatchStats {
    /// `y₀ − μ` per channel, `y₀` the float convolution's output.
    centered: Array4<f32>,
    /// `√(var + eps)`.
    sigma: Array1<f32>,
}

/// What a [`QatConv2d`] kept for its backward pass.
#[derive(Clone, Debug)]
pub(crate) struct QatConvCache {
    cols: Vec<Array2<f32>>,
    /// `W·k` before fake quantization.
    folded: Array4<f32>,
    /// `fq(W·k)`.
    quantized: Array4<f32>,
    params: Vec<(f32, i32)>,
    /// `k = γ/σ` (ones without BatchNorm).
    fold: Array1<f32>,
    /// The mean folded into the bias.
    mean: Array1<f32>,
    batch: Option<BatchStats>,
}

/// Runs a [`QatConv2d`]: with `batch_stats`, folds the batch's statistics (and returns the
/// batch mean and biased variance for the running statistics); otherwise the running ones.
pub(crate) fn qat_conv_forward(
    op: &QatConv2d,
    x: ArrayView4<f32>,
    batch_stats: bool,
) -> Result<(Array4<f32>, QatConvCache, Option<Moments>)> {
    let (n, _, h, w) = x.dim();
    let cols = layers::conv2d_cols(&op.conv, x)?;
    let (fold, mean, batch, stats) = match (&op.bn, batch_stats) {
        (Some(bn), true) => {
            let y0 = layers::conv2d_from_cols(&op.conv, (n, h, w), &cols)?;
            let (mean, var) = layers::channel_moments(y0.view())?;
            let sigma = var.mapv(|v| (v + bn.eps).sqrt());
            let fold = &bn.gamma / &sigma;
            let mut centered = y0;
            for (ch, mut plane) in centered.axis_iter_mut(Axis(1)).enumerate() {
                let m = mean[ch];
                plane.mapv_inplace(|v| v - m);
            }
            (
                fold,
                mean.clone(),
                Some(BatchStats { centered, sigma }),
                Some((mean, var)),
            )
        }
        _ => {
            let (fold, mean) = op.running_fold();
            (fold, mean, None, None)
        }
    };
    let folded = scale_rows4(&op.conv.weight, &fold);
    let folded_dyn = folded.view().into_dyn();
    let params = op.weight_quant.qparams(folded_dyn.view())?;
    let quantized = fake_quantize_rows(op.weight_quant.grid, folded_dyn, &params)
        .into_dimensionality()
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    let bias = op.folded_bias(&fold, &mean);
    let conv_q = op.with_weight(quantized, bias);
    let y = layers::conv2d_from_cols(&conv_q, (n, h, w), &cols)?;
    let cache = QatConvCache {
        cols,
        folded,
        quantized: conv_q.weight,
        params,
        fold,
        mean,
        batch,
    };
    Ok((y, cache, stats))
}

/// One training step of a [`QatConv2d`]: batch statistics until the BatchNorm freezes, then
/// the running ones; updates the running statistics while they are in use.
pub(crate) fn qat_conv_train(
    op: &mut QatConv2d,
    x: ArrayView4<f32>,
) -> Result<(Array4<f32>, QatConvCache)> {
    let batch = op.bn.is_some() && !op.bn_frozen();
    let (y, cache, stats) = qat_conv_forward(op, x, batch)?;
    if let (Some(bn), Some((mean, var))) = (&mut op.bn, stats) {
        let (n, _, h, w) = y.dim();
        layers::update_running_stats(bn, &mean, &var, n * h * w);
    }
    op.steps += 1;
    Ok((y, cache))
}

/// Gradients of a [`QatConv2d`]: the input's (when `need_dx`) and every parameter's.
pub(crate) fn qat_conv_backward(
    op: &QatConv2d,
    x: ArrayView4<f32>,
    cache: &QatConvCache,
    gy: ArrayView4<f32>,
    need_dx: bool,
) -> Result<(Option<Array4<f32>>, ParamGrads)> {
    let oc = op.conv.out_channels();
    let conv_q = op.with_weight(cache.quantized.clone(), None);
    let LayerGrads {
        dx, dw: d_quant, ..
    } = layers::conv2d_backward(&conv_q, x, &cache.cols, gy, need_dx)?;
    let folded = cache.folded.view().into_dyn();
    let inner = folded.len() / oc.max(1);
    let wq = &op.weight_quant;
    let gs = lsq_grad_scale(
        wq.grid,
        wq.grid.symmetric_zero(),
        if wq.per_channel { inner } else { folded.len() },
    );
    let (d_folded, d_scale) =
        fake_quantize_backward_rows(wq.grid, folded, &d_quant.into_dyn(), &cache.params, gs);
    let d_folded: Array4<f32> = d_folded
        .into_dimensionality()
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    // Σ over (n, h, w) of the output gradient, per channel.
    let sum_g: Array1<f32> = gy
        .axis_iter(Axis(1))
        .map(|p| p.iter().map(|&v| v as f64).sum::<f64>() as f32)
        .collect();
    let mut grads = Vec::new();
    let mut dx = dx;
    let Some(bn) = &op.bn else {
        grads.push((ParamKind::Weight, d_folded.into_dyn()));
        if op.conv.bias.is_some() {
            grads.push((ParamKind::Bias, sum_g.into_dyn()));
        }
        if wq.learned_scale.is_some() {
            grads.push((ParamKind::WeightScale, d_scale.into_dyn()));
        }
        return Ok((dx, grads));
    };
    let k = &cache.fold;
    let mut d_weight = scale_rows4(&d_folded, k);
    // dL/dk[c] = Σ_j dL/dW'[c, j]·W[c, j] + Σ g·(b − μ)[c]
    let bias = |c: usize| op.conv.bias.as_ref().map_or(0.0, |b| b[c]);
    let d_fold: Array1<f32> = Array1::from_shape_fn(oc, |c| {
        let wrow = op.conv.weight.index_axis(Axis(0), c);
        let drow = d_folded.index_axis(Axis(0), c);
        let dot: f64 = Zip::from(&wrow)
            .and(&drow)
            .fold(0.0f64, |a, &w, &d| a + (w * d) as f64);
        (dot + sum_g[c] as f64 * (bias(c) - cache.mean[c]) as f64) as f32
    });
    let mut d_bias = Array1::from_shape_fn(oc, |c| k[c] * sum_g[c]);
    let d_beta = sum_g.clone();
    let d_gamma = match &cache.batch {
        None => Array1::from_shape_fn(oc, |c| d_fold[c] / (bn.running_var[c] + bn.eps).sqrt()),
        Some(stats) => {
            // k = γ/σ_B and μ_B, σ_B depend on y₀ = conv(x, W) + b: push their gradients back
            // through the batch statistics into y₀, then through the float convolution.
            let (n, _, h, w) = gy.dim();
            let m = (n * h * w) as f32;
            let mut d_y0 = stats.centered.clone();
            for c in 0..oc {
                let sigma = stats.sigma[c];
                let d_mean = -k[c] * sum_g[c];
                let d_sigma = -d_fold[c] * bn.gamma[c] / (sigma * sigma);
                let d_var = d_sigma / (2.0 * sigma);
                let (a, b) = (2.0 * d_var / m, d_mean / m);
                d_y0.index_axis_mut(Axis(1), c)
                    .mapv_inplace(|centered| a * centered + b);
            }
            let LayerGrads {
                dx: dx0,
                dw: dw0,
                db: db0,
            } = layers::conv2d_backward(&op.conv, x, &cache.cols, d_y0.view(), need_dx)?;
            d_weight += &dw0;
            if let Some(db0) = db0 {
                d_bias += &db0;
            }
            if let (Some(dx), Some(dx0)) = (dx.as_mut(), dx0) {
                *dx += &dx0;
            }
            Array1::from_shape_fn(oc, |c| d_fold[c] / stats.sigma[c])
        }
    };
    grads.push((ParamKind::Weight, d_weight.into_dyn()));
    if op.conv.bias.is_some() {
        grads.push((ParamKind::Bias, d_bias.into_dyn()));
    }
    grads.push((ParamKind::BnWeight, d_gamma.into_dyn()));
    grads.push((ParamKind::BnBias, d_beta.into_dyn()));
    if wq.learned_scale.is_some() {
        grads.push((ParamKind::WeightScale, d_scale.into_dyn()));
    }
    Ok((dx, grads))
}

/// What a [`QatLinear`] kept for its backward pass.
#[derive(Clone, Debug)]
pub(crate) struct QatLinearCache {
    quantized: Array2<f32>,
    params: Vec<(f32, i32)>,
}

/// Runs a [`QatLinear`].
pub(crate) fn qat_linear_forward(
    op: &QatLinear,
    x: ArrayView2<f32>,
) -> Result<(Array2<f32>, QatLinearCache)> {
    let w = op.linear.weight.view().into_dyn();
    let params = op.weight_quant.qparams(w.view())?;
    let quantized: Array2<f32> = fake_quantize_rows(op.weight_quant.grid, w, &params)
        .into_dimensionality()
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    let lin = Linear {
        weight: quantized,
        bias: op.linear.bias.clone(),
    };
    let y = layers::linear_forward(&lin, x)?;
    Ok((
        y,
        QatLinearCache {
            quantized: lin.weight,
            params,
        },
    ))
}

/// Gradients of a [`QatLinear`].
pub(crate) fn qat_linear_backward(
    op: &QatLinear,
    x: ArrayView2<f32>,
    cache: &QatLinearCache,
    gy: ArrayView2<f32>,
    need_dx: bool,
) -> Result<(Option<Array2<f32>>, ParamGrads)> {
    let lin = Linear {
        weight: cache.quantized.clone(),
        bias: op.linear.bias.clone(),
    };
    let LayerGrads { dx, dw, db } = layers::linear_backward(&lin, x, gy, need_dx)?;
    let w = op.linear.weight.view().into_dyn();
    let wq = &op.weight_quant;
    let n = if wq.per_channel {
        w.shape()[1]
    } else {
        w.len()
    };
    let gs = lsq_grad_scale(wq.grid, wq.grid.symmetric_zero(), n);
    let (d_weight, d_scale) =
        fake_quantize_backward_rows(wq.grid, w, &dw.into_dyn(), &cache.params, gs);
    let mut grads = vec![(ParamKind::Weight, d_weight)];
    if let Some(db) = db {
        grads.push((ParamKind::Bias, db.into_dyn()));
    }
    if wq.learned_scale.is_some() {
        grads.push((ParamKind::WeightScale, d_scale.into_dyn()));
    }
    Ok((dx, grads))
}
