//! ONNX in and out: a model file decoded with `prost` into [`proto`] and mapped onto a
//! [`Graph`] ([`import`]), and a float graph written back ([`export`]).
//!
//! The bindings in [`proto`] are generated once from ONNX's own `onnx.proto` (committed
//! under `proto/`) by `tools/onnx-proto-gen`, so building the crate needs no `protoc`.
//!
//! It maps graph inputs, initializers, folded constants and the 47 ops listed in
//! `docs/onnx.md` (element-wise, activations, Conv, BatchNormalization, pools, Gemm,
//! MatMul, shape ops, LayerNormalization, Gather), each checked on ONNX's own node tests
//! (`tests/onnx_node.rs`), and folds the shape sub-graphs of real exports at import
//! (`shapes`). Anything else is [`Error::Unsupported`] naming the op type,
//! the node and the opset — never a graph that computes something different.
//!
//! The crate's values are batch-first: an ONNX value's first axis is the graph's batch
//! axis, so a broadcast between activations of different ranks (NumPy aligns them from the
//! right, which moves the batch axis) is refused rather than guessed.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod proto;

mod export;
mod functions;
mod layers;
mod qdq;
mod shapes;
mod tensor;
mod transformer;

pub use export::{export, export_model, export_qdq, export_qdq_model, CRATE_DOMAIN, EXPORT_OPSET};
pub use qdq::{import_qdq, import_qdq_file};
pub use tensor::{load_external_data, tensor_from_proto, tensor_to_proto};

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::model::{Binary, BinaryConst, Dim, Graph, GraphBuilder, Op, Reduction, Unary};
use crate::tensor::{DType, Value};
use ndarray::ArrayD;
use prost::Message;
use proto::tensor_proto::DataType;
use std::collections::{HashMap, HashSet};

/// Nodes one graph may have (prost itself stops nesting at 100 message levels).
const MAX_NODES: usize = 1 << 20;

/// Axes a value may have, and entries an axes / shape list may hold: a file cannot make the
/// importer build or loop over a value of millions of unit axes.
pub(crate) const MAX_RANK: usize = 32;

/// How [`import`] reads a model.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Sizes for symbolic dimensions (`"sequence"` → 128) the graph is checked with when
    /// it is built; a symbol not listed is checked at 1. Every symbolic axis stays dynamic.
    pub dims: HashMap<String, usize>,
    /// Resource limits for the tensors in the file.
    pub limits: Limits,
}

/// Decodes an ONNX `ModelProto` from `bytes`.
///
/// # Errors
/// [`Error::CorruptFile`] when the bytes are not a valid protobuf `ModelProto` (truncated,
/// lengths past the end, wrong wire types, nesting past prost's limit).
pub fn decode_model(bytes: &[u8]) -> Result<proto::ModelProto> {
    proto::ModelProto::decode(bytes).map_err(|e| Error::CorruptFile {
        path: None,
        reason: format!("not an ONNX model: {e}"),
    })
}

/// The default-domain opset a model imports (1 when it names none, as ONNX reads it).
fn default_opset(model: &proto::ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| {
            o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx")
        })
        .and_then(|o| o.version)
        .unwrap_or(1)
}

