//! Fused multi-head scaled dot-product attention over `[N, seq, width]` projections.
//!
//! The same computation as Reshape → Permute → MatMul → scale → add mask → Softmax →
//! MatMul → Permute → Reshape, without materialising any of it: each (sample, head) task
//! reads its head's columns of q, k and v in place, keeps one `[seq_q, seq_k]` score block,
//! and writes its context straight into its columns of the output. The backward pass
//! recomputes the probabilities rather than keeping `N · heads · seq²` of them.

use super::nd::{broadcast_shapes, sum_to};
use crate::error::{Error, Result};
use crate::kernels::{math, sgemm};
use crate::tensor::Tensor;
use ndarray::{s, Array2, ArrayView2, ArrayViewD, ArrayViewMut2, Axis, Ix3, IxDyn};
use std::borrow::Cow;

/// `softmax(scale · q kᵀ + mask) v` per head: inputs q `[N, Sq, heads·d]`, k `[N, Sk,
/// kv_heads·d]`, v `[N, Sk, kv_heads·dv]` and optionally an additive mask whose per-sample
/// shape broadcasts to `[heads, Sq, Sk]` (BERT's `[1, 1, Sk]` padding mask); output `[N, Sq,
/// heads·dv]`, heads side by side as PyTorch's `MultiheadAttention` and Hugging Face lay
/// them out.
///
/// With fewer key/value heads than query heads (grouped-query attention, Llama 2 70B,
/// Mistral; multi-query with one), query head `h` reads key/value head
/// `h / (heads / kv_heads)`, as Hugging Face's `repeat_kv` arranges them. A `causal`
/// attention lets query `i` see keys `0..=i + Sk − Sq` only (the decoder's mask, applied
/// before the additive one), without building a mask tensor.
///
/// # Examples
/// ```
/// use nncompress::model::Attention;
/// // Llama-style: 8 query heads of width 64 sharing 2 key/value heads, causal.
/// let att = Attention::new(8, 64).with_kv_heads(2).causal();
/// assert_eq!((att.heads, att.kv_heads, att.causal), (8, 2, true));
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Attention {
    /// The number of query heads; divides the width of q.
    pub heads: usize,
    /// The number of key/value heads; divides `heads` and the widths of k and v.
    pub kv_heads: usize,
    /// The factor on the scores (`1 / √d` in the original transformer).
    pub scale: f32,
    /// Whether query `i` sees keys up to its own position only.
    pub causal: bool,
}

impl Attention {
    /// `heads` heads (as many key/value heads), not causal, with the usual `1 / √d` scale
    /// for heads of width `head_dim`.
    pub fn new(heads: usize, head_dim: usize) -> Self {
        Attention {
            heads,
            kv_heads: heads,
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            causal: false,
        }
    }

    /// The same with `kv_heads` key/value heads (grouped-query attention).
    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }

    /// The same with a scale other than `1 / √d`.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// The same, causal.
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// The query heads that share one key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }
}

/// The per-sample output shape, after checking the inputs fit together.
pub(crate) fn attention_shape(node: &str, att: &Attention, ins: &[&[usize]]) -> Result<Vec<usize>> {
    let bad = |want: String, got: &[usize]| Err(Error::shape("attention", Some(node), want, got));
    let (q, k, v) = (ins[0], ins[1], ins[2]);
    if att.heads == 0
        || att.kv_heads == 0
        || !att.heads.is_multiple_of(att.kv_heads)
        || !att.scale.is_finite()
    {
        return Err(Error::config(
            format!("node `{node}`"),
            format!(
                "attention needs at least one head, key/value heads ({}) that divide the query \
                 heads ({}), and a finite scale",
                att.kv_heads, att.heads
            ),
        ));
    }
    if q.len() != 2 || q[1] % att.heads != 0 {
        return bad(format!("[seq, heads·d] with {} heads", att.heads), q);
    }
    let kv_width = q[1] / att.heads * att.kv_heads;
    if k.len() != 2 || k[1] != kv_width {
        return bad(
            format!(
                "[seq_k, {kv_width}] ({} key heads of the query's width)",
                att.kv_heads
            ),
            k,
        );
    }
    if v.len() != 2 || v[0] != k[0] || v[1] % att.kv_heads != 0 {
        return bad(format!("[{}, kv_heads·dv] (the key's length)", k[0]), v);
    }
    if att.causal && k[0] < q[0] {
        return bad(
            format!(
                "at least {} keys for a causal attention of {} queries",
                q[0], q[0]
            ),
            k,
        );
    }
    if let Some(m) = ins.get(3) {
        let scores = [att.heads, q[0], k[0]];
        if m.len() > 3 || broadcast_shapes(m, &scores).as_deref() != Some(&scores[..]) {
            return bad(format!("a mask that broadcasts to {scores:?}"), m);
        }
    }
    Ok(vec![q[0], v[1] / att.kv_heads * att.heads])
}

