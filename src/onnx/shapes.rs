//! The shape sub-graphs of real exports (`Shape → Gather → Unsqueeze → Concat → Reshape`,
//! position ids sliced from a buffer, `Expand` to another value's shape) folded at import.
//!
//! Every value's per-sample shape is inferred twice, with two different example sizes for
//! each symbolic dimension; an axis equal in both passes is fixed, an axis equal to one
//! symbol's two examples is that symbol, anything else is a size derived at run time
//! ([`SymInt::Unknown`], refused where it would matter). `Shape` then yields a short
//! integer vector whose entries are numbers, the batch or a symbol, and the integer ops
//! of shape arithmetic are evaluated on such vectors; a vector with no symbol left is an
//! ordinary constant.
//!
//! The crate's values are batch-first. An export's buffer sliced to the sequence length
//! (`position_ids[:, :seq]`, shape `[1, seq]`) is materialised with the graph's batch;
//! such a value is marked, and only ops that broadcast it over the batch (element-wise
//! ops, `Gather` as ids, `Expand`, `Cast`) may read it.

use super::layers::Constants;
use super::{NodeCtx, Step, MAX_RANK};
use crate::error::Result;
use crate::model::{Dim, Embedding, Op};
use crate::tensor::{DType, Value};
use ndarray::{Array2, ArrayD, IxDyn};
use std::collections::{HashMap, HashSet};

/// One entry of a shape vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum SymInt {
    /// A number.
    Known(i64),
    /// The graph's batch.
    Batch,
    /// The symbolic dimension with this index.
    Dim(usize),
    /// A size derived from symbols at run time.
    Unknown,
}

/// A shape vector or scalar holding symbols (rank 0 or 1).
#[derive(Clone, Debug)]
pub(super) struct SymTensor {
    scalar: bool,
    data: Vec<SymInt>,
}

/// What a folded node became.
pub(super) enum Folded {
    /// A constant (no symbol left).
    Constant(Value),
    /// A shape vector with symbols.
    Symbolic(SymTensor),
}

/// First example size of symbol `k`; the second pass uses [`EXAMPLE_B`]. Far apart and
/// unlike the sizes of real layers, so no fixed or derived size matches both by chance.
const EXAMPLE_A: usize = 1009;
const EXAMPLE_B: usize = 1511;

/// A value's per-sample shapes under both example passes, and its element type.
type Inferred = ([Vec<usize>; 2], DType);

/// Per-value shapes in two passes, the shape vectors being folded, and the values that
/// carry a materialised batch.
#[derive(Default)]
pub(super) struct ShapeTracker {
    symbols: Vec<String>,
    /// Per-sample shapes (batch excluded) under both example passes, and the dtype.
    values: HashMap<String, Inferred>,
    /// The batch every input fixes, when they do.
    fixed_batch: Option<usize>,
    /// The first value of each full symbolic shape, for `Expand` and position ids.
    by_shape: HashMap<Vec<SymInt>, String>,
    /// The first value with each symbol on an axis past the batch, and that axis.
    axis_of: HashMap<SymInt, (String, usize)>,
    /// Shape vectors with symbols.
    syms: HashMap<String, SymTensor>,
    /// Values whose ONNX batch axis is 1 but which the crate holds at the graph's batch.
    batch_broadcast: HashSet<String>,
    /// Values holding positions that stand for ids of a buffer (see [`Sliced::remap`]).
    remapped: HashMap<String, Vec<i64>>,
}

impl ShapeTracker {
    pub(super) fn new(fixed_batch: Option<usize>) -> Self {
        ShapeTracker {
            fixed_batch,
            ..Default::default()
        }
    }

    fn symbol(&mut self, name: &str) -> usize {
        match self.symbols.iter().position(|s| s == name) {
            Some(k) => k,
            None => {
                self.symbols.push(name.to_string());
                self.symbols.len() - 1
            }
        }
    }

    /// Records a graph input of per-sample `dims`.
    pub(super) fn input(&mut self, name: &str, dtype: DType, dims: &[Dim]) {
        let mut passes = [Vec::new(), Vec::new()];
        for d in dims {
            match d {
                Dim::Fixed(n) => {
                    passes[0].push(*n);
                    passes[1].push(*n);
                }
                Dim::Dynamic { symbol, .. } => {
                    let k = self.symbol(symbol);
                    passes[0].push(EXAMPLE_A + 2 * k);
                    passes[1].push(EXAMPLE_B + 2 * k);
                }
            }
        }
        self.insert(name, passes, dtype);
    }