/// Imports an ONNX model (file bytes) as a [`Graph`]: graph inputs that are not
/// initializers become typed inputs (first axis the batch), the listed outputs become the
/// graph's outputs in order.
///
/// # Errors
/// [`Error::CorruptFile`] for bytes that do not decode or a graph that is inconsistent
/// (a node reading a value nobody produces, a name produced twice);
/// [`Error::Unsupported`] for an op, attribute, domain or element type this importer does
/// not map (the message names the op type, node and opset); [`Error::LimitExceeded`] for
/// tensors past `options.limits`; shape errors from building the graph.
///
/// # Examples
/// ```
/// use nncompress::onnx::{import, proto, ImportOptions};
/// use prost::Message;
/// // A one-node model, y = relu(x) for x of shape [N, 3], written with the bindings.
/// let dim = |v: i64| proto::tensor_shape_proto::Dimension {
///     value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)),
///     ..Default::default()
/// };
/// let value = |name: &str| proto::ValueInfoProto {
///     name: Some(name.into()),
///     r#type: Some(proto::TypeProto {
///         value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
///             elem_type: Some(1),
///             shape: Some(proto::TensorShapeProto { dim: vec![dim(2), dim(3)] }),
///         })),
///         ..Default::default()
///     }),
///     ..Default::default()
/// };
/// let model = proto::ModelProto {
///     ir_version: Some(8),
///     opset_import: vec![proto::OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
///     graph: Some(proto::GraphProto {
///         node: vec![proto::NodeProto {
///             op_type: Some("Relu".into()),
///             input: vec!["x".into()],
///             output: vec!["y".into()],
///             ..Default::default()
///         }],
///         input: vec![value("x")],
///         output: vec![value("y")],
///         ..Default::default()
///     }),
///     ..Default::default()
/// };
/// let graph = import(&model.encode_to_vec(), &ImportOptions::default())?;
/// let x = nncompress::tensor::Value::F32(ndarray::arr2(&[[-1.0f32, 0.0, 2.0], [3.0, -4.0, 5.0]]).into_dyn());
/// let y = graph.run(&[("x", &x)])?;
/// assert_eq!(y[0].as_f32().unwrap().as_slice().unwrap(), &[0.0, 0.0, 2.0, 3.0, 0.0, 5.0]);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn import(bytes: &[u8], options: &ImportOptions) -> Result<Graph> {
    import_model(&decode_model(bytes)?, options)
}

/// Imports the ONNX model file at `path` (see [`import`]), reading initializers kept in
/// external data files beside it ([`load_external_data`]: locations may not leave the
/// model's folder).
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; as [`load_external_data`] and [`import`].
pub fn import_file(path: impl AsRef<std::path::Path>, options: &ImportOptions) -> Result<Graph> {
    import_model(&read_model(path.as_ref(), options)?, options)
}

/// The model at `path`, its external data read in.
pub(crate) fn read_model(
    path: &std::path::Path,
    options: &ImportOptions,
) -> Result<proto::ModelProto> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut model = decode_model(&bytes)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    load_external_data(&mut model, dir, &options.limits)?;
    Ok(model)
}

