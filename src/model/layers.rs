//! Forward and backward computations of the built-in ops on batches.
//!
//! Conv2d and Linear run through [`crate::kernels::sgemm`]; the rest are memory-bound loops,
//! parallel over (image, channel) planes where the work is large enough to matter.

use super::op::{BatchNorm2d, Conv2d, Linear, Pool2d};
use crate::error::{Error, Result};
use crate::kernels::{sgemm, PackedLinear};
use crate::tensor::{col2im_add, im2col, parallel, ConvGeometry, Im2colPlan};
use ndarray::{s, Array1, Array2, Array4, ArrayView2, ArrayView4, Axis, Zip};
use rayon::prelude::*;

fn contiguous_2d<'a>(
    w: &'a ndarray::ArrayView4<'a, f32>,
    rows: usize,
    cols: usize,
) -> Result<ArrayView2<'a, f32>> {
    w.view().into_shape_with_order((rows, cols)).map_err(|_| {
        Error::Unsupported("conv weight must be in standard (C-contiguous) layout".into())
    })
}

/// Gradients of a layer: input (when asked for), weight, bias (when the layer has one).
pub(crate) struct LayerGrads<D: ndarray::Dimension> {
    pub dx: Option<ndarray::Array<f32, D>>,
    pub dw: ndarray::Array<f32, D>,
    pub db: Option<Array1<f32>>,
}