    fn insert(&mut self, name: &str, passes: [Vec<usize>; 2], dtype: DType) {
        self.values.insert(name.to_string(), (passes, dtype));
        if let Some(shape) = self.full_shape(name) {
            if !self.batch_broadcast.contains(name) {
                for (axis, d) in shape.iter().enumerate().skip(1) {
                    if matches!(d, SymInt::Dim(_)) {
                        self.axis_of
                            .entry(*d)
                            .or_insert_with(|| (name.to_string(), axis));
                    }
                }
            }
            self.by_shape
                .entry(shape)
                .or_insert_with(|| name.to_string());
        }
    }

    /// Records a crate node `name` = `op(inputs)`; a value whose shape cannot be inferred
    /// (the build reports why) is left out.
    pub(super) fn record(&mut self, name: &str, op: &Op, inputs: &[String]) {
        let ins: Option<Vec<&Inferred>> = inputs.iter().map(|i| self.values.get(i)).collect();
        let Some(ins) = ins else { return };
        let dtypes: Vec<DType> = ins.iter().map(|(_, d)| *d).collect();
        let Ok(dtype) = op.output_dtype(name, &dtypes) else {
            return;
        };
        let mut passes = [Vec::new(), Vec::new()];
        for (p, out) in passes.iter_mut().enumerate() {
            let shapes: Vec<&[usize]> = ins.iter().map(|(s, _)| s[p].as_slice()).collect();
            match op.output_shape(name, &shapes) {
                Ok(s) => *out = s,
                Err(_) => return,
            }
        }
        self.insert(name, passes, dtype);
    }

    fn classify(&self, a: usize, b: usize) -> SymInt {
        if a == b {
            return SymInt::Known(a as i64);
        }
        (0..self.symbols.len())
            .find(|&k| a == EXAMPLE_A + 2 * k && b == EXAMPLE_B + 2 * k)
            .map_or(SymInt::Unknown, SymInt::Dim)
    }

    /// The full symbolic shape of activation `name`, batch first.
    pub(super) fn full_shape(&self, name: &str) -> Option<Vec<SymInt>> {
        let ([a, b], _) = self.values.get(name)?;
        let first = if self.batch_broadcast.contains(name) {
            SymInt::Known(1)
        } else {
            self.fixed_batch
                .map_or(SymInt::Batch, |n| SymInt::Known(n as i64))
        };
        Some(
            std::iter::once(first)
                .chain(a.iter().zip(b).map(|(&a, &b)| self.classify(a, b)))
                .collect(),
        )
    }

    /// The element type of activation `name`.
    pub(super) fn dtype(&self, name: &str) -> Option<DType> {
        self.values.get(name).map(|(_, d)| *d)
    }

