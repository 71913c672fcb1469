//! The two ops decoder-only language models (Llama, Mistral, Qwen, SmolLM) add to an
//! encoder's: RMS normalisation and rotary position embeddings.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use ndarray::{Array1, Array2, IxDyn};

/// Root-mean-square normalisation over the last axis (Zhang & Sennrich 2019; Llama's
/// `LlamaRMSNorm`): `y = x / √(mean(x²) + eps) · weight`, no centring and no shift.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm {
    /// The per-feature scale (Hugging Face's `weight`).
    pub weight: Array1<f32>,
    /// Added to the mean square before the square root.
    pub eps: f32,
}

impl RmsNorm {
    /// A scale of one over `features`, eps 1e-6 (Llama's default).
    pub fn new(features: usize) -> Self {
        RmsNorm {
            weight: Array1::ones(features),
            eps: 1e-6,
        }
    }
}

/// Rotary position embeddings (Su et al. 2021, RoFormer) applied to each head of a
/// `[N, seq, heads · head_dim]` projection: the pair `(a, b)` of head features at rotary
/// index `i` is turned by the angle `position · base^(−2i / head_dim)`, positions counted
/// `0..seq` along the sequence axis.
///
/// Pairs are `(i, i + head_dim/2)` (the "rotate half" form of GPT-NeoX and Hugging Face's
/// Llama), or `(2i, 2i + 1)` with `interleaved` (the original RoFormer and GPT-J form;
/// ONNX's `RotaryEmbedding` `interleaved = 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Rotary {
    /// The width of one head; must be even and divide the input's width.
    pub head_dim: usize,
    /// The frequency base (`rope_theta`: 10 000 in Llama 1–2, 500 000 in Llama 3).
    pub base: f32,
    /// Whether pairs are adjacent features rather than the two halves of a head.
    pub interleaved: bool,
}

impl Rotary {
    /// Rotate-half rotary embeddings for heads of width `head_dim` with frequency `base`.
    pub fn new(head_dim: usize, base: f32) -> Self {
        Rotary {
            head_dim,
            base,
            interleaved: false,
        }
    }
}

/// The per-sample shape of an RMSNorm over `x`, after checking its parameters.
pub(crate) fn rms_norm_shape(node: &str, n: &RmsNorm, x: &[usize]) -> Result<Vec<usize>> {
    if !(n.eps >= 0.0 && n.eps.is_finite()) {
        return Err(Error::config(
            format!("node `{node}`"),
            format!("rms norm eps {} is not a finite non-negative number", n.eps),
        ));
    }
    if n.weight.is_empty() || x.last() != Some(&n.weight.len()) {
        return Err(Error::shape(
            "rms_norm",
            Some(node),
            format!("[…, {}] per sample", n.weight.len()),
            x,
        ));
    }
    Ok(x.to_vec())
}

/// The per-sample shape of a rotary embedding over `x` (`[seq, width]`).
pub(crate) fn rotary_shape(node: &str, r: &Rotary, x: &[usize]) -> Result<Vec<usize>> {
    if r.head_dim == 0 || !r.head_dim.is_multiple_of(2) || !(r.base > 0.0 && r.base.is_finite()) {
        return Err(Error::config(
            format!("node `{node}`"),
            format!(
                "rotary embeddings need an even head width (got {}) and a positive, finite base \
                 (got {})",
                r.head_dim, r.base
            ),
        ));
    }
    if x.len() != 2 || !x[1].is_multiple_of(r.head_dim) {
        return Err(Error::shape(
            "rotary",
            Some(node),
            format!("[seq, heads·{}] per sample", r.head_dim),
            x,
        ));
    }
    Ok(x.to_vec())
}

/// The contiguous values of `x` and the length of its last axis.
fn contiguous<'a>(x: &'a Tensor, what: &str) -> Result<(ndarray::CowArray<'a, f32, IxDyn>, usize)> {
    let width = x.shape().last().copied().unwrap_or(0);
    if width == 0 {
        return Err(Error::shape(what, None, "[…, width ≥ 1]", x.shape()));
    }
    Ok((x.as_standard_layout(), width))
}

fn slice<'a>(a: &'a ndarray::CowArray<'_, f32, IxDyn>, what: &str) -> Result<&'a [f32]> {
    a.as_slice()
        .ok_or_else(|| Error::Unsupported(format!("{what}: values are not contiguous")))
}

fn shaped(like: &Tensor, v: Vec<f32>) -> Result<Tensor> {
    Tensor::from_shape_vec(like.raw_dim(), v).map_err(|e| Error::Unsupported(e.to_string()))
}

/// `1 / √(mean(row²) + eps)`, accumulated in f64.
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row.len() as f64;
    (1.0 / (ms + eps as f64).sqrt()) as f32
}