/// Imports a decoded model (see [`import`]).
///
/// # Errors
/// As [`import`].
pub fn import_model(model: &proto::ModelProto, options: &ImportOptions) -> Result<Graph> {
    let opset = default_opset(model);
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| corrupt("the model has no graph"))?;
    if graph.node.len() > MAX_NODES {
        return Err(Error::LimitExceeded {
            what: "ONNX graph nodes".into(),
            limit: MAX_NODES as u64,
            requested: graph.node.len() as u64,
        });
    }
    let mut constants: HashMap<String, Value> = HashMap::new();
    for init in &graph.initializer {
        let name = init.name.clone().unwrap_or_default();
        let value = tensor_from_proto(init, &options.limits)?;
        if constants.insert(name.clone(), value).is_some() {
            return Err(corrupt(format!("initializer `{name}` appears twice")));
        }
    }
    let mut b = GraphBuilder::zeroed();
    // Names the graph can read: its inputs and the outputs of the nodes so far.
    let mut known: HashSet<String> = HashSet::new();
    // Full ranks (batch axis included) of those values, for NumPy's broadcasting rules.
    let mut ranks: HashMap<String, usize> = HashMap::new();
    // The batch every input is declared with, when they all fix one: a Reshape may name
    // it literally.
    let first_dims: Vec<Option<i64>> = graph
        .input
        .iter()
        .filter(|i| !constants.contains_key(i.name.as_deref().unwrap_or("")))
        .map(|i| match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(proto::type_proto::Value::TensorType(t)) => t
                .shape
                .as_ref()
                .and_then(|s| s.dim.first())
                .and_then(|d| match d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                    _ => None,
                }),
            _ => None,
        })
        .collect();
    let batch = match first_dims.first() {
        Some(Some(b)) if *b > 0 && first_dims.iter().all(|d| *d == Some(*b)) => Some(*b as usize),
        _ => None,
    };
    let mut tracker = shapes::ShapeTracker::new(batch);
    for input in &graph.input {
        let name = input.name.clone().unwrap_or_default();
        if constants.contains_key(&name) {
            continue;
        }
        let (dtype, dims) = input_signature(input, options)?;
        b.typed_input(&name, dtype, &dims);
        ranks.insert(name.clone(), dims.len() + 1);
        tracker.input(&name, dtype, &dims);
        known.insert(name);
    }
    // Every name some node or the graph's output list reads.
    let read: HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(graph.output.iter().filter_map(|o| o.name.as_deref()))
        .collect();
    let graph_outputs: Vec<&str> = graph
        .output
        .iter()
        .filter_map(|o| o.name.as_deref())
        .collect();
    if let Some(n) = graph
        .node
        .iter()
        .find(|n| n.domain.as_deref() == Some(transformer::FUSED_DOMAIN))
    {
        return Err(unsupported(
            n.op_type.as_deref().unwrap_or(""),
            n.name.as_deref().unwrap_or(""),
            opset,
            format!(
                "domain `{}` (the importer's own)",
                transformer::FUSED_DOMAIN
            ),
        ));
    }
    let nodes = transformer::fuse(&graph.node, &constants, &graph_outputs);
    for (index, node) in nodes.iter().enumerate() {
        let op_type = node.op_type.as_deref().unwrap_or("");
        let name = node
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("{op_type}_{index}"));
        let domain = match node.domain.as_deref().unwrap_or("") {
            "ai.onnx" => "",
            d => d,
        };
        let crate_domain = domain == CRATE_DOMAIN || domain == transformer::FUSED_DOMAIN;
        if !(domain.is_empty() || crate_domain) {
            return Err(unsupported(
                op_type,
                &name,
                opset,
                format!("domain `{domain}`"),
            ));
        }
        // Outputs after the first (Dropout's mask, MaxPool's indices, LayerNormalization's
        // statistics) are dropped when nothing reads them; an op's outputs never change
        // one another, so the graph computes the same.
        let Some((output, extra)) = node.output.split_first() else {
            return Err(corrupt(format!("node `{name}` has no output")));
        };
        if let Some(used) = extra
            .iter()
            .find(|o| !o.is_empty() && read.contains(o.as_str()))
        {
            return Err(unsupported(
                op_type,
                &name,
                opset,
                format!("its output `{used}` after the first is read"),
            ));
        }
        if known.contains(output) || constants.contains_key(output) || tracker.is_symbolic(output) {
            return Err(corrupt(format!("value `{output}` is produced twice")));
        }
        let ctx = NodeCtx {
            node,
            op_type,
            name: &name,
            opset,
        };
        for i in node.input.iter().filter(|i| !i.is_empty()) {
            if !known.contains(i.as_str())
                && !constants.contains_key(i.as_str())
                && !tracker.is_symbolic(i)
            {
                return Err(corrupt(format!(
                    "node `{name}` reads `{i}`, which no input, initializer or earlier node produces"
                )));
            }
        }
        if !crate_domain {
            if let Some(folded) = tracker.fold(&ctx, &constants, &options.limits)? {
                tracker.store(output, folded, &mut constants);
                continue;
            }
            if let Some(value) = layers::fold(&ctx, &constants, &options.limits)? {
                constants.insert(output.clone(), value);
                continue;
            }
        }
        let activations: Vec<&String> = node
            .input
            .iter()
            .filter(|i| known.contains(i.as_str()))
            .collect();
        let marked_inputs = activations
            .iter()
            .filter(|i| tracker.is_batch_broadcast(i))
            .count();
        if marked_inputs > 0
            && !matches!(
                op_type,
                "Gather" | "Expand" | "Cast" | "Add" | "Sub" | "Mul" | "Div" | "Identity"
            )
        {
            return Err(unsupported(
                op_type,
                &name,
                opset,
                "a value sliced from a [1, ...] buffer, broadcast over the batch".into(),
            ));
        }
        // Positions standing for buffer ids are read only as a table's ids (or expanded).
        let mut remap = None;
        if let Some(ids) = activations.iter().find(|i| tracker.remapped(i).is_some()) {
            let as_ids = op_type == "Gather" && node.input.get(1) == Some(*ids);
            if as_ids || op_type == "Expand" {
                remap = tracker
                    .remapped(ids)
                    .filter(|_| !as_ids)
                    .map(<[i64]>::to_vec);
            } else {
                return Err(unsupported(
                    op_type,
                    &name,
                    opset,
                    "ids sliced from a buffer read other than by a Gather".into(),
                ));
            }
        }
        let mut marked = marked_inputs > 0 && marked_inputs == activations.len();
        let symbolic_input = node.input.iter().skip(1).any(|i| tracker.is_symbolic(i));
        let steps = match op_type {
            _ if crate_domain => transformer::crate_op(&ctx, domain, &constants, &tracker)?,
            "Attention" if opset >= 23 => transformer::attention(&ctx, &constants, &tracker)?,
            "Reshape" if symbolic_input => shapes::reshape(&ctx, &tracker, &constants)?,
            "Expand" => {
                let (steps, m) = shapes::expand(&ctx, &tracker, &constants)?;
                marked = m;
                steps
            }
            "Slice" => {
                let sliced = shapes::slice(&ctx, &tracker, &constants)?;
                marked = sliced.marked;
                remap = sliced.remap;
                sliced.steps
            }
            "Gather" => shapes::gather(&ctx, &tracker, &constants)?,
            _ if node.input.iter().any(|i| tracker.is_symbolic(i)) => {
                return Err(unsupported(
                    op_type,
                    &name,
                    opset,
                    "a shape value computed from run-time sizes as an operand".into(),
                ))
            }
            _ => {
                let fixed = node.input.first().and_then(|x| tracker.fixed_dims(x));
                map_node(&ctx, &constants, &ranks, batch, fixed.as_deref())?
            }
        };
        // A node may become several crate nodes (a variadic Max as a chain); the last
        // carries the ONNX output's name, the others `{output}.part{k}`.
        let last = steps.len().saturating_sub(1);
        for (k, (op, inputs)) in steps.into_iter().enumerate() {
            let step_name = if k == last {
                output.clone()
            } else {
                part_name(output, k)
            };
            let in_rank = inputs
                .iter()
                .filter_map(|i| ranks.get(i))
                .copied()
                .max()
                .unwrap_or(1);
            let rank = output_rank(&op, in_rank);
            if rank > MAX_RANK {
                return Err(unsupported(
                    op_type,
                    &name,
                    opset,
                    format!("an output of {rank} axes (at most {MAX_RANK})"),
                ));
            }
            ranks.insert(step_name.clone(), rank);
            tracker.set_batch_broadcast(&step_name, marked);
            if k == last {
                if let Some(r) = remap.take() {
                    tracker.set_remapped(&step_name, r);
                }
            }
            tracker.record(&step_name, &op, &inputs);
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            b.node(&step_name, op, &refs);
            known.insert(step_name);
        }
    }
    let outputs: Vec<&str> = graph
        .output
        .iter()
        .map(|o| o.name.as_deref().unwrap_or(""))
        .collect();
    if let Some(missing) = outputs.iter().find(|o| !known.contains(**o)) {
        return Err(corrupt(format!(
            "graph output `{missing}` is never produced"
        )));
    }
    if let Some(marked) = outputs.iter().find(|o| tracker.is_batch_broadcast(o)) {
        return Err(Error::Unsupported(format!(
            "graph output `{marked}` has a batch of 1 that the crate would hold at the graph's batch"
        )));
    }
    b.build_with_outputs(&outputs)
}