    /// The per-sample dims of activation `name` when every one is a fixed number.
    pub(super) fn fixed_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.full_shape(name)?
            .iter()
            .skip(1)
            .map(|d| match d {
                SymInt::Known(n) => usize::try_from(*n).ok(),
                _ => None,
            })
            .collect()
    }

    /// The shape vector `name` (a folded symbolic value or a small integer constant).
    fn vector(&self, name: &str, constants: &Constants) -> Option<SymTensor> {
        if let Some(s) = self.syms.get(name) {
            return Some(s.clone());
        }
        match constants.get(name) {
            Some(Value::I64(t)) if t.ndim() <= 1 && t.len() <= MAX_RANK => Some(SymTensor {
                scalar: t.ndim() == 0,
                data: t.iter().map(|&v| SymInt::Known(v)).collect(),
            }),
            _ => None,
        }
    }

    /// Whether `name` is a shape vector holding symbols.
    pub(super) fn is_symbolic(&self, name: &str) -> bool {
        self.syms.contains_key(name)
    }

    /// The entries of input `index` read as a shape vector (symbols allowed).
    pub(super) fn entries(
        &self,
        ctx: &NodeCtx<'_>,
        constants: &Constants,
        index: usize,
    ) -> Result<Vec<SymInt>> {
        let name = ctx.node.input.get(index).map(String::as_str).unwrap_or("");
        self.vector(name, constants).map(|v| v.data).ok_or_else(|| {
            ctx.unsupported(format!("input {index} `{name}` must be a shape vector"))
        })
    }

    /// Stores a folded node's output.
    pub(super) fn store(&mut self, name: &str, folded: Folded, constants: &mut Constants) {
        match folded {
            Folded::Constant(v) => {
                constants.insert(name.to_string(), v);
            }
            Folded::Symbolic(s) => {
                self.syms.insert(name.to_string(), s);
            }
        }
    }

    /// Whether value `name` carries a materialised batch.
    pub(super) fn is_batch_broadcast(&self, name: &str) -> bool {
        self.batch_broadcast.contains(name)
    }

    /// The buffer ids value `name`'s positions stand for, when it holds such positions.
    pub(super) fn remapped(&self, name: &str) -> Option<&[i64]> {
        self.remapped.get(name).map(Vec::as_slice)
    }

    /// Records that value `name`'s positions stand for the buffer ids `remap`.
    pub(super) fn set_remapped(&mut self, name: &str, remap: Vec<i64>) {
        self.remapped.insert(name.to_string(), remap);
    }

    /// Marks (or clears) value `name` as carrying a materialised batch.
    pub(super) fn set_batch_broadcast(&mut self, name: &str, marked: bool) {
        if marked {
            self.batch_broadcast.insert(name.to_string());
        } else {
            self.batch_broadcast.remove(name);
        }
    }

    /// Folds `ctx`'s node when it is shape arithmetic: `Shape` of any value, or an integer
    /// op whose inputs are all shape vectors or small integer constants with at least one
    /// symbol among them (or `Shape`, `Gather`, `Equal`, `Where`, arithmetic and `Range` of
    /// constants, which the crate has no run-time op for). `None` when the node is not.
    pub(super) fn fold(
        &self,
        ctx: &NodeCtx<'_>,
        constants: &Constants,
        limits: &crate::limits::Limits,
    ) -> Result<Option<Folded>> {
        let inputs: Vec<&str> = ctx.node.input.iter().map(String::as_str).collect();
        if ctx.op_type == "Shape" {
            ctx.only_attributes(&["start", "end"])?;
            let x = inputs.first().copied().unwrap_or("");
            let dims: Vec<SymInt> = if let Some(s) = self.full_shape(x) {
                s
            } else if let Some(v) = self.syms.get(x) {
                if v.scalar {
                    Vec::new()
                } else {
                    vec![SymInt::Known(v.data.len() as i64)]
                }
            } else if let Some(c) = constants.get(x) {
                value_shape(c)
                    .iter()
                    .map(|&d| SymInt::Known(d as i64))
                    .collect()
            } else {
                return Err(ctx.unsupported(format!("the shape of `{x}` is not known at import")));
            };
            let rank = dims.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
            let start = clamp(ctx.int_attribute("start").unwrap_or(0));
            let end = clamp(ctx.int_attribute("end").unwrap_or(rank));
            let data = dims[start..end.max(start)].to_vec();
            return Ok(Some(finish(SymTensor {
                scalar: false,
                data,
            })));
        }
        const SHAPE_OPS: &[&str] = &[
            "Gather",
            "Unsqueeze",
            "Squeeze",
            "Concat",
            "Reshape",
            "Cast",
            "Equal",
            "Where",
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Slice",
            "Range",
            "Identity",
        ];
        if !SHAPE_OPS.contains(&ctx.op_type) {
            return Ok(None);
        }
        let present: Vec<&str> = inputs.iter().copied().filter(|i| !i.is_empty()).collect();
        let vectors: Option<Vec<SymTensor>> =
            present.iter().map(|i| self.vector(i, constants)).collect();
        let Some(vectors) = vectors else {
            return Ok(None);
        };
        let any_symbol = present.iter().any(|i| self.syms.contains_key(*i));
        // Constants-only nodes the older folding or the op mapping already read.
        if !any_symbol
            && matches!(
                ctx.op_type,
                "Unsqueeze" | "Squeeze" | "Reshape" | "Identity" | "Concat" | "Cast" | "Slice"
            )
        {
            return Ok(None);
        }
        let out = eval(ctx, &inputs, &vectors, limits)?;
        Ok(Some(out))
    }

    /// A value whose full symbolic shape is `shape`, for ops that need one to copy a
    /// run-time size from.
    pub(super) fn value_with_shape(&self, shape: &[SymInt]) -> Option<&str> {
        self.by_shape
            .get(shape)
            .map(String::as_str)
            .filter(|v| !self.batch_broadcast.contains(*v))
    }
}

fn value_shape(v: &Value) -> Vec<usize> {
    match v {
        Value::F32(t) => t.shape().to_vec(),
        Value::I64(t) => t.shape().to_vec(),
    }
}

/// A constant when no symbol is left.
fn finish(t: SymTensor) -> Folded {
    let known: Option<Vec<i64>> = t
        .data
        .iter()
        .map(|d| match d {
            SymInt::Known(v) => Some(*v),
            _ => None,
        })
        .collect();
    match known {
        Some(v) if t.scalar => Folded::Constant(Value::I64(ArrayD::from_elem(
            IxDyn(&[]),
            v.first().copied().unwrap_or(0),
        ))),
        Some(v) => Folded::Constant(Value::I64(ndarray::Array1::from(v).into_dyn())),
        None => Folded::Symbolic(t),
    }
}

