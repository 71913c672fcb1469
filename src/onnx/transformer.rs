//! Transformer ops in: the opset-23 `Attention` and `RMSNormalization`, the crate's own
//! domain ([`CRATE_DOMAIN`]: `Positions`, `Rotary`), and the two-node patterns exporters
//! write for one layer (`MatMul` by a weight then `Add` of a bias: a Linear with its bias;
//! `x · Sigmoid(x)`: SiLU), fused before mapping so the crate runs them as one node.

use super::export::CRATE_DOMAIN;
use super::shapes::{ShapeTracker, SymInt};
use super::{proto, NodeCtx, Step};
use crate::error::Result;
use crate::model::{Attention, Linear, Op, RmsNorm, Rotary, Unary};
use crate::tensor::{DType, Value};
use std::collections::HashMap;

type Constants = HashMap<String, Value>;

/// The domain of the nodes [`fuse`] makes; a file's own node of this domain is refused.
pub(super) const FUSED_DOMAIN: &str = "nncompress.fused";

/// `nodes` with each fusable pattern made one node of [`FUSED_DOMAIN`] carrying the
/// pattern's last output (`LinearBias(x, weight, bias)`, `Silu(x)`); the pattern's first
/// output must be read by its second node only.
pub(super) fn fuse(
    nodes: &[proto::NodeProto],
    constants: &Constants,
    graph_outputs: &[&str],
) -> Vec<proto::NodeProto> {
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, n) in nodes.iter().enumerate() {
        for i in &n.input {
            readers.entry(i.as_str()).or_default().push(k);
        }
    }
    let sole_reader = |value: &str| -> Option<usize> {
        match readers.get(value).map(Vec::as_slice) {
            Some([only]) if !graph_outputs.contains(&value) => Some(*only),
            _ => None,
        }
    };
    let default_domain = |n: &proto::NodeProto| {
        matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx")) && n.attribute.is_empty()
    };
    let mut out: Vec<Option<proto::NodeProto>> = nodes.iter().cloned().map(Some).collect();
    // A mask broadcast over the queries for ONNX Runtime, read only as attention masks:
    // the crate broadcasts it itself, so the attentions read the mask it was made from.
    let mut renamed: HashMap<String, String> = HashMap::new();
    for (k, n) in nodes.iter().enumerate() {
        let is_mask = n.domain.as_deref() == Some(CRATE_DOMAIN)
            && n.op_type.as_deref() == Some("BroadcastMask")
            && n.input.len() == 2
            && n.output.len() == 1
            && !graph_outputs.contains(&n.output[0].as_str());
        if !is_mask {
            continue;
        }
        let only_masks = readers.get(n.output[0].as_str()).is_some_and(|r| {
            r.iter().all(|&j| {
                let a = &nodes[j];
                a.op_type.as_deref() == Some("Attention")
                    && matches!(a.domain.as_deref(), None | Some("") | Some("ai.onnx"))
                    && a.input.iter().position(|i| *i == n.output[0]) == Some(3)
            })
        });
        if only_masks {
            renamed.insert(n.output[0].clone(), n.input[0].clone());
            out[k] = None;
        }
    }
    for n in out.iter_mut().flatten() {
        for i in n.input.iter_mut() {
            if let Some(r) = renamed.get(i.as_str()) {
                *i = r.clone();
            }
        }
    }
    for (k, first) in nodes.iter().enumerate() {
        let op = first.op_type.as_deref().unwrap_or("");
        if !default_domain(first) || first.output.len() != 1 {
            continue;
        }
        let Some(r) = sole_reader(&first.output[0]) else {
            continue;
        };
        let second = &nodes[r];
        let second_op = second.op_type.as_deref().unwrap_or("");
        if !default_domain(second) || second.input.len() != 2 || second.output.len() != 1 {
            continue;
        }
        let other = if second.input[0] == first.output[0] {
            &second.input[1]
        } else {
            &second.input[0]
        };
        let fused = match (op, second_op) {
            ("MatMul", "Add") if first.input.len() == 2 => {
                let weight = match constants.get(&first.input[1]) {
                    Some(Value::F32(w)) if w.ndim() == 2 => w,
                    _ => continue,
                };
                match constants.get(other) {
                    Some(Value::F32(b)) if b.ndim() == 1 && b.len() == weight.shape()[1] => {}
                    _ => continue,
                }
                (
                    "LinearBias",
                    vec![
                        first.input[0].clone(),
                        first.input[1].clone(),
                        other.clone(),
                    ],
                )
            }
            ("Sigmoid", "Mul") if first.input.len() == 1 && *other == first.input[0] => {
                ("Silu", vec![first.input[0].clone()])
            }
            _ => continue,
        };
        out[k] = Some(proto::NodeProto {
            op_type: Some(fused.0.into()),
            domain: Some(FUSED_DOMAIN.into()),
            name: second.name.clone(),
            input: fused.1,
            output: second.output.clone(),
            ..Default::default()
        });
        out[r] = None;
    }
    out.into_iter().flatten().collect()
}

