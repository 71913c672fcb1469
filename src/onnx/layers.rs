//! Mappings of ONNX's layer and shape ops (Conv, BatchNormalization, pools, Gemm, MatMul,
//! Flatten, Concat, Clip, Transpose, Reshape, Unsqueeze / Squeeze, Cast,
//! LayerNormalization, ReduceSum / ReduceMean) onto the crate's ops. Weights must be
//! initializers (or folded constants); anything the crate's op cannot express exactly is
//! refused.

use super::{NodeCtx, Step, MAX_RANK};
use crate::error::Result;
use crate::model::{
    BatchNorm2d, Binary, BinaryConst, Conv2d, LayerNorm, Linear, Op, Pool2d, Reduction,
};
use crate::tensor::{DType, Value};
use ndarray::{Array1, Array2, Array4, ArrayD, Ix2, Ix4, IxDyn};
use std::collections::HashMap;

/// The values an ONNX node's mapping may read as constants.
pub(super) type Constants = HashMap<String, Value>;

fn float_constant<'c>(
    ctx: &NodeCtx<'_>,
    constants: &'c Constants,
    index: usize,
) -> Result<&'c ArrayD<f32>> {
    let name = ctx.node.input.get(index).map(String::as_str).unwrap_or("");
    match constants.get(name) {
        Some(Value::F32(t)) => Ok(t),
        Some(Value::I64(_)) => Err(ctx.unsupported(format!("input {index} `{name}` is an integer constant"))),
        None => Err(ctx.unsupported(format!(
            "input {index} `{name}` must be an initializer (weights computed at run time are not mapped)"
        ))),
    }
}

/// An integer initializer read as a shape or axes list (at most [`MAX_RANK`] entries).
fn int_constant(ctx: &NodeCtx<'_>, constants: &Constants, index: usize) -> Result<Vec<i64>> {
    let name = ctx.node.input.get(index).map(String::as_str).unwrap_or("");
    match constants.get(name) {
        Some(Value::I64(t)) if t.len() > MAX_RANK => Err(ctx.unsupported(format!(
            "input {index} `{name}` lists {} entries (at most {MAX_RANK})",
            t.len()
        ))),
        Some(Value::I64(t)) => Ok(t.iter().copied().collect()),
        _ => Err(ctx.unsupported(format!(
            "input {index} `{name}` must be an integer initializer"
        ))),
    }
}

fn has_input(ctx: &NodeCtx<'_>, index: usize) -> bool {
    ctx.node.input.get(index).is_some_and(|s| !s.is_empty())
}

fn usize_pair(
    ctx: &NodeCtx<'_>,
    name: &str,
    v: Option<Vec<i64>>,
    default: usize,
) -> Result<[usize; 2]> {
    match v.as_deref() {
        None => Ok([default, default]),
        Some([a, b]) if *a >= 0 && *b >= 0 => Ok([*a as usize, *b as usize]),
        Some(other) => Err(ctx.unsupported(format!("{name} {other:?} (2-D, non-negative)"))),
    }
}

/// Symmetric `[h, w]` padding from ONNX's `pads` (`[top, left, bottom, right]`) and
/// `auto_pad` (SAME_* only where the total padding is even and independent of the input
/// size: stride 1).
fn padding(
    ctx: &NodeCtx<'_>,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
) -> Result<[usize; 2]> {
    let auto = ctx
        .attribute("auto_pad")
        .and_then(|a| a.s.as_deref())
        .map(|s| String::from_utf8_lossy(s).to_string())
        .unwrap_or_else(|| "NOTSET".into());
    match auto.as_str() {
        "NOTSET" => {}
        "VALID" => return Ok([0, 0]),
        "SAME_UPPER" | "SAME_LOWER" if stride == [1, 1] => {
            // Checked: the dilations come from the file.
            let span = |a: usize| kernel[a].saturating_sub(1).checked_mul(dilation[a]);
            let (Some(h), Some(w)) = (span(0), span(1)) else {
                return Err(ctx.unsupported(format!("dilations {dilation:?}")));
            };
            let total = [h, w];
            if total[0].is_multiple_of(2) && total[1].is_multiple_of(2) {
                return Ok([total[0] / 2, total[1] / 2]);
            }
            return Err(ctx.unsupported(format!("auto_pad {auto} with uneven padding")));
        }
        other => return Err(ctx.unsupported(format!("auto_pad {other} with strides {stride:?}"))),
    }
    match ctx.ints_attribute("pads").as_deref() {
        None => Ok([0, 0]),
        Some([t, l, b, r]) if t == b && l == r && *t >= 0 && *l >= 0 => {
            Ok([*t as usize, *l as usize])
        }
        Some(p) => Err(ctx.unsupported(format!("pads {p:?} (only symmetric 2-D padding maps)"))),
    }
}