/// A graph input's element type and per-sample dims (its first axis is the batch).
fn input_signature(
    input: &proto::ValueInfoProto,
    options: &ImportOptions,
) -> Result<(DType, Vec<Dim>)> {
    let name = input.name.as_deref().unwrap_or("");
    let tensor = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(proto::type_proto::Value::TensorType(t)) => t,
        _ => {
            return Err(Error::Unsupported(format!(
                "graph input `{name}` is not a tensor"
            )))
        }
    };
    let dtype = match tensor.elem_type.and_then(|t| DataType::try_from(t).ok()) {
        Some(DataType::Float) => DType::F32,
        // Booleans are fed as 0 / 1 integers, as initializers read them.
        Some(DataType::Int64 | DataType::Bool) => DType::I64,
        other => {
            return Err(Error::UnsupportedDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    };
    let dims = tensor
        .shape
        .as_ref()
        .ok_or_else(|| Error::Unsupported(format!("graph input `{name}` has no shape")))?;
    use proto::tensor_shape_proto::dimension::Value as D;
    let mut out = Vec::new();
    for (axis, d) in dims.dim.iter().enumerate() {
        let dim = match &d.value {
            Some(D::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
            Some(D::DimParam(p)) => Dim::dynamic(p, options.dims.get(p).copied().unwrap_or(1)),
            Some(D::DimValue(v)) => {
                return Err(corrupt(format!("graph input `{name}` has dimension {v}")))
            }
            None => Dim::dynamic(&format!("{name}.{axis}"), 1),
        };
        out.push(dim);
    }
    if out.is_empty() {
        return Err(Error::Unsupported(format!(
            "graph input `{name}` is a scalar; the crate's values have a batch axis"
        )));
    }
    if out.len() > MAX_RANK {
        return Err(Error::Unsupported(format!(
            "graph input `{name}` has {} axes (at most {MAX_RANK})",
            out.len()
        )));
    }
    // The batch axis is implicit in the crate's inputs.
    out.remove(0);
    let sizes: Vec<usize> = out
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n,
            Dim::Dynamic { example, .. } => *example,
        })
        .collect();
    options.limits.check_elements(&sizes, name)?;
    Ok((dtype, out))
}

