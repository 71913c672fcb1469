//! The model-local functions that define the crate's own ONNX nodes ([`CRATE_DOMAIN`]) in
//! standard ops, so that a runtime which inlines functions (ONNX Runtime, the ONNX
//! reference evaluator) runs an exported graph without knowing the crate. The importer
//! reads these nodes by their attributes and never runs the bodies.
//!
//! - `Positions(X; axis)`: `[N, L]` int64 rows `0..L`, `L` the size of `X`'s axis `axis`.
//! - `BroadcastMask(Mask, Q)`: the `[N, 1, 1, Sk]` attention mask expanded to `[N, 1, Sq,
//!   Sk]` for `Q` of `Sq` queries (ONNX Runtime's `Attention` wants the query axis spelled
//!   out; the crate broadcasts it, and its importer drops this node).
//! - `Rotary(X; head_dim, base, interleaved, num_heads)`: rotary position embeddings of
//!   `X` (`[N, S, num_heads·head_dim]`) at positions `0..S`, angles `p · base^(−2i/head_dim)`
//!   computed in double precision as the crate computes them, then `RotaryEmbedding`.

use super::export::{int, CRATE_DOMAIN};
use super::proto::{self, attribute_proto::AttributeType, tensor_proto::DataType};

/// The function defining crate op `op` for a model of default-domain opset `opset`.
pub(super) fn definition(op: &str, opset: i64) -> proto::FunctionProto {
    let mut body = Body::default();
    let (input, attribute): (&[&str], &[&str]) = match op {
        "Positions" => {
            positions(&mut body);
            (&["X"], &["axis"])
        }
        "BroadcastMask" => {
            broadcast_mask(&mut body);
            (&["Mask", "Q"], &[])
        }
        _ => {
            rotary(&mut body);
            (&["X"], &["head_dim", "base", "interleaved", "num_heads"])
        }
    };
    proto::FunctionProto {
        name: Some(op.into()),
        domain: Some(CRATE_DOMAIN.into()),
        input: input.iter().map(|i| (*i).into()).collect(),
        output: vec!["Y".into()],
        attribute: attribute.iter().map(|a| (*a).into()).collect(),
        node: body.nodes,
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        ..Default::default()
    }
}

#[derive(Default)]
struct Body {
    nodes: Vec<proto::NodeProto>,
}

impl Body {
    /// `op(inputs) → out` with attributes; returns `out`.
    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        out: &str,
        attribute: Vec<proto::AttributeProto>,
    ) -> String {
        self.nodes.push(proto::NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|i| (*i).into()).collect(),
            output: vec![out.into()],
            attribute,
            ..Default::default()
        });
        out.into()
    }

    /// An int64 constant of shape `dims` (`[]` for a scalar).
    fn ints(&mut self, out: &str, dims: &[i64], v: &[i64]) -> String {
        self.constant(
            out,
            proto::TensorProto {
                dims: dims.to_vec(),
                data_type: Some(DataType::Int64 as i32),
                int64_data: v.to_vec(),
                ..Default::default()
            },
        )
    }

    /// A double scalar constant.
    fn double(&mut self, out: &str, v: f64) -> String {
        self.constant(
            out,
            proto::TensorProto {
                data_type: Some(DataType::Double as i32),
                double_data: vec![v],
                ..Default::default()
            },
        )
    }

    fn constant(&mut self, out: &str, value: proto::TensorProto) -> String {
        let attr = proto::AttributeProto {
            name: Some("value".into()),
            r#type: Some(AttributeType::Tensor as i32),
            t: Some(value),
            ..Default::default()
        };
        self.node("Constant", &[], out, vec![attr])
    }

    /// A scalar constant whose value is the caller's attribute `attribute`
    /// (`value_int` / `value_float` by `kind`).
    fn attribute_value(&mut self, out: &str, attribute: &str, kind: AttributeType) -> String {
        let name = if kind == AttributeType::Int {
            "value_int"
        } else {
            "value_float"
        };
        self.node("Constant", &[], out, vec![reference(name, attribute, kind)])
    }

    fn cast(&mut self, x: &str, out: &str, to: DataType) -> String {
        self.node("Cast", &[x], out, vec![int("to", to as i64)])
    }
}

