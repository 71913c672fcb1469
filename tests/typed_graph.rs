//! Graphs with several named inputs and outputs, integer values and dynamic sizes: what
//! `Graph::run` computes, and the typed error of every input that does not fit.

use ndarray::{ArrayD, IxDyn};
use nncompress::model::{Binary, Dim, Graph, GraphBuilder, NodeSpec, Op, Reduction};
use nncompress::tensor::{DType, Value};
use nncompress::Error;

const VOCAB: usize = 11;
const WIDTH: usize = 3;

/// Token ids and a padding mask (both `[N, seq]`, seq dynamic) → the masked mean of the
/// ids' embeddings plus their positions' (`pooled`, `[N, WIDTH]`) and the per-token sum
/// (`tokens`, `[N, seq, WIDTH]`).
fn pooled_embeddings() -> Graph {
    let seq = || Dim::dynamic("seq", 4);
    let mut b = GraphBuilder::new(5);
    b.typed_input("ids", DType::I64, &[seq()])
        .typed_input("mask", DType::I64, &[seq()])
        .embedding("word", "ids", VOCAB, WIDTH)
        .node("pos_ids", Op::Positions { axis: 1 }, &["ids"])
        .embedding("pos", "pos_ids", 8, WIDTH)
        .node("tokens", Op::Binary(Binary::Add), &["word", "pos"])
        .node("m", Op::Cast { to: DType::F32 }, &["mask"])
        .node("m3", Op::Unsqueeze { axes: vec![2] }, &["m"])
        .node("masked", Op::Binary(Binary::Mul), &["tokens", "m3"])
        .node("sum", reduce_sum(false), &["masked"])
        .node("count", reduce_sum(false), &["m3"])
        .node("pooled", Op::Binary(Binary::Div), &["sum", "count"]);
    b.build_with_outputs(&["pooled", "tokens"]).unwrap()
}

fn reduce_sum(keep_dims: bool) -> Op {
    Op::Reduce {
        how: Reduction::Sum,
        axes: vec![1],
        keep_dims,
    }
}

