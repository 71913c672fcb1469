//! Ops over values of any rank, the pieces transformers are built from: element-wise maths,
//! binary ops with NumPy broadcasting, LayerNorm, softmax over any axis, batched MatMul of
//! two activations, Reshape, Permute and reductions.
//!
//! Every value carries the batch as axis 0. Broadcasting applies to the per-sample shapes
//! (trailing axes aligned, as NumPy), and the batch axes of two activations must agree; a
//! constant operand has no batch axis and is shared by every sample. Axes of Softmax,
//! Permute and the reductions count the batch as axis 0, as PyTorch and ONNX do, and may be
//! negative; none of them may touch the batch axis.

use crate::error::{Error, Result};
use crate::kernels::math;
use crate::tensor::Tensor;
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Zip};

/// An element-wise function of one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unary {
    /// `x · Φ(x)` with the exact normal CDF (PyTorch's default `gelu`, BERT's).
    Gelu,
    /// The tanh approximation of GELU (`approximate="tanh"`, GPT-2's `gelu_new`).
    GeluTanh,
    /// `1 / (1 + e^−x)`.
    Sigmoid,
    /// `tanh(x)`.
    Tanh,
    /// `x · sigmoid(x)` (SiLU, swish).
    Silu,
    /// `x · relu6(x + 3) / 6`.
    HardSwish,
    /// The error function.
    Erf,
    /// `√x` (NaN below zero, as IEEE).
    Sqrt,
    /// `e^x`.
    Exp,
    /// `−x`.
    Neg,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_TANH_CUBIC: f32 = 0.044_715;

impl Unary {
    /// The op kind as reports print it.
    pub fn kind(self) -> &'static str {
        match self {
            Unary::Gelu => "gelu",
            Unary::GeluTanh => "gelu_tanh",
            Unary::Sigmoid => "sigmoid",
            Unary::Tanh => "tanh",
            Unary::Silu => "silu",
            Unary::HardSwish => "hard_swish",
            Unary::Erf => "erf",
            Unary::Sqrt => "sqrt",
            Unary::Exp => "exp",
            Unary::Neg => "neg",
        }
    }

    /// The function at `x`.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Unary::Gelu => math::gelu(x),
            Unary::GeluTanh => {
                let u = SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
            Unary::Sigmoid => sigmoid(x),
            Unary::Tanh => x.tanh(),
            Unary::Silu => x * sigmoid(x),
            Unary::HardSwish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
            Unary::Erf => math::erf(x),
            Unary::Sqrt => x.sqrt(),
            Unary::Exp => math::exp(x),
            Unary::Neg => -x,
        }
    }

    /// `dy/dx` at `x`, given `y = apply(x)`.
    fn derivative(self, x: f32, y: f32) -> f32 {
        match self {
            Unary::Gelu => {
                let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp()
                    * (0.5 * std::f32::consts::FRAC_2_SQRT_PI)
                    * std::f32::consts::FRAC_1_SQRT_2;
                cdf + x * pdf
            }
            Unary::GeluTanh => {
                let u = SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
            Unary::Sigmoid => y * (1.0 - y),
            Unary::Tanh => 1.0 - y * y,
            Unary::Silu => {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            }
            Unary::HardSwish => {
                if x < -3.0 {
                    0.0
                } else if x > 3.0 {
                    1.0
                } else {
                    (2.0 * x + 3.0) / 6.0
                }
            }
            Unary::Erf => std::f32::consts::FRAC_2_SQRT_PI * (-x * x).exp(),
            Unary::Sqrt => 0.5 / y,
            Unary::Exp => y,
            Unary::Neg => -1.0,
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    // exp(−x) overflows to +∞ below −88.7, where 1 / (1 + ∞) is the 0 it should round to.
    1.0 / (1.0 + math::exp(-x))
}

/// An element-wise function of two values, broadcast as NumPy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Binary {
    /// `a + b`.
    Add,
    /// `a − b`.
    Sub,
    /// `a · b`.
    Mul,
    /// `a / b`.
    Div,
    /// `a ^ b`.
    Pow,
    /// The larger of `a` and `b` (with a constant: a clamp from below).
    Max,
    /// The smaller of `a` and `b`.
    Min,
}

impl Binary {
    /// The op kind as reports print it.
    pub fn kind(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Pow => "pow",
            Binary::Max => "max",
            Binary::Min => "min",
        }
    }

    /// The function at `(a, b)`.
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
            Binary::Pow => a.powf(b),
            Binary::Max => a.max(b),
            Binary::Min => a.min(b),
        }
    }

    /// `(∂y/∂a, ∂y/∂b)` at `(a, b)`.
    fn partials(self, a: f32, b: f32) -> (f32, f32) {
        match self {
            Binary::Add => (1.0, 1.0),
            Binary::Sub => (1.0, -1.0),
            Binary::Mul => (b, a),
            Binary::Div => (1.0 / b, -a / (b * b)),
            Binary::Pow => {
                let y = a.powf(b);
                // The exponent's gradient needs ln a; it is 0 where a ≤ 0 (PyTorch agrees
                // at a = 0 and leaves a < 0 undefined).
                let db = if a > 0.0 { y * a.ln() } else { 0.0 };
                let da = if b == 0.0 { 0.0 } else { b * a.powf(b - 1.0) };
                (da, db)
            }
            // The gradient goes to the operand taken; a tie gives it to `a`, as PyTorch's
            // `clamp` does to its input.
            Binary::Max if a >= b => (1.0, 0.0),
            Binary::Min if a <= b => (1.0, 0.0),
            Binary::Max | Binary::Min => (0.0, 1.0),
        }
    }
}