/// Conv: 2-D, weight (and bias) initializers.
pub(super) fn conv(ctx: &NodeCtx<'_>, constants: &Constants) -> Result<Vec<Step>> {
    ctx.only_attributes(&[
        "kernel_shape",
        "strides",
        "pads",
        "dilations",
        "group",
        "auto_pad",
    ])?;
    let w = float_constant(ctx, constants, 1)?;
    let weight: Array4<f32> = w.clone().into_dimensionality::<Ix4>().map_err(|_| {
        ctx.unsupported(format!(
            "a weight of shape {:?} (only 2-D convolutions map)",
            w.shape()
        ))
    })?;
    let kernel = [weight.shape()[2], weight.shape()[3]];
    if let Some(k) = ctx.ints_attribute("kernel_shape") {
        if k != [kernel[0] as i64, kernel[1] as i64] {
            return Err(
                ctx.unsupported(format!("kernel_shape {k:?} against a weight of {kernel:?}"))
            );
        }
    }
    let stride = usize_pair(ctx, "strides", ctx.ints_attribute("strides"), 1)?;
    let dilation = usize_pair(ctx, "dilations", ctx.ints_attribute("dilations"), 1)?;
    let groups = ctx.int_attribute("group").unwrap_or(1);
    if groups < 1 || stride.contains(&0) || dilation.contains(&0) {
        return Err(ctx.unsupported(format!(
            "group {groups}, strides {stride:?}, dilations {dilation:?}"
        )));
    }
    let padding = padding(ctx, kernel, stride, dilation)?;
    let bias = if has_input(ctx, 2) {
        Some(vector(
            ctx,
            float_constant(ctx, constants, 2)?,
            weight.shape()[0],
            "bias",
        )?)
    } else {
        None
    };
    let op = Op::Conv2d(Conv2d {
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups: groups as usize,
    });
    Ok(vec![(op, vec![ctx.node.input[0].clone()])])
}

fn vector(ctx: &NodeCtx<'_>, t: &ArrayD<f32>, len: usize, what: &str) -> Result<Array1<f32>> {
    if t.len() != len || t.ndim() > 1 && t.shape().iter().filter(|&&d| d != 1).count() > 1 {
        return Err(ctx.unsupported(format!(
            "{what} of shape {:?} (want {len} values)",
            t.shape()
        )));
    }
    Ok(Array1::from_iter(t.iter().copied()))
}

/// BatchNormalization in inference mode, every parameter an initializer.
pub(super) fn batch_norm(ctx: &NodeCtx<'_>, constants: &Constants) -> Result<Vec<Step>> {
    ctx.only_attributes(&["epsilon", "momentum", "training_mode", "spatial"])?;
    if ctx.int_attribute("training_mode").unwrap_or(0) != 0
        || ctx.int_attribute("spatial").unwrap_or(1) != 1
    {
        return Err(ctx.unsupported("training mode or non-spatial batch norm"));
    }
    if ctx.node.output.len() != 1 {
        return Err(ctx.unsupported("running statistics as outputs"));
    }
    let gamma = float_constant(ctx, constants, 1)?;
    let c = gamma.len();
    let mut bn = BatchNorm2d::new(c);
    bn.gamma = vector(ctx, gamma, c, "scale")?;
    bn.beta = vector(ctx, float_constant(ctx, constants, 2)?, c, "B")?;
    bn.running_mean = vector(ctx, float_constant(ctx, constants, 3)?, c, "input_mean")?;
    bn.running_var = vector(ctx, float_constant(ctx, constants, 4)?, c, "input_var")?;
    bn.eps = ctx.float_attribute("epsilon").unwrap_or(1e-5);
    Ok(vec![(Op::BatchNorm2d(bn), vec![ctx.node.input[0].clone()])])
}

/// MaxPool / AveragePool, 2-D, floor mode.
/// MaxPool / AveragePool; `hw` is the input's spatial size when it is fixed (an average
/// that excludes its padding needs it).
pub(super) fn pool(ctx: &NodeCtx<'_>, max: bool, hw: Option<[usize; 2]>) -> Result<Vec<Step>> {
    ctx.only_attributes(&[
        "kernel_shape",
        "strides",
        "pads",
        "auto_pad",
        "ceil_mode",
        "dilations",
        "storage_order",
        "count_include_pad",
    ])?;
    if ctx.int_attribute("ceil_mode").unwrap_or(0) != 0
        || ctx.int_attribute("storage_order").unwrap_or(0) != 0
    {
        return Err(ctx.unsupported("ceil_mode or storage_order"));
    }
    if ctx.node.output.len() != 1 {
        return Err(ctx.unsupported("the indices output"));
    }
    let kernel = usize_pair(ctx, "kernel_shape", ctx.ints_attribute("kernel_shape"), 0)?;
    if kernel.contains(&0) {
        return Err(ctx.unsupported("kernel_shape missing or not 2-D"));
    }
    let dilation = usize_pair(ctx, "dilations", ctx.ints_attribute("dilations"), 1)?;
    if dilation != [1, 1] {
        return Err(ctx.unsupported(format!("dilations {dilation:?}")));
    }
    let stride = usize_pair(ctx, "strides", ctx.ints_attribute("strides"), 1)?;
    if stride.contains(&0) {
        return Err(ctx.unsupported("stride 0"));
    }
    if let Some([0, 0, b, r]) = ctx.ints_attribute("pads").as_deref() {
        if (*b, *r) != (0, 0) && ctx.attribute("auto_pad").is_none() {
            let include = ctx.int_attribute("count_include_pad").unwrap_or(0) != 0;
            if !max && include {
                return Err(ctx.unsupported("end padding counted in an average's divisor"));
            }
            let end = [*b, *r].map(|v| usize::try_from(v).unwrap_or(usize::MAX));
            return end_padded_pool(ctx, max, kernel, stride, end, hw);
        }
    }
    let padding = padding(ctx, kernel, stride, dilation)?;
    let p = Pool2d {
        kernel,
        stride,
        padding,
    };
    // The crate's average counts padded zeros in the divisor (PyTorch's default); ONNX's
    // default does not.
    if !max && padding != [0, 0] && ctx.int_attribute("count_include_pad").unwrap_or(0) == 0 {
        return avg_pool_excluding_padding(ctx, p, hw);
    }
    let op = if max {
        Op::MaxPool2d(p)
    } else {
        Op::AvgPool2d(p)
    };
    Ok(vec![(op, vec![ctx.node.input[0].clone()])])
}