fn ints(shape: &[usize], v: &[i64]) -> Value {
    Value::I64(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
}

/// The rows of a graph's embedding table.
fn table(g: &Graph, node: &str) -> ndarray::Array2<f32> {
    match &g.node(g.id(node).unwrap()).op {
        Op::Embedding(e) => e.weight.clone(),
        _ => unreachable!(),
    }
}

#[test]
fn named_inputs_of_any_length_give_the_masked_mean() {
    let g = pooled_embeddings();
    assert_eq!(g.input_names(), ["ids", "mask"]);
    assert_eq!(g.output_names(), ["pooled", "tokens"]);
    let (word, pos) = (table(&g, "word"), table(&g, "pos"));
    // Two lengths, neither the build-time one; the second sentence is padded.
    for (seq, ids, mask) in [
        (2, vec![3, 7, 1, 0], vec![1, 1, 1, 0]),
        (
            6,
            vec![1, 2, 3, 4, 5, 6, 10, 9, 0, 0, 0, 0],
            vec![1; 6].into_iter().chain([1, 1, 0, 0, 0, 0]).collect(),
        ),
    ] {
        let (idv, maskv) = (ints(&[2, seq], &ids), ints(&[2, seq], &mask));
        // Feeding order does not matter: inputs are matched by name.
        let out = g.run(&[("mask", &maskv), ("ids", &idv)]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].shape(), [2, WIDTH]);
        assert_eq!(out[1].shape(), [2, seq, WIDTH]);
        let pooled = out[0].as_f32().unwrap();
        for n in 0..2 {
            let kept: Vec<usize> = (0..seq).filter(|&t| mask[n * seq + t] == 1).collect();
            for c in 0..WIDTH {
                let want: f32 = kept
                    .iter()
                    .map(|&t| word[[ids[n * seq + t] as usize, c]] + pos[[t, c]])
                    .sum::<f32>()
                    / kept.len() as f32;
                let got = pooled[[n, c]];
                assert!(
                    (got - want).abs() < 1e-5,
                    "seq {seq} sample {n}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn inputs_that_do_not_fit_are_typed_errors() {
    let g = pooled_embeddings();
    let ids = ints(&[1, 3], &[1, 2, 3]);
    let mask = ints(&[1, 3], &[1, 1, 1]);
    let bad = |inputs: &[(&str, &Value)], what: &str| match g.run(inputs) {
        Err(Error::BadInput { input, reason }) => {
            assert!(
                reason.contains(what),
                "{input}: `{reason}` does not say `{what}`"
            );
            input
        }
        other => panic!("expected BadInput ({what}), got {other:?}"),
    };
    assert_eq!(bad(&[("ids", &ids)], "not fed"), "mask");
    assert_eq!(
        bad(
            &[("ids", &ids), ("mask", &mask), ("input_ids", &ids)],
            "no such input"
        ),
        "input_ids"
    );
    assert_eq!(
        bad(&[("ids", &ids), ("ids", &ids), ("mask", &mask)], "twice"),
        "ids"
    );
    let floats = Value::F32(ArrayD::zeros(IxDyn(&[1, 3])));
    assert_eq!(
        bad(&[("ids", &floats), ("mask", &mask)], "takes i64, got f32"),
        "ids"
    );
    // The mask of another length than the ids, another batch, another rank.
    let short = ints(&[1, 2], &[1, 1]);
    assert_eq!(
        bad(&[("ids", &ids), ("mask", &short)], "`seq` is 2 here but 3"),
        "mask"
    );
    let two = ints(&[2, 3], &[1; 6]);
    assert_eq!(bad(&[("ids", &ids), ("mask", &two)], "batch 2"), "mask");
    let flat = ints(&[3], &[1; 3]);
    match g.run(&[("ids", &ids), ("mask", &flat)]) {
        Err(Error::ShapeMismatch { node, expected, .. }) => {
            assert_eq!(
                (node.as_deref(), expected.as_str()),
                (Some("mask"), "[N, seq]")
            );
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let empty = ints(&[0, 3], &[]);
    assert!(matches!(
        g.run(&[("ids", &empty), ("mask", &empty)]),
        Err(Error::Empty(_))
    ));
    let none = ints(&[1, 0], &[]);
    assert_eq!(bad(&[("ids", &none), ("mask", &none)], "is 0"), "ids");
    // Ids outside the table, either side.
    for id in [-1, VOCAB as i64] {
        let wrong = ints(&[1, 3], &[1, id, 2]);
        match g.run(&[("ids", &wrong), ("mask", &mask)]) {
            Err(Error::IndexOutOfRange { node, index, len }) => {
                assert_eq!((node.as_str(), index, len), ("word", id, VOCAB));
            }
            other => panic!("expected IndexOutOfRange, got {other:?}"),
        }
    }
    // A sequence longer than the position table: the positions are ids out of range too.
    let long = ints(&[1, 9], &[1; 9]);
    assert!(matches!(
        g.run(&[("ids", &long), ("mask", &long)]),
        Err(Error::IndexOutOfRange {
            index: 8,
            len: 8,
            ..
        })
    ));
    // The single-tensor API refuses a graph with two inputs, and an integer input.
    let x = ArrayD::zeros(IxDyn(&[1, 3]));
    assert!(matches!(g.forward(&x), Err(Error::InputCount { found: 2 })));
}

#[test]
fn graphs_that_mix_types_or_sizes_wrongly_do_not_build() {
    // Integers into a float op.
    let mut b = GraphBuilder::new(1);
    b.typed_input("ids", DType::I64, &[Dim::Fixed(4)])
        .relu("r", "ids");
    assert!(matches!(
        b.build("r"),
        Err(Error::DtypeMismatch { node, expected: DType::F32, found: DType::I64, .. }) if node == "r"
    ));
    // Floats into an embedding.
    let mut b = GraphBuilder::new(1);
    b.input("x", &[4]).embedding("e", "x", 5, 2);
    assert!(matches!(
        b.build("e"),
        Err(Error::DtypeMismatch {
            expected: DType::I64,
            found: DType::F32,
            ..
        })
    ));
    // Floats cast to integers would truncate silently.
    let specs = vec![
        NodeSpec::new("x", Op::input(&[4]), &[]),
        NodeSpec::new("c", Op::Cast { to: DType::I64 }, &["x"]),
    ];
    assert!(matches!(
        Graph::from_specs(specs, "c"),
        Err(Error::Unsupported(_))
    ));
    // Two inputs that share a symbol but not its example size.
    let mut b = GraphBuilder::new(1);
    b.typed_input("a", DType::F32, &[Dim::dynamic("seq", 4)])
        .typed_input("b", DType::F32, &[Dim::dynamic("seq", 5)])
        .node("s", Op::Binary(Binary::Add), &["a", "b"]);
    assert!(matches!(b.build("s"), Err(Error::InvalidConfig { .. })));
    // Squeezing an axis that is not 1, a where whose branches do not broadcast.
    let mut b = GraphBuilder::new(1);
    b.input("x", &[2, 3])
        .node("s", Op::Squeeze { axes: vec![1] }, &["x"]);
    assert!(matches!(b.build("s"), Err(Error::ShapeMismatch { .. })));
    let mut b = GraphBuilder::new(1);
    b.input("x", &[2, 3])
        .input("y", &[4])
        .node("w", Op::Where, &["x", "x", "y"]);
    assert!(matches!(b.build("w"), Err(Error::ShapeMismatch { .. })));
    // No outputs.
    let mut b = GraphBuilder::new(1);
    b.input("x", &[2]);
    assert!(matches!(
        b.build_with_outputs(&[]),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn a_size_that_only_fails_at_run_time_is_an_error_of_that_run() {
    // A per-sample reshape to a fixed size builds at seq 4 but cannot take seq 5.
    let mut b = GraphBuilder::new(1);
    b.typed_input("x", DType::F32, &[Dim::dynamic("seq", 4), Dim::Fixed(2)])
        .node("r", Op::Reshape { shape: vec![8] }, &["x"]);
    let g = b.build("r").unwrap();
    let ok = Value::F32(ArrayD::zeros(IxDyn(&[3, 4, 2])));
    assert_eq!(g.run(&[("x", &ok)]).unwrap()[0].shape(), [3, 8]);
    let other = Value::F32(ArrayD::zeros(IxDyn(&[3, 5, 2])));
    assert!(matches!(
        g.run(&[("x", &other)]),
        Err(Error::ShapeMismatch { .. } | Error::InvalidConfig { .. })
    ));
}

#[test]
fn concat_along_an_axis_checks_the_other_axes() {
    let mut b = GraphBuilder::new(1);
    b.input("x", &[2, 3])
        .input("y", &[2, 5])
        .node("c", Op::ConcatAxis { axis: -1 }, &["x", "y"]);
    assert_eq!(b.build("c").unwrap().output_shape(), [2, 8]);
    for axis in [1, 0, 3] {
        let mut b = GraphBuilder::new(1);
        b.input("x", &[2, 3])
            .input("y", &[2, 5])
            .node("c", Op::ConcatAxis { axis }, &["x", "y"]);
        assert!(
            matches!(
                b.build("c"),
                Err(Error::ShapeMismatch { .. } | Error::InvalidConfig { .. })
            ),
            "axis {axis}"
        );
    }
}