/// A binary op between an activation and a constant of a fixed per-sample shape (a scale,
/// a bias, an additive mask), broadcast as NumPy does.
#[derive(Clone, Debug, PartialEq)]
pub struct BinaryConst {
    /// The function.
    pub op: Binary,
    /// The constant, with no batch axis (`[]` for a scalar).
    pub constant: ArrayD<f32>,
    /// Whether the constant is the left operand (`c − x`, `c / x`).
    pub constant_first: bool,
}

/// Layer normalization over the trailing axes whose shape is `gamma`'s (PyTorch's
/// `LayerNorm(normalized_shape)`): `y = (x − mean) / √(var + eps) · γ + β`, with the biased
/// variance.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// Scale γ (PyTorch `weight`), shaped as the normalized axes.
    pub gamma: ArrayD<f32>,
    /// Shift β (PyTorch `bias`), shaped as `gamma`.
    pub beta: ArrayD<f32>,
    /// Added to the variance before the square root.
    pub eps: f32,
}

impl LayerNorm {
    /// γ = 1, β = 0 over a last axis of `features`, eps 1e-5 (PyTorch's defaults).
    pub fn new(features: usize) -> Self {
        LayerNorm {
            gamma: ArrayD::ones(IxDyn(&[features])),
            beta: ArrayD::zeros(IxDyn(&[features])),
            eps: 1e-5,
        }
    }
}

/// How a reduction combines the values it reduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reduction {
    /// The sum.
    Sum,
    /// The mean.
    Mean,
}

/// The broadcast of two per-sample shapes (NumPy rules), or `None` when they do not fit.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        let pad = rank - s.len();
        if i < pad {
            1
        } else {
            s[i - pad]
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// An axis of a rank-`rank` value (batch included) from a possibly negative index; the
/// batch axis is refused.
pub(crate) fn resolve_axis(axis: isize, rank: usize, what: &str) -> Result<usize> {
    let r = rank as isize;
    let a = if axis < 0 { axis + r } else { axis };
    if a <= 0 || a >= r {
        return Err(Error::config(
            what,
            format!(
                "axis {axis} is outside the per-sample axes 1..{rank} (or −{}..−1)",
                rank - 1
            ),
        ));
    }
    Ok(a as usize)
}

/// `t` (`[N, s…]`) viewed as `[N, 1…, s…]` with `rank` per-sample axes.
fn pad_view<'a>(t: ArrayViewD<'a, f32>, rank: usize) -> ArrayViewD<'a, f32> {
    let mut v = t;
    while v.ndim() < rank + 1 {
        v = v.insert_axis(Axis(1));
    }
    v
}

/// The batch of two operands: equal, or one of them 1 (a constant).
fn joint_batch(a: usize, b: usize, what: &str, shapes: (&[usize], &[usize])) -> Result<usize> {
    match (a, b) {
        (x, y) if x == y => Ok(x),
        (1, y) => Ok(y),
        (x, 1) => Ok(x),
        _ => Err(Error::shape(
            what,
            None,
            format!("batch {a} on both operands"),
            shapes.1,
        )),
    }
}

