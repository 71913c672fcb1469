//! Dynamic int8 over any rank (issue 17): the `DynamicLinear` node equals a scalar
//! reference bit for bit (per tensor and per row), gives the same bits at any thread count,
//! and `quantizer::dynamic_int8` turns a transformer's Linears into such nodes of the same
//! graph; bad input is a typed error.

use ndarray::{Array1, Array2, Array3, ArrayD, IxDyn};
use nncompress::model::zoo::{bert_encoder, bert_names as names, BertConfig};
use nncompress::model::{ActivationGranularity, DynamicLinear, Op};
use nncompress::quantizer::{dynamic_int8, DynamicInt8};
use nncompress::tensor::{QuantGrid, Value};
use nncompress::Error;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const U8: QuantGrid = QuantGrid {
    qmin: 0,
    qmax: 255,
    symmetric: false,
};

/// The layer computed one value at a time: the grid of each row (or of the whole input),
/// `QuantGrid::quantize`, an i64 dot product, then `acc · (s_x · s_w[c]) + b[c]` in f32.
fn reference(
    x: &Array2<f32>,
    w: &Array2<i8>,
    scales: &[f32],
    bias: &Array1<f32>,
    granularity: ActivationGranularity,
) -> Array2<f32> {
    let grid = |vals: &mut dyn Iterator<Item = f32>| {
        let (lo, hi) = vals.fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
        U8.params(lo, hi)
    };
    let whole = grid(&mut x.iter().copied());
    Array2::from_shape_fn((x.nrows(), w.nrows()), |(r, c)| {
        let (s, z) = match granularity {
            ActivationGranularity::PerRow => grid(&mut x.row(r).iter().copied()),
            _ => whole,
        };
        let acc: i64 = x
            .row(r)
            .iter()
            .zip(w.row(c))
            .map(|(&v, &q)| i64::from(U8.quantize(v, s, z) - z) * i64::from(q))
            .sum();
        acc as i32 as f32 * (s * scales[c]) + bias[c]
    })
}

fn layer(
    n: usize,
    k: usize,
    granularity: ActivationGranularity,
    rng: &mut StdRng,
) -> DynamicLinear {
    let w = Array2::from_shape_simple_fn((n, k), || rng.random_range(-127i8..=127));
    let scales: Vec<f32> = (0..n).map(|_| rng.random_range(1e-3f32..1e-1)).collect();
    let bias = Array1::from_shape_simple_fn(n, || rng.random_range(-1.0f32..1.0));
    DynamicLinear::new(w, scales, Some(bias), granularity).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn the_dynamic_layer_equals_its_scalar_reference(
        batch in 1usize..4, seq in 1usize..40, k in 1usize..200, n in 1usize..70,
        per_row in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let granularity = if per_row {
            ActivationGranularity::PerRow
        } else {
            ActivationGranularity::PerTensor
        };
        let l = layer(n, k, granularity, &mut rng);
        // Rows of different ranges, so per-row and per-tensor grids differ.
        let x = Array3::from_shape_fn((batch, seq, k), |(b, t, _)| {
            rng.random_range(-1.0f32..1.0) * (1 + (b * 7 + t) % 5) as f32
        })
        .into_dyn();
        let got = l.forward(&x, "l").unwrap();
        let rows = x.to_shape((batch * seq, k)).unwrap().to_owned();
        let want = reference(&rows, l.weight(), l.weight_scales(), l.bias().unwrap(), granularity);
        prop_assert_eq!(got.shape(), &[batch, seq, n][..]);
        for (g, w) in got.iter().zip(want.iter()) {
            prop_assert_eq!(g.to_bits(), w.to_bits());
        }
    }
}