/// Gemm `alpha · A · op(B) + beta · C` with `A` the activation and `B`, `C` initializers:
/// a Linear.
pub(super) fn gemm(ctx: &NodeCtx<'_>, constants: &Constants) -> Result<Vec<Step>> {
    ctx.only_attributes(&["alpha", "beta", "transA", "transB"])?;
    if ctx.int_attribute("transA").unwrap_or(0) != 0 {
        return Err(ctx.unsupported("transA"));
    }
    let b = float_constant(ctx, constants, 1)?
        .clone()
        .into_dimensionality::<Ix2>()
        .map_err(|_| ctx.unsupported("a B that is not 2-D"))?;
    let alpha = ctx.float_attribute("alpha").unwrap_or(1.0);
    let beta = ctx.float_attribute("beta").unwrap_or(1.0);
    // The crate's Linear weight is [out, in].
    let weight: Array2<f32> = if ctx.int_attribute("transB").unwrap_or(0) != 0 {
        b
    } else {
        b.reversed_axes().as_standard_layout().into_owned()
    };
    let weight = if alpha == 1.0 {
        weight
    } else {
        weight.mapv(|v| v * alpha)
    };
    let bias = if has_input(ctx, 2) {
        let c = float_constant(ctx, constants, 2)?;
        let v = vector(ctx, c, weight.nrows(), "C").or_else(|e| {
            if c.len() == 1 {
                Ok(Array1::from_elem(
                    weight.nrows(),
                    c.iter().copied().next().unwrap_or(0.0),
                ))
            } else {
                Err(e)
            }
        })?;
        Some(if beta == 1.0 { v } else { v.mapv(|x| x * beta) })
    } else {
        None
    };
    Ok(vec![(
        Op::Linear(Linear { weight, bias }),
        vec![ctx.node.input[0].clone()],
    )])
}

/// MatMul: activation × 2-D initializer is a Linear without bias; two activations of one
/// rank are a batched MatMul.
pub(super) fn matmul(
    ctx: &NodeCtx<'_>,
    constants: &Constants,
    ranks: &HashMap<String, usize>,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&[])?;
    let (a, b) = (&ctx.node.input[0], &ctx.node.input[1]);
    if constants.contains_key(a) {
        return Err(ctx.unsupported("a constant left operand"));
    }
    if constants.contains_key(b) {
        let w = float_constant(ctx, constants, 1)?
            .clone()
            .into_dimensionality::<Ix2>()
            .map_err(|_| ctx.unsupported("a constant right operand that is not 2-D"))?;
        let weight = w.reversed_axes().as_standard_layout().into_owned();
        return Ok(vec![(
            Op::Linear(Linear { weight, bias: None }),
            vec![a.clone()],
        )]);
    }
    let (ra, rb) = (
        ranks.get(a).copied().unwrap_or(1),
        ranks.get(b).copied().unwrap_or(1),
    );
    if ra != rb || ra < 3 {
        return Err(ctx.unsupported(format!(
            "activations of ranks {ra} and {rb} (both must be ≥ 3 and equal)"
        )));
    }
    Ok(vec![(Op::MatMul, vec![a.clone(), b.clone()])])
}

/// An axis attribute or input that must not be the batch axis.
fn axis_of(ctx: &NodeCtx<'_>, axis: i64, rank: usize) -> Result<isize> {
    let resolved = if axis < 0 { axis + rank as i64 } else { axis };
    if resolved <= 0 || resolved >= rank as i64 {
        return Err(ctx.unsupported(format!(
            "axis {axis} of a rank-{rank} value (the batch axis, or outside)"
        )));
    }
    Ok(resolved as isize)
}