/// The shape of `op(a, b)` for full tensors `a` and `b` (batch first), with both views
/// padded to the output's rank.
fn binary_layout<'a>(
    what: &str,
    a: ArrayViewD<'a, f32>,
    b: ArrayViewD<'a, f32>,
) -> Result<(Vec<usize>, ArrayViewD<'a, f32>, ArrayViewD<'a, f32>)> {
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    if sa.is_empty() || sb.is_empty() {
        return Err(Error::shape(what, None, "a batch axis", &sa));
    }
    let per = broadcast_shapes(&sa[1..], &sb[1..]).ok_or_else(|| {
        Error::shape(
            what,
            None,
            format!("a shape broadcastable with {sa:?}"),
            &sb,
        )
    })?;
    let n = joint_batch(sa[0], sb[0], what, (&sa, &sb))?;
    let mut out = vec![n];
    out.extend_from_slice(&per);
    Ok((out, pad_view(a, per.len()), pad_view(b, per.len())))
}

/// `op(a, b)` with broadcasting.
pub(crate) fn binary_forward(
    op: Binary,
    a: ArrayViewD<'_, f32>,
    b: ArrayViewD<'_, f32>,
) -> Result<Tensor> {
    let (shape, a, b) = binary_layout(op.kind(), a, b)?;
    if a.shape() == b.shape() {
        if let (Some(sa), Some(sb)) = (a.as_slice(), b.as_slice()) {
            let mut y = sa.to_vec();
            binary_assign_slices(op, &mut y, sb);
            return Tensor::from_shape_vec(IxDyn(&shape), y)
                .map_err(|e| Error::Unsupported(e.to_string()));
        }
    }
    let mut y = Tensor::zeros(IxDyn(&shape));
    let (ab, bb) = (stretch(&a, &shape, op)?, stretch(&b, &shape, op)?);
    Zip::from(&mut y)
        .and(&ab)
        .and(&bb)
        .for_each(|y, &a, &b| *y = op.apply(a, b));
    Ok(y)
}

/// `a = op(a, b)` element by element for a `b` of `a`'s own shape (a residual add written
/// over the buffer its node reads last).
///
/// # Errors
/// [`Error::ShapeMismatch`] when the shapes differ.
pub(crate) fn binary_assign(op: Binary, a: &mut Tensor, b: ArrayViewD<'_, f32>) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(
            op.kind(),
            None,
            format!("{:?}", a.shape()),
            b.shape(),
        ));
    }
    match (a.as_slice_mut(), b.as_slice()) {
        (Some(sa), Some(sb)) => binary_assign_slices(op, sa, sb),
        _ => Zip::from(a).and(&b).for_each(|x, &y| *x = op.apply(*x, y)),
    }
    Ok(())
}

/// The slice loop with the op chosen once, outside it, so each arm vectorizes.
fn binary_assign_slices(op: Binary, a: &mut [f32], b: &[f32]) {
    fn each(a: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = f(*x, y);
        }
    }
    match op {
        Binary::Add => each(a, b, |x, y| x + y),
        Binary::Sub => each(a, b, |x, y| x - y),
        Binary::Mul => each(a, b, |x, y| x * y),
        Binary::Div => each(a, b, |x, y| x / y),
        Binary::Max => each(a, b, f32::max),
        Binary::Min => each(a, b, f32::min),
        Binary::Pow => each(a, b, f32::powf),
    }
}

/// The gradients of `op(a, b)` with respect to `a` and `b` (each summed back to its own
/// shape), given the output gradient `g`.
pub(crate) fn binary_backward(
    op: Binary,
    a: ArrayViewD<'_, f32>,
    b: ArrayViewD<'_, f32>,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let (shape, ap, bp) = binary_layout(op.kind(), a, b)?;
    if g.shape() != shape.as_slice() {
        return Err(Error::shape(
            op.kind(),
            None,
            format!("{shape:?}"),
            g.shape(),
        ));
    }
    let dim = IxDyn(&shape);
    let (ab, bb) = (stretch(&ap, &shape, op)?, stretch(&bp, &shape, op)?);
    let mut da = Tensor::zeros(dim.clone());
    let mut db = Tensor::zeros(dim.clone());
    Zip::from(&mut da)
        .and(&mut db)
        .and(g)
        .and(&ab)
        .and(&bb)
        .for_each(|da, db, &g, &a, &b| {
            let (pa, pb) = op.partials(a, b);
            *da = g * pa;
            *db = g * pb;
        });
    Ok((sum_to(da, &sa)?, sum_to(db, &sb)?))
}

