//! Ops that read or make integer values (token ids, positions, masks) and the shape ops
//! that add or drop unit axes: `Embedding`, `Cast`, `Positions`, `Where`, `Unsqueeze`,
//! `Squeeze`.
//!
//! Integer values are `i64`, as ONNX and PyTorch keep token ids and attention masks; only
//! the ops here read them, every other op takes floats, and a graph that feeds an integer
//! value to a float op is refused when it is built.

use super::nd::{broadcast_shapes, resolve_axis, sum_to};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use ndarray::{Array2, ArrayD, ArrayViewD, Axis, IxDyn, Zip};

/// A lookup table: each integer id selects one row of `weight` (`[num_embeddings,
/// embedding_dim]`, PyTorch's `nn.Embedding`), so ids of shape `[N, …]` give `[N, …, dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// The table, one row per id.
    pub weight: Array2<f32>,
}

impl Embedding {
    /// A table of `num` rows of `dim` zeros (load or initialise the values).
    pub fn zeros(num: usize, dim: usize) -> Self {
        Embedding {
            weight: Array2::zeros((num, dim)),
        }
    }

    /// The number of ids the table holds.
    pub fn num_embeddings(&self) -> usize {
        self.weight.nrows()
    }

    /// The width of one row.
    pub fn embedding_dim(&self) -> usize {
        self.weight.ncols()
    }
}

/// The per-sample output shape of an embedding lookup of ids of per-sample shape `ids`.
pub(crate) fn embedding_shape(e: &Embedding, ids: &[usize]) -> Vec<usize> {
    let mut out = ids.to_vec();
    out.push(e.embedding_dim());
    out
}

/// The rows of `e` the ids select.
///
/// # Errors
/// [`Error::IndexOutOfRange`] for an id outside `0..num_embeddings`.
pub(crate) fn embedding_forward(
    e: &Embedding,
    ids: ArrayViewD<'_, i64>,
    node: &str,
) -> Result<Tensor> {
    let dim = e.embedding_dim();
    let num = e.num_embeddings();
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    let mut out = Vec::with_capacity(ids.len().saturating_mul(dim));
    for &id in ids.iter() {
        let row = checked_row(id, num, node)?;
        out.extend(e.weight.row(row).iter());
    }
    Tensor::from_shape_vec(IxDyn(&shape), out).map_err(|e| Error::Unsupported(e.to_string()))
}

fn checked_row(id: i64, num: usize, node: &str) -> Result<usize> {
    match usize::try_from(id) {
        Ok(r) if r < num => Ok(r),
        _ => Err(Error::IndexOutOfRange {
            node: node.to_string(),
            index: id,
            len: num,
        }),
    }
}

/// The gradient of the table: each id's output gradient added to its row.
pub(crate) fn embedding_backward(
    e: &Embedding,
    ids: ArrayViewD<'_, i64>,
    g: &Tensor,
    node: &str,
) -> Result<Array2<f32>> {
    let dim = e.embedding_dim();
    let rows = g.to_shape((ids.len(), dim)).map_err(|_| {
        Error::shape(
            "embedding backward",
            Some(node),
            format!("[…, {dim}]"),
            g.shape(),
        )
    })?;
    let mut dw = Array2::<f32>::zeros(e.weight.raw_dim());
    for (&id, gr) in ids.iter().zip(rows.rows()) {
        let r = checked_row(id, e.num_embeddings(), node)?;
        dw.row_mut(r).scaled_add(1.0, &gr);
    }
    Ok(dw)
}

/// `[N, len]` integer positions `0..len` along `axis` of a value of full shape `x`.
pub(crate) fn positions_forward(x: &[usize], axis: usize) -> Result<ArrayD<i64>> {
    let (n, len) = (x[0], x[axis]);
    let row = (0..len as i64).collect::<Vec<_>>();
    let mut out = Vec::with_capacity(n.saturating_mul(len));
    for _ in 0..n {
        out.extend_from_slice(&row);
    }
    ArrayD::from_shape_vec(IxDyn(&[n, len]), out).map_err(|e| Error::Unsupported(e.to_string()))
}