/// One node being mapped.
pub(crate) struct NodeCtx<'a> {
    node: &'a proto::NodeProto,
    op_type: &'a str,
    name: &'a str,
    opset: i64,
}

impl NodeCtx<'_> {
    fn unsupported(&self, what: impl Into<String>) -> Error {
        unsupported(self.op_type, self.name, self.opset, what.into())
    }

    fn attribute(&self, name: &str) -> Option<&proto::AttributeProto> {
        self.node
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    fn int_attribute(&self, name: &str) -> Option<i64> {
        self.attribute(name).and_then(|a| a.i)
    }

    fn float_attribute(&self, name: &str) -> Option<f32> {
        self.attribute(name).and_then(|a| a.f)
    }

    fn ints_attribute(&self, name: &str) -> Option<Vec<i64>> {
        self.attribute(name).map(|a| a.ints.clone())
    }

    /// Refuses attributes the mapping does not read, so none is silently ignored.
    fn only_attributes(&self, allowed: &[&str]) -> Result<()> {
        match self
            .node
            .attribute
            .iter()
            .find(|a| !allowed.contains(&a.name.as_deref().unwrap_or("")))
        {
            Some(a) => {
                Err(self.unsupported(format!("attribute `{}`", a.name.as_deref().unwrap_or(""))))
            }
            None => Ok(()),
        }
    }

    fn arity(&self, n: usize) -> Result<()> {
        if self.node.input.len() == n && self.node.input.iter().all(|i| !i.is_empty()) {
            Ok(())
        } else {
            Err(self.unsupported(format!(
                "{} inputs (this mapping takes {n})",
                self.node.input.len()
            )))
        }
    }
}

/// The crate op for `ctx`'s node and the values it reads.
/// The full rank of `op`'s output for inputs of (at most) `in_rank`.
fn output_rank(op: &Op, in_rank: usize) -> usize {
    match op {
        Op::Flatten | Op::Positions { .. } => 2,
        Op::Attention(_) | Op::Rotary(_) => 3,
        Op::Embedding(_) => in_rank + 1,
        Op::Reshape { shape } => shape.len() + 1,
        Op::Unsqueeze { axes } => in_rank + axes.len(),
        Op::Squeeze { axes } => in_rank.saturating_sub(axes.len()),
        Op::Reduce {
            axes,
            keep_dims: false,
            ..
        } => in_rank.saturating_sub(axes.len()),
        _ => in_rank,
    }
}