/// Views a full `[N, S, W]` value as 3-D.
fn view3<'a>(t: ArrayViewD<'a, f32>, node: &str) -> Result<ndarray::ArrayView3<'a, f32>> {
    let shape = t.shape().to_vec();
    t.into_dimensionality::<Ix3>()
        .map_err(|_| Error::shape("attention", Some(node), "[N, seq, width]", &shape))
}

/// The additive mask of sample `n`, head `h`, as [`math::scaled_softmax_rows`] takes it:
/// one row shared by every query row (BERT's padding mask, borrowed in place) or `Sq · Sk`
/// values; `None` without a mask.
///
/// # Errors
/// When the mask does not broadcast to `[Sq, Sk]` (shape inference refuses that first).
fn mask_bias<'m>(
    mask: Option<&'m ArrayViewD<'_, f32>>,
    n: usize,
    h: usize,
    sq: usize,
    sk: usize,
) -> Result<Option<Cow<'m, [f32]>>> {
    let Some(m) = mask else { return Ok(None) };
    let mut v = m.view();
    while v.ndim() < 4 {
        v = v.insert_axis(Axis(1));
    }
    let n = if v.shape()[0] == 1 { 0 } else { n };
    let h = if v.shape()[1] == 1 { 0 } else { h };
    let block = v.slice_move(s![n, h, .., ..]);
    if block.dim() == (1, sk) {
        if let Some(row) = block.index_axis_move(Axis(0), 0).to_slice() {
            return Ok(Some(Cow::Borrowed(row)));
        }
    }
    let shape = block.shape().to_vec();
    let full = block.broadcast((sq, sk)).ok_or_else(|| {
        Error::shape(
            "attention",
            None,
            format!("a mask that broadcasts to [{sq}, {sk}]"),
            &shape,
        )
    })?;
    Ok(Some(Cow::Owned(full.iter().copied().collect())))
}

/// The probabilities of one head: `softmax(scale · q kᵀ + mask)`, `[Sq, Sk]`.
fn probabilities(
    att: &Attention,
    qh: ArrayView2<'_, f32>,
    kh: ArrayView2<'_, f32>,
    bias: Option<&[f32]>,
) -> Result<Array2<f32>> {
    let (sq, sk) = (qh.nrows(), kh.nrows());
    let mut p = Array2::<f32>::zeros((sq, sk));
    sgemm(qh, kh.t(), p.view_mut(), false)?;
    let data = p
        .as_slice_mut()
        .ok_or_else(|| Error::Unsupported("score block not contiguous".into()))?;
    if !att.causal {
        math::scaled_softmax_rows(data, sk, att.scale, bias)?;
        return Ok(p);
    }
    // Query i sees the first i + 1 + (Sk − Sq) keys; the rest keep probability 0.
    let offset = sk.saturating_sub(sq);
    for (i, row) in data.chunks_exact_mut(sk).enumerate() {
        let seen = (i + 1 + offset).min(sk);
        let row_bias = bias.map(|b| {
            let start = if b.len() == sk { 0 } else { i * sk };
            &b[start..start + seen]
        });
        let (visible, hidden) = row.split_at_mut(seen);
        math::scaled_softmax_rows(visible, seen, att.scale, row_bias)?;
        hidden.fill(0.0);
    }
    Ok(p)
}

/// q, k, v and the optional mask of one attention node, full values (batch first).
pub(crate) type Inputs<'a> = [Option<ArrayViewD<'a, f32>>; 4];

/// The inputs as 3-D views with their sizes.
struct Operands<'a> {
    q: ndarray::ArrayView3<'a, f32>,
    k: ndarray::ArrayView3<'a, f32>,
    v: ndarray::ArrayView3<'a, f32>,
    mask: Option<ArrayViewD<'a, f32>>,
    n: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
}

impl<'a> Operands<'a> {
    fn new(att: &Attention, node: &str, ins: Inputs<'a>) -> Result<Self> {
        let [q, k, v, mask] = ins;
        let missing = || Error::Unsupported(format!("`{node}`: attention needs q, k and v"));
        let q = view3(q.ok_or_else(missing)?, node)?;
        let k = view3(k.ok_or_else(missing)?, node)?;
        let v = view3(v.ok_or_else(missing)?, node)?;
        let (n, sq, width) = q.dim();
        Ok(Operands {
            n,
            sq,
            sk: k.shape()[1],
            d: width / att.heads,
            dv: v.shape()[2] / att.kv_heads.max(1),
            q,
            k,
            v,
            mask,
        })
    }
}

