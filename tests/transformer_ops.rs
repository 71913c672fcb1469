//! Transformer ops on the graph: a tiny encoder block built from them trains, and inputs
//! that do not fit are typed errors when the graph is built or run.

use ndarray::{ArrayD, IxDyn};
use nncompress::model::{
    Attention, Binary, BinaryConst, Graph, GraphBuilder, LayerNorm, Mode, Op, Reduction, Unary,
};
use nncompress::tensor::Value;
use nncompress::train::{softmax_cross_entropy, Adam, Optimizer};
use nncompress::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEQ: usize = 6;
const HIDDEN: usize = 8;

fn scalar(op: Binary, v: f32) -> Op {
    Op::BinaryConst(BinaryConst {
        op,
        constant: ArrayD::from_elem(IxDyn(&[]), v),
        constant_first: false,
    })
}

/// One post-norm encoder block (single head) over `[SEQ, HIDDEN]`, mean-pooled into two
/// logits.
fn tiny_encoder(seed: u64) -> Graph {
    let mut b = GraphBuilder::new(seed);
    b.input("x", &[SEQ, HIDDEN])
        .linear("q", "x", HIDDEN, HIDDEN, true)
        .linear("k", "x", HIDDEN, HIDDEN, true)
        .linear("v", "x", HIDDEN, HIDDEN, true)
        .node(
            "kt",
            Op::Permute {
                axes: vec![0, 2, 1],
            },
            &["k"],
        )
        .node("scores", Op::MatMul, &["q", "kt"])
        .node(
            "scaled",
            scalar(Binary::Mul, 1.0 / (HIDDEN as f32).sqrt()),
            &["scores"],
        )
        .node("probs", Op::Softmax { axis: -1 }, &["scaled"])
        .node("ctx", Op::MatMul, &["probs", "v"])
        .linear("o", "ctx", HIDDEN, HIDDEN, true)
        .node("res1", Op::Binary(Binary::Add), &["x", "o"])
        .node("ln1", Op::LayerNorm(LayerNorm::new(HIDDEN)), &["res1"])
        .linear("up", "ln1", HIDDEN, 2 * HIDDEN, true)
        .node("act", Op::Unary(Unary::Gelu), &["up"])
        .linear("down", "act", 2 * HIDDEN, HIDDEN, true)
        .node("res2", Op::Binary(Binary::Add), &["ln1", "down"])
        .node("ln2", Op::LayerNorm(LayerNorm::new(HIDDEN)), &["res2"])
        .node(
            "pool",
            Op::Reduce {
                how: Reduction::Mean,
                axes: vec![1],
                keep_dims: false,
            },
            &["ln2"],
        )
        .linear("head", "pool", HIDDEN, 2, true);
    b.build("head").unwrap()
}

/// Sequences whose label is whether feature 0 summed over the sequence is positive.
fn task(n: usize, seed: u64) -> (ArrayD<f32>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x =
        ArrayD::from_shape_simple_fn(IxDyn(&[n, SEQ, HIDDEN]), || rng.random_range(-1.0f32..1.0));
    let labels = (0..n)
        .map(|i| usize::from((0..SEQ).map(|s| x[[i, s, 0]]).sum::<f32>() > 0.0))
        .collect();
    (x, labels)
}