pub(super) fn flatten(ctx: &NodeCtx<'_>, rank: usize) -> Result<Vec<Step>> {
    ctx.only_attributes(&["axis"])?;
    let axis = ctx.int_attribute("axis").unwrap_or(1);
    let resolved = if axis < 0 { axis + rank as i64 } else { axis };
    if resolved != 1 {
        return Err(ctx.unsupported(format!("axis {axis} (only 1, after the batch, maps)")));
    }
    Ok(vec![(Op::Flatten, vec![ctx.node.input[0].clone()])])
}

pub(super) fn concat(ctx: &NodeCtx<'_>, constants: &Constants, rank: usize) -> Result<Vec<Step>> {
    ctx.only_attributes(&["axis"])?;
    if ctx.node.input.iter().any(|i| constants.contains_key(i)) {
        return Err(ctx.unsupported("a constant operand"));
    }
    let axis = ctx
        .int_attribute("axis")
        .ok_or_else(|| ctx.unsupported("no axis"))?;
    let axis = axis_of(ctx, axis, rank)?;
    if ctx.node.input.len() == 1 {
        return Ok(vec![(Op::Identity, ctx.node.input.clone())]);
    }
    Ok(vec![(Op::ConcatAxis { axis }, ctx.node.input.clone())])
}

/// Clip: bounds from attributes (before opset 11) or constant inputs.
pub(super) fn clip(ctx: &NodeCtx<'_>, constants: &Constants) -> Result<Vec<Step>> {
    let scalar = |index: usize| -> Result<Option<f32>> {
        if !has_input(ctx, index) {
            return Ok(None);
        }
        let t = float_constant(ctx, constants, index)?;
        match t.iter().next() {
            Some(&v) if t.len() == 1 => Ok(Some(v)),
            _ => Err(ctx.unsupported("a bound that is not one value")),
        }
    };
    let (lo, hi) = if ctx.opset < 11 {
        ctx.only_attributes(&["min", "max"])?;
        (ctx.float_attribute("min"), ctx.float_attribute("max"))
    } else {
        ctx.only_attributes(&[])?;
        (scalar(1)?, scalar(2)?)
    };
    let x = ctx.node.input[0].clone();
    let bound = |op: Binary, v: f32, input: String| {
        (
            Op::BinaryConst(BinaryConst {
                op,
                constant: ArrayD::from_elem(IxDyn(&[]), v),
                constant_first: false,
            }),
            vec![input],
        )
    };
    let out = ctx.node.output[0].clone();
    Ok(match (lo, hi) {
        (None, None) => vec![(Op::Identity, vec![x])],
        (Some(l), None) => vec![bound(Binary::Max, l, x)],
        (None, Some(h)) => vec![bound(Binary::Min, h, x)],
        (Some(l), Some(h)) => vec![
            bound(Binary::Max, l, x),
            bound(Binary::Min, h, super::part_name(&out, 0)),
        ],
    })
}

pub(super) fn transpose(ctx: &NodeCtx<'_>, rank: usize) -> Result<Vec<Step>> {
    ctx.only_attributes(&["perm"])?;
    let perm: Vec<i64> = ctx
        .ints_attribute("perm")
        .unwrap_or_else(|| (0..rank as i64).rev().collect());
    if perm.first() != Some(&0) || perm.len() != rank {
        return Err(ctx.unsupported(format!("perm {perm:?} (the batch axis must stay first)")));
    }
    let axes = perm
        .iter()
        .map(|&p| usize::try_from(p).map_err(|_| ctx.unsupported(format!("perm {perm:?}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(vec![(
        Op::Permute { axes },
        vec![ctx.node.input[0].clone()],
    )])
}

/// Reshape to a constant shape whose first entry keeps the batch (0, or −1 with no other
/// −1, or the graph's fixed batch).
pub(super) fn reshape(
    ctx: &NodeCtx<'_>,
    constants: &Constants,
    batch: Option<usize>,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&["allowzero"])?;
    if ctx.int_attribute("allowzero").unwrap_or(0) != 0 {
        return Err(ctx.unsupported("allowzero"));
    }
    let shape = int_constant(ctx, constants, 1)?;
    let Some((&first, rest)) = shape.split_first() else {
        return Err(ctx.unsupported("a scalar target shape"));
    };
    let keeps_batch = first == 0
        || (first == -1 && !rest.contains(&-1))
        || batch.is_some_and(|b| first == b as i64);
    if !keeps_batch {
        return Err(ctx.unsupported(format!(
            "shape {shape:?} (its first entry must keep the batch)"
        )));
    }
    let shape = rest
        .iter()
        .map(|&d| isize::try_from(d).map_err(|_| ctx.unsupported(format!("shape entry {d}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(vec![(
        Op::Reshape { shape },
        vec![ctx.node.input[0].clone()],
    )])
}

/// The axes of Unsqueeze / Squeeze / Reduce*: an attribute before `input_from`, an input
/// from it on.
fn axes(ctx: &NodeCtx<'_>, constants: &Constants, input_from: i64) -> Result<Option<Vec<isize>>> {
    let v = if ctx.opset >= input_from {
        if has_input(ctx, 1) {
            Some(int_constant(ctx, constants, 1)?)
        } else {
            None
        }
    } else {
        ctx.ints_attribute("axes")
    };
    if v.as_ref().is_some_and(|a| a.len() > MAX_RANK) {
        return Err(ctx.unsupported(format!("more than {MAX_RANK} axes")));
    }
    v.map(|a| {
        a.iter()
            .map(|&x| isize::try_from(x).map_err(|_| ctx.unsupported(format!("axis {x}"))))
            .collect()
    })
    .transpose()
}

pub(super) fn unsqueeze(
    ctx: &NodeCtx<'_>,
    constants: &Constants,
    squeeze: bool,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&["axes"])?;
    let axes = axes(ctx, constants, 13)?.ok_or_else(|| ctx.unsupported("no axes"))?;
    let x = vec![ctx.node.input[0].clone()];
    Ok(vec![(
        if squeeze {
            Op::Squeeze { axes }
        } else {
            Op::Unsqueeze { axes }
        },
        x,
    )])
}