/// The attention of full values q, k, v (and the optional mask), `[N, Sq, heads·dv]`.
pub(crate) fn attention_forward(att: &Attention, node: &str, ins: Inputs<'_>) -> Result<Tensor> {
    let Operands {
        q,
        k,
        v,
        mask,
        n,
        sq,
        sk,
        d,
        dv,
    } = Operands::new(att, node, ins)?;
    let wv = att.heads * dv;
    let mut out = Tensor::zeros(IxDyn(&[n, sq, wv]));
    {
        let mut out4 = out
            .view_mut()
            .into_shape_with_order((n, sq, att.heads, dv))
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let mut tasks: Vec<(usize, usize, ArrayViewMut2<'_, f32>)> = Vec::new();
        for (i, sample) in out4.axis_iter_mut(Axis(0)).enumerate() {
            // Splitting consumes the view, so each head's block keeps the output's lifetime.
            let mut rest = sample;
            for h in 0..att.heads {
                let (head, tail) = rest.split_at(Axis(1), 1);
                tasks.push((i, h, head.index_axis_move(Axis(1), 0)));
                rest = tail;
            }
        }
        let group = att.group();
        let task = |(i, h, mut block): (usize, usize, ArrayViewMut2<'_, f32>)| -> Result<()> {
            let kvh = h / group;
            let qh = q.slice(s![i, .., h * d..(h + 1) * d]);
            let kh = k.slice(s![i, .., kvh * d..(kvh + 1) * d]);
            let vh = v.slice(s![i, .., kvh * dv..(kvh + 1) * dv]);
            let bias = mask_bias(mask.as_ref(), i, h, sq, sk)?;
            let p = probabilities(att, qh, kh, bias.as_deref())?;
            sgemm(p.view(), vh, block.view_mut(), false)
        };
        let macs = (n * att.heads * sq * sk).saturating_mul(d + dv);
        if tasks.len() > 1 && macs >= 1 << 20 {
            crate::kernels::parallel::try_for_each(tasks, &task)?;
        } else {
            tasks.into_iter().try_for_each(task)?;
        }
    }
    Ok(out)
}

/// Gradients of [`attention_forward`] for q, k, v and the mask (summed back to its shape).
pub(crate) fn attention_backward(
    att: &Attention,
    node: &str,
    ins: Inputs<'_>,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
    let Operands {
        q,
        k,
        v,
        mask,
        n,
        sq,
        sk,
        d,
        dv,
    } = Operands::new(att, node, ins)?;
    let (width, wv) = (att.heads * d, att.heads * dv);
    let (kv_width, kv_wv) = (att.kv_heads * d, att.kv_heads * dv);
    let group = att.group();
    let g = view3(g.view(), node)?;
    if g.dim() != (n, sq, wv) {
        return Err(Error::shape(
            "attention backward",
            Some(node),
            format!("[{n}, {sq}, {wv}]"),
            g.shape(),
        ));
    }
    let mut dq = Tensor::zeros(IxDyn(&[n, sq, width]));
    let mut dk = Tensor::zeros(IxDyn(&[n, sk, kv_width]));
    let mut dvt = Tensor::zeros(IxDyn(&[n, sk, kv_wv]));
    let mut dscores = mask
        .as_ref()
        .map(|_| Tensor::zeros(IxDyn(&[n, att.heads, sq, sk])));
    for i in 0..n {
        for h in 0..att.heads {
            let kvh = h / group;
            let (cq, cv) = (h * d..(h + 1) * d, h * dv..(h + 1) * dv);
            let (ck, ckv) = (kvh * d..(kvh + 1) * d, kvh * dv..(kvh + 1) * dv);
            let qh = q.slice(s![i, .., cq.clone()]);
            let kh = k.slice(s![i, .., ck.clone()]);
            let vh = v.slice(s![i, .., ckv.clone()]);
            let gh = g.slice(s![i, .., cv]);
            let bias = mask_bias(mask.as_ref(), i, h, sq, sk)?;
            let p = probabilities(att, qh, kh, bias.as_deref())?;
            // dV = Pᵀ g; dP = g Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)). The query heads of one
            // group share a key/value head, so dK and dV accumulate over them.
            let mut dvh = dvt.slice_mut(s![i, .., ckv]);
            let dvh = dvh
                .view_mut()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| Error::Unsupported(e.to_string()))?;
            sgemm(p.t(), gh, dvh, true)?;
            let mut dp = Array2::<f32>::zeros((sq, sk));
            sgemm(gh, vh.t(), dp.view_mut(), false)?;
            for (mut dr, pr) in dp.rows_mut().into_iter().zip(p.rows()) {
                let dot: f32 = dr.iter().zip(pr.iter()).map(|(&a, &b)| a * b).sum();
                dr.zip_mut_with(&pr, |a, &b| *a = b * (*a - dot));
            }
            if let Some(ds) = dscores.as_mut() {
                ds.slice_mut(s![i, h, .., ..]).assign(&dp);
            }
            dp.mapv_inplace(|x| x * att.scale);
            let mut dqh = dq.slice_mut(s![i, .., cq.clone()]);
            sgemm(
                dp.view(),
                kh,
                dqh.view_mut()
                    .into_dimensionality()
                    .map_err(|e| Error::Unsupported(e.to_string()))?,
                false,
            )?;
            let mut dkh = dk.slice_mut(s![i, .., ck]);
            sgemm(
                dp.t(),
                qh,
                dkh.view_mut()
                    .into_dimensionality()
                    .map_err(|e| Error::Unsupported(e.to_string()))?,
                true,
            )?;
        }
    }
    let dmask = match (dscores, mask) {
        (Some(ds), Some(m)) => Some(sum_to(ds, m.shape())?),
        _ => None,
    };
    Ok((dq, dk, dvt, dmask))
}