#[test]
fn a_tiny_encoder_block_trains() {
    let mut g = tiny_encoder(1);
    let (x, labels) = task(64, 2);
    let loss = |g: &Graph| {
        softmax_cross_entropy(&g.forward(&x).unwrap(), &labels)
            .unwrap()
            .0
    };
    let before = loss(&g);
    let mut opt = Adam::new(1e-2);
    for _ in 0..30 {
        let trace = g
            .trace(&x, Mode::Training, &mut StdRng::seed_from_u64(3))
            .unwrap();
        let (_, grad) = softmax_cross_entropy(trace.value(g.output_id()), &labels).unwrap();
        let grads = g.backward(&trace, &grad).unwrap();
        // Every parameter, LayerNorm γ and β included, receives a gradient.
        let mut names = Vec::new();
        g.visit_params(|name, kind, _| {
            if kind.is_trainable() {
                names.push(name.to_string())
            }
        });
        assert!(names.iter().all(|n| grads.get(n).is_some()), "{names:?}");
        opt.step(&mut g, &grads).unwrap();
    }
    let after = loss(&g);
    assert!(
        after < 0.7 * before,
        "loss {before:.4} → {after:.4} after 30 Adam steps"
    );
    // Inference agrees with the traced pass.
    let trace = g
        .trace(&x, Mode::Inference, &mut StdRng::seed_from_u64(3))
        .unwrap();
    let y = g.forward(&x).unwrap();
    let diff = (&y - trace.value(g.output_id())).mapv(f32::abs);
    assert!(diff.iter().all(|&d| d < 1e-5));
}