/// `v` broadcast to `shape`.
fn stretch<'a>(
    v: &'a ArrayViewD<'_, f32>,
    shape: &[usize],
    op: Binary,
) -> Result<ArrayViewD<'a, f32>> {
    v.broadcast(IxDyn(shape))
        .ok_or_else(|| Error::shape(op.kind(), None, format!("{shape:?}"), v.shape()))
}

/// Sums `g` over the axes that broadcasting added or stretched, back to `shape` (a full
/// shape, batch first, of the same or lower rank).
pub(crate) fn sum_to(g: Tensor, shape: &[usize]) -> Result<Tensor> {
    let mismatch =
        |g: &Tensor| Error::shape("broadcast gradient", None, format!("{shape:?}"), g.shape());
    if shape.is_empty() || g.ndim() < shape.len() {
        return Err(mismatch(&g));
    }
    let extra = g.ndim() - shape.len();
    let mut g = g;
    // Added axes sit just after the batch axis.
    for _ in 0..extra {
        g = g.sum_axis(Axis(1));
    }
    for (k, &want) in shape.iter().enumerate() {
        let have = g.shape()[k];
        if have == want {
            continue;
        }
        if want != 1 {
            return Err(mismatch(&g));
        }
        g = g.sum_axis(Axis(k)).insert_axis(Axis(k));
    }
    Ok(g)
}

/// The per-sample shape `op` gives two per-sample shapes.
pub(crate) fn binary_shape(node: &str, op: Binary, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    broadcast_shapes(a, b).ok_or_else(|| {
        Error::shape(
            op.kind(),
            Some(node),
            format!("a shape broadcastable with {a:?}"),
            b,
        )
    })
}

/// A constant as a one-sample tensor `[1, c…]`.
pub(crate) fn constant_view(c: &ArrayD<f32>) -> ArrayViewD<'_, f32> {
    c.view().insert_axis(Axis(0))
}

/// The per-sample shape of a LayerNorm over `x`, after checking its parameters.
pub(crate) fn layer_norm_shape(node: &str, ln: &LayerNorm, x: &[usize]) -> Result<Vec<usize>> {
    let norm = ln.gamma.shape();
    if norm.is_empty() || ln.beta.shape() != norm {
        return Err(Error::config(
            format!("node `{node}`"),
            "layer norm γ and β must have the same, non-scalar shape",
        ));
    }
    if !(ln.eps >= 0.0 && ln.eps.is_finite()) {
        return Err(Error::config(
            format!("node `{node}`"),
            format!(
                "layer norm eps {} is not a finite non-negative number",
                ln.eps
            ),
        ));
    }
    if x.len() < norm.len() || &x[x.len() - norm.len()..] != norm {
        return Err(Error::shape(
            "layer_norm",
            Some(node),
            format!("[…, {}] per sample", dims(norm)),
            x,
        ));
    }
    Ok(x.to_vec())
}

fn dims(d: &[usize]) -> String {
    d.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rows of `x` over the normalized axes: (row count, row length) and a contiguous copy
/// or view.
fn rows<'a>(
    x: &'a Tensor,
    width: usize,
    what: &str,
) -> Result<(ndarray::CowArray<'a, f32, IxDyn>, usize)> {
    if width == 0 || !x.len().is_multiple_of(width) {
        return Err(Error::shape(what, None, format!("[…, {width}]"), x.shape()));
    }
    Ok((x.as_standard_layout(), x.len() / width))
}