#[test]
fn large_inputs_give_the_same_bits_on_one_and_two_threads() {
    let mut rng = StdRng::seed_from_u64(3);
    for granularity in [
        ActivationGranularity::PerRow,
        ActivationGranularity::PerTensor,
    ] {
        let l = layer(96, 384, granularity, &mut rng);
        let x =
            ArrayD::from_shape_simple_fn(IxDyn(&[4, 128, 384]), || rng.random_range(-3.0f32..3.0));
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| l.forward(&x, "l").unwrap())
        };
        let (one, two) = (run(1), run(2));
        assert!(one
            .iter()
            .zip(two.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let rows = x.to_shape((512, 384)).unwrap().to_owned();
        let want = reference(
            &rows,
            l.weight(),
            l.weight_scales(),
            l.bias().unwrap(),
            granularity,
        );
        assert!(one
            .iter()
            .zip(want.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

fn tiny_bert() -> nncompress::model::Graph {
    let config = BertConfig {
        vocab_size: 40,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        example_seq_len: 6,
        ..BertConfig::minilm_l6_h384()
    };
    bert_encoder(&config, 11).unwrap()
}

#[test]
fn a_transformer_keeps_its_graph_and_follows_the_float_model() {
    let g = tiny_bert();
    let (q, report) = dynamic_int8(&g, &DynamicInt8::per_row().exclude("pooler.dense")).unwrap();
    // 2 layers × 6 Linears quantized, the pooler kept; nothing else changed.
    assert_eq!(report.layers.len(), 12);
    assert_eq!(report.kept_f32, vec!["pooler.dense".to_string()]);
    assert!(
        report.weight_compression() > 3.5,
        "{}",
        report.weight_compression()
    );
    assert_eq!(g.nodes().len(), q.nodes().len());
    let dynamic = q
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::DynamicLinear(_)))
        .count();
    assert_eq!(dynamic, 12);
    assert_eq!(g.output_names(), q.output_names());
    // A sequence length other than the build-time one, with padding.
    let (n, seq) = (3, 9);
    let ids = Value::I64(ArrayD::from_shape_fn(IxDyn(&[n, seq]), |i| {
        ((i[0] * 13 + i[1] * 7) % 40) as i64
    }));
    let mask = Value::I64(ArrayD::from_shape_fn(IxDyn(&[n, seq]), |i| {
        i64::from(i[1] < seq - i[0])
    }));
    let types = Value::I64(ArrayD::zeros(IxDyn(&[n, seq])));
    let feeds = [
        (names::INPUT_IDS, &ids),
        (names::ATTENTION_MASK, &mask),
        (names::TOKEN_TYPE_IDS, &types),
    ];
    let at = g
        .output_names()
        .iter()
        .position(|o| *o == names::SENTENCE_EMBEDDING)
        .unwrap();
    let (f, d) = (g.run(&feeds).unwrap(), q.run(&feeds).unwrap());
    let (f, d) = (f[at].as_f32().unwrap(), d[at].as_f32().unwrap());
    for (a, b) in f.outer_iter().zip(d.outer_iter()) {
        let cos: f32 = a.iter().zip(b.iter()).map(|(x, y)| x * y).sum();
        assert!(cos > 0.99, "cosine {cos}");
    }
    // Not trainable: backward says so.
    let mut q = q;
    let mut rng = StdRng::seed_from_u64(0);
    let trace = q
        .trace_inputs(&feeds, nncompress::model::Mode::Inference, &mut rng)
        .unwrap();
    let out = q.id(names::SENTENCE_EMBEDDING).unwrap();
    let grads = q.backward_with(&trace, None, &[(out, d.clone())]);
    assert!(
        matches!(grads, Err(Error::Unsupported(_))),
        "{:?}",
        grads.err()
    );
}

#[test]
fn bad_input_is_a_typed_error() {
    let g = tiny_bert();
    // An exclusion that names nothing (or a node that is not a Linear) would quantize the
    // layer it meant to keep.
    for name in [
        "encoder.layer.0.attention.self.qurey",
        "embeddings.LayerNorm",
    ] {
        let r = dynamic_int8(&g, &DynamicInt8::per_row().exclude(name));
        assert!(
            matches!(r, Err(Error::InvalidConfig { .. })),
            "{name}: {r:?}"
        );
    }
    // NaN activations have no grid.
    let mut rng = StdRng::seed_from_u64(1);
    for granularity in [
        ActivationGranularity::PerRow,
        ActivationGranularity::PerTensor,
    ] {
        let l = layer(4, 8, granularity, &mut rng);
        let mut x = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 8]));
        x[[1, 2, 5]] = f32::NAN;
        assert!(matches!(l.forward(&x, "l"), Err(Error::NonFinite(_))));
        let wrong = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 7]));
        assert!(matches!(
            l.forward(&wrong, "l"),
            Err(Error::ShapeMismatch { .. })
        ));
    }
    // Weights: one finite positive scale per channel, a bias per channel.
    let w = Array2::<i8>::zeros((3, 4));
    for scales in [
        vec![1.0, 1.0],
        vec![1.0, 0.0, 1.0],
        vec![1.0, f32::NAN, 1.0],
    ] {
        let r = DynamicLinear::new(w.clone(), scales, None, ActivationGranularity::PerRow);
        assert!(matches!(r, Err(Error::InvalidConfig { .. })));
    }
    let r = DynamicLinear::new(
        w,
        vec![1.0; 3],
        Some(Array1::zeros(2)),
        ActivationGranularity::PerRow,
    );
    assert!(matches!(r, Err(Error::InvalidConfig { .. })));
}
