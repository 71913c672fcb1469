//! QDQ models in (ONNX Runtime's `quantize_static` output, TensorRT's input): a float
//! graph whose weights are integer initializers behind `DequantizeLinear`, and whose
//! activations pass through `QuantizeLinear → DequantizeLinear` pairs, read as the crate's
//! full-integer [`QuantizedModel`].
//!
//! The file is first rewritten into its float graph: each weight or bias `DequantizeLinear`
//! of an initializer becomes the float initializer it computes, each activation pair is
//! removed (its scale and zero point kept for the value it quantizes). That graph is
//! imported by [`import`](super::import), BatchNorms are folded, and the integer model is
//! built with the file's activation parameters and the file's weight integers (recovered
//! exactly from the dequantized weights and their scales). Only what the crate's kernels
//! compute the same way is accepted: u8 activations (per tensor), int8 weights with zero
//! point 0 (per tensor or per output channel), biases that are int32 at `s_in · s_w`.

use super::proto::{self, tensor_proto::DataType};
use super::{corrupt, decode_model, import_model, ImportOptions};
use crate::error::{Error, Result};
use crate::model::{Graph, NodeId, Op};
use crate::quantizer::{fold_batch_norms, QuantConfig, QuantizedModel, StoredWeights};
use ndarray::{ArrayD, IxDyn};
use std::collections::{HashMap, HashSet};

/// An integer initializer read by a `DequantizeLinear`.
struct IntTensor {
    dims: Vec<usize>,
    values: Vec<i64>,
    dtype: DataType,
}

fn int_tensor(t: &proto::TensorProto, limits: &crate::limits::Limits) -> Result<IntTensor> {
    let name = t.name.as_deref().unwrap_or("");
    let dtype = t
        .data_type
        .and_then(|d| DataType::try_from(d).ok())
        .ok_or_else(|| corrupt(format!("tensor `{name}` has no element type")))?;
    let width = match dtype {
        DataType::Int8 | DataType::Uint8 | DataType::Int4 => 1,
        DataType::Int32 => 4,
        other => {
            return Err(Error::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?} as a quantized tensor"),
            })
        }
    };
    let dims = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| corrupt(format!("tensor `{name}` dim {d}"))))
        .collect::<Result<Vec<_>>>()?;
    limits.check_elements(&dims, name)?;
    let count: usize = dims.iter().product();
    let values: Vec<i64> = match (&t.raw_data, dtype) {
        // Two signed nibbles a byte, the first in the low one.
        (Some(raw), DataType::Int4) if raw.len() == count.div_ceil(2) => {
            crate::quantizer::unpack_i4(raw, count)?
                .into_iter()
                .map(i64::from)
                .collect()
        }
        (Some(raw), DataType::Int4) => {
            return Err(corrupt(format!(
                "tensor `{name}` has {} bytes for {count} int4 elements",
                raw.len()
            )))
        }
        (Some(raw), _) if raw.len() == count * width => match dtype {
            DataType::Int8 => raw.iter().map(|&b| i64::from(b as i8)).collect(),
            DataType::Uint8 => raw.iter().map(|&b| i64::from(b)).collect(),
            _ => raw
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        },
        (Some(raw), _) => {
            return Err(corrupt(format!(
                "tensor `{name}` has {} bytes for {count} elements",
                raw.len()
            )))
        }
        // Typed field: int8 / uint8 / int32 all live in `int32_data`.
        (None, _) if t.int32_data.len() == count => {
            t.int32_data.iter().map(|&v| i64::from(v)).collect()
        }
        (None, _) => {
            return Err(corrupt(format!(
                "tensor `{name}` holds {} values for {count} elements",
                t.int32_data.len()
            )))
        }
    };
    let (lo, hi) = match dtype {
        DataType::Int4 => (-8, 7),
        DataType::Int8 => (-128, 127),
        DataType::Uint8 => (0, 255),
        _ => (i64::from(i32::MIN), i64::from(i32::MAX)),
    };
    if values.iter().any(|v| !(lo..=hi).contains(v)) {
        return Err(corrupt(format!(
            "tensor `{name}` holds values past {dtype:?}"
        )));
    }
    Ok(IntTensor {
        dims,
        values,
        dtype,
    })
}

