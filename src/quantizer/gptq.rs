//! Weight-only quantization per group: round to nearest, and GPTQ (Frantar et al., 2022,
//! "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
//! columns quantized one at a time, each one's rounding error spread over the columns not
//! yet quantized through the inverse Hessian `(2·X·Xᵀ)⁻¹` of the layer's calibration
//! inputs, in blocks with lazy updates, optionally in order of decreasing Hessian diagonal
//! ("act order"). Arithmetic in f64, as the reference's algorithm on a direct NumPy port.

use crate::error::{Error, Result};
use ndarray::{s, Array2, ArrayView2};

/// A per-group grid: `bits` (2–8) unsigned codes with a zero point per group of `group`
/// consecutive input features of each output row (`[out, in / group]` scales).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupScheme {
    /// Bits per weight.
    pub bits: u8,
    /// Input features per group (a divisor of the layer's input width).
    pub group: usize,
    /// A zero point at the middle of the grid (`2^(bits−1)`) and a scale from `max |w|`;
    /// otherwise the group's own range (affine).
    pub symmetric: bool,
}

impl GroupScheme {
    /// 4-bit, groups of `group`, affine (GPTQ's and AWQ's usual setting).
    pub fn int4(group: usize) -> Self {
        GroupScheme {
            bits: 4,
            group,
            symmetric: false,
        }
    }

    fn check(&self, in_features: usize) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(Error::config(
                "group scheme",
                format!("{} bits (2 to 8 are supported)", self.bits),
            ));
        }
        if self.group == 0 || !in_features.is_multiple_of(self.group) {
            return Err(Error::config(
                "group scheme",
                format!(
                    "a group of {} does not divide the {in_features} input features",
                    self.group
                ),
            ));
        }
        Ok(())
    }

    fn max_code(&self) -> f64 {
        f64::from((1u32 << self.bits) - 1)
    }

    /// `(scale, zero)` of one row's group values (GPTQ's `find_params`: the range widened
    /// to hold 0, an all-zero group mapped to `[−1, 1]`).
    fn params(&self, values: impl Iterator<Item = f64>) -> (f64, f64) {
        let (lo, hi) = values.fold((0f64, 0f64), |(l, h), v| (l.min(v), h.max(v)));
        let maxq = self.max_code();
        // As the reference: symmetric widens a negative minimum to −max|w| (a group of
        // non-negative weights keeps 0 as its minimum).
        let (lo, hi) = if self.symmetric {
            let m = lo.abs().max(hi);
            (if lo < 0.0 { -m } else { lo }, m)
        } else {
            (lo, hi)
        };
        let (lo, hi) = if lo == 0.0 && hi == 0.0 {
            (-1.0, 1.0)
        } else {
            (lo, hi)
        };
        let scale = (hi - lo) / maxq;
        let zero = if self.symmetric {
            (maxq + 1.0) / 2.0
        } else {
            (-lo / scale).round_ties_even()
        };
        (scale, zero)
    }

    fn code(&self, w: f64, scale: f64, zero: f64) -> f64 {
        ((w / scale).round_ties_even() + zero).clamp(0.0, self.max_code())
    }
}

/// Weights quantized per group: codes, and per `(row, group)` scales and zero points.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupQuantized {
    /// Codes `[out, in]` in `0..2^bits`, in the layer's own column order.
    pub codes: Array2<u8>,
    /// Scales `[out, in / group]`.
    pub scales: Array2<f32>,
    /// Zero points `[out, in / group]`.
    pub zeros: Array2<u8>,
    /// The scheme.
    pub scheme: GroupScheme,
    /// The group of each input feature (`column / group`, or by processing order with act
    /// order, as GPTQ's `g_idx`).
    pub group_of: Vec<usize>,
}

impl GroupQuantized {
    /// The f32 weights the codes stand for, `[out, in]`.
    pub fn dequantize(&self) -> Array2<f32> {
        Array2::from_shape_fn(self.codes.dim(), |(r, c)| {
            let g = self.group_of[c];
            let s = self.scales[[r, g]];
            s * (f32::from(self.codes[[r, c]]) - f32::from(self.zeros[[r, g]]))
        })
    }

    /// Bytes of the packed codes (two 4-bit codes a byte for `bits ≤ 4`), the f32 scales
    /// and the zero points.
    pub fn stored_bytes(&self) -> usize {
        let codes = if self.scheme.bits <= 4 {
            self.codes.len().div_ceil(2)
        } else {
            self.codes.len()
        };
        codes + 4 * self.scales.len() + self.zeros.len()
    }
}