/// The per-sample shape of `Where(cond, a, b)`.
pub(crate) fn where_shape(node: &str, ins: &[&[usize]]) -> Result<Vec<usize>> {
    let ab = broadcast_shapes(ins[1], ins[2]);
    ab.and_then(|ab| broadcast_shapes(ins[0], &ab))
        .ok_or_else(|| {
            Error::shape(
                "where",
                Some(node),
                format!("shapes that broadcast with {:?} and {:?}", ins[1], ins[2]),
                ins[0],
            )
        })
}

/// `v` (full shape, batch first) viewed with unit axes after the batch up to the rank of
/// `full`, ready to broadcast to it.
fn pad<'a, T>(v: ArrayViewD<'a, T>, full: &[usize]) -> ArrayViewD<'a, T> {
    let mut v = v;
    while v.ndim() < full.len() {
        v = v.insert_axis(Axis(1));
    }
    v
}

/// `v` (padded by [`pad`]) broadcast to `full`.
fn stretch<'a, T>(
    v: &'a ArrayViewD<'_, T>,
    full: &[usize],
    node: &str,
) -> Result<ArrayViewD<'a, T>> {
    v.broadcast(IxDyn(full))
        .ok_or_else(|| Error::shape("where", Some(node), format!("{full:?}"), v.shape()))
}

/// The full output shape of `Where` on three full shapes (the batches must agree).
fn where_full(node: &str, c: &[usize], a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    if c.is_empty() || a.is_empty() || b.is_empty() || c[0] != a[0] || a[0] != b[0] {
        return Err(Error::shape(
            "where",
            Some(node),
            format!("the batch of the first operand ({:?})", c.first()),
            a,
        ));
    }
    let mut full = vec![c[0]];
    full.extend(where_shape(node, &[&c[1..], &a[1..], &b[1..]])?);
    Ok(full)
}

/// A condition value: integers or floats, non-zero is true.
#[derive(Clone, Debug)]
pub(crate) enum Condition<'a> {
    Int(ArrayViewD<'a, i64>),
    Float(ArrayViewD<'a, f32>),
}

impl Condition<'_> {
    fn shape(&self) -> &[usize] {
        match self {
            Condition::Int(c) => c.shape(),
            Condition::Float(c) => c.shape(),
        }
    }

    /// The condition as booleans broadcast to `full`.
    fn truth(&self, full: &[usize], node: &str) -> Result<ArrayD<bool>> {
        Ok(match self {
            Condition::Int(c) => stretch(&pad(c.view(), full), full, node)?.mapv(|v| v != 0),
            Condition::Float(c) => stretch(&pad(c.view(), full), full, node)?.mapv(|v| v != 0.0),
        })
    }
}

/// `cond ? a : b`, element by element, broadcast as NumPy does.
pub(crate) fn where_forward<T: Copy + num_traits::Zero>(
    cond: Condition<'_>,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    node: &str,
) -> Result<ArrayD<T>> {
    let full = where_full(node, cond.shape(), a.shape(), b.shape())?;
    let t = cond.truth(&full, node)?;
    let (ap, bp) = (pad(a.view(), &full), pad(b.view(), &full));
    let (av, bv) = (stretch(&ap, &full, node)?, stretch(&bp, &full, node)?);
    let mut y = ArrayD::<T>::zeros(IxDyn(&full));
    Zip::from(&mut y)
        .and(&t)
        .and(&av)
        .and(&bv)
        .for_each(|y, &t, &a, &b| *y = if t { a } else { b });
    Ok(y)
}