pub(super) fn reduce(
    ctx: &NodeCtx<'_>,
    constants: &Constants,
    how: Reduction,
    rank: usize,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&["axes", "keepdims", "noop_with_empty_axes"])?;
    let input_from = if how == Reduction::Sum { 13 } else { 18 };
    let axes = match axes(ctx, constants, input_from)? {
        Some(a) if !a.is_empty() => a,
        _ => return Err(ctx.unsupported("a reduction over every axis (the batch included)")),
    };
    for &a in &axes {
        axis_of(ctx, a as i64, rank)?;
    }
    let keep_dims = ctx.int_attribute("keepdims").unwrap_or(1) != 0;
    Ok(vec![(
        Op::Reduce {
            how,
            axes,
            keep_dims,
        },
        vec![ctx.node.input[0].clone()],
    )])
}

pub(super) fn cast(ctx: &NodeCtx<'_>) -> Result<Vec<Step>> {
    ctx.only_attributes(&["to", "saturate"])?;
    match ctx.int_attribute("to") {
        Some(1) => Ok(vec![(
            Op::Cast { to: DType::F32 },
            vec![ctx.node.input[0].clone()],
        )]),
        other => Err(ctx.unsupported(format!("cast to element type {other:?}"))),
    }
}

/// LayerNormalization (opset 17) over trailing axes, scale and bias initializers.
pub(super) fn layer_norm(
    ctx: &NodeCtx<'_>,
    constants: &Constants,
    rank: usize,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&["axis", "epsilon", "stash_type"])?;
    if ctx.node.output.len() != 1 {
        return Err(ctx.unsupported("mean / inverse-deviation outputs"));
    }
    let axis = axis_of(ctx, ctx.int_attribute("axis").unwrap_or(-1), rank)?;
    let gamma = float_constant(ctx, constants, 1)?.clone();
    if gamma.ndim() != rank - axis as usize {
        return Err(ctx.unsupported(format!(
            "a scale of shape {:?} for axis {axis}",
            gamma.shape()
        )));
    }
    let beta = if has_input(ctx, 2) {
        float_constant(ctx, constants, 2)?.clone()
    } else {
        ArrayD::zeros(gamma.raw_dim())
    };
    let ln = LayerNorm {
        gamma,
        beta,
        eps: ctx.float_attribute("epsilon").unwrap_or(1e-5),
    };
    Ok(vec![(Op::LayerNorm(ln), vec![ctx.node.input[0].clone()])])
}

/// Folds Constant and ConstantOfShape into a value, `None` when the node is not one of them.
pub(super) fn fold(
    ctx: &NodeCtx<'_>,
    constants: &Constants,
    limits: &crate::limits::Limits,
) -> Result<Option<Value>> {
    match ctx.op_type {
        "Constant" => {
            let [a] = ctx.node.attribute.as_slice() else {
                return Err(ctx.unsupported("a Constant needs exactly one attribute"));
            };
            let name = a.name.as_deref().unwrap_or("");
            let v = match name {
                "value" => super::tensor_from_proto(
                    a.t.as_ref()
                        .ok_or_else(|| ctx.unsupported("value without a tensor"))?,
                    limits,
                )?,
                "value_float" => Value::F32(ArrayD::from_elem(IxDyn(&[]), a.f.unwrap_or(0.0))),
                "value_floats" => Value::F32(Array1::from(a.floats.clone()).into_dyn()),
                "value_int" => Value::I64(ArrayD::from_elem(IxDyn(&[]), a.i.unwrap_or(0))),
                "value_ints" => Value::I64(Array1::from(a.ints.clone()).into_dyn()),
                other => return Err(ctx.unsupported(format!("Constant attribute `{other}`"))),
            };
            Ok(Some(v))
        }
        "Identity" | "Unsqueeze" | "Squeeze" | "Reshape" if constant_input(ctx, constants) => {
            fold_shape_op(ctx, constants).map(Some)
        }
        "ConstantOfShape" => {
            ctx.only_attributes(&["value"])?;
            let dims = int_constant(ctx, constants, 0)?;
            let shape = dims
                .iter()
                .map(|&d| usize::try_from(d).map_err(|_| ctx.unsupported(format!("dimension {d}"))))
                .collect::<Result<Vec<_>>>()?;
            limits.check_elements(&shape, "ConstantOfShape")?;
            let fill = match ctx.attribute("value").and_then(|a| a.t.as_ref()) {
                Some(t) => super::tensor_from_proto(t, limits)?,
                None => Value::F32(ArrayD::zeros(IxDyn(&[1]))),
            };
            Ok(Some(match fill {
                Value::F32(t) if t.len() == 1 => Value::F32(ArrayD::from_elem(
                    IxDyn(&shape),
                    t.iter().copied().next().unwrap_or(0.0),
                )),
                Value::I64(t) if t.len() == 1 => Value::I64(ArrayD::from_elem(
                    IxDyn(&shape),
                    t.iter().copied().next().unwrap_or(0),
                )),
                _ => return Err(ctx.unsupported("a fill value that is not one element")),
            }))
        }
        _ => Ok(None),
    }
}