/// Round to nearest per group (no calibration).
///
/// # Errors
/// [`Error::InvalidConfig`] for a group that does not divide the input width or bits
/// outside 2–8; [`Error::NonFinite`] for a NaN or infinite weight.
pub fn quantize_rtn(weight: &Array2<f32>, scheme: GroupScheme) -> Result<GroupQuantized> {
    let (out, cols) = weight.dim();
    scheme.check(cols)?;
    finite(weight.view())?;
    let groups = cols / scheme.group;
    let mut q = GroupQuantized {
        codes: Array2::zeros((out, cols)),
        scales: Array2::zeros((out, groups)),
        zeros: Array2::zeros((out, groups)),
        scheme,
        group_of: (0..cols).map(|c| c / scheme.group).collect(),
    };
    for r in 0..out {
        for g in 0..groups {
            let span = g * scheme.group..(g + 1) * scheme.group;
            let (scale, zero) = scheme.params(
                weight
                    .slice(s![r, span.clone()])
                    .iter()
                    .map(|&v| f64::from(v)),
            );
            q.scales[[r, g]] = scale as f32;
            q.zeros[[r, g]] = zero as u8;
            for c in span {
                q.codes[[r, c]] = scheme.code(f64::from(weight[[r, c]]), scale, zero) as u8;
            }
        }
    }
    Ok(q)
}

fn finite(w: ArrayView2<'_, f32>) -> Result<()> {
    if w.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite("a weight to quantize".into()))
    }
}

/// `H = 2/n · Σ x·xᵀ` over the calibration inputs `x` of one layer (rows of `[tokens, in]`),
/// accumulated batch by batch as GPTQ's `add_batch` does.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    h: Array2<f64>,
    samples: usize,
}

impl Hessian {
    /// An empty Hessian for `in_features` inputs.
    pub fn new(in_features: usize) -> Self {
        Hessian {
            h: Array2::zeros((in_features, in_features)),
            samples: 0,
        }
    }

    /// Adds the rows of `x` (`[tokens, in]`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for rows of another width; [`Error::NonFinite`] for a NaN
    /// or infinite activation.
    pub fn add_rows(&mut self, x: ArrayView2<'_, f32>) -> Result<()> {
        let d = self.h.nrows();
        if x.ncols() != d {
            return Err(Error::shape(
                "hessian",
                None,
                format!("[tokens, {d}]"),
                x.shape(),
            ));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite("a calibration activation".into()));
        }
        let n = x.nrows();
        if n == 0 {
            return Ok(());
        }
        // The running mean of 2·x·xᵀ: H ← H·s/(s+n) + 2/(s+n)·XᵀX.
        let total = (self.samples + n) as f64;
        self.h *= self.samples as f64 / total;
        let x64 = x.mapv(f64::from);
        self.h += &(x64.t().dot(&x64) * (2.0 / total));
        self.samples += n;
        Ok(())
    }

    /// The calibration rows seen.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The matrix.
    pub fn matrix(&self) -> &Array2<f64> {
        &self.h
    }
}

/// GPTQ's options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqConfig {
    /// Damping added to the diagonal, as a fraction of its mean (`percdamp`, 0.01).
    pub damp: f64,
    /// Columns per lazy-update block (128).
    pub block: usize,
    /// Quantize columns in order of decreasing Hessian diagonal.
    pub act_order: bool,
}

impl Default for GptqConfig {
    fn default() -> Self {
        GptqConfig {
            damp: 0.01,
            block: 128,
            act_order: false,
        }
    }
}

