//! ONNX out: a float [`Graph`] as a `ModelProto` of the lowest opset that has its ops (17;
//! 20 with GELU; 23 with attention, RMSNorm or rotary embeddings).
//!
//! Each crate node becomes one ONNX node whose output carries the node's name (a Linear
//! over a sequence two: `MatMul` then `Add`, as PyTorch exports it; SiLU `Sigmoid` then
//! `Mul`), and each parameter an initializer named `node.weight`, `node.bias`, ... so that
//! [`import`](super::import) gives back the same graph: the same parameters and
//! bit-identical outputs for every zoo model (`tests/onnx_export.rs`). Positions and rotary
//! embeddings, which no ONNX op computes alone, are nodes of the crate's domain
//! [`CRATE_DOMAIN`] whose model-local functions spell them in standard ops, so every runtime
//! that inlines functions (ONNX Runtime does) runs them. The batch axis is the symbolic
//! `N`; a dynamic axis keeps its symbol.

use super::proto::{self, attribute_proto::AttributeType, tensor_proto::DataType};
use super::tensor_to_proto;
use crate::error::{Error, Result};
use crate::model::{Binary, Graph, Op, Reduction, Unary};
use crate::quantizer::QuantizedModel;
use crate::tensor::{DType, Value};
use ndarray::{ArrayD, IxDyn};
use prost::Message;

/// The opset the exporter writes when the graph needs nothing newer.
pub const EXPORT_OPSET: i64 = 17;

/// The domain of the crate's own ONNX nodes (`Positions`, `Rotary`), each defined by a
/// model-local function of standard ops.
pub const CRATE_DOMAIN: &str = "ai.nncompress";

/// The lowest default-domain opset with a standard form of every op of `graph`.
fn opset_for(graph: &Graph) -> i64 {
    graph
        .nodes()
        .iter()
        .map(|n| match &n.op {
            Op::Attention(_) | Op::RmsNorm(_) | Op::Rotary(_) => 23,
            Op::Unary(Unary::Gelu | Unary::GeluTanh) => 20,
            _ => EXPORT_OPSET,
        })
        .max()
        .unwrap_or(EXPORT_OPSET)
}

/// The IR version ONNX released with `opset`.
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        _ => 11,
    }
}

/// The graph as ONNX file bytes (see [`export_model`]).
///
/// # Errors
/// As [`export_model`].
pub fn export(graph: &Graph) -> Result<Vec<u8>> {
    Ok(export_model(graph)?.encode_to_vec())
}

/// The graph as an ONNX `ModelProto`: opset 17, or the first opset with the graph's ops
/// (20 for GELU; 23 for `Attention`, `RMSNormalization`, `RotaryEmbedding`).
///
/// # Errors
/// [`Error::Unsupported`] for an op without an ONNX form here (QAT and custom ops, a
/// causal attention with more keys than queries, integer casts, ...), naming the node.
///
/// # Examples
/// ```
/// use nncompress::model::zoo;
/// use nncompress::onnx::{export, import, ImportOptions};
/// let net = zoo::lenet_300_100(7)?;
/// let back = import(&export(&net)?, &ImportOptions::default())?;
/// let x = ndarray::Array4::<f32>::from_elem((2, 1, 28, 28), 0.5).into_dyn();
/// assert_eq!(net.forward(&x)?, back.forward(&x)?);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn export_model(graph: &Graph) -> Result<proto::ModelProto> {
    export_at(graph, EXPORT_OPSET)
}