/// Applies `f`, a map of `[rows, features] → [rows, out]`, over the last axis of `x`
/// (`[N, …, features] → [N, …, out]`, PyTorch's `nn.Linear` on any rank). A rank-2 `x` and
/// any contiguous `x` are passed as views, without a copy.
///
/// # Errors
/// [`Error::ShapeMismatch`] when the last axis of `x` is not `features`, and `f`'s errors.
pub(crate) fn over_rows(
    x: ndarray::ArrayViewD<'_, f32>,
    features: usize,
    node: Option<&str>,
    f: impl FnOnce(ArrayView2<'_, f32>) -> Result<Array2<f32>>,
) -> Result<ndarray::ArrayD<f32>> {
    let shape = x.shape().to_vec();
    if shape.len() < 2 || shape.last() != Some(&features) {
        return Err(Error::shape(
            "linear",
            node,
            format!("[N, …, {features}]"),
            &shape,
        ));
    }
    if shape.len() == 2 {
        let rows = x
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        return Ok(f(rows)?.into_dyn());
    }
    let rows = shape.iter().product::<usize>() / features.max(1);
    let flat = x
        .to_shape((rows, features))
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    let y = f(flat.view())?;
    let mut out = shape;
    if let Some(last) = out.last_mut() {
        *last = y.ncols();
    }
    y.into_shape_with_order(ndarray::IxDyn(&out))
        .map_err(|e| Error::Unsupported(e.to_string()))
}

/// `y = x · Wᵀ + b`.
///
/// On CPUs with the packed kernel this packs the weight for the call (as the `gemm` crate
/// would internally), so that training, QAT and inference (which keeps the packed copy,
/// see [`crate::model::Graph`]) compute every output with the same operations, bit for bit.
pub(crate) fn linear_forward(l: &Linear, x: ArrayView2<f32>) -> Result<Array2<f32>> {
    if PackedLinear::is_supported() {
        return PackedLinear::new(l.weight.view(), l.bias.as_ref().map(|b| b.view()))?.forward(x);
    }
    let mut y = Array2::<f32>::zeros((x.nrows(), l.out_features()));
    sgemm(x, l.weight.t(), y.view_mut(), false)?;
    if let Some(b) = &l.bias {
        y += b;
    }
    Ok(y)
}

/// Gradients of [`linear_forward`]: `(dx, dW, db)`.
pub(crate) fn linear_backward(
    l: &Linear,
    x: ArrayView2<f32>,
    gy: ArrayView2<f32>,
    need_dx: bool,
) -> Result<LayerGrads<ndarray::Ix2>> {
    let mut dw = Array2::<f32>::zeros(l.weight.dim());
    sgemm(gy.t(), x, dw.view_mut(), false)?;
    let db = l.bias.as_ref().map(|_| gy.sum_axis(Axis(0)));
    let dx = if need_dx {
        let mut dx = Array2::<f32>::zeros(x.dim());
        sgemm(gy, l.weight.view(), dx.view_mut(), false)?;
        Some(dx)
    } else {
        None
    };
    Ok(LayerGrads { dx, dw, db })
}

/// Output planes at least this large get one GEMM per image (enough columns to run at full
/// speed); smaller ones share one batched GEMM.
const PER_IMAGE_MIN_PLANE: usize = 256;

/// Convolution by batched im2col + GEMMs per group. Returns the output and, when
/// `keep_cols`, each group's column matrix for the backward pass.
pub(crate) fn conv2d_forward(
    c: &Conv2d,
    x: ArrayView4<f32>,
    keep_cols: bool,
) -> Result<(Array4<f32>, Vec<Array2<f32>>)> {
    let (n, _, h, w) = x.dim();
    let geo = c.geometry(h, w);
    let mut y = None;
    let mut kept = Vec::new();
    for g in 0..c.groups {
        let cols = im2col(x, &geo, g)?;
        conv2d_group_from_cols(c, (n, h, w), g, &cols, &mut y)?;
        if keep_cols {
            kept.push(cols);
        }
    }
    let mut y = y.ok_or_else(|| Error::config("conv2d", "groups must be at least 1"))?;
    if let Some(b) = &c.bias {
        add_channel_bias(&mut y, b);
    }
    Ok((y, kept))
}

/// Below this many multiply-adds a batch's images run on the calling thread.
const CONV_PARALLEL_MIN_MACS: usize = 1 << 20;

/// Inference convolution: per image, im2col into one buffer per worker (L2-sized, reused
/// across images) and a GEMM straight into the image's NCHW block, then the bias while
/// the block is in cache: no batch-wide column matrix or scatter. Each output is the same
/// GEMM dot product plus bias as in [`conv2d_forward`] (what training runs), so the two
/// agree bit for bit. Grouped convolutions keep the batched path (one tiny GEMM per group
/// and image would be slower).
pub(crate) fn conv2d_infer(c: &Conv2d, x: ArrayView4<f32>) -> Result<Array4<f32>> {
    if c.groups != 1 {
        return Ok(conv2d_forward(c, x, false)?.0);
    }
    let (n, _, h, w) = x.dim();
    let geo = c.geometry(h, w);
    let [oh, ow] = geo.output_hw()?;
    let (oc, kdim, plane) = (c.out_channels(), geo.col_rows(), oh * ow);
    let weight = c.weight.as_standard_layout();
    let wv = weight.view();
    let w2 = contiguous_2d(&wv, oc, kdim)?;
    let mut y = Array4::<f32>::zeros((n, oc, oh, ow));
    let x = x.as_standard_layout();
    let plan = Im2colPlan::new(&geo, 0)?;
    let image = |cols: &mut Vec<f32>, (b, mut yb): (usize, ndarray::ArrayViewMut3<f32>)| {
        cols.resize(plan.len(1), 0.0);
        plan.fill(x.slice(s![b..b + 1, .., .., ..]), cols, n == 1)?;
        let cv = ArrayView2::from_shape((kdim, plane), &cols[..])
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let mut dst = yb
            .view_mut()
            .into_shape_with_order((oc, plane))
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        sgemm(w2, cv, dst.view_mut(), false)?;
        if let Some(bias) = &c.bias {
            for (mut row, &v) in dst.rows_mut().into_iter().zip(bias.iter()) {
                row += v;
            }
        }
        Ok(())
    };
    let macs = n.saturating_mul(oc * plane * kdim);
    let threads = rayon::current_num_threads();
    if macs < CONV_PARALLEL_MIN_MACS || threads == 1 {
        let mut cols = Vec::new();
        for item in y.axis_iter_mut(Axis(0)).enumerate() {
            image(&mut cols, item)?;
        }
    } else if n == 1 {
        // One image: its column matrix filled in bands of rows, then its GEMM split by
        // output channels, 8 or more per task. Each output is the same dot product as in
        // the whole GEMM (`inference_is_bit_identical_at_any_thread_count` checks it).
        let mut cols = vec![0.0; plan.len(1)];
        let rows_per_band = kdim.div_ceil(2 * threads);
        let bands: Vec<_> = cols
            .chunks_mut((rows_per_band * plane).max(1))
            .enumerate()
            .collect();
        crate::kernels::parallel::try_for_each(bands, &|(i, rows)| {
            plan.fill_rows(x.view(), i * rows_per_band, rows, false)
        })?;
        let cv = ArrayView2::from_shape((kdim, plane), &cols[..])
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let mut dst = y
            .index_axis_mut(Axis(0), 0)
            .into_shape_with_order((oc, plane))
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let height = oc.div_ceil((2 * threads).min(oc.div_ceil(8)));
        let pieces: Vec<_> = w2
            .axis_chunks_iter(Axis(0), height)
            .zip(dst.axis_chunks_iter_mut(Axis(0), height))
            .enumerate()
            .collect();
        crate::kernels::parallel::try_for_each(pieces, &|(p, (w_piece, mut d_piece))| {
            sgemm(w_piece, cv, d_piece.view_mut(), false)?;
            if let Some(bias) = &c.bias {
                let bias = bias.iter().skip(p * height);
                for (mut row, &v) in d_piece.rows_mut().into_iter().zip(bias) {
                    row += v;
                }
            }
            Ok(())
        })?;
    } else {
        // Runs of images, four per thread, through `for_each` (the caller works too and no
        // one waits for a sleeping worker); each run reuses one column buffer.
        let mut runs: Vec<Vec<_>> = Vec::new();
        let per_run = n.div_ceil(4 * threads);
        for (i, item) in y.axis_iter_mut(Axis(0)).enumerate() {
            if i % per_run == 0 {
                runs.push(Vec::with_capacity(per_run));
            }
            if let Some(run) = runs.last_mut() {
                run.push((i, item));
            }
        }
        crate::kernels::parallel::try_for_each(runs, &|run| {
            let mut cols = Vec::new();
            run.into_iter().try_for_each(|item| image(&mut cols, item))
        })?;
    }
    Ok(y)
}

/// The im2col matrices of every group of `c` over `x`.
pub(crate) fn conv2d_cols(c: &Conv2d, x: ArrayView4<f32>) -> Result<Vec<Array2<f32>>> {
    let (_, _, h, w) = x.dim();
    let geo = c.geometry(h, w);
    (0..c.groups).map(|g| im2col(x, &geo, g)).collect()
}

/// Convolution from precomputed im2col matrices (see [`conv2d_cols`]) of an input with `n`
/// images of `h × w`.
pub(crate) fn conv2d_from_cols(
    c: &Conv2d,
    (n, h, w): (usize, usize, usize),
    cols: &[Array2<f32>],
) -> Result<Array4<f32>> {
    let mut y = None;
    for (g, cg) in cols.iter().enumerate() {
        conv2d_group_from_cols(c, (n, h, w), g, cg, &mut y)?;
    }
    let mut y = y.ok_or_else(|| Error::config("conv2d", "groups must be at least 1"))?;
    if let Some(b) = &c.bias {
        add_channel_bias(&mut y, b);
    }
    Ok(y)
}

/// Writes group `g`'s output channels of the convolution into `y` (allocated on first use).
fn conv2d_group_from_cols(
    c: &Conv2d,
    (n, h, w): (usize, usize, usize),
    g: usize,
    cols: &Array2<f32>,
    y: &mut Option<Array4<f32>>,
) -> Result<()> {
    let geo = c.geometry(h, w);
    let [oh, ow] = geo.output_hw()?;
    let oc = c.out_channels();
    let og = oc / c.groups;
    let weight = c.weight.as_standard_layout();
    let wv = weight.view();
    let w2 = contiguous_2d(&wv, oc, geo.col_rows())?;
    let plane = oh * ow;
    let y = y.get_or_insert_with(|| Array4::<f32>::zeros((n, oc, oh, ow)));
    let wg = w2.slice(s![g * og..(g + 1) * og, ..]);
    if n == 1 || plane >= PER_IMAGE_MIN_PLANE {
        // One GEMM per image straight into its NCHW block: no permute pass.
        for b in 0..n {
            let dst = y
                .slice_mut(s![b, g * og..(g + 1) * og, .., ..])
                .into_shape_with_order((og, plane))
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            sgemm(
                wg,
                cols.slice(s![.., b * plane..(b + 1) * plane]),
                dst,
                false,
            )?;
        }
    } else {
        // Small planes (LeNet-sized): one batched GEMM, then scatter into NCHW.
        let mut out = Array2::<f32>::zeros((og, n * plane));
        sgemm(wg, cols.view(), out.view_mut(), false)?;
        let out3 = out
            .into_shape_with_order((og, n, plane))
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let mut yv = y
            .view_mut()
            .into_shape_with_order((n, oc, plane))
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        yv.slice_mut(s![.., g * og..(g + 1) * og, ..])
            .assign(&out3.permuted_axes([1, 0, 2]));
    }
    Ok(())
}

fn add_channel_bias(y: &mut Array4<f32>, b: &Array1<f32>) {
    let body = |mut img: ndarray::ArrayViewMut3<f32>| {
        for (mut plane, &bias) in img.axis_iter_mut(Axis(0)).zip(b.iter()) {
            plane += bias;
        }
    };
    if parallel(y.len()) {
        y.axis_iter_mut(Axis(0)).into_par_iter().for_each(body);
    } else {
        y.axis_iter_mut(Axis(0)).for_each(body);
    }
}

/// Rearranges `[N, C, H, W]` into `[C, N·H·W]`.
fn channels_first(t: ArrayView4<f32>) -> Result<Array2<f32>> {
    let (n, c, h, w) = t.dim();
    t.permuted_axes([1, 0, 2, 3])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((c, n * h * w))
        .map_err(|e| Error::Unsupported(e.to_string()))
}

/// Gradients of [`conv2d_forward`]: `(dx, dW, db)`.
pub(crate) fn conv2d_backward(
    c: &Conv2d,
    x: ArrayView4<f32>,
    cols: &[Array2<f32>],
    gy: ArrayView4<f32>,
    need_dx: bool,
) -> Result<LayerGrads<ndarray::Ix4>> {
    let (_, _, h, w) = x.dim();
    let geo = c.geometry(h, w);
    let oc = c.out_channels();
    let og = oc / c.groups;
    let k = geo.col_rows();
    let gmat = channels_first(gy)?;
    let db = c.bias.as_ref().map(|_| gmat.sum_axis(Axis(1)));
    let weight = c.weight.as_standard_layout();
    let wv = weight.view();
    let w2 = contiguous_2d(&wv, oc, k)?;
    let mut dw = Array2::<f32>::zeros((oc, k));
    let mut dx = need_dx.then(|| Array4::<f32>::zeros(x.dim()));
    for g in 0..c.groups {
        let rows = s![g * og..(g + 1) * og, ..];
        let owned;
        let cols_g = match cols.get(g) {
            Some(cg) => cg,
            None => {
                owned = im2col(x, &geo, g)?;
                &owned
            }
        };
        sgemm(gmat.slice(rows), cols_g.t(), dw.slice_mut(rows), false)?;
        if let Some(dx) = dx.as_mut() {
            let mut dcols = Array2::<f32>::zeros(cols_g.dim());
            sgemm(
                w2.slice(rows).t(),
                gmat.slice(rows),
                dcols.view_mut(),
                false,
            )?;
            col2im_add(dcols.view(), &geo, g, dx.view_mut())?;
        }
    }
    let dw = dw
        .into_shape_with_order(c.weight.dim())
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    Ok(LayerGrads { dx, dw, db })
}

/// What the training-mode BatchNorm keeps for its backward pass.
#[derive(Clone, Debug)]
pub(crate) struct BnCache {
    pub xhat: Array4<f32>,
    pub inv_std: Array1<f32>,
}

/// Per-channel mean and biased variance of `[N, C, H, W]` (f64 accumulation: a batch of
/// 64 × 28 × 28 values loses digits in f32).
///
/// # Errors
/// [`Error::InvalidConfig`] with a single value per channel (no variance to normalize by).
pub(crate) fn channel_moments(x: ArrayView4<f32>) -> Result<(Array1<f32>, Array1<f32>)> {
    let (n, c, h, w) = x.dim();
    let m = n * h * w;
    if m < 2 {
        return Err(Error::config(
            "batch statistics in training mode",
            "need more than one value per channel (batch × height × width ≥ 2)",
        ));
    }
    let mut mean = Array1::<f32>::zeros(c);
    let mut var = Array1::<f32>::zeros(c);
    for ch in 0..c {
        let xc = x.index_axis(Axis(1), ch);
        let mu = xc.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
        let v = xc.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / m as f64;
        mean[ch] = mu as f32;
        var[ch] = v as f32;
    }
    Ok((mean, var))
}

/// `r ← (1 − momentum)·r + momentum·batch`, with the unbiased variance (PyTorch) from the
/// biased `var` of `m` values per channel.
pub(crate) fn update_running_stats(
    bn: &mut BatchNorm2d,
    mean: &Array1<f32>,
    var: &Array1<f32>,
    m: usize,
) {
    let mom = bn.momentum;
    let unbias = m as f32 / (m as f32 - 1.0);
    Zip::from(&mut bn.running_mean)
        .and(mean)
        .for_each(|r, &b| *r = (1.0 - mom) * *r + mom * b);
    Zip::from(&mut bn.running_var)
        .and(var)
        .for_each(|r, &b| *r = (1.0 - mom) * *r + mom * b * unbias);
}

/// BatchNorm with batch statistics; updates the running statistics in place.
pub(crate) fn batch_norm_train(
    bn: &mut BatchNorm2d,
    x: ArrayView4<f32>,
) -> Result<(Array4<f32>, BnCache)> {
    let (n, c, h, w) = x.dim();
    let (mean, var) = channel_moments(x)?;
    let inv_std = var.mapv(|v| 1.0 / (v + bn.eps).sqrt());
    let mut xhat = x.to_owned();
    let mut y = Array4::<f32>::zeros(x.dim());
    for ch in 0..c {
        let (mu, is, ga, be) = (mean[ch], inv_std[ch], bn.gamma[ch], bn.beta[ch]);
        Zip::from(xhat.index_axis_mut(Axis(1), ch))
            .and(y.index_axis_mut(Axis(1), ch))
            .for_each(|xh, yv| {
                *xh = (*xh - mu) * is;
                *yv = ga * *xh + be;
            });
    }
    update_running_stats(bn, &mean, &var, n * h * w);
    Ok((y, BnCache { xhat, inv_std }))
}

/// BatchNorm with the running statistics.
pub(crate) fn batch_norm_eval(bn: &BatchNorm2d, x: ArrayView4<f32>) -> Array4<f32> {
    let mut y = x.to_owned();
    for (ch, mut plane) in y.axis_iter_mut(Axis(1)).enumerate() {
        let is = 1.0 / (bn.running_var[ch] + bn.eps).sqrt();
        let (mu, ga, be) = (bn.running_mean[ch], bn.gamma[ch], bn.beta[ch]);
        plane.mapv_inplace(|v| (v - mu) * is * ga + be);
    }
    y
}

/// Gradients of training-mode BatchNorm: `(dx, dγ, dβ)`.
pub(crate) fn batch_norm_train_backward(
    bn: &BatchNorm2d,
    cache: &BnCache,
    gy: ArrayView4<f32>,
) -> (Array4<f32>, Array1<f32>, Array1<f32>) {
    let (n, c, h, w) = gy.dim();
    let m = (n * h * w) as f32;
    let mut dx = Array4::<f32>::zeros(gy.dim());
    let mut dgamma = Array1::<f32>::zeros(c);
    let mut dbeta = Array1::<f32>::zeros(c);
    for ch in 0..c {
        let g = gy.index_axis(Axis(1), ch);
        let xh = cache.xhat.index_axis(Axis(1), ch);
        let sum_g: f64 = g.iter().map(|&v| v as f64).sum();
        let sum_gx: f64 = Zip::from(&g)
            .and(&xh)
            .fold(0.0f64, |a, &gv, &xv| a + (gv * xv) as f64);
        dgamma[ch] = sum_gx as f32;
        dbeta[ch] = sum_g as f32;
        let k = bn.gamma[ch] * cache.inv_std[ch] / m;
        let (sg, sgx) = (sum_g as f32, sum_gx as f32);
        Zip::from(dx.index_axis_mut(Axis(1), ch))
            .and(&g)
            .and(&xh)
            .for_each(|d, &gv, &xv| *d = k * (m * gv - sg - xv * sgx));
    }
    (dx, dgamma, dbeta)
}

/// Gradients of inference-mode BatchNorm (frozen statistics): `(dx, dγ, dβ)`.
pub(crate) fn batch_norm_eval_backward(
    bn: &BatchNorm2d,
    x: ArrayView4<f32>,
    gy: ArrayView4<f32>,
) -> (Array4<f32>, Array1<f32>, Array1<f32>) {
    let c = gy.dim().1;
    let mut dx = gy.to_owned();
    let mut dgamma = Array1::<f32>::zeros(c);
    let mut dbeta = Array1::<f32>::zeros(c);
    for ch in 0..c {
        let is = 1.0 / (bn.running_var[ch] + bn.eps).sqrt();
        let mu = bn.running_mean[ch];
        let g = gy.index_axis(Axis(1), ch);
        dbeta[ch] = g.sum();
        dgamma[ch] = Zip::from(&g)
            .and(x.index_axis(Axis(1), ch))
            .fold(0.0, |a, &gv, &xv| a + gv * (xv - mu) * is);
        dx.index_axis_mut(Axis(1), ch)
            .mapv_inplace(|v| v * bn.gamma[ch] * is);
    }
    (dx, dgamma, dbeta)
}

/// Max pooling; with `want_arg`, also returns, per output element, the flat index of the
/// chosen input element within its (image, channel) plane (what the backward pass needs).
pub(crate) fn max_pool_forward(
    p: &Pool2d,
    x: ArrayView4<f32>,
    want_arg: bool,
) -> Result<(Array4<f32>, Option<Array4<u32>>)> {
    let (n, c, h, w) = x.dim();
    let geo = p.geometry(c, h, w);
    let [oh, ow] = geo.output_hw()?;
    let mut y = Array4::<f32>::zeros((n, c, oh, ow));
    let mut arg = Array4::<u32>::zeros(if want_arg {
        (n, c, oh, ow)
    } else {
        (0, 0, 0, 0)
    });
    let xs = x.as_standard_layout();
    let (Some(src), Some(ys), Some(args)) = (xs.as_slice(), y.as_slice_mut(), arg.as_slice_mut())
    else {
        return Err(Error::Unsupported("non-contiguous pooling buffers".into()));
    };
    if ys.is_empty() || src.is_empty() {
        return Ok((y, want_arg.then_some(arg)));
    }
    // One plane (image, channel) at a time over flat slices, each window's in-bounds rows
    // and columns found once (the generic window iterator with n-d indexing cost a third of
    // LeNet-5's float forward). The comparisons are selects, not branches: on real
    // activations they are a coin toss. `>` keeps the first maximum; NaN propagates like
    // PyTorch (the last NaN of a window wins).
    let (plane_in, plane_out) = (h * w, oh * ow);
    let [kh, kw] = geo.kernel;
    let [sh, sw] = geo.stride;
    let [ph, pw] = geo.padding;
    let with_arg = |((xp, yp), ap): ((&[f32], &mut [f32]), &mut [u32])| {
        for oy in 0..oh {
            let (ylo, yhi) = span(oy, sh, ph, kh, h);
            for ox in 0..ow {
                let (xlo, xhi) = span(ox, sw, pw, kw, w);
                let mut best = (f32::NEG_INFINITY, 0u32);
                for sy in ylo..yhi {
                    let row = &xp[sy * w + xlo..sy * w + xhi];
                    for (sx, &v) in (xlo..).zip(row) {
                        let take = (v > best.0) | v.is_nan();
                        best.0 = if take { v } else { best.0 };
                        best.1 = if take { (sy * w + sx) as u32 } else { best.1 };
                    }
                }
                yp[oy * ow + ox] = best.0;
                ap[oy * ow + ox] = best.1;
            }
        }
    };
    // Values only (inference): the same comparisons in the same order, kept in a register
    // per output (no index chain), whole rows when the window is inside the image.
    let values = |(xp, yp): (&[f32], &mut [f32])| {
        for (oy, yrow) in yp.chunks_exact_mut(ow).enumerate() {
            let (ylo, yhi) = span(oy, sh, ph, kh, h);
            let rows = &xp[ylo * w..yhi * w];
            for (ox, out) in yrow.iter_mut().enumerate() {
                let (xlo, xhi) = span(ox, sw, pw, kw, w);
                let mut best = f32::NEG_INFINITY;
                for row in rows.chunks_exact(w) {
                    for &v in &row[xlo..xhi] {
                        best = if (v > best) | v.is_nan() { v } else { best };
                    }
                }
                *out = best;
            }
        }
    };
    match (want_arg, parallel(x.len())) {
        (true, true) => src
            .par_chunks(plane_in)
            .zip(ys.par_chunks_mut(plane_out))
            .zip(args.par_chunks_mut(plane_out))
            .for_each(with_arg),
        (true, false) => src
            .chunks(plane_in)
            .zip(ys.chunks_mut(plane_out))
            .zip(args.chunks_mut(plane_out))
            .for_each(with_arg),
        (false, par) if geo.padding == [0, 0] => {
            // Every window lies inside the plane: fixed-size windows, no span arithmetic,
            // and for 2 × 2 / stride 2 (LeNet, VGG) a loop the compiler vectorises.
            let interior = |(xp, yp): (&[f32], &mut [f32])| match (kh, kw, sh, sw) {
                (2, 2, 2, 2) => max_plane_2x2(xp, yp, w, ow),
                _ => max_plane_interior(xp, yp, w, ow, (kh, kw), (sh, sw)),
            };
            if par {
                src.par_chunks(plane_in)
                    .zip(ys.par_chunks_mut(plane_out))
                    .for_each(interior);
            } else {
                src.chunks(plane_in)
                    .zip(ys.chunks_mut(plane_out))
                    .for_each(interior);
            }
        }
        (false, true) => src
            .par_chunks(plane_in)
            .zip(ys.par_chunks_mut(plane_out))
            .for_each(values),
        (false, false) => src
            .chunks(plane_in)
            .zip(ys.chunks_mut(plane_out))
            .for_each(values),
    }
    Ok((y, want_arg.then_some(arg)))
}

/// [`max_plane_interior`] for 2 × 2 windows at stride 2: each output's four comparisons in
/// the general order (`a, b` of the top row, then `c, d`), written over pairs of columns so
/// that the loop over outputs vectorises (the window loop kept one dependent chain).
fn max_plane_2x2(xp: &[f32], yp: &mut [f32], w: usize, ow: usize) {
    let pick = |best: f32, v: f32| if (v > best) | v.is_nan() { v } else { best };
    for (oy, yrow) in yp.chunks_exact_mut(ow).enumerate() {
        let top = &xp[2 * oy * w..2 * oy * w + 2 * ow];
        let bottom = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
        for ((out, t), b) in yrow
            .iter_mut()
            .zip(top.chunks_exact(2))
            .zip(bottom.chunks_exact(2))
        {
            // pick(−∞, a) is a (a NaN or −∞ included).
            *out = pick(pick(pick(t[0], t[1]), b[0]), b[1]);
        }
    }
}

/// Max pooling of one plane whose windows all lie inside it (no padding): the same
/// comparisons in the same order as the general path, so the results are identical.
#[inline(always)]
fn max_plane_interior(
    xp: &[f32],
    yp: &mut [f32],
    w: usize,
    ow: usize,
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
) {
    for (oy, yrow) in yp.chunks_exact_mut(ow).enumerate() {
        let rows = &xp[oy * sh * w..(oy * sh + kh) * w];
        for (ox, out) in yrow.iter_mut().enumerate() {
            let mut best = f32::NEG_INFINITY;
            for row in rows.chunks_exact(w) {
                for &v in &row[ox * sw..ox * sw + kw] {
                    best = if (v > best) | v.is_nan() { v } else { best };
                }
            }
            *out = best;
        }
    }
}

/// The in-bounds input rows (or columns) `lo..hi` of output position `o`'s window.
#[inline]
fn span(o: usize, stride: usize, padding: usize, kernel: usize, size: usize) -> (usize, usize) {
    let start = (o * stride) as isize - padding as isize;
    let lo = start.max(0) as usize;
    let hi = (start + kernel as isize).clamp(0, size as isize) as usize;
    (lo.min(hi), hi)
}

/// The in-bounds input positions of output `(oy, ox)`'s window.
fn window(
    geo: &ConvGeometry,
    oy: usize,
    ox: usize,
    h: usize,
    w: usize,
) -> impl Iterator<Item = (usize, usize)> + '_ {
    let y0 = (oy * geo.stride[0]) as isize - geo.padding[0] as isize;
    let x0 = (ox * geo.stride[1]) as isize - geo.padding[1] as isize;
    (0..geo.kernel[0]).flat_map(move |i| {
        (0..geo.kernel[1]).filter_map(move |j| {
            let (sy, sx) = (y0 + i as isize, x0 + j as isize);
            (sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w)
                .then_some((sy as usize, sx as usize))
        })
    })
}