/// GPTQ of `weight` (`[out, in]`) with the layer's calibration Hessian.
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad scheme or config (as [`quantize_rtn`], a block of 0,
/// damping that is not a finite non-negative number), or a Hessian without samples (GPTQ
/// needs the layer's calibration inputs) or that is not positive definite even damped;
/// [`Error::ShapeMismatch`] for a Hessian of another size; [`Error::NonFinite`] for a NaN
/// or infinite weight.
pub fn quantize_gptq(
    weight: &Array2<f32>,
    hessian: &Hessian,
    scheme: GroupScheme,
    config: &GptqConfig,
) -> Result<GroupQuantized> {
    let (out, cols) = weight.dim();
    scheme.check(cols)?;
    finite(weight.view())?;
    if hessian.h.nrows() != cols {
        return Err(Error::shape(
            "gptq",
            None,
            format!("a Hessian of {cols} × {cols}"),
            hessian.h.shape(),
        ));
    }
    if hessian.samples == 0 {
        return Err(Error::config(
            "gptq",
            "the Hessian has no calibration rows (GPTQ needs the layer's inputs)",
        ));
    }
    if config.block == 0 || !(config.damp.is_finite() && config.damp >= 0.0) {
        return Err(Error::config(
            "gptq",
            "the block must be positive and the damping finite and non-negative",
        ));
    }
    let mut w = weight.mapv(f64::from);
    let mut h = hessian.h.clone();
    // Inputs that never fire: weight 0, unit Hessian diagonal.
    for c in 0..cols {
        if h[[c, c]] == 0.0 {
            h[[c, c]] = 1.0;
            w.column_mut(c).fill(0.0);
        }
    }
    let perm: Vec<usize> = if config.act_order {
        let mut p: Vec<usize> = (0..cols).collect();
        // Stable, by decreasing diagonal (NumPy's argsort of −diag, kind="stable").
        p.sort_by(|&a, &b| h[[b, b]].total_cmp(&h[[a, a]]));
        p
    } else {
        (0..cols).collect()
    };
    let w_perm = Array2::from_shape_fn((out, cols), |(r, c)| w[[r, perm[c]]]);
    let mut w = w_perm;
    let h = Array2::from_shape_fn((cols, cols), |(i, j)| h[[perm[i], perm[j]]]);
    let mean_diag = h.diag().sum() / cols as f64;
    let mut h = h;
    for c in 0..cols {
        h[[c, c]] += config.damp * mean_diag;
    }
    let hinv = upper_cholesky_of_inverse(&h)?;
    let groups = cols / scheme.group;
    let mut codes = Array2::<u8>::zeros((out, cols));
    let mut scales = Array2::<f32>::zeros((out, groups));
    let mut zeros = Array2::<u8>::zeros((out, groups));
    let mut params = vec![(1.0f64, 0.0f64); out];
    let mut i1 = 0;
    while i1 < cols {
        let i2 = (i1 + config.block).min(cols);
        let count = i2 - i1;
        let mut w1 = w.slice(s![.., i1..i2]).to_owned();
        let mut err1 = Array2::<f64>::zeros((out, count));
        for i in 0..count {
            let col = i1 + i;
            if col % scheme.group == 0 {
                // As the reference: the group's range from the weights before this block's
                // updates reach its columns.
                let g = col / scheme.group;
                for (r, p) in params.iter_mut().enumerate() {
                    *p = scheme.params(w.slice(s![r, col..col + scheme.group]).iter().copied());
                    scales[[r, g]] = p.0 as f32;
                    zeros[[r, g]] = p.1 as u8;
                }
            }
            let d = hinv[[i1 + i, i1 + i]];
            for (r, &(scale, zero)) in params.iter().enumerate() {
                let v = w1[[r, i]];
                let code = scheme.code(v, scale, zero);
                codes[[r, perm[col]]] = code as u8;
                let back = scale * (code - zero);
                let e = (v - back) / d;
                err1[[r, i]] = e;
                for j in i..count {
                    w1[[r, j]] -= e * hinv[[i1 + i, i1 + j]];
                }
            }
        }
        if i2 < cols {
            let update = err1.dot(&hinv.slice(s![i1..i2, i2..]));
            let mut rest = w.slice_mut(s![.., i2..]);
            rest -= &update;
        }
        i1 = i2;
    }
    let mut group_of = vec![0; cols];
    for (position, &c) in perm.iter().enumerate() {
        group_of[c] = position / scheme.group;
    }
    Ok(GroupQuantized {
        codes,
        scales,
        zeros,
        scheme,
        group_of,
    })
}

/// The upper Cholesky factor `U` of `H⁻¹` (`H⁻¹ = Uᵀ·U`), GPTQ's `Hinv`: Cholesky of `H`,
/// its inverse from the factor, then the upper factor of that.
fn upper_cholesky_of_inverse(h: &Array2<f64>) -> Result<Array2<f64>> {
    let l = cholesky(h)?;
    let n = h.nrows();
    // L⁻¹ by forward substitution, then H⁻¹ = L⁻ᵀ·L⁻¹.
    let mut linv = Array2::<f64>::zeros((n, n));
    for c in 0..n {
        for r in c..n {
            let mut sum = if r == c { 1.0 } else { 0.0 };
            for k in c..r {
                sum -= l[[r, k]] * linv[[k, c]];
            }
            linv[[r, c]] = sum / l[[r, r]];
        }
    }
    let inv = linv.t().dot(&linv);
    Ok(cholesky(&inv)?.reversed_axes())
}

/// The lower Cholesky factor of a symmetric positive definite matrix.
fn cholesky(a: &Array2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut d = a[[j, j]];
        for k in 0..j {
            d -= l[[j, k]] * l[[j, k]];
        }
        if !(d > 0.0 && d.is_finite()) {
            return Err(Error::config(
                "gptq",
                "the damped Hessian is not positive definite (raise the damping)",
            ));
        }
        let d = d.sqrt();
        l[[j, j]] = d;
        for i in j + 1..n {
            let mut v = a[[i, j]];
            for k in 0..j {
                v -= l[[i, k]] * l[[j, k]];
            }
            l[[i, j]] = v / d;
        }
    }
    Ok(l)
}