/// Layer normalization of `x` (full tensor).
pub(crate) fn layer_norm_forward(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    let m = ln.gamma.len();
    let (xs, _) = rows(x, m, "layer_norm")?;
    let src = xs
        .as_slice()
        .ok_or_else(|| Error::Unsupported("layer norm input is not contiguous".into()))?;
    let gamma = ln.gamma.as_standard_layout();
    let beta = ln.beta.as_standard_layout();
    let (gamma, beta) = (
        gamma.as_slice().unwrap_or(&[]),
        beta.as_slice().unwrap_or(&[]),
    );
    if gamma.len() != m || beta.len() != m {
        return Err(Error::Unsupported(
            "layer norm parameters are not contiguous".into(),
        ));
    }
    let mut out = vec![0f32; src.len()];
    let normalise = |(src, out): (&[f32], &mut [f32])| {
        // Lengths were checked above; the kernel's own check cannot fail here.
        let _ = math::layer_norm_rows(src, out, gamma, beta, ln.eps);
    };
    // Rows are independent: a sequence's rows are split over the threads (each row's
    // arithmetic is the same whoever runs it).
    let threads = rayon::current_num_threads();
    if threads > 1 && src.len() >= 1 << 16 {
        let per = (src.len() / m).div_ceil(threads * 2).max(1) * m;
        let tasks: Vec<_> = src.chunks(per).zip(out.chunks_mut(per)).collect();
        crate::kernels::parallel::for_each(tasks, &normalise);
    } else {
        normalise((src, &mut out));
    }
    Tensor::from_shape_vec(x.raw_dim(), out).map_err(|e| Error::Unsupported(e.to_string()))
}

/// Gradients of [`layer_norm_forward`]: `(dx, dγ, dβ)`.
pub(crate) fn layer_norm_backward(
    ln: &LayerNorm,
    x: &Tensor,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let m = ln.gamma.len();
    let (xs, _) = rows(x, m, "layer_norm")?;
    let gs = g.as_standard_layout();
    let (Some(src), Some(gsrc)) = (xs.as_slice(), gs.as_slice()) else {
        return Err(Error::Unsupported(
            "layer norm values are not contiguous".into(),
        ));
    };
    if gsrc.len() != src.len() {
        return Err(Error::shape(
            "layer_norm",
            None,
            format!("{:?}", x.shape()),
            g.shape(),
        ));
    }
    let gamma = ln.gamma.as_standard_layout();
    let gamma = gamma.as_slice().unwrap_or(&[]);
    let mut dx = vec![0f32; src.len()];
    let mut dgamma = vec![0f64; m];
    let mut dbeta = vec![0f64; m];
    let mut xhat = vec![0f32; m];
    let mut dxhat = vec![0f32; m];
    for ((row, grow), drow) in src
        .chunks_exact(m)
        .zip(gsrc.chunks_exact(m))
        .zip(dx.chunks_exact_mut(m))
    {
        let (mean, inv_std) = math::row_moments(row, ln.eps);
        let (mut mean_d, mut mean_dx) = (0f64, 0f64);
        for k in 0..m {
            xhat[k] = (row[k] - mean) * inv_std;
            dxhat[k] = grow[k] * gamma[k];
            mean_d += dxhat[k] as f64;
            mean_dx += (dxhat[k] * xhat[k]) as f64;
            dgamma[k] += (grow[k] * xhat[k]) as f64;
            dbeta[k] += grow[k] as f64;
        }
        let (mean_d, mean_dx) = ((mean_d / m as f64) as f32, (mean_dx / m as f64) as f32);
        for k in 0..m {
            drow[k] = inv_std * (dxhat[k] - mean_d - xhat[k] * mean_dx);
        }
    }
    let shaped = |v: Vec<f64>| {
        Tensor::from_shape_vec(
            ln.gamma.raw_dim(),
            v.into_iter().map(|v| v as f32).collect(),
        )
        .map_err(|e| Error::Unsupported(e.to_string()))
    };
    let dx =
        Tensor::from_shape_vec(x.raw_dim(), dx).map_err(|e| Error::Unsupported(e.to_string()))?;
    Ok((dx, shaped(dgamma)?, shaped(dbeta)?))
}

/// Softmax of `x` along `axis` (resolved), stabilised by each lane's maximum.
pub(crate) fn softmax(x: &Tensor, axis: usize) -> Tensor {
    let mut y = x.as_standard_layout().into_owned();
    softmax_in_place(&mut y, axis);
    y
}