/// Evaluates one shape-arithmetic node on its (rank ≤ 1) inputs.
fn eval(
    ctx: &NodeCtx<'_>,
    names: &[&str],
    v: &[SymTensor],
    limits: &crate::limits::Limits,
) -> Result<Folded> {
    let need = |n: usize| -> Result<()> {
        if v.len() >= n {
            Ok(())
        } else {
            Err(ctx.unsupported(format!("{} inputs (at least {n})", v.len())))
        }
    };
    let vector = |data: Vec<SymInt>| {
        Ok(finish(SymTensor {
            scalar: false,
            data,
        }))
    };
    match ctx.op_type {
        "Identity" => {
            need(1)?;
            Ok(finish(v[0].clone()))
        }
        "Gather" => {
            need(2)?;
            ctx.only_attributes(&["axis"])?;
            if ctx.int_attribute("axis").unwrap_or(0) != 0 || v[0].scalar {
                return Err(ctx.unsupported("a gather from a shape vector along an axis past 0"));
            }
            let len = v[0].data.len() as i64;
            let mut data = Vec::with_capacity(v[1].data.len());
            for i in &v[1].data {
                let SymInt::Known(i) = *i else {
                    return Err(ctx.unsupported("a run-time index into a shape vector"));
                };
                let k = if i < 0 { i + len } else { i };
                if !(0..len).contains(&k) {
                    return Err(ctx.unsupported(format!("index {i} into a vector of {len}")));
                }
                data.push(v[0].data[k as usize]);
            }
            Ok(finish(SymTensor {
                scalar: v[1].scalar,
                data,
            }))
        }
        "Unsqueeze" | "Squeeze" => {
            need(1)?;
            // Only a scalar ↔ one-element vector: a rank-2 shape value is not folded.
            let axes: Vec<i64> = if ctx.opset >= 13 {
                match v.get(1) {
                    Some(a) => known(ctx, &a.data)?,
                    None => vec![0],
                }
            } else {
                ctx.only_attributes(&["axes"])?;
                ctx.ints_attribute("axes").unwrap_or_else(|| vec![0])
            };
            let unsqueeze = ctx.op_type == "Unsqueeze";
            let ok = matches!(axes.as_slice(), [0] | [-1])
                && if unsqueeze {
                    v[0].scalar
                } else {
                    !v[0].scalar && v[0].data.len() == 1
                };
            if !ok {
                return Err(
                    ctx.unsupported(format!("{} of a shape value along {axes:?}", ctx.op_type))
                );
            }
            Ok(finish(SymTensor {
                scalar: !unsqueeze,
                data: v[0].data.clone(),
            }))
        }
        "Concat" => {
            ctx.only_attributes(&["axis"])?;
            if !matches!(ctx.int_attribute("axis"), Some(0) | Some(-1))
                || v.iter().any(|t| t.scalar)
            {
                return Err(ctx.unsupported("a concat of shape values past axis 0"));
            }
            let data: Vec<SymInt> = v.iter().flat_map(|t| t.data.iter().copied()).collect();
            if data.len() > MAX_RANK {
                return Err(ctx.unsupported(format!("a shape of more than {MAX_RANK} entries")));
            }
            vector(data)
        }
        "Reshape" => {
            need(2)?;
            let target = known(ctx, &v[1].data)?;
            match target.as_slice() {
                [] if v[0].data.len() == 1 => Ok(finish(SymTensor {
                    scalar: true,
                    data: v[0].data.clone(),
                })),
                [-1] => vector(v[0].data.clone()),
                [n] if *n == v[0].data.len() as i64 => vector(v[0].data.clone()),
                _ => Err(ctx.unsupported(format!("a shape value reshaped to {target:?}"))),
            }
        }
        "Cast" => {
            need(1)?;
            ctx.only_attributes(&["to", "saturate"])?;
            use super::proto::tensor_proto::DataType as T;
            match ctx
                .int_attribute("to")
                .and_then(|t| T::try_from(t as i32).ok())
            {
                Some(T::Int64 | T::Int32) => Ok(finish(v[0].clone())),
                Some(T::Float) => {
                    let k = known(ctx, &v[0].data)?;
                    let data: Vec<f32> = k.iter().map(|&x| x as f32).collect();
                    Ok(Folded::Constant(Value::F32(if v[0].scalar {
                        ArrayD::from_elem(IxDyn(&[]), data.first().copied().unwrap_or(0.0))
                    } else {
                        ndarray::Array1::from(data).into_dyn()
                    })))
                }
                other => Err(ctx.unsupported(format!("a shape value cast to {other:?}"))),
            }
        }
        "Equal" | "Add" | "Sub" | "Mul" | "Div" => {
            need(2)?;
            ctx.only_attributes(&[])?;
            let (a, b) = (&v[0], &v[1]);
            let pairs = broadcast(ctx, a, b)?;
            let mut data = Vec::with_capacity(pairs.len());
            for (x, y) in pairs {
                data.push(arith(ctx, x, y)?);
            }
            Ok(finish(SymTensor {
                scalar: a.scalar && b.scalar,
                data,
            }))
        }
        "Where" => {
            need(3)?;
            let cond = known(ctx, &v[0].data)?;
            let n = cond.len().max(v[1].data.len()).max(v[2].data.len());
            let pick = |t: &SymTensor, k: usize| -> Result<SymInt> {
                match t.data.len() {
                    1 => Ok(t.data[0]),
                    l if l == n => Ok(t.data[k]),
                    l => Err(ctx.unsupported(format!("shape vectors of {l} and {n} entries"))),
                }
            };
            let mut data = Vec::with_capacity(n);
            for k in 0..n {
                let c = match cond.len() {
                    1 => cond[0],
                    l if l == n => cond[k],
                    l => return Err(ctx.unsupported(format!("a condition of {l} entries"))),
                };
                data.push(if c != 0 {
                    pick(&v[1], k)?
                } else {
                    pick(&v[2], k)?
                });
            }
            Ok(finish(SymTensor {
                scalar: v.iter().all(|t| t.scalar),
                data,
            }))
        }
        "Range" => {
            need(3)?;
            let [start, limit, delta] = [0, 1, 2].map(|k| known(ctx, &v[k].data));
            let (start, limit, delta) = (
                scalar(ctx, start?)?,
                scalar(ctx, limit?)?,
                scalar(ctx, delta?)?,
            );
            if delta == 0 {
                return Err(ctx.unsupported("a range with step 0"));
            }
            let span = (limit as i128 - start as i128 + delta as i128 - delta.signum() as i128)
                / delta as i128;
            let count = usize::try_from(span.max(0)).unwrap_or(usize::MAX);
            limits.check_elements(&[count], names.first().copied().unwrap_or("Range"))?;
            let data: Vec<i64> = (0..count as i64).map(|k| start + k * delta).collect();
            Ok(Folded::Constant(Value::I64(
                ndarray::Array1::from(data).into_dyn(),
            )))
        }
        "Slice" => {
            need(3)?;
            if v[0].scalar {
                return Err(ctx.unsupported("a slice of a scalar"));
            }
            let [starts, ends] = [1, 2].map(|k| known(ctx, &v[k].data));
            let (starts, ends) = (starts?, ends?);
            let axes = v.get(3).map(|a| known(ctx, &a.data)).transpose()?;
            let steps = v.get(4).map(|a| known(ctx, &a.data)).transpose()?;
            if starts.len() != 1
                || ends.len() != 1
                || axes
                    .as_ref()
                    .is_some_and(|a| !matches!(a.as_slice(), [0] | [-1]))
                || steps.as_ref().is_some_and(|s| s.as_slice() != [1])
            {
                return Err(ctx.unsupported("a slice of a shape vector other than [a:b]"));
            }
            let len = v[0].data.len() as i64;
            let clamp = |x: i64| (if x < 0 { x.saturating_add(len) } else { x }).clamp(0, len);
            let (lo, hi) = (clamp(starts[0]), clamp(ends[0]));
            vector(v[0].data[lo as usize..hi.max(lo) as usize].to_vec())
        }
        other => Err(ctx.unsupported(format!("`{other}` of a shape value"))),
    }
}