/// The gradients of `Where` for `a` and `b`: the output gradient where each was taken,
/// summed back to its own shape.
pub(crate) fn where_backward(
    cond: Condition<'_>,
    a: &[usize],
    b: &[usize],
    g: &Tensor,
    node: &str,
) -> Result<(Tensor, Tensor)> {
    let full = where_full(node, cond.shape(), a, b)?;
    let t = cond.truth(&full, node)?;
    if g.shape() != full.as_slice() {
        return Err(Error::shape(
            "where backward",
            Some(node),
            format!("{full:?}"),
            g.shape(),
        ));
    }
    let mut da = g.clone();
    let mut db = g.clone();
    Zip::from(&mut da)
        .and(&mut db)
        .and(&t)
        .for_each(|da, db, &t| if t { *db = 0.0 } else { *da = 0.0 });
    Ok((sum_to(da, a)?, sum_to(db, b)?))
}

/// The sorted output axes (batch counted as 0) an Unsqueeze inserts into a value of
/// per-sample rank `rank`.
pub(crate) fn unsqueeze_axes(node: &str, axes: &[isize], rank: usize) -> Result<Vec<usize>> {
    let out_rank = rank + 1 + axes.len();
    let what = format!("node `{node}`");
    let mut resolved = axes
        .iter()
        .map(|&a| resolve_axis(a, out_rank, &what))
        .collect::<Result<Vec<_>>>()?;
    resolved.sort_unstable();
    if resolved.is_empty() || resolved.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::config(
            what,
            "unsqueeze needs distinct axes, at least one",
        ));
    }
    Ok(resolved)
}

/// The per-sample shape after inserting unit axes at the (sorted, full-rank) `axes`.
pub(crate) fn unsqueeze_shape(axes: &[usize], x: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(x.len() + axes.len());
    let mut rest = x.iter();
    for k in 1..=x.len() + axes.len() {
        if axes.contains(&k) {
            out.push(1);
        } else if let Some(&d) = rest.next() {
            out.push(d);
        }
    }
    out
}

/// The sorted axes (batch counted as 0) a Squeeze removes from a value of per-sample shape
/// `x`; each must have size 1.
pub(crate) fn squeeze_axes(node: &str, axes: &[isize], x: &[usize]) -> Result<Vec<usize>> {
    let what = format!("node `{node}`");
    let mut resolved = axes
        .iter()
        .map(|&a| resolve_axis(a, x.len() + 1, &what))
        .collect::<Result<Vec<_>>>()?;
    resolved.sort_unstable();
    if resolved.is_empty() || resolved.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::config(
            what,
            "squeeze needs distinct axes, at least one",
        ));
    }
    if let Some(&a) = resolved.iter().find(|&&a| x[a - 1] != 1) {
        return Err(Error::shape(
            "squeeze",
            Some(node),
            format!("size 1 on axis {a}"),
            x,
        ));
    }
    Ok(resolved)
}

/// The per-sample shape after removing the (sorted, full-rank) `axes`.
pub(crate) fn squeeze_shape(axes: &[usize], x: &[usize]) -> Vec<usize> {
    x.iter()
        .enumerate()
        .filter(|(k, _)| !axes.contains(&(k + 1)))
        .map(|(_, &d)| d)
        .collect()
}

/// Whether an op may read a value of `dtype` as its input number `k`.
pub(crate) fn expect_dtype(node: &str, op: &str, k: usize, want: DType, got: DType) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::DtypeMismatch {
            node: node.to_string(),
            op: op.to_string(),
            input: k,
            expected: want,
            found: got,
        })
    }
}

/// The clamped bounds `start..end` of ONNX's Slice (step 1) on an axis of size `len`.
pub(crate) fn slice_bounds(start: i64, end: i64, len: usize) -> (usize, usize) {
    let n = len as i64;
    let clamp = |v: i64| {
        let v = if v < 0 { v.saturating_add(n) } else { v };
        v.clamp(0, n) as usize
    };
    (clamp(start), clamp(end))
}