/// [`export_model`] at an opset of at least `floor`.
fn export_at(graph: &Graph, floor: i64) -> Result<proto::ModelProto> {
    let opset = opset_for(graph).max(floor);
    let mut w = Writer {
        opset,
        ..Writer::default()
    };
    for node in graph.nodes() {
        let inputs: Vec<String> = node
            .inputs
            .iter()
            .map(|&i| graph.node(i).name.clone())
            .collect();
        w.node(graph, node, inputs)?;
    }
    // Output sizes are known when no input axis is dynamic; otherwise only the rank is.
    let fixed = graph
        .nodes()
        .iter()
        .all(|n| !matches!(&n.op, Op::Input { dynamic, .. } if !dynamic.is_empty()));
    let output = graph
        .output_ids()
        .iter()
        .map(|&id| {
            let mut dims = vec![dim_param("N")];
            dims.extend(graph.shape(id).iter().map(|&d| {
                if fixed {
                    dim_value(d)
                } else {
                    proto::tensor_shape_proto::Dimension::default()
                }
            }));
            value_info(&graph.node(id).name, graph.dtype(id), Some(dims))
        })
        .collect();
    let mut opset_import = vec![opset_id("", opset)];
    if !w.functions.is_empty() {
        opset_import.push(opset_id(CRATE_DOMAIN, 1));
    }
    Ok(proto::ModelProto {
        ir_version: Some(ir_version(opset)),
        producer_name: Some("nncompress".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import,
        graph: Some(proto::GraphProto {
            name: Some("nncompress".into()),
            node: w.nodes,
            initializer: w.initializers,
            input: w.inputs,
            output,
            ..Default::default()
        }),
        functions: w.functions,
        ..Default::default()
    })
}

fn opset_id(domain: &str, version: i64) -> proto::OperatorSetIdProto {
    proto::OperatorSetIdProto {
        domain: Some(domain.into()),
        version: Some(version),
    }
}

#[derive(Default)]
struct Writer {
    opset: i64,
    nodes: Vec<proto::NodeProto>,
    initializers: Vec<proto::TensorProto>,
    inputs: Vec<proto::ValueInfoProto>,
    /// The crate-domain functions the graph calls, each once.
    functions: Vec<proto::FunctionProto>,
}

fn value_info(
    name: &str,
    dtype: DType,
    dims: Option<Vec<proto::tensor_shape_proto::Dimension>>,
) -> proto::ValueInfoProto {
    let elem = match dtype {
        DType::I64 => DataType::Int64,
        _ => DataType::Float,
    };
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(elem as i32),
                    shape: dims.map(|dim| proto::TensorShapeProto { dim }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn dim_value(v: usize) -> proto::tensor_shape_proto::Dimension {
    proto::tensor_shape_proto::Dimension {
        value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(
            v as i64,
        )),
        ..Default::default()
    }
}

fn dim_param(p: &str) -> proto::tensor_shape_proto::Dimension {
    proto::tensor_shape_proto::Dimension {
        value: Some(proto::tensor_shape_proto::dimension::Value::DimParam(
            p.into(),
        )),
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub(super) fn int(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn string(name: &str, v: &str) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn pair(v: [usize; 2]) -> Vec<i64> {
    vec![v[0] as i64, v[1] as i64]
}

impl Writer {
    fn emit(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        attribute: Vec<proto::AttributeProto>,
    ) {
        self.nodes.push(proto::NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs,
            output: vec![name.into()],
            attribute,
            ..Default::default()
        });
    }

    /// A node of [`CRATE_DOMAIN`], its defining function added to the model once.
    fn crate_node(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        attribute: Vec<proto::AttributeProto>,
    ) {
        if !self.functions.iter().any(|f| f.name.as_deref() == Some(op)) {
            self.functions
                .push(super::functions::definition(op, self.opset));
        }
        self.nodes.push(proto::NodeProto {
            op_type: Some(op.into()),
            domain: Some(CRATE_DOMAIN.into()),
            name: Some(name.into()),
            input: inputs,
            output: vec![name.into()],
            attribute,
            ..Default::default()
        });
    }

    /// The operands of an element-wise node, those of fewer axes given unit axes after the
    /// batch (the crate's broadcasting) so that ONNX's, from the left, agrees.
    fn aligned(
        &mut self,
        graph: &Graph,
        node: &crate::model::Node,
        ins: Vec<String>,
    ) -> Vec<String> {
        let ranks: Vec<usize> = node
            .inputs
            .iter()
            .map(|&i| graph.shape(i).len() + 1)
            .collect();
        let top = ranks.iter().copied().max().unwrap_or(0);
        ins.into_iter()
            .zip(ranks)
            .enumerate()
            .map(|(k, (input, rank))| {
                if rank == top {
                    return input;
                }
                let padded = format!("{}.operand{k}", node.name);
                let axes = self.i64_init(&padded, "axes", (1..=(top - rank) as i64).collect());
                self.emit("Unsqueeze", &padded, vec![input, axes], vec![]);
                padded
            })
            .collect()
    }

    /// Adds an initializer `node.suffix` and returns its name.
    fn init(&mut self, node: &str, suffix: &str, value: Value) -> String {
        let name = format!("{node}.{suffix}");
        self.initializers.push(tensor_to_proto(&name, &value));
        name
    }

    fn f32_init(&mut self, node: &str, suffix: &str, t: ArrayD<f32>) -> String {
        self.init(node, suffix, Value::F32(t))
    }

    fn i64_init(&mut self, node: &str, suffix: &str, v: Vec<i64>) -> String {
        self.init(
            node,
            suffix,
            Value::I64(ndarray::Array1::from(v).into_dyn()),
        )
    }

    fn node(
        &mut self,
        graph: &Graph,
        node: &crate::model::Node,
        mut ins: Vec<String>,
    ) -> Result<()> {
        let name = node.name.as_str();
        let unsupported =
            || Error::Unsupported(format!("ONNX export of node `{name}` ({})", node.op.kind()));
        match &node.op {
            Op::Input {
                shape,
                dtype,
                dynamic,
            } => {
                let mut dims = vec![dim_param("N")];
                for (axis, &d) in shape.iter().enumerate() {
                    match dynamic.iter().find(|(a, _)| *a == axis) {
                        Some((_, symbol)) => dims.push(dim_param(symbol)),
                        None => dims.push(dim_value(d)),
                    }
                }
                self.inputs.push(value_info(name, *dtype, Some(dims)));
            }
            Op::Conv2d(c) => {
                ins.push(self.f32_init(name, "weight", c.weight.clone().into_dyn()));
                if let Some(b) = &c.bias {
                    ins.push(self.f32_init(name, "bias", b.clone().into_dyn()));
                }
                let [ph, pw] = c.padding;
                let attrs = vec![
                    ints("kernel_shape", &pair(c.kernel())),
                    ints("strides", &pair(c.stride)),
                    ints("pads", &[ph as i64, pw as i64, ph as i64, pw as i64]),
                    ints("dilations", &pair(c.dilation)),
                    int("group", c.groups as i64),
                ];
                self.emit("Conv", name, ins, attrs);
            }
            Op::BatchNorm2d(bn) => {
                ins.push(self.f32_init(name, "weight", bn.gamma.clone().into_dyn()));
                ins.push(self.f32_init(name, "bias", bn.beta.clone().into_dyn()));
                ins.push(self.f32_init(name, "running_mean", bn.running_mean.clone().into_dyn()));
                ins.push(self.f32_init(name, "running_var", bn.running_var.clone().into_dyn()));
                self.emit(
                    "BatchNormalization",
                    name,
                    ins,
                    vec![float("epsilon", bn.eps)],
                );
            }
            Op::Linear(l) if graph.shape(node.inputs[0]).len() == 1 => {
                ins.push(self.f32_init(name, "weight", l.weight.clone().into_dyn()));
                if let Some(b) = &l.bias {
                    ins.push(self.f32_init(name, "bias", b.clone().into_dyn()));
                }
                self.emit("Gemm", name, ins, vec![int("transB", 1)]);
            }
            // Over a sequence: the transposed weight's MatMul, then the bias (PyTorch's form,
            // which the importer fuses back).
            Op::Linear(l) => {
                let transposed = l.weight.t().as_standard_layout().into_owned();
                ins.push(self.f32_init(name, "weight", transposed.into_dyn()));
                match &l.bias {
                    None => self.emit("MatMul", name, ins, vec![]),
                    Some(b) => {
                        let product = format!("{name}.matmul");
                        self.emit("MatMul", &product, ins, vec![]);
                        let bias = self.f32_init(name, "bias", b.clone().into_dyn());
                        self.emit("Add", name, vec![product, bias], vec![]);
                    }
                }
            }
            Op::Embedding(e) => {
                ins.insert(
                    0,
                    self.f32_init(name, "weight", e.weight.clone().into_dyn()),
                );
                self.emit("Gather", name, ins, vec![int("axis", 0)]);
            }
            Op::Attention(a) => {
                let (q, k) = (graph.shape(node.inputs[0]), graph.shape(node.inputs[1]));
                if a.causal && q.first() != k.first() {
                    return Err(Error::Unsupported(format!(
                        "ONNX export of node `{name}`: a causal attention of {} queries over {} \
                         keys (ONNX aligns its causal mask top-left, the crate bottom-right)",
                        q.first().unwrap_or(&0),
                        k.first().unwrap_or(&0)
                    )));
                }
                if let Some(&mask) = node.inputs.get(3) {
                    // The crate puts a short mask's missing axes after the batch; ONNX
                    // broadcasts from the left, so they are spelled out.
                    let mut shape = graph.shape(mask).to_vec();
                    if shape.len() < 3 {
                        let padded = format!("{name}.mask");
                        let missing = 3 - shape.len();
                        let axes = self.i64_init(&padded, "axes", (1..=missing as i64).collect());
                        self.emit("Unsqueeze", &padded, vec![ins[3].clone(), axes], vec![]);
                        ins[3] = padded;
                        shape.splice(0..0, std::iter::repeat_n(1, missing));
                    }
                    // ONNX Runtime wants the mask's query axis at full length (by the
                    // mask's shape alone, so that the export does not hang on the example
                    // sequence length).
                    if shape[1] == 1 {
                        let expanded = format!("{name}.mask_queries");
                        let reads = vec![ins[3].clone(), ins[0].clone()];
                        self.crate_node("BroadcastMask", &expanded, reads, vec![]);
                        ins[3] = expanded;
                    }
                }
                let mut attrs = vec![
                    int("q_num_heads", a.heads as i64),
                    int("kv_num_heads", a.kv_heads as i64),
                    float("scale", a.scale),
                ];
                if a.causal {
                    attrs.push(int("is_causal", 1));
                }
                self.emit("Attention", name, ins, attrs);
            }
            Op::RmsNorm(n) => {
                ins.push(self.f32_init(name, "weight", n.weight.clone().into_dyn()));
                self.emit(
                    "RMSNormalization",
                    name,
                    ins,
                    vec![int("axis", -1), float("epsilon", n.eps)],
                );
            }
            Op::Rotary(r) => {
                let width = graph.shape(node.inputs[0]).last().copied().unwrap_or(0);
                let heads = width.checked_div(r.head_dim).unwrap_or(0);
                let attrs = vec![
                    int("head_dim", r.head_dim as i64),
                    float("base", r.base),
                    int("interleaved", i64::from(r.interleaved)),
                    int("num_heads", heads as i64),
                ];
                self.crate_node("Rotary", name, ins, attrs);
            }
            Op::Positions { axis } => {
                let rank = graph.shape(node.inputs[0]).len() as isize + 1;
                let axis = if *axis < 0 { axis + rank } else { *axis };
                self.crate_node("Positions", name, ins, vec![int("axis", axis as i64)]);
            }
            Op::Slice { axis, start, end } => {
                let rank = graph.shape(node.inputs[0]).len() as isize + 1;
                let axis = if *axis < 0 { axis + rank } else { *axis };
                ins.push(self.i64_init(name, "starts", vec![*start]));
                ins.push(self.i64_init(name, "ends", vec![*end]));
                ins.push(self.i64_init(name, "axes", vec![axis as i64]));
                self.emit("Slice", name, ins, vec![]);
            }
            Op::Where => {
                let ins = self.aligned(graph, node, ins);
                self.emit("Where", name, ins, vec![]);
            }
            Op::ReLU => self.emit("Relu", name, ins, vec![]),
            Op::ReLU6 => {
                ins.push(self.f32_init(name, "min", ArrayD::from_elem(IxDyn(&[]), 0.0)));
                ins.push(self.f32_init(name, "max", ArrayD::from_elem(IxDyn(&[]), 6.0)));
                self.emit("Clip", name, ins, vec![]);
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                let [ph, pw] = p.padding;
                let mut attrs = vec![
                    ints("kernel_shape", &pair(p.kernel)),
                    ints("strides", &pair(p.stride)),
                    ints("pads", &[ph as i64, pw as i64, ph as i64, pw as i64]),
                ];
                let op = if matches!(node.op, Op::MaxPool2d(_)) {
                    "MaxPool"
                } else {
                    // The crate counts padded zeros in the divisor.
                    attrs.push(int("count_include_pad", 1));
                    "AveragePool"
                };
                self.emit(op, name, ins, attrs);
            }
            Op::GlobalAvgPool => self.emit("GlobalAveragePool", name, ins, vec![]),
            Op::Flatten => self.emit("Flatten", name, ins, vec![int("axis", 1)]),
            Op::Add if ins.len() == 2 => self.emit("Add", name, ins, vec![]),
            Op::Add => self.emit("Sum", name, ins, vec![]),
            Op::Concat => self.emit("Concat", name, ins, vec![int("axis", 1)]),
            Op::ConcatAxis { axis } => {
                self.emit("Concat", name, ins, vec![int("axis", *axis as i64)])
            }
            Op::Softmax { axis } => {
                self.emit("Softmax", name, ins, vec![int("axis", *axis as i64)])
            }
            Op::Dropout { .. } | Op::Identity => self.emit("Identity", name, ins, vec![]),
            Op::Unary(u) => {
                let op = match u {
                    Unary::Sigmoid => "Sigmoid",
                    Unary::Tanh => "Tanh",
                    Unary::Erf => "Erf",
                    Unary::Sqrt => "Sqrt",
                    Unary::Exp => "Exp",
                    Unary::Neg => "Neg",
                    Unary::HardSwish => "HardSwish",
                    Unary::Gelu => "Gelu",
                    Unary::GeluTanh => {
                        self.emit("Gelu", name, ins, vec![string("approximate", "tanh")]);
                        return Ok(());
                    }
                    // SiLU as PyTorch exports it (which the importer fuses back); the
                    // crate's SiLU is this very product, bit for bit.
                    Unary::Silu => {
                        let sigmoid = format!("{name}.sigmoid");
                        self.emit("Sigmoid", &sigmoid, ins.clone(), vec![]);
                        ins.push(sigmoid);
                        self.emit("Mul", name, ins, vec![]);
                        return Ok(());
                    }
                };
                self.emit(op, name, ins, vec![]);
            }
            Op::Binary(b) => {
                let ins = self.aligned(graph, node, ins);
                self.emit(binary_op(*b), name, ins, vec![]);
            }
            Op::BinaryConst(b) if b.constant.ndim() > graph.shape(node.inputs[0]).len() => {
                return Err(Error::Unsupported(format!(
                    "ONNX export of node `{name}`: a constant of more axes than the operand's \
                     sample (the crate would broadcast it past the batch axis)"
                )));
            }
            Op::BinaryConst(b) => {
                let c = self.f32_init(name, "constant", b.constant.clone());
                if b.constant_first {
                    ins.insert(0, c);
                } else {
                    ins.push(c);
                }
                self.emit(binary_op(b.op), name, ins, vec![]);
            }
            Op::LayerNorm(ln) => {
                ins.push(self.f32_init(name, "weight", ln.gamma.clone()));
                ins.push(self.f32_init(name, "bias", ln.beta.clone()));
                let axis = -(ln.gamma.ndim() as i64);
                self.emit(
                    "LayerNormalization",
                    name,
                    ins,
                    vec![int("axis", axis), float("epsilon", ln.eps)],
                );
            }
            Op::MatMul => self.emit("MatMul", name, ins, vec![]),
            Op::Reshape { shape } => {
                let mut full = vec![0i64];
                full.extend(shape.iter().map(|&d| d as i64));
                ins.push(self.i64_init(name, "shape", full));
                self.emit("Reshape", name, ins, vec![]);
            }
            Op::Permute { axes } => {
                let perm: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                self.emit("Transpose", name, ins, vec![ints("perm", &perm)]);
            }
            Op::Unsqueeze { axes } | Op::Squeeze { axes } => {
                ins.push(self.i64_init(name, "axes", axes.iter().map(|&a| a as i64).collect()));
                let op = if matches!(node.op, Op::Unsqueeze { .. }) {
                    "Unsqueeze"
                } else {
                    "Squeeze"
                };
                self.emit(op, name, ins, vec![]);
            }
            Op::Reduce {
                how,
                axes,
                keep_dims,
            } => {
                let axes: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                let keep = int("keepdims", i64::from(*keep_dims));
                match how {
                    Reduction::Sum => {
                        ins.push(self.i64_init(name, "axes", axes));
                        self.emit("ReduceSum", name, ins, vec![keep]);
                    }
                    // ReduceMean takes its axes as an attribute until opset 18.
                    Reduction::Mean if self.opset < 18 => {
                        self.emit("ReduceMean", name, ins, vec![ints("axes", &axes), keep])
                    }
                    Reduction::Mean => {
                        ins.push(self.i64_init(name, "axes", axes));
                        self.emit("ReduceMean", name, ins, vec![keep]);
                    }
                }
            }
            Op::Cast { to: DType::F32 } => {
                self.emit("Cast", name, ins, vec![int("to", DataType::Float as i64)])
            }
            _ => return Err(unsupported()),
        }
        Ok(())
    }
}

fn binary_op(b: Binary) -> &'static str {
    match b {
        Binary::Add => "Add",
        Binary::Sub => "Sub",
        Binary::Mul => "Mul",
        Binary::Div => "Div",
        Binary::Pow => "Pow",
        Binary::Max => "Max",
        Binary::Min => "Min",
    }
}

/// A full-integer [`QuantizedModel`] as ONNX bytes in QDQ form (see [`export_qdq_model`]).
///
/// # Errors
/// As [`export_qdq_model`].
pub fn export_qdq(model: &QuantizedModel) -> Result<Vec<u8>> {
    Ok(export_qdq_model(model)?.encode_to_vec())
}

/// A full-integer [`QuantizedModel`] as an opset-17 ONNX model in QDQ form, the format
/// ONNX Runtime recommends and TensorRT reads: the BatchNorm-folded float graph with
///
/// - each integer conv / linear weight an int8 initializer `node.weight/q` (per output
///   channel, symmetric, zero point 0) read by `DequantizeLinear` (`axis` 0), its bias an
///   int32 initializer with scale `s_in · s_w[c]` (the crate's own rounding);
/// - a `QuantizeLinear` → `DequantizeLinear` pair (u8, the calibrated scale and zero point)
///   on the graph input and after every node whose output the integer model quantizes; a
///   conv / linear fused with its ReLU gets its pair after the ReLU, as the crate fuses it.
///
/// Layers kept in float keep float weights; int4 layers get ONNX INT4 initializers, which
/// makes the file opset 21 (IR 10). The graph's input and output names and shapes are
/// those of [`export_model`] on the folded graph.
///
/// # Errors
/// [`Error::Unsupported`] for a dynamic-range or float16 model, or an op of the folded
/// graph without an ONNX form.
pub fn export_qdq_model(model: &QuantizedModel) -> Result<proto::ModelProto> {
    let (graph, values) = model.qdq_values()?;
    let int4_layers = values
        .iter()
        .any(|v| v.weights.is_some() && v.weight_bits == 4);
    // int4 initializers need opset 21 (IR 10).
    let mut out = export_at(
        graph,
        if int4_layers {
            INT4_OPSET
        } else {
            EXPORT_OPSET
        },
    )?;
    let g = out
        .graph
        .as_mut()
        .ok_or_else(|| Error::Unsupported("an export without a graph".into()))?;
    // Which float node's output carries which (scale, zero point), and the weights of the
    // integer layers.
    let mut params: std::collections::HashMap<&str, (f32, u8)> = Default::default();
    let mut weights: std::collections::HashMap<&str, (&ArrayD<i8>, &[f32], f32)> =
        Default::default();
    let mut int4: std::collections::HashSet<&str> = Default::default();
    for v in &values {
        params.insert(v.reports_as, (v.scale, v.zero));
        if let Some(w) = v.weights {
            // A Linear over a sequence exports as MatMul by the transposed weight, which
            // the per-output-channel `DequantizeLinear` below does not describe.
            let over_sequence = graph.nodes().iter().any(|n| {
                n.name == v.name
                    && matches!(n.op, Op::Linear(_))
                    && graph.shape(n.inputs[0]).len() != 1
            });
            if over_sequence {
                return Err(Error::Unsupported(format!(
                    "a QDQ export of the integer Linear `{}` over a sequence",
                    v.name
                )));
            }
            weights.insert(v.name, w);
            if v.weight_bits == 4 {
                int4.insert(v.name);
            }
        }
    }
    let mut inits: Vec<proto::TensorProto> = Vec::new();
    let mut nodes: Vec<proto::NodeProto> = Vec::new();
    let inputs: Vec<String> = g.input.iter().filter_map(|i| i.name.clone()).collect();
    let mut renamed: std::collections::HashMap<String, String> = Default::default();
    for x in &inputs {
        let &(scale, zero) = params
            .get(x.as_str())
            .ok_or_else(|| Error::Unsupported(format!("input `{x}` has no quantization")))?;
        let dq = format!("{x}/dq");
        qdq_pair(&mut nodes, &mut inits, x, &dq, scale, zero);
        renamed.insert(x.clone(), dq);
    }
    let float_inits = std::mem::take(&mut g.initializer);
    let mut dropped: std::collections::HashSet<String> = Default::default();
    for mut node in std::mem::take(&mut g.node) {
        for i in node.input.iter_mut() {
            if let Some(r) = renamed.get(i.as_str()) {
                *i = r.clone();
            }
        }
        let name = node.output.first().cloned().unwrap_or_default();
        if let Some(&(wq, s_w, s_in)) = weights.get(name.as_str()) {
            let weight = format!("{name}.weight");
            let channels = s_w.len();
            let (dtype, data, zeros) = if int4.contains(name.as_str()) {
                let values: Vec<i32> = wq.iter().map(|&v| i32::from(v)).collect();
                (
                    DataType::Int4,
                    crate::quantizer::pack_i4(&values),
                    vec![0; channels.div_ceil(2)],
                )
            } else {
                (
                    DataType::Int8,
                    wq.iter().map(|&v| v as u8).collect(),
                    vec![0; channels],
                )
            };
            inits.push(raw_tensor(&format!("{weight}/q"), dtype, wq.shape(), data));
            inits.push(f32_tensor(&format!("{weight}/scale"), &[channels], s_w));
            inits.push(raw_tensor(
                &format!("{weight}/zero"),
                dtype,
                &[channels],
                zeros,
            ));
            nodes.push(dequantize(&weight, &format!("{weight}/"), Some(0)));
            dropped.insert(weight);
            let bias = format!("{name}.bias");
            if let Some(b) = float_inits
                .iter()
                .find(|t| t.name.as_deref() == Some(&bias))
            {
                let b = super::tensor_from_proto(b, &crate::limits::Limits::default())?;
                let Value::F32(b) = b else {
                    return Err(Error::Unsupported(format!("bias `{bias}` is not float")));
                };
                // The crate's requantization: i32 bias at scale s_in·s_w[c].
                let scale: Vec<f64> = s_w
                    .iter()
                    .map(|&s| f64::from(s_in) * f64::from(s))
                    .collect();
                let q: Vec<u8> = b
                    .iter()
                    .zip(&scale)
                    .flat_map(|(&b, &s)| crate::quantizer::bias_to_i32(b, s).to_le_bytes())
                    .collect();
                inits.push(raw_tensor(
                    &format!("{bias}/q"),
                    DataType::Int32,
                    &[channels],
                    q,
                ));
                let scale32: Vec<f32> = scale.iter().map(|&s| s as f32).collect();
                inits.push(f32_tensor(&format!("{bias}/scale"), &[channels], &scale32));
                inits.push(raw_tensor(
                    &format!("{bias}/zero"),
                    DataType::Int32,
                    &[channels],
                    vec![0; 4 * channels],
                ));
                nodes.push(dequantize(&bias, &format!("{bias}/"), Some(0)));
                dropped.insert(bias);
            }
        }
        match params.get(name.as_str()) {
            Some(&(scale, zero)) => {
                let float = format!("{name}/float");
                node.output[0] = float.clone();
                nodes.push(node);
                qdq_pair(&mut nodes, &mut inits, &float, &name, scale, zero);
            }
            None => nodes.push(node),
        }
    }
    inits.extend(
        float_inits
            .into_iter()
            .filter(|t| !t.name.as_ref().is_some_and(|n| dropped.contains(n))),
    );
    g.initializer = inits;
    g.node = nodes;
    g.name = Some("nncompress-qdq".into());
    Ok(out)
}

/// The opset of a QDQ export with int4 weights.
const INT4_OPSET: i64 = 21;

/// `QuantizeLinear(x) → DequantizeLinear → out` at u8 `(scale, zero)`.
fn qdq_pair(
    nodes: &mut Vec<proto::NodeProto>,
    inits: &mut Vec<proto::TensorProto>,
    x: &str,
    out: &str,
    scale: f32,
    zero: u8,
) {
    let prefix = format!("{out}/");
    inits.push(f32_tensor(&format!("{prefix}scale"), &[], &[scale]));
    inits.push(raw_tensor(
        &format!("{prefix}zero"),
        DataType::Uint8,
        &[],
        vec![zero],
    ));
    nodes.push(proto::NodeProto {
        op_type: Some("QuantizeLinear".into()),
        name: Some(format!("{prefix}quantize")),
        input: vec![x.into(), format!("{prefix}scale"), format!("{prefix}zero")],
        output: vec![format!("{prefix}q")],
        ..Default::default()
    });
    nodes.push(dequantize(out, &prefix, None));
}

/// `DequantizeLinear(prefix+q, prefix+scale, prefix+zero) → out`.
fn dequantize(out: &str, prefix: &str, axis: Option<i64>) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some("DequantizeLinear".into()),
        name: Some(format!("{prefix}dequantize")),
        input: vec![
            format!("{prefix}q"),
            format!("{prefix}scale"),
            format!("{prefix}zero"),
        ],
        output: vec![out.into()],
        attribute: axis.map(|a| int("axis", a)).into_iter().collect(),
        ..Default::default()
    }
}

fn raw_tensor(name: &str, dtype: DataType, dims: &[usize], raw: Vec<u8>) -> proto::TensorProto {
    proto::TensorProto {
        name: Some(name.into()),
        data_type: Some(dtype as i32),
        dims: dims.iter().map(|&d| d as i64).collect(),
        raw_data: Some(raw),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[usize], v: &[f32]) -> proto::TensorProto {
    raw_tensor(
        name,
        DataType::Float,
        dims,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}