fn scalar(ctx: &NodeCtx<'_>, v: Vec<i64>) -> Result<i64> {
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(ctx.unsupported("a range bound that is not one number")),
    }
}

/// The numbers of a shape vector that must hold no symbol.
fn known(ctx: &NodeCtx<'_>, data: &[SymInt]) -> Result<Vec<i64>> {
    data.iter()
        .map(|d| match d {
            SymInt::Known(v) => Ok(*v),
            _ => Err(ctx.unsupported("a size only known at run time where a number is needed")),
        })
        .collect()
}

fn broadcast(ctx: &NodeCtx<'_>, a: &SymTensor, b: &SymTensor) -> Result<Vec<(SymInt, SymInt)>> {
    let (la, lb) = (a.data.len(), b.data.len());
    match (la, lb) {
        _ if la == lb => Ok(a.data.iter().copied().zip(b.data.iter().copied()).collect()),
        (1, _) => Ok(b.data.iter().map(|&y| (a.data[0], y)).collect()),
        (_, 1) => Ok(a.data.iter().map(|&x| (x, b.data[0])).collect()),
        _ => Err(ctx.unsupported(format!("shape vectors of {la} and {lb} entries"))),
    }
}

/// One element of `Equal` / `Add` / `Sub` / `Mul` / `Div` on shape entries. A symbol is a
/// size of at least 1, so it never equals a number below 1; anything else that depends on a
/// symbol's value is refused.
fn arith(ctx: &NodeCtx<'_>, x: SymInt, y: SymInt) -> Result<SymInt> {
    use SymInt::Known as K;
    let refuse = || ctx.unsupported(format!("{} of {x:?} and {y:?}", ctx.op_type));
    let overflow = || ctx.unsupported(format!("{} of {x:?} and {y:?} overflows", ctx.op_type));
    let sym = |s: SymInt| matches!(s, SymInt::Batch | SymInt::Dim(_));
    Ok(match (ctx.op_type, x, y) {
        ("Equal", K(a), K(b)) => K((a == b) as i64),
        ("Equal", s, t) if sym(s) && s == t => K(1),
        ("Equal", s, K(b)) | ("Equal", K(b), s) if sym(s) && b < 1 => K(0),
        ("Add", K(a), K(b)) => K(a.checked_add(b).ok_or_else(overflow)?),
        ("Sub", K(a), K(b)) => K(a.checked_sub(b).ok_or_else(overflow)?),
        ("Mul", K(a), K(b)) => K(a.checked_mul(b).ok_or_else(overflow)?),
        ("Div", K(a), K(b)) if b != 0 => K(a.checked_div(b).ok_or_else(overflow)?),
        ("Add" | "Sub", s, K(0)) | ("Add", K(0), s) => s,
        ("Mul" | "Div", s, K(1)) | ("Mul", K(1), s) => s,
        _ => return Err(refuse()),
    })
}