/// `[H, W]` of per-sample dims `[C, H, W]`.
fn spatial(fixed: Option<&[usize]>) -> Option<[usize; 2]> {
    match fixed? {
        [_, h, w] => Some([*h, *w]),
        _ => None,
    }
}

/// `fixed`: the first input's per-sample dims when none is a run-time size.
fn map_node(
    ctx: &NodeCtx<'_>,
    constants: &HashMap<String, Value>,
    ranks: &HashMap<String, usize>,
    batch: Option<usize>,
    fixed: Option<&[usize]>,
) -> Result<Vec<Step>> {
    let inputs = ctx.node.input.clone();
    let first = inputs.first().cloned().unwrap_or_default();
    let rank = ranks.get(&first).copied().unwrap_or(1);
    let needs = |n: usize| -> Result<()> {
        if inputs.len() >= n && inputs.iter().take(n).all(|i| !i.is_empty()) {
            Ok(())
        } else {
            Err(ctx.unsupported(format!(
                "{} inputs (this mapping takes at least {n})",
                inputs.len()
            )))
        }
    };
    let unary = |u: Unary| -> Result<Vec<Step>> {
        ctx.arity(1)?;
        ctx.only_attributes(&[])?;
        Ok(vec![(Op::Unary(u), inputs.clone())])
    };
    match ctx.op_type {
        "Relu" => {
            ctx.arity(1)?;
            ctx.only_attributes(&[])?;
            Ok(vec![(Op::ReLU, inputs)])
        }
        "Identity" => {
            ctx.arity(1)?;
            ctx.only_attributes(&[])?;
            Ok(vec![(Op::Identity, inputs)])
        }
        "Sigmoid" => unary(Unary::Sigmoid),
        "Tanh" => unary(Unary::Tanh),
        "Erf" => unary(Unary::Erf),
        "Sqrt" => unary(Unary::Sqrt),
        "Exp" => unary(Unary::Exp),
        "Neg" => unary(Unary::Neg),
        "HardSwish" => unary(Unary::HardSwish),
        "Gelu" => {
            // Opset 20: `approximate` = "none" (erf) or "tanh".
            ctx.arity(1)?;
            ctx.only_attributes(&["approximate"])?;
            let how = ctx
                .attribute("approximate")
                .and_then(|a| a.s.as_deref())
                .map(|s| String::from_utf8_lossy(s).to_string());
            match how.as_deref() {
                None | Some("none") => Ok(vec![(Op::Unary(Unary::Gelu), inputs)]),
                Some("tanh") => Ok(vec![(Op::Unary(Unary::GeluTanh), inputs)]),
                Some(other) => Err(ctx.unsupported(format!("approximate `{other}`"))),
            }
        }
        "Where" => {
            ctx.arity(3)?;
            ctx.only_attributes(&[])?;
            if let Some(c) = inputs.iter().find(|i| constants.contains_key(*i)) {
                return Err(ctx.unsupported(format!(
                    "a constant operand `{c}` (the crate's Where reads three values)"
                )));
            }
            let r: Vec<usize> = inputs
                .iter()
                .map(|i| ranks.get(i).copied().unwrap_or(1))
                .collect();
            if r.iter().any(|&x| x != r[0]) {
                return Err(ctx.unsupported(format!(
                    "operands of ranks {r:?} (NumPy would align them past the batch axis)"
                )));
            }
            Ok(vec![(Op::Where, inputs)])
        }
        "Softmax" => {
            ctx.arity(1)?;
            ctx.only_attributes(&["axis"])?;
            // Opset 13 made the axis a plain axis (default −1); before, the input was
            // flattened to 2-D at `axis` (default 1), which equals a softmax over the last
            // axis only when `axis` is the last one.
            let axis = ctx.int_attribute("axis");
            let axis = if ctx.opset >= 13 {
                axis.unwrap_or(-1)
            } else {
                let a = axis.unwrap_or(1);
                match if a < 0 { a + rank as i64 } else { a } {
                    last if last == rank as i64 - 1 => -1,
                    _ => return layers::flattened_softmax(ctx, fixed.map(<[usize]>::to_vec)),
                }
            };
            Ok(vec![(
                Op::Softmax {
                    axis: axis as isize,
                },
                inputs,
            )])
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" => {
            let op = match ctx.op_type {
                "Add" => Binary::Add,
                "Sub" => Binary::Sub,
                "Mul" => Binary::Mul,
                "Div" => Binary::Div,
                _ => Binary::Pow,
            };
            ctx.arity(2)?;
            ctx.only_attributes(&[])?;
            let rank_of = |name: &str| ranks.get(name).copied().unwrap_or(1);
            let (a, b) = (&inputs[0], &inputs[1]);
            Ok(vec![binary(
                ctx,
                op,
                (a, rank_of(a)),
                (b, rank_of(b)),
                constants,
            )?])
        }
        "Max" | "Min" | "Sum" | "Mean" => variadic(ctx, &inputs, constants, ranks),
        "Conv" => needs(2).and_then(|_| layers::conv(ctx, constants)),
        "BatchNormalization" => needs(5).and_then(|_| layers::batch_norm(ctx, constants)),
        "MaxPool" => needs(1).and_then(|_| layers::pool(ctx, true, spatial(fixed))),
        "AveragePool" => needs(1).and_then(|_| layers::pool(ctx, false, spatial(fixed))),
        "LRN" => layers::lrn(ctx, fixed.and_then(|d| d.first().copied())),
        "GlobalAveragePool" => {
            ctx.arity(1)?;
            ctx.only_attributes(&[])?;
            Ok(vec![(Op::GlobalAvgPool, inputs)])
        }
        "Gemm" => needs(2).and_then(|_| layers::gemm(ctx, constants)),
        "MatMul" => {
            ctx.arity(2)?;
            layers::matmul(ctx, constants, ranks)
        }
        "Flatten" => needs(1).and_then(|_| layers::flatten(ctx, rank)),
        "Concat" => needs(1).and_then(|_| layers::concat(ctx, constants, rank)),
        "Clip" => needs(1).and_then(|_| layers::clip(ctx, constants)),
        "Transpose" => needs(1).and_then(|_| layers::transpose(ctx, rank)),
        "Reshape" => needs(2).and_then(|_| layers::reshape(ctx, constants, batch)),
        "Unsqueeze" => needs(1).and_then(|_| layers::unsqueeze(ctx, constants, false)),
        "Squeeze" => needs(1).and_then(|_| layers::unsqueeze(ctx, constants, true)),
        "ReduceSum" => needs(1).and_then(|_| layers::reduce(ctx, constants, Reduction::Sum, rank)),
        "ReduceMean" => {
            needs(1).and_then(|_| layers::reduce(ctx, constants, Reduction::Mean, rank))
        }
        "Cast" => needs(1).and_then(|_| layers::cast(ctx)),
        "LayerNormalization" => needs(2).and_then(|_| layers::layer_norm(ctx, constants, rank)),
        "RMSNormalization" if ctx.opset >= 23 => transformer::rms_norm(ctx, constants, rank),
        "Dropout" => {
            // Inference: the identity (a mask output or a training_mode input are refused).
            ctx.only_attributes(&["ratio", "seed"])?;
            if inputs.get(2).is_some_and(|t| !t.is_empty()) {
                return Err(ctx.unsupported("a training_mode input"));
            }
            Ok(vec![(Op::Identity, vec![first])])
        }
        other => Err(ctx.unsupported(format!("op `{other}` is not mapped"))),
    }
}