/// Gradient of max pooling: each output gradient goes to its chosen input element.
pub(crate) fn max_pool_backward(
    arg: &Array4<u32>,
    gy: ArrayView4<f32>,
    in_shape: (usize, usize, usize, usize),
) -> Array4<f32> {
    let mut dx = Array4::<f32>::zeros(in_shape);
    let w = in_shape.3;
    let work = dx.len();
    let zip = Zip::from(dx.outer_iter_mut())
        .and(arg.outer_iter())
        .and(gy.outer_iter());
    let body = |(mut dxi, ai, gi): (
        ndarray::ArrayViewMut3<f32>,
        ndarray::ArrayView3<u32>,
        ndarray::ArrayView3<f32>,
    )| {
        for (mut plane, (ap, gp)) in dxi
            .outer_iter_mut()
            .zip(ai.outer_iter().zip(gi.outer_iter()))
        {
            for (&idx, &g) in ap.iter().zip(gp.iter()) {
                let idx = idx as usize;
                plane[[idx / w, idx % w]] += g;
            }
        }
    };
    if parallel(work) {
        zip.into_par_iter().for_each(body);
    } else {
        zip.for_each(|a, b, c| body((a, b, c)));
    }
    dx
}

/// Average pooling, padded zeros counted in the divisor.
pub(crate) fn avg_pool_forward(p: &Pool2d, x: ArrayView4<f32>) -> Result<Array4<f32>> {
    let (n, c, h, w) = x.dim();
    let geo = p.geometry(c, h, w);
    let [oh, ow] = geo.output_hw()?;
    let area = (p.kernel[0] * p.kernel[1]) as f32;
    let mut y = Array4::<f32>::zeros((n, c, oh, ow));
    let work = x.len();
    let zip = Zip::from(y.outer_iter_mut()).and(x.outer_iter());
    let body = |(mut yi, xi): (ndarray::ArrayViewMut3<f32>, ndarray::ArrayView3<f32>)| {
        for ch in 0..c {
            let plane = xi.index_axis(Axis(0), ch);
            for oy in 0..oh {
                for ox in 0..ow {
                    let s: f32 = window(&geo, oy, ox, h, w).map(|(a, b)| plane[[a, b]]).sum();
                    yi[[ch, oy, ox]] = s / area;
                }
            }
        }
    };
    if parallel(work) {
        zip.into_par_iter().for_each(body);
    } else {
        zip.for_each(|a, b| body((a, b)));
    }
    Ok(y)
}