/// `Reshape(x, target)` for a target holding symbols: a symbol at the position `x` has it
/// copies that axis (0), one other run-time size is inferred (−1).
pub(super) fn reshape(
    ctx: &NodeCtx<'_>,
    tracker: &ShapeTracker,
    constants: &Constants,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&["allowzero"])?;
    if ctx.int_attribute("allowzero").unwrap_or(0) != 0 {
        return Err(ctx.unsupported("allowzero"));
    }
    let x = &ctx.node.input[0];
    let target = tracker.entries(ctx, constants, 1)?;
    let source = tracker.full_shape(x).unwrap_or_default();
    let Some((&first, rest)) = target.split_first() else {
        return Err(ctx.unsupported("a scalar target shape"));
    };
    let keeps_batch = match first {
        SymInt::Batch | SymInt::Known(0) => true,
        SymInt::Known(b) => tracker.fixed_batch == Some(b as usize),
        _ => false,
    };
    if !keeps_batch || tracker.is_batch_broadcast(x) {
        return Err(ctx.unsupported(format!(
            "shape {target:?} (its first entry must keep the batch)"
        )));
    }
    let mut inferred = rest.iter().filter(|d| **d == SymInt::Known(-1)).count();
    let mut shape = Vec::with_capacity(rest.len());
    for (k, d) in rest.iter().enumerate() {
        shape.push(match *d {
            SymInt::Known(n) => {
                isize::try_from(n).map_err(|_| ctx.unsupported(format!("shape entry {n}")))?
            }
            s if source.get(k + 1) == Some(&s) && s != SymInt::Unknown => 0,
            _ => {
                inferred += 1;
                -1
            }
        });
    }
    if inferred > 1 {
        return Err(ctx.unsupported(format!(
            "shape {target:?} has more than one size known only at run time"
        )));
    }
    Ok(vec![(Op::Reshape { shape }, vec![x.clone()])])
}

