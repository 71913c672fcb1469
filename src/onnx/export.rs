//! ONNX out: a float [`Graph`] as an opset-17 `ModelProto`.
//!
//! Each crate node becomes one ONNX node whose output carries the node's name, and each
//! parameter an initializer named `node.weight`, `node.bias`, ... so that
//! [`import`](super::import) gives back the same graph: the same parameters and, for the
//! ops of the CNN / MLP zoo, bit-identical outputs (`tests/onnx_export.rs`). The batch axis
//! is the symbolic `N`; a dynamic axis keeps its symbol.

use super::proto::{self, attribute_proto::AttributeType, tensor_proto::DataType};
use super::tensor_to_proto;
use crate::error::{Error, Result};
use crate::model::{Binary, Graph, Op, Reduction, Unary};
use crate::tensor::{DType, Value};
use ndarray::{ArrayD, IxDyn};
use prost::Message;

/// The opset the exporter writes.
pub const EXPORT_OPSET: i64 = 17;

/// The graph as ONNX file bytes (see [`export_model`]).
///
/// # Errors
/// As [`export_model`].
pub fn export(graph: &Graph) -> Result<Vec<u8>> {
    Ok(export_model(graph)?.encode_to_vec())
}

/// The graph as an opset-17 ONNX `ModelProto`.
///
/// # Errors
/// [`Error::Unsupported`] for an op without an ONNX form here (QAT and custom ops, GELU
/// before opset 20, attention, embeddings, ...), naming the node.
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
    let mut w = Writer::default();
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
    Ok(proto::ModelProto {
        ir_version: Some(8),
        producer_name: Some("nncompress".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(EXPORT_OPSET),
        }],
        graph: Some(proto::GraphProto {
            name: Some("nncompress".into()),
            node: w.nodes,
            initializer: w.initializers,
            input: w.inputs,
            output,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[derive(Default)]
struct Writer {
    nodes: Vec<proto::NodeProto>,
    initializers: Vec<proto::TensorProto>,
    inputs: Vec<proto::ValueInfoProto>,
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

fn int(name: &str, v: i64) -> proto::AttributeProto {
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
            Op::Linear(l) => {
                let rank = graph.shape(node.inputs[0]).len();
                if rank != 1 {
                    return Err(Error::Unsupported(format!(
                        "ONNX export of node `{name}`: a Linear over a rank-{} input (only [N, in] maps to Gemm)",
                        rank + 1
                    )));
                }
                ins.push(self.f32_init(name, "weight", l.weight.clone().into_dyn()));
                if let Some(b) = &l.bias {
                    ins.push(self.f32_init(name, "bias", b.clone().into_dyn()));
                }
                self.emit("Gemm", name, ins, vec![int("transB", 1)]);
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
                    _ => return Err(unsupported()),
                };
                self.emit(op, name, ins, vec![]);
            }
            Op::Binary(b) => self.emit(binary_op(*b), name, ins, vec![]),
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
                    Reduction::Mean => {
                        self.emit("ReduceMean", name, ins, vec![ints("axes", &axes), keep])
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