/// One crate node of a mapped ONNX node: its op and the values it reads.
type Step = (Op, Vec<String>);

fn part_name(output: &str, k: usize) -> String {
    format!("{output}.part{k}")
}

/// Max / Min / Sum / Mean of one or more operands: a chain of binary nodes, left to right
/// (Mean then scales by 1/n).
fn variadic(
    ctx: &NodeCtx<'_>,
    inputs: &[String],
    constants: &HashMap<String, Value>,
    ranks: &HashMap<String, usize>,
) -> Result<Vec<Step>> {
    ctx.only_attributes(&[])?;
    if inputs.is_empty() || inputs.iter().any(String::is_empty) {
        return Err(ctx.unsupported("no operands"));
    }
    let op = match ctx.op_type {
        "Max" => Binary::Max,
        "Min" => Binary::Min,
        _ => Binary::Add,
    };
    let output = ctx.node.output.first().map(String::as_str).unwrap_or("");
    let mut steps: Vec<Step> = Vec::new();
    let mut acc = inputs[0].clone();
    if constants.contains_key(&acc) {
        return Err(ctx.unsupported("a constant first operand"));
    }
    // Every link of the chain has the first operand's rank (operands of another rank
    // are refused, a constant never raises it).
    let rank_of = |name: &str| ranks.get(name).copied().unwrap_or(1);
    let chain_rank = rank_of(&acc);
    for next in &inputs[1..] {
        steps.push(binary(
            ctx,
            op,
            (&acc, chain_rank),
            (next, rank_of(next)),
            constants,
        )?);
        acc = part_name(output, steps.len() - 1);
    }
    if ctx.op_type == "Mean" && inputs.len() > 1 {
        let scale = ArrayD::from_elem(ndarray::IxDyn(&[]), 1.0 / inputs.len() as f32);
        steps.push((
            Op::BinaryConst(BinaryConst {
                op: Binary::Mul,
                constant: scale,
                constant_first: false,
            }),
            vec![acc],
        ));
    } else if steps.is_empty() {
        steps.push((Op::Identity, vec![acc]));
    }
    Ok(steps)
}