/// Scale (f32) and zero point of one `QuantizeLinear` / `DequantizeLinear`, and its axis.
struct Params {
    scale: Vec<f32>,
    zero: Vec<i64>,
    zero_dtype: DataType,
    axis: i64,
}

impl Params {
    fn same(&self, other: &Params) -> bool {
        self.scale
            .iter()
            .map(|s| s.to_bits())
            .eq(other.scale.iter().map(|s| s.to_bits()))
            && self.zero == other.zero
            && self.zero_dtype == other.zero_dtype
    }
}

struct Reader<'a> {
    inits: HashMap<&'a str, &'a proto::TensorProto>,
    limits: &'a crate::limits::Limits,
}

impl Reader<'_> {
    fn floats(&self, name: &str, node: &str) -> Result<Vec<f32>> {
        let t = self.inits.get(name).ok_or_else(|| {
            Error::Unsupported(format!(
                "node `{node}`: scale `{name}` is not an initializer"
            ))
        })?;
        match super::tensor_from_proto(t, self.limits)? {
            crate::tensor::Value::F32(v) if v.len() <= 1 << 16 => {
                let v: Vec<f32> = v.iter().copied().collect();
                if v.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(corrupt(format!(
                        "scale `{name}` is not finite and positive"
                    )));
                }
                Ok(v)
            }
            _ => Err(Error::Unsupported(format!(
                "node `{node}`: scale `{name}` is not a short float tensor"
            ))),
        }
    }

    fn params(&self, node: &proto::NodeProto) -> Result<Params> {
        let name = node.name.as_deref().unwrap_or("");
        for a in &node.attribute {
            if a.name.as_deref() != Some("axis") {
                return Err(Error::Unsupported(format!(
                    "node `{name}`: attribute `{}`",
                    a.name.as_deref().unwrap_or("")
                )));
            }
        }
        let scale = self.floats(node.input.get(1).map_or("", String::as_str), name)?;
        let (zero, zero_dtype) = match node.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => {
                let t = self.inits.get(z.as_str()).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "node `{name}`: zero point `{z}` is not an initializer"
                    ))
                })?;
                let t = int_tensor(t, self.limits)?;
                (t.values, t.dtype)
            }
            // ONNX's default zero point is a uint8 0.
            None => (vec![0; scale.len()], DataType::Uint8),
        };
        if zero.len() != scale.len() {
            return Err(corrupt(format!(
                "node `{name}`: {} scales but {} zero points",
                scale.len(),
                zero.len()
            )));
        }
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("axis"))
            .and_then(|a| a.i)
            .unwrap_or(1);
        Ok(Params {
            scale,
            zero,
            zero_dtype,
            axis,
        })
    }
}

/// A weight's per-output-channel scales, as the file gives them, and whether it is int4.
struct WeightScales {
    scale: Vec<f32>,
    int4: bool,
}

/// Imports a QDQ model (as ONNX Runtime's `quantize_static` writes it) as a full-integer
/// [`QuantizedModel`] on the crate's int8 kernels.
///
/// # Errors
/// As [`import`] for the float graph; [`Error::Unsupported`] for what the crate's integer
/// model does not compute the same way: int8 or per-channel activations, weights with a
/// non-zero zero point or off their int8 grid, a `QuantizeLinear` not followed by its
/// `DequantizeLinear`, a quantized value the integer model needs and the file does not
/// quantize; [`Error::CorruptFile`] for lengths and values that lie.
pub fn import_qdq(bytes: &[u8], options: &ImportOptions) -> Result<QuantizedModel> {
    qdq_model(decode_model(bytes)?, options)
}

/// [`import_qdq`] of the file at `path`, with its external data (as
/// [`import_file`](super::import_file)).
///
/// # Errors
/// As [`import_file`](super::import_file) and [`import_qdq`].
pub fn import_qdq_file(
    path: impl AsRef<std::path::Path>,
    options: &ImportOptions,
) -> Result<QuantizedModel> {
    qdq_model(super::read_model(path.as_ref(), options)?, options)
}