/// `Expand(x, shape)`: the identity when `x` already has the shape, else a `Where(ref, x,
/// x)` against a value `ref` of the target shape (it broadcasts `x`, whatever `ref` holds).
pub(super) fn expand(
    ctx: &NodeCtx<'_>,
    tracker: &ShapeTracker,
    constants: &Constants,
) -> Result<(Vec<Step>, bool)> {
    ctx.only_attributes(&[])?;
    let x = &ctx.node.input[0];
    let target = tracker.entries(ctx, constants, 1)?;
    let source = tracker
        .full_shape(x)
        .ok_or_else(|| ctx.unsupported(format!("the shape of `{x}` is not known at import")))?;
    if target.len() != source.len() {
        return Err(ctx.unsupported(format!(
            "an expand of rank {} to rank {} (NumPy would align them past the batch axis)",
            source.len(),
            target.len()
        )));
    }
    let mut result = Vec::with_capacity(source.len());
    for (&s, &t) in source.iter().zip(&target) {
        result.push(match (s, t) {
            (s, SymInt::Known(1)) => s,
            (SymInt::Known(1), t) => t,
            (s, t) if s == t && s != SymInt::Unknown => s,
            _ => return Err(ctx.unsupported(format!("an expand of {source:?} to {target:?}"))),
        });
    }
    let marked = result[0] == SymInt::Known(1) && tracker.is_batch_broadcast(x);
    if result == source || (result[1..] == source[1..] && tracker.is_batch_broadcast(x)) {
        return Ok((vec![(Op::Identity, vec![x.clone()])], marked));
    }
    if marked {
        return Err(ctx.unsupported("an expand of a value broadcast over the batch"));
    }
    let reference = tracker.value_with_shape(&result).ok_or_else(|| {
        ctx.unsupported(format!(
            "an expand to {result:?}, a shape no earlier value has"
        ))
    })?;
    Ok((
        vec![(Op::Where, vec![reference.into(), x.clone(), x.clone()])],
        false,
    ))
}

/// `Slice`: of an activation by constant bounds (one crate `Slice` per axis, step 1), or of
/// a `[1, L]` constant buffer to a run-time length (`position_ids[:, :seq]`), read as
/// a one-column table by the positions of a value of that length.
pub(super) fn slice(
    ctx: &NodeCtx<'_>,
    tracker: &ShapeTracker,
    constants: &Constants,
) -> Result<Sliced> {
    ctx.only_attributes(&[])?;
    if ctx.opset < 10 {
        return Err(ctx.unsupported("attribute bounds (opset < 10)"));
    }
    let x = &ctx.node.input[0];
    let output = ctx.node.output.first().cloned().unwrap_or_default();
    let list = |k: usize| -> Result<Option<Vec<SymInt>>> {
        match ctx.node.input.get(k).filter(|s| !s.is_empty()) {
            Some(_) => tracker.entries(ctx, constants, k).map(Some),
            None => Ok(None),
        }
    };
    let starts = list(1)?.unwrap_or_default();
    let ends = list(2)?.unwrap_or_default();
    let n = starts.len();
    let axes = list(3)?.unwrap_or_else(|| (0..n as i64).map(SymInt::Known).collect());
    let steps = list(4)?.unwrap_or_else(|| vec![SymInt::Known(1); n]);
    if ends.len() != n || axes.len() != n || steps.len() != n {
        return Err(ctx.unsupported("starts, ends, axes and steps of different lengths"));
    }
    if steps.iter().any(|s| *s != SymInt::Known(1)) {
        return Err(ctx.unsupported("a step other than 1"));
    }
    if let Some(buffer) = constants.get(x.as_str()) {
        let shape = value_shape(buffer);
        let (
            [SymInt::Known(0)],
            [SymInt::Dim(_)],
            [SymInt::Known(1) | SymInt::Known(-1)],
            [1, len],
        ) = (
            starts.as_slice(),
            ends.as_slice(),
            axes.as_slice(),
            shape.as_slice(),
        )
        else {
            return Err(ctx.unsupported(format!(
                "a slice of a constant of shape {shape:?} to a run-time length"
            )));
        };
        let end = ends[0];
        let len = *len;
        let (reference, axis) = tracker
            .axis_of
            .get(&end)
            .ok_or_else(|| ctx.unsupported("a run-time length no value has on an axis"))?;
        let positions: Step = (
            Op::Positions {
                axis: *axis as isize,
            },
            vec![reference.clone()],
        );
        return Ok(match buffer {
            // Integer ids (position or token-type ids): the positions themselves, with the
            // buffer's row kept to remap the table of the `Gather` that reads them.
            Value::I64(t) => Sliced {
                steps: vec![positions],
                marked: true,
                remap: Some(t.iter().copied().collect()),
            },
            Value::F32(t) => {
                let weight = Array2::from_shape_vec((len, 1), t.iter().copied().collect())
                    .map_err(|e| ctx.unsupported(e.to_string()))?;
                Sliced {
                    steps: vec![
                        positions,
                        (
                            Op::Embedding(Embedding { weight }),
                            vec![format!("{output}.part0")],
                        ),
                        (
                            Op::Squeeze { axes: vec![2] },
                            vec![format!("{output}.part1")],
                        ),
                    ],
                    marked: true,
                    remap: None,
                }
            }
        });
    }
    let rank = tracker.full_shape(x).map_or(MAX_RANK, |s| s.len()) as i64;
    let mut steps: Vec<Step> = Vec::with_capacity(n);
    let mut current = x.clone();
    for k in 0..n {
        let (SymInt::Known(start), SymInt::Known(end), SymInt::Known(axis)) =
            (starts[k], ends[k], axes[k])
        else {
            return Err(ctx.unsupported("run-time slice bounds of an activation"));
        };
        let a = if axis < 0 { axis + rank } else { axis };
        if a <= 0 || a >= rank {
            return Err(ctx.unsupported(format!("a slice along axis {axis} (the batch is 0)")));
        }
        steps.push((
            Op::Slice {
                axis: a as isize,
                start,
                end,
            },
            vec![current],
        ));
        current = format!("{output}.part{k}");
    }
    if steps.is_empty() {
        steps.push((Op::Identity, vec![x.clone()]));
    }
    Ok(Sliced {
        steps,
        marked: tracker.is_batch_broadcast(x),
        remap: None,
    })
}