fn constant_input(ctx: &NodeCtx<'_>, constants: &Constants) -> bool {
    ctx.node
        .input
        .first()
        .is_some_and(|i| constants.contains_key(i))
}

/// Identity / Unsqueeze / Squeeze / Reshape of a constant, with ONNX's own axis rules (the
/// constant has no batch axis).
fn fold_shape_op(ctx: &NodeCtx<'_>, constants: &Constants) -> Result<Value> {
    let name = &ctx.node.input[0];
    let value = constants
        .get(name)
        .cloned()
        .ok_or_else(|| ctx.unsupported("no constant"))?;
    let shape: Vec<usize> = match &value {
        Value::F32(t) => t.shape().to_vec(),
        Value::I64(t) => t.shape().to_vec(),
    };
    let resolve = |a: i64, rank: usize| -> Result<usize> {
        let r = if a < 0 { a + rank as i64 } else { a };
        usize::try_from(r)
            .ok()
            .filter(|&r| r < rank)
            .ok_or_else(|| ctx.unsupported(format!("axis {a} of a rank-{rank} constant")))
    };
    let new_shape: Vec<usize> = match ctx.op_type {
        "Identity" => shape.clone(),
        "Unsqueeze" | "Squeeze" => {
            let axes: Vec<i64> = if ctx.opset >= 13 {
                if has_input(ctx, 1) {
                    int_constant(ctx, constants, 1)?
                } else {
                    Vec::new()
                }
            } else {
                ctx.ints_attribute("axes").unwrap_or_default()
            };
            if axes.len() > MAX_RANK || shape.len() + axes.len() > MAX_RANK {
                return Err(ctx.unsupported(format!("more than {MAX_RANK} axes")));
            }
            if ctx.op_type == "Unsqueeze" {
                let rank = shape.len() + axes.len();
                let mut at = axes
                    .iter()
                    .map(|&a| resolve(a, rank))
                    .collect::<Result<Vec<_>>>()?;
                at.sort_unstable();
                let mut rest = shape.iter();
                (0..rank)
                    .map(|k| {
                        if at.contains(&k) {
                            1
                        } else {
                            rest.next().copied().unwrap_or(1)
                        }
                    })
                    .collect()
            } else {
                let at = axes
                    .iter()
                    .map(|&a| resolve(a, shape.len()))
                    .collect::<Result<Vec<_>>>()?;
                shape
                    .iter()
                    .enumerate()
                    .filter(|&(k, &d)| {
                        if at.is_empty() {
                            d != 1
                        } else {
                            !at.contains(&k)
                        }
                    })
                    .map(|(_, &d)| d)
                    .collect()
            }
        }
        _ => {
            if ctx.int_attribute("allowzero").unwrap_or(0) != 0 {
                return Err(ctx.unsupported("allowzero"));
            }
            let target = int_constant(ctx, constants, 1)?;
            let total: usize = shape.iter().product();
            let mut out = Vec::with_capacity(target.len());
            let mut infer = None;
            for (k, &d) in target.iter().enumerate() {
                match d {
                    0 => out.push(
                        shape
                            .get(k)
                            .copied()
                            .ok_or_else(|| ctx.unsupported("a 0 past the input's rank"))?,
                    ),
                    -1 if infer.is_none() => {
                        infer = Some(k);
                        out.push(1);
                    }
                    d if d > 0 => out.push(d as usize),
                    d => return Err(ctx.unsupported(format!("shape entry {d}"))),
                }
            }
            // Checked: the target's entries come from the file.
            let known = out
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| ctx.unsupported(format!("reshape to {target:?}")))?;
            if let Some(k) = infer {
                if known == 0 || !total.is_multiple_of(known) {
                    return Err(ctx.unsupported(format!("reshape {shape:?} to {target:?}")));
                }
                out[k] = total / known;
            }
            out
        }
    };
    let reshaped = |len: usize| -> Result<IxDyn> {
        if new_shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == Some(len) {
            Ok(IxDyn(&new_shape))
        } else {
            Err(ctx.unsupported(format!("shape {shape:?} to {new_shape:?}")))
        }
    };
    Ok(match value {
        Value::F32(t) => {
            let dim = reshaped(t.len())?;
            let data: Vec<f32> = t.iter().copied().collect();
            Value::F32(
                ArrayD::from_shape_vec(dim, data).map_err(|e| ctx.unsupported(e.to_string()))?,
            )
        }
        Value::I64(t) => {
            let dim = reshaped(t.len())?;
            let data: Vec<i64> = t.iter().copied().collect();
            Value::I64(
                ArrayD::from_shape_vec(dim, data).map_err(|e| ctx.unsupported(e.to_string()))?,
            )
        }
    })
}