fn qdq_model(mut model: proto::ModelProto, options: &ImportOptions) -> Result<QuantizedModel> {
    if let Some(g) = model.graph.as_mut() {
        qoperator_to_qdq(g, &options.limits)?;
    }
    let graph = model
        .graph
        .take()
        .ok_or_else(|| corrupt("the model has no graph"))?;
    let reader = Reader {
        inits: graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
            .collect(),
        limits: &options.limits,
    };
    let producer: HashMap<&str, &proto::NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    // Activation parameters by the value they quantize; weight scales by the float
    // initializer a dequantize makes; DequantizeLinear outputs that alias a value.
    let mut acts: HashMap<String, (f32, u8)> = HashMap::new();
    let mut scales: HashMap<String, WeightScales> = HashMap::new();
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut new_inits: Vec<proto::TensorProto> = Vec::new();
    let mut used_inits: HashSet<String> = HashSet::new();
    let mut nodes: Vec<proto::NodeProto> = Vec::new();
    for node in &graph.node {
        let op = node.op_type.as_deref().unwrap_or("");
        let name = node.name.as_deref().unwrap_or("");
        if !node.domain.as_deref().unwrap_or("").is_empty() {
            // Foreign domains (com.microsoft QDQ ops) are left to the float import to refuse.
            nodes.push(node.clone());
            continue;
        }
        match op {
            "QuantizeLinear" => {
                let p = reader.params(node)?;
                if p.zero_dtype != DataType::Uint8 || p.scale.len() != 1 {
                    return Err(Error::Unsupported(format!(
                        "node `{name}`: {:?} activations with {} scales (the integer model's are u8 per tensor)",
                        p.zero_dtype,
                        p.scale.len()
                    )));
                }
                // Read when its DequantizeLinear comes; nothing else may read it.
            }
            "DequantizeLinear" => {
                let p = reader.params(node)?;
                let x = node.input.first().cloned().unwrap_or_default();
                let out = node
                    .output
                    .first()
                    .cloned()
                    .ok_or_else(|| corrupt(format!("node `{name}` has no output")))?;
                if let Some(t) = reader.inits.get(x.as_str()) {
                    // A weight or bias: the float initializer it computes.
                    let q = int_tensor(t, &options.limits)?;
                    let w = dequantize(&q, &p, name)?;
                    let mut init = super::tensor_to_proto(&out, &crate::tensor::Value::F32(w));
                    init.name = Some(out.clone());
                    new_inits.push(init);
                    used_inits.insert(x.clone());
                    if matches!(q.dtype, DataType::Int8 | DataType::Int4) {
                        if p.zero.iter().any(|&z| z != 0) {
                            return Err(Error::Unsupported(format!(
                                "node `{name}`: integer weights with a non-zero zero point"
                            )));
                        }
                        scales.insert(
                            out,
                            WeightScales {
                                scale: p.scale,
                                int4: q.dtype == DataType::Int4,
                            },
                        );
                    }
                    continue;
                }
                let quantize = producer
                    .get(x.as_str())
                    .filter(|n| n.op_type.as_deref() == Some("QuantizeLinear"))
                    .ok_or_else(|| {
                        Error::Unsupported(format!(
                            "node `{name}`: a DequantizeLinear of `{x}`, neither an initializer nor a QuantizeLinear"
                        ))
                    })?;
                let qp = reader.params(quantize)?;
                if !qp.same(&p) {
                    return Err(Error::Unsupported(format!(
                        "node `{name}`: dequantizes with other parameters than its QuantizeLinear"
                    )));
                }
                let source = quantize.input.first().cloned().unwrap_or_default();
                let source = alias.get(&source).cloned().unwrap_or(source);
                let zero = u8::try_from(p.zero[0]).map_err(|_| corrupt("zero point past u8"))?;
                let here = (p.scale[0], zero);
                if acts
                    .insert(source.clone(), here)
                    .is_some_and(|before| before != here)
                {
                    return Err(Error::Unsupported(format!(
                        "value `{source}` is quantized twice with different parameters"
                    )));
                }
                alias.insert(out, source);
            }
            _ => {
                let mut n = node.clone();
                for i in n.input.iter_mut() {
                    if let Some(a) = alias.get(i.as_str()) {
                        *i = a.clone();
                    }
                }
                nodes.push(n);
            }
        }
    }
    // Every QuantizeLinear output may feed only DequantizeLinear nodes.
    let quantized: HashSet<&str> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("QuantizeLinear"))
        .filter_map(|n| n.output.first().map(String::as_str))
        .collect();
    if let Some(n) = nodes
        .iter()
        .find(|n| n.input.iter().any(|i| quantized.contains(i.as_str())))
    {
        return Err(Error::Unsupported(format!(
            "node `{}` reads a quantized value directly",
            n.name.as_deref().unwrap_or("")
        )));
    }
    // A graph output produced by a dequantize keeps its name through an Identity.
    for out in &graph.output {
        let o = out.name.clone().unwrap_or_default();
        if let Some(src) = alias.get(&o) {
            if let Some(p) = acts.get(src).copied() {
                acts.insert(o.clone(), p);
            }
            nodes.push(proto::NodeProto {
                op_type: Some("Identity".into()),
                name: Some(format!("{o}/identity")),
                input: vec![src.clone()],
                output: vec![o],
                ..Default::default()
            });
        }
    }
    // Which crate layer reads which weight (its name is the node's first output).
    let layer_weight: HashMap<String, String> = nodes
        .iter()
        .filter(|n| matches!(n.op_type.as_deref(), Some("Conv" | "Gemm" | "MatMul")))
        .filter_map(|n| Some((n.output.first()?.clone(), n.input.get(1)?.clone())))
        .collect();
    // Initializers the float graph still reads (scales and zero points go with their
    // nodes, integer weights with their dequantize).
    let read: HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let mut initializer: Vec<proto::TensorProto> = graph
        .initializer
        .iter()
        .filter(|t| {
            t.name
                .as_deref()
                .is_some_and(|n| read.contains(n) && !used_inits.contains(n))
        })
        .cloned()
        .collect();
    initializer.extend(new_inits);
    let float = proto::GraphProto {
        node: nodes,
        initializer,
        ..graph
    };
    model.graph = Some(float);
    let g = fold_batch_norms(&import_model(&model, options)?)?;
    let Plan {
        acts: act_list,
        stored,
        int4,
    } = integer_plan(&g, &acts, &scales, &layer_weight)?;
    let mut config = QuantConfig::int8();
    for name in &int4 {
        let scheme = crate::quantizer::QuantScheme::int8_weights()
            .with_dtype(crate::quantizer::QuantDtype::Int4);
        config = config.with_layer_weights(name, scheme);
    }
    let mut q = QuantizedModel::build(&g, &act_list, &config, &stored)?;
    // The report's rows (sizes, kernel paths); no calibration data to measure SQNR on.
    q.measure(&g, &[])?;
    Ok(q)
}