/// What a `Slice` maps to.
pub(super) struct Sliced {
    /// The crate nodes.
    pub(super) steps: Vec<Step>,
    /// Whether the output carries a materialised batch.
    pub(super) marked: bool,
    /// For ids sliced from an integer buffer: the output holds positions, and the id at
    /// position `p` is `remap[p]`.
    pub(super) remap: Option<Vec<i64>>,
}

/// `Gather`: rows of a constant table by activation ids (an embedding), or one index of
/// an activation's axis past the batch.
pub(super) fn gather(
    ctx: &NodeCtx<'_>,
    tracker: &ShapeTracker,
    constants: &Constants,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&["axis"])?;
    ctx.arity(2)?;
    let (data, indices) = (&ctx.node.input[0], &ctx.node.input[1]);
    let axis = ctx.int_attribute("axis").unwrap_or(0);
    let output = ctx.node.output.first().cloned().unwrap_or_default();
    match (
        constants.get(data.as_str()),
        constants.get(indices.as_str()),
    ) {
        (Some(Value::F32(table)), None) if axis == 0 && table.ndim() == 2 => {
            let table = table
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| ctx.unsupported(e.to_string()))?;
            let weight = match tracker.remapped(indices) {
                None => table.to_owned(),
                // Positions indexing a table remapped by the buffer's ids: row p is
                // table[remap[p]].
                Some(remap) => {
                    let rows = table.nrows() as i64;
                    // The buffer's length times the table's width: both from the file.
                    crate::limits::Limits::default()
                        .check_elements(&[remap.len(), table.ncols()], "remapped table")?;
                    let mut out = Array2::zeros((remap.len(), table.ncols()));
                    for (p, &id) in remap.iter().enumerate() {
                        let r = if id < 0 { id + rows } else { id };
                        if !(0..rows).contains(&r) {
                            return Err(ctx.unsupported(format!(
                                "buffer id {id} past a table of {rows} rows"
                            )));
                        }
                        out.row_mut(p).assign(&table.row(r as usize));
                    }
                    out
                }
            };
            Ok(vec![(
                Op::Embedding(Embedding { weight }),
                vec![indices.clone()],
            )])
        }
        (None, Some(Value::I64(index))) if index.len() == 1 && index.ndim() <= 1 => {
            let rank = tracker.full_shape(data).map(|s| s.len()).unwrap_or(0) as i64;
            let a = if axis < 0 { axis + rank } else { axis };
            if a <= 0 || a >= rank {
                return Err(ctx.unsupported(format!("a gather along axis {axis} (the batch is 0)")));
            }
            let i = index.iter().copied().next().unwrap_or(0);
            let end = if i == -1 { i64::MAX } else { i + 1 };
            let mut steps = vec![(
                Op::Slice {
                    axis: a as isize,
                    start: i,
                    end,
                },
                vec![data.clone()],
            )];
            if index.ndim() == 0 {
                steps.push((
                    Op::Squeeze {
                        axes: vec![a as isize],
                    },
                    vec![format!("{output}.part0")],
                ));
            }
            Ok(steps)
        }
        _ => Err(ctx
            .unsupported("a gather other than constant rows by ids or one index of an activation")),
    }
}