/// RMS normalisation of `x` (full tensor).
pub(crate) fn rms_norm_forward(n: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    let (xs, m) = contiguous(x, "rms_norm")?;
    if m != n.weight.len() {
        return Err(Error::shape(
            "rms_norm",
            None,
            format!("[…, {}]", n.weight.len()),
            x.shape(),
        ));
    }
    let src = slice(&xs, "rms_norm")?;
    let w = n.weight.as_slice().unwrap_or(&[]);
    let mut out = vec![0f32; src.len()];
    for (row, dst) in src.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
        let r = inverse_rms(row, n.eps);
        for k in 0..m {
            dst[k] = row[k] * r * w[k];
        }
    }
    shaped(x, out)
}

/// Gradients of [`rms_norm_forward`]: `(dx, dweight)`.
pub(crate) fn rms_norm_backward(n: &RmsNorm, x: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (xs, m) = contiguous(x, "rms_norm")?;
    let gs = g.as_standard_layout();
    let (src, gsrc) = (slice(&xs, "rms_norm")?, slice(&gs, "rms_norm gradient")?);
    if m != n.weight.len() || gsrc.len() != src.len() {
        return Err(Error::shape(
            "rms_norm backward",
            None,
            format!("{:?}", x.shape()),
            g.shape(),
        ));
    }
    let w = n.weight.as_slice().unwrap_or(&[]);
    let mut dx = vec![0f32; src.len()];
    let mut dw = vec![0f64; m];
    for ((row, grow), drow) in src
        .chunks_exact(m)
        .zip(gsrc.chunks_exact(m))
        .zip(dx.chunks_exact_mut(m))
    {
        let r = inverse_rms(row, n.eps);
        // y = x·r·w with r = (mean(x²) + eps)^−½, so dx = r·(g⊙w) − r³·x·mean(g⊙w⊙x).
        let mut dot = 0f64;
        for k in 0..m {
            dot += (grow[k] * w[k]) as f64 * row[k] as f64;
            dw[k] += (grow[k] * row[k] * r) as f64;
        }
        let c = (dot / m as f64) as f32 * r * r * r;
        for k in 0..m {
            drow[k] = r * grow[k] * w[k] - c * row[k];
        }
    }
    let dw = Tensor::from_shape_vec(IxDyn(&[m]), dw.into_iter().map(|v| v as f32).collect())
        .map_err(|e| Error::Unsupported(e.to_string()))?;
    Ok((shaped(x, dx)?, dw))
}

/// `cos` and `sin` of every (position, rotary index) angle, `[seq, head_dim / 2]` each;
/// angles in f64 so long sequences keep their precision.
fn angles(r: &Rotary, seq: usize) -> (Array2<f32>, Array2<f32>) {
    let half = r.head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| (r.base as f64).powf(-2.0 * i as f64 / r.head_dim as f64))
        .collect();
    let cos = Array2::from_shape_fn((seq, half), |(p, i)| (p as f64 * inv_freq[i]).cos() as f32);
    let sin = Array2::from_shape_fn((seq, half), |(p, i)| (p as f64 * inv_freq[i]).sin() as f32);
    (cos, sin)
}

/// Turns every pair of `x` (`[N, seq, width]`) by its angle; `inverse` turns it back (the
/// transpose of a rotation is its inverse, so this is also the backward pass).
fn rotate(r: &Rotary, x: &Tensor, inverse: bool) -> Result<Tensor> {
    let shape = x.shape().to_vec();
    if shape.len() != 3 || r.head_dim == 0 || !shape[2].is_multiple_of(r.head_dim) {
        return Err(Error::shape(
            "rotary",
            None,
            format!("[N, seq, heads·{}]", r.head_dim),
            &shape,
        ));
    }
    let (seq, width) = (shape[1], shape[2]);
    let half = r.head_dim / 2;
    let (cos, sin) = angles(r, seq);
    let xs = x.as_standard_layout();
    let src = slice(&xs, "rotary")?;
    let mut out = vec![0f32; src.len()];
    let sign = if inverse { -1.0 } else { 1.0 };
    for (t, (row, dst)) in src
        .chunks_exact(width)
        .zip(out.chunks_exact_mut(width))
        .enumerate()
    {
        let p = t % seq;
        let (c, s) = (cos.row(p), sin.row(p));
        for (head, dh) in row
            .chunks_exact(r.head_dim)
            .zip(dst.chunks_exact_mut(r.head_dim))
        {
            for i in 0..half {
                let (ia, ib) = if r.interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (a, b) = (head[ia], head[ib]);
                let (ci, si) = (c[i], sign * s[i]);
                dh[ia] = a * ci - b * si;
                dh[ib] = b * ci + a * si;
            }
        }
    }
    shaped(x, out)
}

/// Rotary embeddings of `x` (full tensor, `[N, seq, width]`).
pub(crate) fn rotary_forward(r: &Rotary, x: &Tensor) -> Result<Tensor> {
    rotate(r, x, false)
}

/// The gradient of [`rotary_forward`] for its input: the inverse rotation of `g`.
pub(crate) fn rotary_backward(r: &Rotary, g: &Tensor) -> Result<Tensor> {
    rotate(r, g, true)
}