/// LRN over `channels` channels: `x / (bias + alpha / size · Σ_window x²)^beta`, the window
/// sum as a 1×1 convolution with a banded 0/1 weight (ONNX's window:
/// `[c − ⌊(size − 1)/2⌋, c + ⌈(size − 1)/2⌉]`, clipped to the channels).
pub(super) fn lrn(ctx: &NodeCtx<'_>, channels: Option<usize>) -> Result<Vec<Step>> {
    ctx.only_attributes(&["alpha", "beta", "bias", "size"])?;
    ctx.arity(1)?;
    let c = channels.ok_or_else(|| ctx.unsupported("an input whose channels are not fixed"))?;
    // The banded weight is c × c.
    crate::limits::Limits::default().check_elements(&[c, c], "LRN window weight")?;
    let size = ctx
        .int_attribute("size")
        .and_then(|s| usize::try_from(s).ok())
        .filter(|&s| s >= 1)
        .ok_or_else(|| ctx.unsupported("no size, or a size below 1"))?;
    let alpha = ctx.float_attribute("alpha").unwrap_or(1e-4);
    let beta = ctx.float_attribute("beta").unwrap_or(0.75);
    let bias = ctx.float_attribute("bias").unwrap_or(1.0);
    let (before, after) = ((size - 1) / 2, (size - 1).div_ceil(2));
    let weight = Array4::from_shape_fn((c, c, 1, 1), |(o, i, _, _)| {
        f32::from(u8::from(i + before >= o && i <= o + after))
    });
    let x = ctx.node.input[0].clone();
    let output = ctx.node.output.first().cloned().unwrap_or_default();
    let part = |k: usize| format!("{output}.part{k}");
    let scalar = |op: Binary, v: f32| {
        Op::BinaryConst(BinaryConst {
            op,
            constant: ArrayD::from_elem(IxDyn(&[]), v),
            constant_first: false,
        })
    };
    Ok(vec![
        (Op::Binary(Binary::Mul), vec![x.clone(), x.clone()]),
        (
            Op::Conv2d(Conv2d {
                weight,
                bias: None,
                stride: [1, 1],
                padding: [0, 0],
                dilation: [1, 1],
                groups: 1,
            }),
            vec![part(0)],
        ),
        (scalar(Binary::Mul, alpha / size as f32), vec![part(1)]),
        (scalar(Binary::Add, bias), vec![part(2)]),
        (scalar(Binary::Pow, beta), vec![part(3)]),
        (Op::Binary(Binary::Div), vec![x, part(4)]),
    ])
}

/// An average pool that leaves the padding out of its divisor (ONNX's default), on an input
/// of fixed spatial size `[h, w]`: the crate's pool (which counts it) times
/// `k_h·k_w / count`, a per-position constant.
pub(super) fn avg_pool_excluding_padding(
    ctx: &NodeCtx<'_>,
    pool: Pool2d,
    hw: Option<[usize; 2]>,
) -> Result<Vec<Step>> {
    let [h, w] = hw.ok_or_else(|| {
        ctx.unsupported("padded average pooling that excludes the padding, on a run-time size")
    })?;
    let geometry = |len: usize, k: usize, s: usize, p: usize| -> Result<Vec<f32>> {
        // The crate's pool allows padding up to half the window; that also bounds the
        // output (at most `len` + 1 positions), which sizes the divisor built here.
        if p > k / 2 {
            return Err(ctx.unsupported("pool padding over half the window"));
        }
        let out = p
            .checked_mul(2)
            .and_then(|p2| len.checked_add(p2))
            .and_then(|padded| padded.checked_sub(k))
            .map(|d| d / s + 1)
            .ok_or_else(|| ctx.unsupported("a window past the padded input"))?;
        Ok((0..out)
            .map(|o| {
                let start = (o * s) as isize - p as isize;
                let lo = start.max(0);
                let hi = (start + k as isize).min(len as isize);
                (hi - lo).max(1) as f32
            })
            .collect())
    };
    let rows = geometry(h, pool.kernel[0], pool.stride[0], pool.padding[0])?;
    let cols = geometry(w, pool.kernel[1], pool.stride[1], pool.padding[1])?;
    let area = (pool.kernel[0] * pool.kernel[1]) as f32;
    let scale = ArrayD::from_shape_fn(IxDyn(&[1, rows.len(), cols.len()]), |d| {
        area / (rows[d[1]] * cols[d[2]])
    });
    let output = ctx.node.output.first().cloned().unwrap_or_default();
    Ok(vec![
        (Op::AvgPool2d(pool), vec![ctx.node.input[0].clone()]),
        (
            Op::BinaryConst(BinaryConst {
                op: Binary::Mul,
                constant: scale,
                constant_first: false,
            }),
            vec![format!("{output}.part0")],
        ),
    ])
}