/// Softmax along `axis`, in place; contiguous rows (the last axis of a standard-layout
/// value, attention's case) go to the vectorized kernel.
pub(crate) fn softmax_in_place(y: &mut Tensor, axis: usize) {
    let row_len = y.shape()[axis];
    if axis + 1 == y.ndim() {
        if let Some(data) = y.as_slice_mut() {
            math::softmax_rows(data, row_len);
            return;
        }
    }
    for mut lane in y.lanes_mut(Axis(axis)) {
        let m = lane.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        lane.mapv_inplace(|v| math::exp(v - m));
        let s = lane.sum();
        lane.mapv_inplace(|v| v / s);
    }
}

/// The input gradient of softmax along `axis`, from its output `y`.
pub(crate) fn softmax_backward(y: &Tensor, g: &Tensor, axis: usize) -> Tensor {
    let mut d = g * y;
    let dot = d.sum_axis(Axis(axis)).insert_axis(Axis(axis));
    d -= &(y * &dot);
    d
}

/// The per-sample shape of `a @ b` (batched, leading axes broadcast).
pub(crate) fn matmul_shape(node: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let err = |want: String| Err(Error::shape("matmul", Some(node), want, b));
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::shape(
            "matmul",
            Some(node),
            "two operands of at least two axes per sample",
            if a.len() < 2 { a } else { b },
        ));
    }
    let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
    let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
    if k != k2 {
        return err(format!("[…, {k}, _] (rows = the left operand's columns)"));
    }
    let Some(mut lead) = broadcast_shapes(&a[..a.len() - 2], &b[..b.len() - 2]) else {
        return err(format!(
            "leading axes broadcastable with {:?}",
            &a[..a.len() - 2]
        ));
    };
    lead.extend([m, n]);
    Ok(lead)
}

/// Both operands broadcast to their joint leading axes and flattened to `[B, rows, cols]`.
fn matmul_operands<'a>(
    a: ArrayViewD<'a, f32>,
    b: ArrayViewD<'a, f32>,
) -> Result<(Vec<usize>, ArrayD<f32>, ArrayD<f32>)> {
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    if sa.len() < 3 || sb.len() < 3 {
        return Err(Error::shape("matmul", None, "[N, …, rows, cols]", &sa));
    }
    let per = matmul_shape("matmul", &sa[1..], &sb[1..])?;
    let n = joint_batch(sa[0], sb[0], "matmul", (&sa, &sb))?;
    let mut lead = vec![n];
    lead.extend_from_slice(&per[..per.len() - 2]);
    let flat = |v: ArrayViewD<'a, f32>, s: &[usize]| -> Result<ArrayD<f32>> {
        let v = pad_view(v, per.len());
        let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
        let mut full = lead.clone();
        full.extend([r, c]);
        let bv = v
            .broadcast(IxDyn(&full))
            .ok_or_else(|| Error::shape("matmul", None, format!("{full:?}"), s))?;
        let batch: usize = lead.iter().product();
        bv.as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(&[batch, r, c]))
            .map_err(|e| Error::Unsupported(e.to_string()))
    };
    let a3 = flat(a, &sa)?;
    let b3 = flat(b, &sb)?;
    Ok((lead, a3, b3))
}

fn as_3d(t: &ArrayD<f32>) -> Result<ndarray::ArrayView3<'_, f32>> {
    t.view()
        .into_dimensionality::<ndarray::Ix3>()
        .map_err(|e| Error::Unsupported(e.to_string()))
}

fn batched_product(a3: &ArrayD<f32>, b3: &ArrayD<f32>, ta: bool, tb: bool) -> Result<ArrayD<f32>> {
    let (a3, b3) = (as_3d(a3)?, as_3d(b3)?);
    let batch = a3.shape()[0];
    let rows = if ta { a3.shape()[2] } else { a3.shape()[1] };
    let cols = if tb { b3.shape()[1] } else { b3.shape()[2] };
    let mut out = ndarray::Array3::<f32>::zeros((batch, rows, cols));
    let product = |(i, mut c): (usize, ndarray::ArrayViewMut2<'_, f32>)| {
        let (x, y) = (a3.index_axis(Axis(0), i), b3.index_axis(Axis(0), i));
        let x = if ta { x.reversed_axes() } else { x };
        let y = if tb { y.reversed_axes() } else { y };
        crate::kernels::sgemm(x, y, c.view_mut(), false)
    };
    let tasks: Vec<_> = out.axis_iter_mut(Axis(0)).enumerate().collect();
    // The products of one attention layer are many and small (one per head): spread them
    // over the threads rather than splitting each.
    let inner = if ta { a3.shape()[1] } else { a3.shape()[2] };
    let macs = batch
        .saturating_mul(rows)
        .saturating_mul(cols)
        .saturating_mul(inner);
    if batch > 1 && macs >= 1 << 20 {
        crate::kernels::parallel::try_for_each(tasks, &product)?;
    } else {
        tasks.into_iter().try_for_each(product)?;
    }
    Ok(out.into_dyn())
}