/// The crate op of a node of [`CRATE_DOMAIN`] or [`FUSED_DOMAIN`].
pub(super) fn crate_op(
    ctx: &NodeCtx<'_>,
    domain: &str,
    constants: &Constants,
    tracker: &ShapeTracker,
) -> Result<Vec<Step>> {
    let x = ctx.node.input.first().cloned().unwrap_or_default();
    match (domain, ctx.op_type) {
        (FUSED_DOMAIN, "LinearBias") => {
            let (Some(Value::F32(w)), Some(Value::F32(b))) = (
                constants.get(&ctx.node.input[1]),
                constants.get(&ctx.node.input[2]),
            ) else {
                return Err(ctx.unsupported("a fused Linear without its weight and bias"));
            };
            let weight = w
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| ctx.unsupported(e.to_string()))?
                .reversed_axes()
                .as_standard_layout()
                .into_owned();
            let bias = b
                .view()
                .into_dimensionality::<ndarray::Ix1>()
                .map_err(|e| ctx.unsupported(e.to_string()))?
                .to_owned();
            Ok(vec![(
                Op::Linear(Linear {
                    weight,
                    bias: Some(bias),
                }),
                vec![x],
            )])
        }
        (FUSED_DOMAIN, "Silu") => Ok(vec![(Op::Unary(Unary::Silu), vec![x])]),
        (CRATE_DOMAIN, "Positions") => {
            ctx.arity(1)?;
            ctx.only_attributes(&["axis"])?;
            let axis = ctx
                .int_attribute("axis")
                .ok_or_else(|| ctx.unsupported("no `axis`"))?;
            Ok(vec![(
                Op::Positions {
                    axis: axis as isize,
                },
                vec![x],
            )])
        }
        (CRATE_DOMAIN, "Rotary") => {
            ctx.arity(1)?;
            ctx.only_attributes(&["head_dim", "base", "interleaved", "num_heads"])?;
            let head_dim = ctx
                .int_attribute("head_dim")
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| ctx.unsupported("no non-negative `head_dim`"))?;
            let base = ctx
                .float_attribute("base")
                .ok_or_else(|| ctx.unsupported("no `base`"))?;
            // Runtimes read `num_heads`, the crate the width: they must agree.
            let heads = ctx.int_attribute("num_heads");
            let width = tracker.full_shape(&x).and_then(|s| s.last().copied());
            if let (Some(h), Some(SymInt::Known(w))) = (heads, width) {
                if h.checked_mul(head_dim as i64) != Some(w) {
                    return Err(ctx.unsupported(format!(
                        "num_heads {h} of head_dim {head_dim} for a width of {w}"
                    )));
                }
            }
            let mut rotary = Rotary::new(head_dim, base);
            rotary.interleaved = ctx.int_attribute("interleaved").unwrap_or(0) != 0;
            Ok(vec![(Op::Rotary(rotary), vec![x])])
        }
        (_, other) => Err(ctx.unsupported(format!("op `{other}` of domain `{domain}`"))),
    }
}