/// Gradient of [`avg_pool_forward`].
pub(crate) fn avg_pool_backward(
    p: &Pool2d,
    gy: ArrayView4<f32>,
    in_shape: (usize, usize, usize, usize),
) -> Result<Array4<f32>> {
    let (_, c, h, w) = in_shape;
    let geo = p.geometry(c, h, w);
    let [oh, ow] = geo.output_hw()?;
    let area = (p.kernel[0] * p.kernel[1]) as f32;
    let mut dx = Array4::<f32>::zeros(in_shape);
    let work = dx.len();
    let zip = Zip::from(dx.outer_iter_mut()).and(gy.outer_iter());
    let body = |(mut dxi, gi): (ndarray::ArrayViewMut3<f32>, ndarray::ArrayView3<f32>)| {
        for ch in 0..c {
            let mut plane = dxi.index_axis_mut(Axis(0), ch);
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = gi[[ch, oy, ox]] / area;
                    for (a, b) in window(&geo, oy, ox, h, w) {
                        plane[[a, b]] += g;
                    }
                }
            }
        }
    };
    if parallel(work) {
        zip.into_par_iter().for_each(body);
    } else {
        zip.for_each(|a, b| body((a, b)));
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inference path of max pooling (values only, vectorised by tap) equals the
    /// training path (values and arguments) bit for bit, NaN and padding included, and the
    /// values match a naive window maximum.
    #[test]
    fn max_pool_value_path_equals_the_argmax_path() {
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state
        };
        for (k, s, pad, h, w) in [
            (2, 2, 0, 8, 8),
            (3, 1, 1, 7, 5),
            (3, 2, 1, 9, 6),
            (2, 3, 1, 5, 7),
            (1, 1, 0, 3, 3),
        ] {
            let x = Array4::from_shape_fn((2, 3, h, w), |_| {
                let r = next();
                if r % 17 == 0 {
                    f32::NAN
                } else {
                    (r >> 8) as f32 / 1e5 - 80.0
                }
            });
            let p = Pool2d {
                kernel: [k, k],
                stride: [s, s],
                padding: [pad, pad],
            };
            let (fast, none) = max_pool_forward(&p, x.view(), false).unwrap();
            let (slow, arg) = max_pool_forward(&p, x.view(), true).unwrap();
            assert!(none.is_none() && arg.is_some());
            let bits = |a: &Array4<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "k {k} s {s} pad {pad}");
            for ((b, c, oy, ox), &v) in fast.indexed_iter() {
                let mut want = f32::NEG_INFINITY;
                for i in 0..k {
                    for j in 0..k {
                        let (sy, sx) = (
                            (oy * s + i) as isize - pad as isize,
                            (ox * s + j) as isize - pad as isize,
                        );
                        if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                            let u = x[[b, c, sy as usize, sx as usize]];
                            if u > want || u.is_nan() {
                                want = u;
                            }
                        }
                    }
                }
                assert_eq!(v.to_bits(), want.to_bits());
            }
        }
    }
}