/// An attribute `name` taking the value of the calling node's attribute `attribute`.
fn reference(name: &str, attribute: &str, kind: AttributeType) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        ref_attr_name: Some(attribute.into()),
        r#type: Some(kind as i32),
        ..Default::default()
    }
}

/// `[N, L]` rows `0..L` and the `[N, L]` shape they expand to, `L` = `X`'s size on
/// `length_axis` (a constant name).
fn counting_rows(b: &mut Body, length_axis: &str) -> (String, String) {
    let shape = b.node("Shape", &["X"], "shape", vec![]);
    let length = b.node("Gather", &[&shape, length_axis], "length", vec![]);
    let zero = b.ints("zero", &[], &[0]);
    let one = b.ints("one", &[], &[1]);
    let row = b.node("Range", &[&zero, &length, &one], "row", vec![]);
    let first = b.ints("first", &[1], &[0]);
    let second = b.ints("second", &[1], &[1]);
    let batch = b.node("Slice", &[&shape, &first, &second], "batch", vec![]);
    let length1 = b.node("Unsqueeze", &[&length, &first], "length1", vec![]);
    let target = b.node(
        "Concat",
        &[&batch, &length1],
        "target",
        vec![int("axis", 0)],
    );
    let row2 = b.node("Unsqueeze", &[&row, &first], "row2", vec![]);
    (row2, target)
}

fn positions(b: &mut Body) {
    let axis = b.attribute_value("axis", "axis", AttributeType::Int);
    let (row, target) = counting_rows(b, &axis);
    b.node("Expand", &[&row, &target], "Y", vec![]);
}

fn broadcast_mask(b: &mut Body) {
    let shape = b.node("Shape", &["Q"], "shape", vec![]);
    let first = b.ints("first", &[1], &[1]);
    let second = b.ints("second", &[1], &[2]);
    let queries = b.node("Slice", &[&shape, &first, &second], "queries", vec![]);
    let ones = b.ints("ones", &[2], &[1, 1]);
    let target = b.node(
        "Concat",
        &[&ones, &queries, &first],
        "target",
        vec![int("axis", 0)],
    );
    b.node("Expand", &["Mask", &target], "Y", vec![]);
}

fn rotary(b: &mut Body) {
    let one = b.ints("axis_one", &[], &[1]);
    let (row, target) = counting_rows(b, &one);
    let ids = b.node("Expand", &[&row, &target], "position_ids", vec![]);
    // inv_freq[i] = base^(−2i / head_dim), i < head_dim / 2, in double.
    let head_dim = b.attribute_value("head_dim", "head_dim", AttributeType::Int);
    let two = b.ints("two", &[], &[2]);
    let half = b.node("Div", &[&head_dim, &two], "half", vec![]);
    let index = b.node("Range", &["zero", &half, "one"], "index", vec![]);
    let index = b.cast(&index, "index_f", DataType::Double);
    let dim = b.cast(&head_dim, "head_dim_f", DataType::Double);
    let base32 = b.attribute_value("base32", "base", AttributeType::Float);
    let base = b.cast(&base32, "base_f", DataType::Double);
    let minus_two = b.double("minus_two", -2.0);
    let scaled = b.node("Mul", &[&index, &minus_two], "scaled", vec![]);
    let exponent = b.node("Div", &[&scaled, &dim], "exponent", vec![]);
    let inv_freq = b.node("Pow", &[&base, &exponent], "inv_freq", vec![]);
    // angle[p, i] = p · inv_freq[i] for p < S.
    let positions = b.cast("row", "positions_f", DataType::Double);
    let column = b.node("Unsqueeze", &[&positions, "second"], "column", vec![]);
    let angle = b.node("Mul", &[&column, &inv_freq], "angle", vec![]);
    let cos = b.node("Cos", &[&angle], "cos_d", vec![]);
    let sin = b.node("Sin", &[&angle], "sin_d", vec![]);
    let cos = b.cast(&cos, "cos", DataType::Float);
    let sin = b.cast(&sin, "sin", DataType::Float);
    b.node(
        "RotaryEmbedding",
        &["X", &cos, &sin, &ids],
        "Y",
        vec![
            reference("interleaved", "interleaved", AttributeType::Int),
            reference("num_heads", "num_heads", AttributeType::Int),
        ],
    );
}