/// `op(a, b)`: between two activations of one rank, or an activation and a float constant,
/// broadcast as NumPy does.
/// Each operand comes with its full rank.
fn binary(
    ctx: &NodeCtx<'_>,
    op: Binary,
    (a, rank_a): (&str, usize),
    (b, rank_b): (&str, usize),
    constants: &HashMap<String, Value>,
) -> Result<Step> {
    let float_constant = |name: &str| -> Result<Option<ArrayD<f32>>> {
        match constants.get(name) {
            None => Ok(None),
            Some(Value::F32(t)) => Ok(Some(t.clone())),
            Some(Value::I64(_)) => Err(ctx.unsupported(format!("integer constant `{name}`"))),
        }
    };
    match (float_constant(a)?, float_constant(b)?) {
        (None, None) if rank_a == rank_b => Ok((Op::Binary(op), vec![a.into(), b.into()])),
        (None, None) => Err(ctx.unsupported(format!(
            "activations of ranks {rank_a} and {rank_b} (NumPy would align them past the batch axis)"
        ))),
        (Some(c), None) => Ok((
            per_sample_constant(ctx, op, c, rank_b, true)?,
            vec![b.into()],
        )),
        (None, Some(c)) => Ok((
            per_sample_constant(ctx, op, c, rank_a, false)?,
            vec![a.into()],
        )),
        (Some(_), Some(_)) => Err(ctx.unsupported("two constant operands (fold them first)")),
    }
}

/// A constant operand as the crate broadcasts it: its shape is per-sample (aligned from
/// the right, as NumPy does), so a constant as long as the activation's full rank `rank`
/// drops its leading axis, which must be 1.
fn per_sample_constant(
    ctx: &NodeCtx<'_>,
    op: Binary,
    constant: ArrayD<f32>,
    rank: usize,
    constant_first: bool,
) -> Result<Op> {
    let constant = match constant.ndim() {
        r if r < rank => constant,
        r if r == rank && constant.shape()[0] == 1 => constant.index_axis_move(ndarray::Axis(0), 0),
        _ => {
            return Err(ctx.unsupported(format!(
                "a constant of shape {:?} against an activation of rank {rank}",
                constant.shape()
            )))
        }
    };
    Ok(Op::BinaryConst(BinaryConst {
        op,
        constant,
        constant_first,
    }))
}

fn corrupt(reason: impl Into<String>) -> Error {
    Error::CorruptFile {
        path: None,
        reason: reason.into(),
    }
}

fn unsupported(op_type: &str, node: &str, opset: i64, what: String) -> Error {
    Error::Unsupported(format!(
        "ONNX {op_type} (node `{node}`, opset {opset}): {what}"
    ))
}