/// `a @ b` over full tensors, leading axes (batch included) broadcast.
pub(crate) fn matmul_forward(a: ArrayViewD<'_, f32>, b: ArrayViewD<'_, f32>) -> Result<Tensor> {
    let (lead, a3, b3) = matmul_operands(a, b)?;
    let y = batched_product(&a3, &b3, false, false)?;
    let mut shape = lead;
    shape.extend_from_slice(&y.shape()[1..]);
    y.into_shape_with_order(IxDyn(&shape))
        .map_err(|e| Error::Unsupported(e.to_string()))
}

/// Gradients of [`matmul_forward`] with respect to both operands, given `g`.
pub(crate) fn matmul_backward(
    a: ArrayViewD<'_, f32>,
    b: ArrayViewD<'_, f32>,
    g: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let (lead, a3, b3) = matmul_operands(a, b)?;
    let batch: usize = lead.iter().product();
    let (m, n) = (a3.shape()[1], b3.shape()[2]);
    let g3 = g
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(&[batch, m, n]))
        .map_err(|_| Error::shape("matmul", None, format!("{lead:?} + [{m}, {n}]"), g.shape()))?;
    let da3 = batched_product(&g3, &b3, false, true)?;
    let db3 = batched_product(&a3, &g3, true, false)?;
    let full = |t: ArrayD<f32>, s: &[usize]| -> Result<Tensor> {
        let mut shape = lead.clone();
        shape.extend_from_slice(&s[s.len() - 2..]);
        let t = t
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        sum_to(t, s)
    };
    Ok((full(da3, &sa)?, full(db3, &sb)?))
}

/// The per-sample shape of a Reshape to `target` (one −1 inferred; 0 copies the input's
/// dimension at that position, as ONNX).
pub(crate) fn reshape_shape(node: &str, target: &[isize], x: &[usize]) -> Result<Vec<usize>> {
    let bad = |why: String| Err(Error::config(format!("node `{node}`"), why));
    let total: usize = x.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (k, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(k);
                out.push(1);
            }
            -1 => return bad("reshape has more than one −1".into()),
            0 => match x.get(k) {
                Some(&d) => out.push(d),
                None => return bad(format!("reshape copies axis {k}, which the input lacks")),
            },
            t if t > 0 => out.push(t as usize),
            t => return bad(format!("reshape dimension {t} is negative")),
        }
    }
    let known = out
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::config(format!("node `{node}`"), "reshape size overflows"))?;
    if let Some(k) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(Error::shape(
                "reshape",
                Some(node),
                format!("a size divisible by {known}"),
                x,
            ));
        }
        out[k] = total / known;
    } else if known != total {
        return Err(Error::shape(
            "reshape",
            Some(node),
            format!("{known} elements per sample"),
            x,
        ));
    }
    Ok(out)
}

/// The per-sample shape of a Permute by `axes` (a permutation of the full tensor's axes that
/// keeps the batch first).
pub(crate) fn permute_shape(node: &str, axes: &[usize], x: &[usize]) -> Result<Vec<usize>> {
    let rank = x.len() + 1;
    let mut seen = vec![false; rank];
    let valid = axes.len() == rank
        && axes.first() == Some(&0)
        && axes
            .iter()
            .all(|&a| a < rank && !std::mem::replace(&mut seen[a], true));
    if !valid {
        return Err(Error::config(
            format!("node `{node}`"),
            format!("axes {axes:?} are not a permutation of 0..{rank} that keeps 0 first"),
        ));
    }
    Ok(axes[1..].iter().map(|&a| x[a - 1]).collect())
}