/// `(q − z) · s` along `p.axis` (or one scale for all).
fn dequantize(q: &IntTensor, p: &Params, node: &str) -> Result<ArrayD<f32>> {
    let rank = q.dims.len() as i64;
    let channels = p.scale.len();
    let axis = if p.axis < 0 { p.axis + rank } else { p.axis };
    let stride: usize = if channels == 1 {
        1
    } else {
        let a = usize::try_from(axis)
            .ok()
            .filter(|&a| a < q.dims.len() && q.dims[a] == channels)
            .ok_or_else(|| {
                corrupt(format!(
                    "node `{node}`: {channels} scales along axis {} of {:?}",
                    p.axis, q.dims
                ))
            })?;
        q.dims[a + 1..].iter().product()
    };
    let values: Vec<f32> = q
        .values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = if channels == 1 {
                0
            } else {
                (i / stride) % channels
            };
            (v - p.zero[c]) as f32 * p.scale[c]
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(&q.dims), values).map_err(|e| corrupt(e.to_string()))
}

/// What [`integer_plan`] finds.
struct Plan {
    /// Each node's activation parameters.
    acts: Vec<(f32, u8)>,
    /// Each integer layer's weights and scales.
    stored: StoredWeights,
    /// The int4 layers.
    int4: Vec<String>,
}