/// Opset-23 `Attention` on `[N, S, heads·d]` queries, keys and values, with an optional
/// additive float mask of four axes.
pub(super) fn attention(
    ctx: &NodeCtx<'_>,
    constants: &Constants,
    tracker: &ShapeTracker,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&[
        "q_num_heads",
        "kv_num_heads",
        "scale",
        "is_causal",
        "softcap",
        "qk_matmul_output_mode",
        "softmax_precision",
    ])?;
    let inputs = &ctx.node.input;
    if inputs.len() < 3 || inputs.iter().take(3).any(String::is_empty) {
        return Err(ctx.unsupported("fewer than three inputs"));
    }
    if inputs.iter().skip(4).any(|i| !i.is_empty()) {
        return Err(ctx.unsupported("a key / value cache or sequence-length input"));
    }
    if ctx.float_attribute("softcap").is_some_and(|c| c != 0.0) {
        return Err(ctx.unsupported("a softcap"));
    }
    if ctx.int_attribute("qk_matmul_output_mode").unwrap_or(0) != 0 {
        return Err(ctx.unsupported("a second output mode"));
    }
    let mut shapes = Vec::new();
    for (k, i) in inputs.iter().take(3).enumerate() {
        if constants.contains_key(i) {
            return Err(ctx.unsupported(format!("a constant operand {k}")));
        }
        match tracker.full_shape(i) {
            Some(s) if s.len() == 3 => shapes.push(s),
            Some(s) => {
                return Err(ctx.unsupported(format!(
                    "operand {k} of {} axes (only [N, S, heads·d] maps)",
                    s.len()
                )))
            }
            None => return Err(ctx.unsupported(format!("operand {k} of unknown shape"))),
        }
    }
    let count = |name: &str| {
        ctx.int_attribute(name)
            .and_then(|h| usize::try_from(h).ok())
            .filter(|&h| h > 0)
            .ok_or_else(|| ctx.unsupported(format!("no positive `{name}` for 3-D inputs")))
    };
    let (heads, kv_heads) = (count("q_num_heads")?, count("kv_num_heads")?);
    let causal = ctx.int_attribute("is_causal").unwrap_or(0) != 0;
    // ONNX aligns a causal mask top-left, the crate bottom-right: equal lengths only.
    if causal && shapes[0][1] != shapes[1][1] {
        return Err(
            ctx.unsupported("a causal attention whose queries and keys may differ in length")
        );
    }
    let mut att = match shapes[0][2] {
        SymInt::Known(w) if w > 0 && (w as usize).is_multiple_of(heads) => {
            Attention::new(heads, w as usize / heads)
        }
        _ if ctx.float_attribute("scale").is_some() => Attention::new(heads, 1),
        _ => return Err(ctx.unsupported("a query width not a known multiple of the heads")),
    }
    .with_kv_heads(kv_heads);
    if let Some(scale) = ctx.float_attribute("scale") {
        att = att.with_scale(scale);
    }
    if causal {
        att = att.causal();
    }
    let mut reads: Vec<String> = inputs.iter().take(3).cloned().collect();
    if let Some(mask) = inputs.get(3).filter(|m| !m.is_empty()) {
        let rank = tracker.full_shape(mask).map(|s| s.len());
        if constants.contains_key(mask)
            || rank != Some(4)
            || tracker.dtype(mask) != Some(DType::F32)
        {
            return Err(
                ctx.unsupported("a mask that is not a float activation of four axes (batch first)")
            );
        }
        reads.push(mask.clone());
    }
    Ok(vec![(Op::Attention(att), reads)])
}

/// Opset-23 `RMSNormalization` over the last axis with a constant scale.
pub(super) fn rms_norm(ctx: &NodeCtx<'_>, constants: &Constants, rank: usize) -> Result<Vec<Step>> {
    ctx.only_attributes(&["axis", "epsilon", "stash_type"])?;
    ctx.arity(2)?;
    let axis = ctx.int_attribute("axis").unwrap_or(-1);
    if axis != -1 && axis != rank as i64 - 1 {
        return Err(ctx.unsupported(format!("axis {axis} (only the last maps)")));
    }
    let weight = match constants.get(&ctx.node.input[1]) {
        Some(Value::F32(w)) if w.ndim() == 1 => w
            .view()
            .into_dimensionality()
            .map_err(|e| ctx.unsupported(e.to_string()))?
            .to_owned(),
        _ => return Err(ctx.unsupported("a scale that is not a 1-D float initializer")),
    };
    let mut norm = RmsNorm::new(0);
    norm.weight = weight;
    norm.eps = ctx.float_attribute("epsilon").unwrap_or(1e-5);
    Ok(vec![(Op::RmsNorm(norm), vec![ctx.node.input[0].clone()])])
}