/// `x` with its axes permuted, in standard layout.
pub(crate) fn permute_forward(x: ArrayViewD<'_, f32>, axes: &[usize]) -> Result<Tensor> {
    if axes.len() != x.ndim() {
        return Err(Error::shape(
            "permute",
            None,
            format!("{} axes", axes.len()),
            x.shape(),
        ));
    }
    Ok(x.permuted_axes(IxDyn(axes))
        .as_standard_layout()
        .into_owned())
}

/// The inverse of a permutation.
pub(crate) fn inverse_permutation(axes: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; axes.len()];
    for (i, &a) in axes.iter().enumerate() {
        if let Some(slot) = inv.get_mut(a) {
            *slot = i;
        }
    }
    inv
}

/// The sorted, resolved axes of a reduction over a value of per-sample rank `rank`.
pub(crate) fn reduce_axes(node: &str, axes: &[isize], rank: usize) -> Result<Vec<usize>> {
    let what = format!("node `{node}`");
    if axes.is_empty() {
        return Err(Error::config(what, "a reduction needs at least one axis"));
    }
    let mut out = axes
        .iter()
        .map(|&a| resolve_axis(a, rank + 1, &what))
        .collect::<Result<Vec<_>>>()?;
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::config(what, format!("axes {axes:?} repeat an axis")));
    }
    Ok(out)
}

/// The per-sample shape of a reduction over `axes` (resolved, full-tensor).
pub(crate) fn reduce_shape(axes: &[usize], x: &[usize], keep_dims: bool) -> Vec<usize> {
    (1..=x.len())
        .filter_map(|a| match (axes.contains(&a), keep_dims) {
            (true, true) => Some(1),
            (true, false) => None,
            (false, _) => Some(x[a - 1]),
        })
        .collect()
}

/// The reduction of `x` over `axes` (resolved, sorted).
pub(crate) fn reduce_forward(
    x: &Tensor,
    how: Reduction,
    axes: &[usize],
    keep_dims: bool,
) -> Tensor {
    let mut y = x.clone();
    let mut count = 1usize;
    for &a in axes.iter().rev() {
        count *= x.shape()[a];
        y = y.sum_axis(Axis(a));
        if keep_dims {
            y = y.insert_axis(Axis(a));
        }
    }
    if how == Reduction::Mean && count > 0 {
        y.mapv_inplace(|v| v / count as f32);
    }
    y
}

/// The input gradient of [`reduce_forward`].
pub(crate) fn reduce_backward(
    x: &Tensor,
    g: &Tensor,
    how: Reduction,
    axes: &[usize],
    keep_dims: bool,
) -> Result<Tensor> {
    let mut gk = g.view();
    if !keep_dims {
        for &a in axes {
            gk = gk.insert_axis(Axis(a));
        }
    }
    let count: usize = axes.iter().map(|&a| x.shape()[a]).product();
    let scale = match how {
        Reduction::Sum => 1.0,
        Reduction::Mean => 1.0 / count.max(1) as f32,
    };
    let b = gk
        .broadcast(x.raw_dim())
        .ok_or_else(|| Error::shape("reduce", None, format!("{:?}", x.shape()), g.shape()))?;
    Ok(b.mapv(|v| v * scale))
}

/// `f` applied element-wise.
pub(crate) fn unary_forward(f: Unary, x: ArrayViewD<'_, f32>) -> Tensor {
    x.mapv(|v| f.apply(v))
}

/// `f` of every value of `y`, in place.
pub(crate) fn unary_in_place(f: Unary, y: &mut Tensor) {
    match (f, y.as_slice_memory_order_mut()) {
        (Unary::Gelu, Some(data)) => math::gelu_in_place(data),
        (_, Some(data)) => data.iter_mut().for_each(|v| *v = f.apply(*v)),
        (_, None) => y.mapv_inplace(|v| f.apply(v)),
    }
}

/// The input gradient of [`unary_forward`], from its input `x` and output `y`.
pub(crate) fn unary_backward(f: Unary, x: &Tensor, y: &Tensor, g: &Tensor) -> Tensor {
    let mut d = g.clone();
    Zip::from(&mut d)
        .and(x)
        .and(y)
        .for_each(|d, &x, &y| *d *= f.derivative(x, y));
    d
}