/// Each node's activation parameters (the file's, or its input's for ops that keep them)
/// and each integer layer's weights, recovered from the dequantized floats and the file's
/// scales; the names of the int4 layers.
fn integer_plan(
    g: &Graph,
    acts: &HashMap<String, (f32, u8)>,
    scales: &HashMap<String, WeightScales>,
    layer_weight: &HashMap<String, String>,
) -> Result<Plan> {
    let mut list: Vec<(f32, u8)> = Vec::with_capacity(g.nodes().len());
    let mut stored = StoredWeights::new();
    let mut int4 = Vec::new();
    for (i, node) in g.nodes().iter().enumerate() {
        let id = NodeId::from_index(i);
        let own = acts.get(&node.name).copied();
        let keeps_input = matches!(
            node.op,
            Op::Flatten
                | Op::MaxPool2d(_)
                | Op::Identity
                | Op::Dropout { .. }
                | Op::ReLU
                | Op::ReLU6
                | Op::Reshape { .. }
        );
        let from_input = node.inputs.first().map(|j| list[j.index()]);
        // A conv or linear whose one consumer is a ReLU is fused: its own output is never
        // quantized, the ReLU's parameters serve.
        let fused = match g.consumers(id).as_slice() {
            [c] if matches!(node.op, Op::Conv2d(_) | Op::Linear(_))
                && matches!(g.node(*c).op, Op::ReLU | Op::ReLU6) =>
            {
                acts.get(&g.node(*c).name).copied()
            }
            _ => None,
        };
        let p = own
            .or(fused)
            .or(if keeps_input { from_input } else { None })
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "value `{}` ({}) is not quantized in the file",
                    node.name,
                    node.op.kind()
                ))
            })?;
        list.push(p);
        let weight = match &node.op {
            Op::Conv2d(c) => Some(c.weight.view().into_dyn()),
            Op::Linear(l) => Some(l.weight.view().into_dyn()),
            _ => None,
        };
        let (Some(w), Some(s)) = (
            weight,
            layer_weight.get(&node.name).and_then(|w| scales.get(w)),
        ) else {
            continue;
        };
        let out = w.shape()[0];
        let per_channel: Vec<f32> = match s.scale.len() {
            1 => vec![s.scale[0]; out],
            n if n == out => s.scale.clone(),
            n => {
                return Err(Error::Unsupported(format!(
                    "`{}`: {n} weight scales for {out} output channels (not per output channel)",
                    node.name
                )))
            }
        };
        let per = w.len() / out.max(1);
        let mut q = Vec::with_capacity(w.len());
        for (k, &v) in w.iter().enumerate() {
            let s = per_channel[k / per.max(1)];
            let r = (v / s).round_ties_even();
            // The float is q · s for an integer q of the file: anything else is not on
            // the grid this layer claims.
            if !(-128.0..=127.0).contains(&r) || (r * s - v).abs() > s * 1e-3 {
                return Err(Error::Unsupported(format!(
                    "`{}`: weight {v} is not on its int8 grid of scale {s}",
                    node.name
                )));
            }
            q.push(r as i8);
        }
        let q = ArrayD::from_shape_vec(IxDyn(w.shape()), q).map_err(|e| corrupt(e.to_string()))?;
        stored.insert(node.name.clone(), (q, per_channel));
        if s.int4 {
            int4.push(node.name.clone());
        }
    }
    Ok(Plan {
        acts: list,
        stored,
        int4,
    })
}