/// A node's name, op and input names.
type NodeArgs = (&'static str, Op, &'static [&'static str]);

fn build_err(shape: &[usize], nodes: &[NodeArgs]) -> Error {
    let mut b = GraphBuilder::new(0);
    b.input("x", shape);
    for (name, op, inputs) in nodes {
        b.node(name, op.clone(), inputs);
    }
    b.build(nodes.last().unwrap().0).unwrap_err()
}

#[test]
fn shapes_that_do_not_fit_are_typed_errors_at_build_time() {
    let lin = |n: usize| {
        let mut b = GraphBuilder::new(0);
        b.input("x", &[3, 4]).linear("l", "x", 4, n, false);
        b.build("l").unwrap()
    };
    assert_eq!(lin(5).output_shape(), &[3, 5]);
    let cases: Vec<(Vec<usize>, Vec<NodeArgs>)> = vec![
        // [3, 4] against [3]: trailing axes 4 and 3 do not broadcast.
        (
            vec![3, 4],
            vec![
                (
                    "m",
                    Op::Reduce {
                        how: Reduction::Sum,
                        axes: vec![2],
                        keep_dims: false,
                    },
                    &["x"],
                ),
                ("op", Op::Binary(Binary::Mul), &["x", "m"]),
            ],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::BinaryConst(BinaryConst {
                    op: Binary::Add,
                    constant: ArrayD::zeros(IxDyn(&[2, 4])),
                    constant_first: false,
                }),
                &["x"],
            )],
        ),
        // Inner dimensions 4 and 3.
        (vec![3, 4], vec![("op", Op::MatMul, &["x", "x"])]),
        (vec![4], vec![("op", Op::MatMul, &["x", "x"])]),
        (vec![3, 4], vec![("op", Op::Softmax { axis: 0 }, &["x"])]),
        (vec![3, 4], vec![("op", Op::Softmax { axis: 3 }, &["x"])]),
        (vec![3, 4], vec![("op", Op::Softmax { axis: -3 }, &["x"])]),
        (
            vec![3, 4],
            vec![("op", Op::LayerNorm(LayerNorm::new(3)), &["x"])],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::LayerNorm(LayerNorm {
                    eps: f32::NAN,
                    ..LayerNorm::new(4)
                }),
                &["x"],
            )],
        ),
        (
            vec![3, 4],
            vec![("op", Op::Reshape { shape: vec![5, -1] }, &["x"])],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::Reshape {
                    shape: vec![-1, -1],
                },
                &["x"],
            )],
        ),
        (
            vec![3, 4],
            vec![("op", Op::Reshape { shape: vec![7] }, &["x"])],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::Reshape {
                    shape: vec![0, 0, 0],
                },
                &["x"],
            )],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::Permute {
                    axes: vec![1, 0, 2],
                },
                &["x"],
            )],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::Permute {
                    axes: vec![0, 1, 1],
                },
                &["x"],
            )],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::Permute {
                    axes: vec![0, 2, 9],
                },
                &["x"],
            )],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::Reduce {
                    how: Reduction::Mean,
                    axes: vec![0],
                    keep_dims: true,
                },
                &["x"],
            )],
        ),
        (
            vec![3, 4],
            vec![(
                "op",
                Op::Reduce {
                    how: Reduction::Mean,
                    axes: vec![1, -2],
                    keep_dims: true,
                },
                &["x"],
            )],
        ),
        (vec![3, 4], vec![("op", Op::Binary(Binary::Add), &["x"])]),
    ];
    for (shape, nodes) in cases {
        let e = build_err(&shape, &nodes);
        assert!(
            matches!(
                e,
                Error::ShapeMismatch { .. } | Error::InvalidConfig { .. } | Error::Arity { .. }
            ),
            "{:?}: {e}",
            nodes.last().map(|n| n.1.kind().to_string())
        );
    }
    // A graph that builds runs: a wrong input shape at run time is an error too.
    let g = tiny_encoder(0);
    assert!(matches!(
        g.forward(&ArrayD::zeros(IxDyn(&[2, SEQ + 1, HIDDEN]))),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn linear_on_a_sequence_is_the_linear_of_each_position() {
    let mut b = GraphBuilder::new(4);
    b.input("x", &[SEQ, HIDDEN])
        .linear("l", "x", HIDDEN, 3, true);
    let g = b.build("l").unwrap();
    let mut flat = GraphBuilder::new(4);
    flat.input("x", &[HIDDEN]).linear("l", "x", HIDDEN, 3, true);
    let flat = flat.build("l").unwrap();
    let (x, _) = task(2, 5);
    let y = g.forward(&x).unwrap();
    let rows = x
        .to_shape((2 * SEQ, HIDDEN))
        .unwrap()
        .into_owned()
        .into_dyn();
    let per_row = flat.forward(&rows).unwrap();
    assert_eq!(y.shape(), &[2, SEQ, 3]);
    assert_eq!(y.as_slice().unwrap(), per_row.as_slice().unwrap());
}

#[test]
fn quantizers_run_what_they_can_and_refuse_the_rest() {
    use nncompress::quantizer::{QuantConfig, Quantizer};
    let mut b = GraphBuilder::new(6);
    b.input("x", &[SEQ, HIDDEN])
        .linear("proj", "x", HIDDEN, HIDDEN, true)
        .node("act", Op::Unary(Unary::Gelu), &["proj"])
        .node(
            "pool",
            Op::Reduce {
                how: Reduction::Mean,
                axes: vec![1],
                keep_dims: false,
            },
            &["act"],
        )
        .linear("head", "pool", HIDDEN, 2, true);
    let g = b.build("head").unwrap();
    let (x, _) = task(16, 7);
    let want = g.forward(&x).unwrap();
    // The dynamic-range pass quantizes the flat head and keeps the projection in float.
    {
        let q = Quantizer::new(QuantConfig::dynamic_int8())
            .calibrate(&g, std::slice::from_ref(&x))
            .unwrap();
        let y = q.forward(&x).unwrap();
        let err = (&y - &want).mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
        let scale = want.mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
        assert!(err <= 0.05 * scale, "max |Δ| {err} against max |y| {scale}");
    }
    // The full-integer pass has no layout for sequence values, nor an integer form of
    // two-activation ops, yet: typed errors, not wrong models.
    let e = Quantizer::new(QuantConfig::int8())
        .calibrate(&g, std::slice::from_ref(&x))
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let enc = tiny_encoder(0);
    let e = Quantizer::new(QuantConfig::int8())
        .calibrate(&enc, &[task(4, 8).0])
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}

#[test]
fn channel_pruning_leaves_sequence_linears_alone() {
    let mut b = GraphBuilder::new(6);
    b.input("x", &[SEQ, HIDDEN])
        .linear("proj", "x", HIDDEN, HIDDEN, true)
        .relu("act", "proj")
        .linear("out", "act", HIDDEN, HIDDEN, true);
    let g = b.build("out").unwrap();
    let deps = nncompress::pruner::dependency_groups(&g).unwrap();
    // Axis 0 of these values is the sequence, not features: no group may be pruned.
    assert_eq!(deps.prunable().count(), 0, "{}", deps.report());
}

#[test]
fn fused_attention_equals_the_same_built_from_ops() {
    // Three heads of 4 over 5 keys and 3 queries, with a [1, 1, 5] padding mask that hides
    // the last two keys (BERT's additive f32::MIN).
    let (heads, d, sq, sk) = (3, 4, 3, 5);
    let mut b = GraphBuilder::new(4);
    b.input("q", &[sq, heads * d])
        .input("k", &[sk, heads * d])
        .input("v", &[sk, heads * d])
        .input("mask", &[1, 1, sk]);
    let split = |b: &mut GraphBuilder, x: &str, axes: Vec<usize>| {
        b.node(
            &format!("{x}_h"),
            Op::Reshape {
                shape: vec![0, heads as isize, d as isize],
            },
            &[x],
        )
        .node(
            &format!("{x}_t"),
            Op::Permute { axes },
            &[&format!("{x}_h")],
        );
    };
    split(&mut b, "q", vec![0, 2, 1, 3]);
    split(&mut b, "k", vec![0, 2, 3, 1]);
    split(&mut b, "v", vec![0, 2, 1, 3]);
    b.node("scores", Op::MatMul, &["q_t", "k_t"])
        .node(
            "scaled",
            Op::BinaryConst(BinaryConst {
                op: Binary::Mul,
                constant: ArrayD::from_elem(IxDyn(&[]), 1.0 / (d as f32).sqrt()),
                constant_first: false,
            }),
            &["scores"],
        )
        .node("masked", Op::Binary(Binary::Add), &["scaled", "mask"])
        .node("probs", Op::Softmax { axis: -1 }, &["masked"])
        .node("ctx", Op::MatMul, &["probs", "v_t"])
        .node(
            "ctx_t",
            Op::Permute {
                axes: vec![0, 2, 1, 3],
            },
            &["ctx"],
        )
        .node(
            "ops",
            Op::Reshape {
                shape: vec![0, (heads * d) as isize],
            },
            &["ctx_t"],
        )
        .node(
            "fused",
            Op::Attention(Attention::new(heads, d)),
            &["q", "k", "v", "mask"],
        );
    let g = b.build_with_outputs(&["ops", "fused"]).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut draw = |shape: &[usize]| {
        Value::F32(ArrayD::from_shape_simple_fn(IxDyn(shape), || {
            rng.random_range(-2.0f32..2.0)
        }))
    };
    let (q, k, v) = (
        draw(&[2, sq, heads * d]),
        draw(&[2, sk, heads * d]),
        draw(&[2, sk, heads * d]),
    );
    let mask = Value::F32(ArrayD::from_shape_fn(IxDyn(&[2, 1, 1, sk]), |i| {
        if i[3] >= 3 {
            f32::MIN
        } else {
            0.0
        }
    }));
    let out = g
        .run(&[("q", &q), ("k", &k), ("v", &v), ("mask", &mask)])
        .unwrap();
    let (a, b) = (out[0].as_f32().unwrap(), out[1].as_f32().unwrap());
    assert_eq!(a.shape(), [2, sq, heads * d]);
    for (x, y) in a.iter().zip(b.iter()) {
        assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
    }
    // The masked keys take no part: changing their values changes nothing.
    let mut v2 = v.as_f32().unwrap().clone();
    v2.slice_mut(ndarray::s![.., 3.., ..]).fill(100.0);
    let out2 = g
        .run(&[
            ("q", &q),
            ("k", &k),
            ("v", &Value::F32(v2)),
            ("mask", &mask),
        ])
        .unwrap();
    assert_eq!(out2[1], out[1]);
}

#[test]
fn a_tiny_bert_encoder_trains_on_token_ids() {
    use nncompress::model::zoo::{bert_encoder, bert_names as names, BertConfig};
    // Two layers of width 8 with two heads; the task: the first feature of every real
    // token's hidden state should be +1 for even ids and −1 for odd ones.
    let config = BertConfig {
        vocab_size: 20,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        example_seq_len: 5,
        ..BertConfig::minilm_l6_h384()
    };
    let mut g = bert_encoder(&config, 7).unwrap();
    assert_eq!(g.output_names()[0], names::LAST_HIDDEN_STATE);
    let mut rng = StdRng::seed_from_u64(8);
    let (n, seq) = (6, 7); // not the build-time length
    let ids = ArrayD::from_shape_simple_fn(IxDyn(&[n, seq]), || rng.random_range(0..20i64));
    let mask = ArrayD::from_shape_fn(IxDyn(&[n, seq]), |i| i64::from(i[1] < seq - i[0] % 3));
    let feeds = [
        (names::INPUT_IDS, Value::I64(ids.clone())),
        (names::ATTENTION_MASK, Value::I64(mask.clone())),
        (
            names::TOKEN_TYPE_IDS,
            Value::I64(ArrayD::zeros(IxDyn(&[n, seq]))),
        ),
    ];
    let feeds: Vec<(&str, &Value)> = feeds.iter().map(|(k, v)| (*k, v)).collect();
    // Squared error on feature 0 of the real tokens; its gradient.
    let loss_and_grad = |h: &ArrayD<f32>| {
        let mut grad = ArrayD::<f32>::zeros(h.raw_dim());
        let mut loss = 0.0;
        for b in 0..n {
            for t in 0..seq {
                if mask[[b, t]] == 1 {
                    let want = if ids[[b, t]] % 2 == 0 { 1.0 } else { -1.0 };
                    let e = h[[b, t, 0]] - want;
                    loss += e * e;
                    grad[[b, t, 0]] = 2.0 * e;
                }
            }
        }
        (loss, grad)
    };
    let before = loss_and_grad(g.run(&feeds).unwrap()[0].as_f32().unwrap()).0;
    let mut opt = Adam::new(1e-2);
    for _ in 0..40 {
        let trace = g
            .trace_inputs(&feeds, Mode::Training, &mut StdRng::seed_from_u64(1))
            .unwrap();
        let (_, grad) = loss_and_grad(trace.value(g.output_id()));
        let grads = g.backward(&trace, &grad).unwrap();
        for table in [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "encoder.layer.1.attention.self.key.weight",
        ] {
            assert!(grads.get(table).is_some(), "no gradient for {table}");
        }
        opt.step(&mut g, &grads).unwrap();
    }
    let after = loss_and_grad(g.run(&feeds).unwrap()[0].as_f32().unwrap()).0;
    assert!(after < 0.5 * before, "loss {before:.3} → {after:.3}");
}

#[test]
fn the_pillars_refuse_a_bert_encoder_with_typed_errors() {
    use nncompress::model::zoo::{bert_encoder, BertConfig};
    use nncompress::quantizer::{QuantConfig, Quantizer};
    let config = BertConfig {
        vocab_size: 20,
        hidden_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 16,
        example_seq_len: 4,
        ..BertConfig::minilm_l6_h384()
    };
    let g = bert_encoder(&config, 1).unwrap();
    // The single-tensor calibration API cannot feed three named integer inputs.
    let x = ArrayD::zeros(IxDyn(&[2, 4]));
    for config in [QuantConfig::int8(), QuantConfig::dynamic_int8()] {
        let e = Quantizer::new(config)
            .calibrate(&g, std::slice::from_ref(&x))
            .unwrap_err();
        assert!(matches!(e, Error::InputCount { found: 3 }), "{e}");
    }
    // Channel pruning finds nothing it may cut (sequence Linears, attention), and says so.
    let deps = nncompress::pruner::dependency_groups(&g).unwrap();
    assert_eq!(deps.prunable().count(), 0, "{}", deps.report());
}