/// Opset < 13 Softmax at `axis`: a softmax over the input flattened to `[.., Π dims from
/// axis]`, on per-sample dims `dims` (all fixed): reshape, softmax over the last axis,
/// reshape back.
pub(super) fn flattened_softmax(ctx: &NodeCtx<'_>, dims: Option<Vec<usize>>) -> Result<Vec<Step>> {
    let dims = dims.ok_or_else(|| ctx.unsupported("a flattened softmax over run-time sizes"))?;
    let rank = dims.len() + 1;
    let axis = ctx.int_attribute("axis").unwrap_or(1);
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 1 || a as usize >= rank {
        return Err(ctx.unsupported(format!("softmax axis {axis} of rank {rank}")));
    }
    let keep = a as usize - 1;
    let mut flat: Vec<isize> = dims[..keep].iter().map(|&d| d as isize).collect();
    flat.push(-1);
    let back: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
    let output = ctx.node.output.first().cloned().unwrap_or_default();
    Ok(vec![
        (Op::Reshape { shape: flat }, vec![ctx.node.input[0].clone()]),
        (Op::Softmax { axis: -1 }, vec![format!("{output}.part0")]),
        (Op::Reshape { shape: back }, vec![format!("{output}.part1")]),
    ])
}

/// A pool padded at the end only (`pads = [0, 0, b, r]`, as Caffe-born models have), on a
/// fixed `[h, w]`: windows wholly inside by the crate's pool, and the one window per axis
/// that reaches into the padding by a pool of the input's last rows / columns with a
/// window clipped to them (the padding is never read: a max ignores it, an average that
/// excludes it divides by what is left). The pieces are concatenated back.
fn end_padded_pool(
    ctx: &NodeCtx<'_>,
    max: bool,
    kernel: [usize; 2],
    stride: [usize; 2],
    end: [usize; 2],
    hw: Option<[usize; 2]>,
) -> Result<Vec<Step>> {
    let [h, w] = hw.ok_or_else(|| ctx.unsupported("end padding on a run-time size"))?;
    // Per axis, blocks of output positions: `(first input index, window, stride)` for the
    // windows wholly inside, then the one window that reaches into the padding, clipped.
    let blocks = |len: usize, a: usize| -> Result<Vec<(usize, usize, usize)>> {
        let (k, s, pad) = (kernel[a], stride[a], end[a]);
        // `pad < k` and `len + pad ≥ k`, with the sum checked: both come from the file.
        let padded = len
            .checked_add(pad)
            .filter(|&p| pad < k && p >= k)
            .ok_or_else(|| ctx.unsupported(format!("end padding {end:?} of a {len} axis")))?;
        let full = if len >= k { (len - k) / s + 1 } else { 0 };
        let total = (padded - k) / s + 1;
        let mut out = Vec::new();
        if full > 0 {
            out.push((0, k, s));
        }
        match total - full {
            0 => {}
            1 if full * s < len => out.push((full * s, len - full * s, 1)),
            _ => return Err(ctx.unsupported(format!("end padding {end:?} past one window"))),
        }
        Ok(out)
    };
    let (rows, cols) = (blocks(h, 0)?, blocks(w, 1)?);
    let output = ctx.node.output.first().cloned().unwrap_or_default();
    let mut steps: Vec<Step> = Vec::new();
    let mut push = |op: Op, inputs: Vec<String>| -> String {
        steps.push((op, inputs));
        format!("{output}.part{}", steps.len() - 1)
    };
    let x = ctx.node.input[0].clone();
    let mut row_parts = Vec::new();
    for &(r0, kh, sh) in &rows {
        let from_rows = if r0 == 0 {
            x.clone()
        } else {
            push(slice_from(2, r0), vec![x.clone()])
        };
        let mut parts = Vec::new();
        for &(c0, kw, sw) in &cols {
            let input = if c0 == 0 {
                from_rows.clone()
            } else {
                push(slice_from(3, c0), vec![from_rows.clone()])
            };
            let p = Pool2d {
                kernel: [kh, kw],
                stride: [sh, sw],
                padding: [0, 0],
            };
            let op = if max {
                Op::MaxPool2d(p)
            } else {
                Op::AvgPool2d(p)
            };
            parts.push(push(op, vec![input]));
        }
        row_parts.push(if parts.len() > 1 {
            push(Op::ConcatAxis { axis: 3 }, parts)
        } else {
            parts.remove(0)
        });
    }
    if row_parts.len() > 1 {
        push(Op::ConcatAxis { axis: 2 }, row_parts);
    }
    Ok(steps)
}

/// Elements `start..` along full-index `axis`.
fn slice_from(axis: isize, start: usize) -> Op {
    Op::Slice {
        axis,
        start: start as i64,
        end: i64::MAX,
    }
}