/// Rewrites ONNX Runtime's operator-oriented form (`QuantizeLinear`, `QLinearConv`,
/// `QLinearMatMul`, `com.microsoft.QGemm`, `MaxPool` / `Flatten` / `Reshape` / ... on uint8,
/// `DequantizeLinear`) into the QDQ form the rest of this module reads: each quantized
/// layer becomes `DequantizeLinear`s of its inputs, weights and int32 bias (at scale
/// `s_x · s_w`), the float op, and a `QuantizeLinear` with the layer's output parameters;
/// a layout or max op on uint8 runs on the dequantized value and is quantized back with
/// its input's parameters. Any other op reading uint8 values is refused. A QDQ graph
/// passes through unchanged.
fn qoperator_to_qdq(graph: &mut proto::GraphProto, limits: &crate::limits::Limits) -> Result<()> {
    const LAYERS: &[&str] = &["QLinearConv", "QLinearMatMul", "QGemm"];
    if !graph
        .node
        .iter()
        .any(|n| LAYERS.contains(&n.op_type.as_deref().unwrap_or("")))
    {
        return Ok(());
    }
    let inits: HashMap<&str, &proto::TensorProto> = graph
        .initializer
        .iter()
        .filter_map(|t| Some((t.name.as_deref()?, t)))
        .collect();
    // Quantized values: name → (scale, zero point) initializer names.
    let mut quantized: HashMap<String, (String, String)> = HashMap::new();
    let mut dequantized: HashMap<String, String> = HashMap::new();
    let mut nodes: Vec<proto::NodeProto> = Vec::new();
    let mut new_inits: Vec<proto::TensorProto> = Vec::new();
    let node = |op: &str, name: String, input: Vec<String>, output: String| proto::NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input,
        output: vec![output],
        ..Default::default()
    };
    let input = |n: &proto::NodeProto, k: usize| n.input.get(k).cloned().unwrap_or_default();
    for n in std::mem::take(&mut graph.node) {
        let op = n.op_type.clone().unwrap_or_default();
        let domain = n.domain.clone().unwrap_or_default();
        let name = n.name.clone().unwrap_or_default();
        let out = n.output.first().cloned().unwrap_or_default();
        // `DequantizeLinear(x, s, z)` once per quantized value read as a float.
        let mut dq = |x: &str, s: &str, z: &str, nodes: &mut Vec<proto::NodeProto>| -> String {
            if let Some(d) = dequantized.get(x) {
                return d.clone();
            }
            let d = format!("{x}/dq");
            nodes.push(node(
                "DequantizeLinear",
                format!("{x}/dequantize"),
                vec![x.into(), s.into(), z.into()],
                d.clone(),
            ));
            dequantized.insert(x.to_string(), d.clone());
            d
        };
        let weight = |w: &str, s: &str, z: &str, nodes: &mut Vec<proto::NodeProto>| -> String {
            let d = format!("{w}/dq");
            let mut n = node(
                "DequantizeLinear",
                format!("{w}/dequantize"),
                vec![w.into(), s.into(), z.into()],
                d.clone(),
            );
            n.attribute.push(proto::AttributeProto {
                name: Some("axis".into()),
                i: Some(0),
                r#type: Some(2),
                ..Default::default()
            });
            nodes.push(n);
            d
        };
        let floats = |t: &str| -> Result<Vec<f32>> {
            let p = inits.get(t).ok_or_else(|| {
                Error::Unsupported(format!("node `{name}`: `{t}` is not an initializer"))
            })?;
            match super::tensor_from_proto(p, limits)? {
                crate::tensor::Value::F32(v) => Ok(v.iter().copied().collect()),
                _ => Err(Error::Unsupported(format!(
                    "node `{name}`: scale `{t}` is not float"
                ))),
            }
        };
        let mut layer = |float_op: &str,
                         (x, xs, xz): (String, String, String),
                         (w, ws, wz): (String, String, String),
                         bias: Option<String>,
                         y: Option<(String, String)>,
                         attribute: Vec<proto::AttributeProto>,
                         nodes: &mut Vec<proto::NodeProto>,
                         new_inits: &mut Vec<proto::TensorProto>|
         -> Result<Option<(String, String)>> {
            let a = dq(&x, &xs, &xz, nodes);
            let b = if inits.contains_key(w.as_str()) {
                weight(&w, &ws, &wz, nodes)
            } else {
                dq(&w, &ws, &wz, nodes)
            };
            let mut ins = vec![a, b];
            if let Some(bias) = bias.filter(|b| !b.is_empty()) {
                let (sx, sw) = (floats(&xs)?, floats(&ws)?);
                let [sx] = sx.as_slice() else {
                    return Err(Error::Unsupported(format!(
                        "node `{name}`: per-channel input scales"
                    )));
                };
                let scale: Vec<f32> = sw.iter().map(|s| s * sx).collect();
                let c = scale.len();
                new_inits.push(super::tensor_to_proto(
                    &format!("{bias}/scale"),
                    &crate::tensor::Value::F32(ndarray::Array1::from(scale).into_dyn()),
                ));
                new_inits.push(proto::TensorProto {
                    name: Some(format!("{bias}/zero")),
                    data_type: Some(DataType::Int32 as i32),
                    dims: vec![c as i64],
                    raw_data: Some(vec![0; 4 * c]),
                    ..Default::default()
                });
                let mut d = node(
                    "DequantizeLinear",
                    format!("{bias}/dequantize"),
                    vec![
                        bias.clone(),
                        format!("{bias}/scale"),
                        format!("{bias}/zero"),
                    ],
                    format!("{bias}/dq"),
                );
                d.attribute.push(proto::AttributeProto {
                    name: Some("axis".into()),
                    i: Some(0),
                    r#type: Some(2),
                    ..Default::default()
                });
                nodes.push(d);
                ins.push(format!("{bias}/dq"));
            }
            let float_out = if y.is_some() {
                format!("{out}/float")
            } else {
                out.clone()
            };
            let mut f = node(float_op, format!("{name}/float"), ins, float_out.clone());
            f.attribute = attribute;
            nodes.push(f);
            if let Some((ys, yz)) = &y {
                nodes.push(node(
                    "QuantizeLinear",
                    format!("{name}/quantize"),
                    vec![float_out, ys.clone(), yz.clone()],
                    out.clone(),
                ));
            }
            Ok(y)
        };
        let three = |k: usize| (input(&n, k), input(&n, k + 1), input(&n, k + 2));
        let made = match (op.as_str(), domain.as_str()) {
            ("QuantizeLinear", "") => {
                nodes.push(n.clone());
                Some((input(&n, 1), input(&n, 2)))
            }
            ("QLinearConv", "") => layer(
                "Conv",
                three(0),
                three(3),
                n.input.get(8).cloned(),
                Some((input(&n, 6), input(&n, 7))),
                n.attribute.clone(),
                &mut nodes,
                &mut new_inits,
            )?,
            ("QLinearMatMul", "") => layer(
                "MatMul",
                three(0),
                three(3),
                None,
                Some((input(&n, 6), input(&n, 7))),
                Vec::new(),
                &mut nodes,
                &mut new_inits,
            )?,
            ("QGemm", "com.microsoft") => {
                let alpha = n
                    .attribute
                    .iter()
                    .find(|a| a.name.as_deref() == Some("alpha"))
                    .and_then(|a| a.f)
                    .unwrap_or(1.0);
                if alpha != 1.0 {
                    return Err(Error::Unsupported(format!(
                        "node `{name}`: QGemm with alpha {alpha}"
                    )));
                }
                let y = n
                    .input
                    .get(7)
                    .filter(|s| !s.is_empty())
                    .map(|s| (s.clone(), input(&n, 8)));
                let attrs = n
                    .attribute
                    .iter()
                    .filter(|a| a.name.as_deref() != Some("alpha"))
                    .cloned()
                    .collect();
                layer(
                    "Gemm",
                    three(0),
                    three(3),
                    n.input.get(6).cloned(),
                    y,
                    attrs,
                    &mut nodes,
                    &mut new_inits,
                )?
            }
            (
                "MaxPool" | "Flatten" | "Reshape" | "Transpose" | "Squeeze" | "Unsqueeze"
                | "Identity",
                "",
            ) if quantized.contains_key(&input(&n, 0)) => {
                let x = input(&n, 0);
                let (s, z) = quantized[&x].clone();
                let mut f = n.clone();
                f.input[0] = dq(&x, &s, &z, &mut nodes);
                f.output[0] = format!("{out}/float");
                nodes.push(f);
                nodes.push(node(
                    "QuantizeLinear",
                    format!("{name}/quantize"),
                    vec![format!("{out}/float"), s.clone(), z.clone()],
                    out.clone(),
                ));
                Some((s, z))
            }
            _ => {
                if let Some(q) = n
                    .input
                    .iter()
                    .skip(usize::from(op == "DequantizeLinear"))
                    .find(|i| quantized.contains_key(*i))
                {
                    return Err(Error::Unsupported(format!(
                        "node `{name}` ({domain}{}{op}) reads the uint8 value `{q}`",
                        if domain.is_empty() { "" } else { "." }
                    )));
                }
                nodes.push(n.clone());
                None
            }
        };
        if let Some(p) = made {
            quantized.insert(out, p);
        }
    }
    graph.node = nodes;
    graph.initializer.extend(new_inits);
    Ok(())
}