/// How [`weight_only_int4`] rounds each layer's weights.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum WeightMethod {
    /// Round to nearest per group.
    Rtn,
    /// GPTQ with the layer's calibration Hessian.
    Gptq(GptqConfig),
}

/// Every Linear of `graph` (any rank, names in `exclude` kept) quantized per group by
/// `method`: the quantized weights of each layer, and the graph with those layers' weights
/// replaced by what the codes stand for (so that it runs, and its fidelity can be measured,
/// on the f32 executor; the int4 kernel is still to come). GPTQ's Hessians come from the
/// float graph's own activations on `calibration` (each a set of named inputs, as
/// [`Graph::run`] takes them); every row of a Linear's input counts, padding included.
///
/// # Errors
/// As [`quantize_gptq`] / [`quantize_rtn`]; [`Error::InvalidConfig`] for an excluded name
/// that is not a Linear node, or GPTQ without calibration data; the errors of running the
/// graph.
pub fn weight_only_int4(
    graph: &crate::model::Graph,
    calibration: &[Vec<(String, crate::tensor::Value)>],
    scheme: GroupScheme,
    method: WeightMethod,
    exclude: &[&str],
) -> Result<(crate::model::Graph, Vec<(String, GroupQuantized)>)> {
    use crate::model::{Linear, Op};
    use std::collections::HashMap;
    for name in exclude {
        if !graph
            .find(name)
            .is_some_and(|id| matches!(graph.node(id).op, Op::Linear(_)))
        {
            return Err(Error::config(
                "weight-only exclusion",
                format!("`{name}` is not a Linear node of the graph"),
            ));
        }
    }
    let layers: Vec<usize> = graph
        .nodes()
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op, Op::Linear(_)) && !exclude.contains(&n.name.as_str()))
        .map(|(i, _)| i)
        .collect();
    // One Hessian per value some quantized Linear reads (q, k and v share theirs).
    let mut hessians: HashMap<usize, Hessian> = HashMap::new();
    if let WeightMethod::Gptq(_) = method {
        if calibration.is_empty() {
            return Err(Error::config("gptq", "no calibration inputs"));
        }
        for &i in &layers {
            let node = &graph.nodes()[i];
            if let (Op::Linear(l), Some(&input)) = (&node.op, node.inputs.first()) {
                hessians
                    .entry(input.index())
                    .or_insert_with(|| Hessian::new(l.in_features()));
            }
        }
        for feeds in calibration {
            let refs: Vec<(&str, &crate::tensor::Value)> =
                feeds.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let mut failed = None;
            graph.run_with(&refs, &mut |id, _, value| {
                if failed.is_some() {
                    return;
                }
                if let Some(h) = hessians.get_mut(&id.index()) {
                    let width = h.matrix().nrows();
                    let rows = value.len() / width.max(1);
                    match value
                        .as_standard_layout()
                        .to_shape((rows, width))
                        .map_err(|e| Error::Unsupported(e.to_string()))
                        .and_then(|x| h.add_rows(x.view()))
                    {
                        Ok(()) => {}
                        Err(e) => failed = Some(e),
                    }
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
    let mut out = graph.clone();
    let mut quantized = Vec::new();
    let mut swaps = Vec::new();
    for &i in &layers {
        let node = &graph.nodes()[i];
        let Op::Linear(l) = &node.op else { continue };
        let q = match method {
            WeightMethod::Rtn => quantize_rtn(&l.weight, scheme)?,
            WeightMethod::Gptq(config) => {
                let input = node.inputs[0].index();
                let h = hessians
                    .get(&input)
                    .ok_or_else(|| Error::config("gptq", "a layer without its Hessian"))?;
                quantize_gptq(&l.weight, h, scheme, &config)?
            }
        };
        swaps.push((
            node.name.clone(),
            Op::Linear(Linear {
                weight: q.dequantize(),
                bias: l.bias.clone(),
            }),
        ));
        quantized.push((node.name.clone(), q));
    }
    out.replace_ops(swaps)?;
    Ok((out, quantized))
}
