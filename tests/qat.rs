//! Quantization-aware training: fake quantization against real quantization, the
//! straight-through and LSQ gradients, graph preparation, and the integer model from `convert`
//! against the fake-quantized graph it came from.

use ndarray::{ArrayD, IxDyn};
use nncompress::model::{
    zoo, Conv2dConfig, CustomOp, FakeQuant, Graph, GraphBuilder, Mode, Op, QatLinear,
    WeightFakeQuant,
};
use nncompress::quantizer::{
    convert, fake_quantize, freeze_observers, prepare_qat, qat_report, QatOptions, QuantConfig,
    QuantDtype, QuantMode, QuantParams, QuantScheme, QuantizedModel,
};
use nncompress::tensor::{QuantGrid, Tensor};
use nncompress::train::{
    argmax_rows, evaluate, load_mnist, Dataset, InMemoryDataset, MnistSplit, Sgd, TrainConfig,
    Trainer,
};
use nncompress::{Error, Result};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mnist(split: MnistSplit) -> InMemoryDataset {
    load_mnist(root().join("data/mnist"), split).unwrap()
}

fn lenet5_fixture() -> Graph {
    Graph::from_safetensors(
        root().join("tests/fixtures/lenet5.safetensors"),
        zoo::lenet5(0).unwrap(),
    )
    .unwrap()
}

fn grid_of(scheme: QuantScheme) -> QuantGrid {
    let (qmin, qmax) = scheme.qrange().unwrap();
    QuantGrid {
        qmin,
        qmax,
        symmetric: scheme.mode == QuantMode::Symmetric,
    }
}

fn schemes() -> Vec<QuantScheme> {
    let s8 = QuantScheme::default();
    vec![
        QuantScheme::uint8_activations(),
        QuantScheme::uint8_activations().with_mode(QuantMode::Symmetric),
        s8,
        s8.with_narrow_range(true),
        s8.with_mode(QuantMode::Affine),
        s8.with_dtype(QuantDtype::Int4),
        s8.with_dtype(QuantDtype::Int4)
            .with_mode(QuantMode::Affine)
            .with_narrow_range(true),
    ]
}

/// `Input → FakeQuant` with a fixed range.
fn fake_quant_graph(fq: FakeQuant, shape: &[usize]) -> Graph {
    let mut b = GraphBuilder::new(0);
    b.input("x", shape).node("fq", Op::FakeQuant(fq), &["x"]);
    b.build("fq").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fake_quant_is_quantize_then_dequantize_bit_for_bit(
        values in proptest::collection::vec(-40.0f32..40.0, 1..64),
        lo in -30.0f32..0.5,
        width in 0.0f32..40.0,
        which in 0usize..7,
    ) {
        let scheme = schemes()[which];
        let hi = lo + width;
        let x = ArrayD::from_shape_vec(IxDyn(&[1, values.len()]), values).unwrap();
        let mut fq = FakeQuant::new(grid_of(scheme), 0.01);
        fq.range = ndarray::arr1(&[lo, hi]);
        let y = fake_quant_graph(fq, &[x.shape()[1]]).forward(&x).unwrap();
        let params = QuantParams::from_range(scheme, &[lo], &[hi]).unwrap();
        let want = fake_quantize(x.view(), &params).unwrap();
        for (a, b) in y.iter().zip(want.iter()) {
            prop_assert_eq!(a.to_bits(), b.to_bits(), "{:?} [{}, {}]", scheme, lo, hi);
        }
    }

    #[test]
    fn shifted_rounding_is_round_half_to_even(
        x in -1.0e6f32..1.0e6,
        halves in -2000i32..2000,
        scale in 1.0e-4f32..10.0,
    ) {
        // ONNX's QuantizeLinear: the quotient in f32, then round half to even.
        let want = f64::from((x / scale).round_ties_even());
        prop_assert_eq!(QuantGrid::rounded(x, scale), want);
        // Exact ties: k + 0.5 rounds to the even neighbour.
        let tie = halves as f32 + 0.5;
        prop_assert_eq!(QuantGrid::rounded(tie, 1.0), (tie as f64).round_ties_even());
    }
}

#[test]
fn weight_fake_quant_matches_per_channel_quantization() {
    // The QAT linear layer computes with exactly the weights the quantizer would store.
    let mut b = GraphBuilder::new(5);
    b.input("x", &[9]).linear("fc", "x", 9, 6, true);
    let float = b.build("fc").unwrap();
    let Op::Linear(linear) = float.node(float.id("fc").unwrap()).op.clone() else {
        unreachable!()
    };
    let x = ArrayD::from_shape_fn(IxDyn(&[3, 9]), |d| (d[0] * 9 + d[1]) as f32 / 7.0 - 2.0);
    for scheme in [
        QuantScheme::int8_weights(),
        QuantScheme::int8_weights().with_dtype(QuantDtype::Int4),
        QuantScheme::int8_weights().with_granularity(nncompress::quantizer::Granularity::PerTensor),
    ] {
        let per_channel = scheme.granularity != nncompress::quantizer::Granularity::PerTensor;
        let mut b = GraphBuilder::new(0);
        b.input("x", &[9]).node(
            "fc",
            Op::QatLinear(QatLinear {
                linear: linear.clone(),
                weight_quant: WeightFakeQuant::new(grid_of(scheme), per_channel),
            }),
            &["x"],
        );
        let qat = b.build("fc").unwrap();
        let p = QuantParams::from_tensor(scheme, linear.weight.view().into_dyn()).unwrap();
        let wq = fake_quantize(linear.weight.view().into_dyn(), &p).unwrap();
        let mut reference = float.clone();
        reference.map_params(|name, _, mut v| {
            if name == "fc.weight" {
                v.assign(&wq);
            }
        });
        let (a, b) = (qat.forward(&x).unwrap(), reference.forward(&x).unwrap());
        assert!(a
            .iter()
            .zip(b.iter())
            .all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

#[test]
fn straight_through_gradient_passes_inside_the_grid_only() {
    let scheme = QuantScheme::uint8_activations();
    let mut fq = FakeQuant::new(grid_of(scheme), 0.01);
    fq.range = ndarray::arr1(&[-1.0, 3.0]);
    let g = fake_quant_graph(fq, &[200]);
    let mut rng = StdRng::seed_from_u64(3);
    let x = ArrayD::from_shape_simple_fn(IxDyn(&[1, 200]), || rng.random_range(-3.0f32..6.0));
    let up = ArrayD::from_shape_simple_fn(IxDyn(&[1, 200]), || rng.random_range(-1.0f32..1.0));
    let mut gm = g.clone();
    let trace = gm.trace(&x, Mode::Inference, &mut rng).unwrap();
    let (_, dx) = g.backward_to_input(&trace, &up).unwrap();
    let (s, z) = QuantGrid {
        qmin: 0,
        qmax: 255,
        symmetric: false,
    }
    .params(-1.0, 3.0);
    let (mut inside, mut outside) = (0, 0);
    for ((&v, &u), &d) in x.iter().zip(up.iter()).zip(dx.iter()) {
        let q = (v as f64 / s as f64).round_ties_even() + z as f64;
        if (0.0..=255.0).contains(&q) {
            assert_eq!(d, u);
            inside += 1;
        } else {
            assert_eq!(d, 0.0);
            outside += 1;
        }
    }
    assert!(
        inside > 50 && outside > 50,
        "{inside} inside, {outside} outside"
    );
}

/// `L = Σ r·fq(x; s)` at scale `s` (a learned-scale fake quantizer in inference mode).
fn lsq_loss(g: &Graph, x: &Tensor, r: &Tensor, scale: f32) -> f64 {
    let mut g = g.clone();
    g.map_params(|name, _, mut v| {
        if name == "fq.scale" {
            v.fill(scale);
        }
    });
    let y = g.forward(x).unwrap();
    y.iter()
        .zip(r.iter())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

#[test]
fn lsq_scale_gradient_matches_finite_differences_where_smooth() {
    let grid = QuantGrid {
        qmin: -127,
        qmax: 127,
        symmetric: true,
    };
    let mut fq = FakeQuant::new(grid, 0.01).with_learned_scale();
    let s = 0.05f32;
    fq.learned_scale = Some(ndarray::arr1(&[s]));
    let g = fake_quant_graph(fq, &[64]);
    let mut rng = StdRng::seed_from_u64(11);
    let r = ArrayD::from_shape_simple_fn(IxDyn(&[2, 64]), || rng.random_range(-1.0f32..1.0));
    // LSQ multiplies the scale's gradient by 1/√(N·Q_P), N values per sample, Q_P = 127.
    let grad_scale = 1.0 / ((64.0f64 * 127.0).sqrt());
    let analytic = |x: &Tensor| -> f64 {
        let mut gm = g.clone();
        let t = gm
            .trace(x, Mode::Inference, &mut StdRng::seed_from_u64(0))
            .unwrap();
        let grads = g.backward(&t, &r).unwrap();
        grads.get("fq.scale").unwrap()[0] as f64 / grad_scale
    };
    // Steps of 2e-4 on s = 0.05 move x/s by at most 0.24 for |x/s| ≤ 60: no rounding boundary
    // is crossed from 0.1 of an integer, and f32's rounding of s ± eps stays far below it.
    let eps = 2e-4f32;
    let numeric = |x: &Tensor| {
        (lsq_loss(&g, x, &r, s + eps) - lsq_loss(&g, x, &r, s - eps)) / (2.0 * eps as f64)
    };

    // Clamped values: fq = s·q_max (or s·q_min), smooth in s; LSQ's gradient is the true one.
    let clamped = ArrayD::from_shape_simple_fn(IxDyn(&[2, 64]), || {
        let m = rng.random_range(6.6f32..9.0);
        if rng.random::<bool>() {
            m
        } else {
            -m
        }
    });
    let (num, ana) = (numeric(&clamped), analytic(&clamped));
    assert!(
        (num - ana).abs() <= 1e-3 * num.abs().max(1.0),
        "{num} vs {ana}"
    );

    // Inside the grid, away from rounding boundaries: fq = s·round(x/s) has derivative
    // round(x/s); LSQ adds the straight-through term −x/s (Esser et al. 2020, eq. 3).
    let inside = ArrayD::from_shape_simple_fn(IxDyn(&[2, 64]), || {
        let k = rng.random_range(-60i32..60) as f32;
        (k + rng.random_range(-0.1f32..0.1)) * s
    });
    let ste_term: f64 = inside
        .iter()
        .zip(r.iter())
        .map(|(&v, &u)| -(v as f64 / s as f64) * u as f64)
        .sum();
    let (num, ana) = (numeric(&inside), analytic(&inside));
    assert!(
        (num + ste_term - ana).abs() <= 0.02 + 1e-3 * ana.abs(),
        "finite difference {num} + STE term {ste_term} vs LSQ {ana}"
    );
}

fn names(g: &Graph) -> Vec<&str> {
    g.nodes().iter().map(|n| n.name.as_str()).collect()
}

#[test]
fn prepare_places_fake_quant_where_the_integer_model_quantizes() {
    let qat = prepare_qat(&zoo::lenet5(1).unwrap(), &QuantConfig::int8()).unwrap();
    assert_eq!(
        names(&qat),
        [
            "input",
            "input.fake_quant",
            "conv1",
            "conv1.fake_quant",
            "pool1",
            "conv2",
            "conv2.fake_quant",
            "pool2",
            "flatten",
            "fc1",
            "relu1",
            "relu1.fake_quant",
            "fc2",
            "fc2.fake_quant"
        ]
    );
    assert_eq!(qat.node(qat.output_id()).name, "fc2.fake_quant");
    let report = qat_report(&qat);
    let relu = report.iter().find(|r| r.name == "relu1").unwrap();
    assert!(relu.treatment.contains("fused into `fc1`"), "{relu:?}");

    // BatchNorm after a conv is folded into it; the ReLU after it carries the quantizer.
    let vgg = zoo::vgg_small([1, 16, 16], &[4, 8], 10, 2).unwrap();
    let qat = prepare_qat(&vgg, &QuantConfig::int8()).unwrap();
    assert!(qat.find("features.0.bn").is_none());
    let Op::QatConv2d(q) = &qat.node(qat.id("features.0.conv").unwrap()).op else {
        panic!("conv not prepared")
    };
    assert!(q.bn.is_some());
    assert!(qat.find("features.0.relu.fake_quant").is_some());
    assert!(qat.find("features.0.conv.fake_quant").is_none());
    let mut params = Vec::new();
    qat.visit_params(|name, _, _| params.push(name.to_string()));
    assert!(params.contains(&"features.0.conv.bn.running_var".to_string()));
}

/// `y = 2x`: an op the quantizer knows nothing about.
#[derive(Debug, Clone)]
struct Double;

impl CustomOp for Double {
    fn kind(&self) -> &str {
        "double"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Ok(inputs[0].to_vec())
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        Ok(inputs[0].mapv(|v| 2.0 * v))
    }
    fn backward(&self, _: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![grad.mapv(|g| 2.0 * g)])
    }
    fn clone_box(&self) -> Box<dyn CustomOp> {
        Box::new(self.clone())
    }
}

/// Runs `steps` training-mode passes of random batches (what a trainer does, minus the
/// optimizer), so that the fake quantizers see data.
fn observe(g: &mut Graph, shape: &[usize], steps: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..steps {
        let x = ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(0.0f32..1.0));
        g.trace(&x, Mode::Training, &mut rng).unwrap();
    }
}

/// Largest |a − b| in units of `step`, and how many rows have a different argmax.
fn compare(a: &Tensor, b: &Tensor, step: f32) -> (f32, usize) {
    let worst = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs() / step)
        .fold(0.0f32, f32::max);
    let differ = argmax_rows(a)
        .unwrap()
        .iter()
        .zip(argmax_rows(b).unwrap())
        .filter(|(p, q)| **p != *q)
        .count();
    (worst, differ)
}

/// The output fake quantizer's scale.
fn output_step(qat: &Graph) -> f32 {
    match &qat.node(qat.output_id()).op {
        Op::FakeQuant(fq) => fq.qparams().0,
        op => panic!("output is {}", op.kind()),
    }
}

#[test]
fn custom_ops_stay_float_residual_adds_are_requantized() {
    let mut b = GraphBuilder::new(4);
    b.input("input", &[2, 6, 6])
        .conv2d("c1", "input", Conv2dConfig::new(2, 3, 3).with_padding(1))
        .custom("twice", &["c1"], Box::new(Double))
        .conv2d("c2", "twice", Conv2dConfig::new(3, 3, 3).with_padding(1))
        .relu("r2", "c2")
        .add("sum", &["r2", "twice"])
        .global_avg_pool("gap", "sum")
        .flatten("flat", "gap")
        .linear("fc", "flat", 3, 4, true);
    let float = b.build("fc").unwrap();
    let mut qat = prepare_qat(&float, &QuantConfig::int8()).unwrap();
    assert!(matches!(
        qat.node(qat.id("twice").unwrap()).op,
        Op::Custom(_)
    ));
    let report = qat_report(&qat);
    let custom = report.iter().find(|r| r.name == "twice").unwrap();
    assert!(
        custom.treatment.contains("kept in float") && custom.treatment.contains("double"),
        "{custom:?}"
    );
    assert!(qat.find("twice.fake_quant").is_some());
    assert!(qat.find("sum.fake_quant").is_some());
    observe(&mut qat, &[8, 2, 6, 6], 5, 1);
    freeze_observers(&mut qat);
    let int8 = convert(&qat).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[16, 2, 6, 6]), |d| {
        ((d[0] * 31 + d[1] * 7 + d[2] * 5 + d[3] * 3) % 17) as f32 / 17.0
    });
    let (worst, _) = compare(
        &qat.forward(&x).unwrap(),
        &int8.forward(&x).unwrap(),
        output_step(&qat),
    );
    assert!(worst <= 1.0 + 1e-3, "outputs differ by {worst} steps");
}

#[test]
fn bad_input_gives_typed_errors() {
    let net = zoo::lenet5(1).unwrap();
    // Never prepared.
    assert!(matches!(convert(&net), Err(Error::InvalidConfig { .. })));
    // Prepared but never trained: the ranges have seen nothing.
    let qat = prepare_qat(&net, &QuantConfig::int8()).unwrap();
    assert!(matches!(convert(&qat), Err(Error::InvalidConfig { .. })));
    // Float and dynamic modes, float16 weights, unknown names.
    for cfg in [QuantConfig::float16(), QuantConfig::dynamic_int8()] {
        assert!(matches!(
            prepare_qat(&net, &cfg),
            Err(Error::InvalidConfig { .. })
        ));
    }
    let f16 = QuantConfig::int8().with_layer_weights("fc1", QuantScheme::float16());
    assert!(matches!(
        prepare_qat(&net, &f16),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        prepare_qat(&net, &QuantConfig::int8().keep_float("nope")),
        Err(Error::UnknownNode { .. })
    ));
    // Learned scales need symmetric weights.
    let affine = QuantConfig::int8()
        .with_layer_weights(
            "fc1",
            QuantScheme::int8_weights().with_mode(QuantMode::Affine),
        )
        .with_qat(QatOptions {
            learned_scales: true,
            ..QatOptions::default()
        });
    assert!(matches!(
        prepare_qat(&net, &affine),
        Err(Error::InvalidConfig { .. })
    ));
    // Grids the integer model cannot run: 4-bit activations, affine weights.
    let mut a4 = QuantConfig::int8();
    a4.activations = QuantScheme::uint8_activations().with_dtype(QuantDtype::Int4);
    let mut w_affine = QuantConfig::int8();
    w_affine.weights = QuantScheme::int8_weights().with_mode(QuantMode::Affine);
    for cfg in [a4, w_affine] {
        let mut qat = prepare_qat(&net, &cfg).unwrap();
        observe(&mut qat, &[4, 1, 28, 28], 1, 2);
        assert!(matches!(convert(&qat), Err(Error::InvalidConfig { .. })));
    }
    // NaN activations while training.
    let mut qat = prepare_qat(&net, &QuantConfig::int8()).unwrap();
    let x = ArrayD::from_elem(IxDyn(&[2, 1, 28, 28]), f32::NAN);
    assert!(matches!(
        qat.trace(&x, Mode::Training, &mut StdRng::seed_from_u64(0)),
        Err(Error::NonFinite(_))
    ));
}

/// Fine-tunes a prepared graph on the first `images` training images for one epoch.
fn qat_fine_tune(qat: &mut Graph, train: &InMemoryDataset, images: usize, seed: u64) {
    let subset = train.subset(&(0..images).collect::<Vec<_>>()).unwrap();
    let mut trainer = Trainer::new(
        TrainConfig::new(1, 64, seed),
        Sgd::new(0.01).with_momentum(0.9),
    );
    trainer.fit(qat, &subset, None).unwrap();
}

fn outputs(test: &InMemoryDataset, mut f: impl FnMut(&Tensor) -> Tensor) -> (Tensor, Vec<usize>) {
    let mut parts = Vec::new();
    let mut labels = Vec::new();
    for start in (0..test.len()).step_by(1000) {
        let idx: Vec<usize> = (start..(start + 1000).min(test.len())).collect();
        let (x, y) = test.batch(&idx).unwrap();
        parts.push(f(&x));
        labels.extend(y);
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    (
        ndarray::concatenate(ndarray::Axis(0), &views).unwrap(),
        labels,
    )
}

fn accuracy(logits: &Tensor, labels: &[usize]) -> f32 {
    let pred = argmax_rows(logits).unwrap();
    pred.iter().zip(labels).filter(|(p, y)| p == y).count() as f32 / labels.len() as f32
}

#[test]
fn lenet5_integer_model_agrees_with_its_fake_quantized_graph_on_mnist() {
    let (train, test) = (mnist(MnistSplit::Train), mnist(MnistSplit::Test));
    let float = lenet5_fixture();
    let float_acc = evaluate(&float, &test, 1000).unwrap().accuracy;
    for four_bit in [false, true] {
        let mut cfg = QuantConfig::int8();
        if four_bit {
            cfg.weights = QuantScheme::int8_weights().with_dtype(QuantDtype::Int4);
        }
        let mut qat = prepare_qat(&float, &cfg).unwrap();
        qat_fine_tune(&mut qat, &train, 6400, 3);
        let int8 = convert(&qat).unwrap();
        let (fake, labels) = outputs(&test, |x| qat.forward(x).unwrap());
        let (real, _) = outputs(&test, |x| int8.forward(x).unwrap());
        let (worst, differ) = compare(&fake, &real, output_step(&qat));
        // Measured on the 10,000 test images: w8 0 argmaxes differ, 97.8 % of the logits are
        // identical, the rest one step apart; w4 1 argmax differs, 91.9 % identical, worst 1.
        assert!(differ <= 10, "{differ} of 10000 argmaxes differ");
        assert!(worst <= 1.0 + 1e-3, "outputs differ by {worst} steps");
        let (fake_acc, int_acc) = (accuracy(&fake, &labels), accuracy(&real, &labels));
        // Measured: float 99.30 %; after 100 QAT steps w8 99.31 %, w4 99.32 % (integer).
        assert!(
            float_acc - int_acc <= 0.004,
            "float {float_acc}, int {int_acc}"
        );
        assert!((fake_acc - int_acc).abs() <= 0.001);

        // The converted model saves and loads with the float architecture.
        let bytes = int8.to_bytes().unwrap();
        let back = QuantizedModel::from_bytes(&bytes, &zoo::lenet5(0).unwrap(), None).unwrap();
        let x = test.batch(&(0..64).collect::<Vec<_>>()).unwrap().0;
        assert_eq!(back.forward(&x).unwrap(), int8.forward(&x).unwrap());
    }
}

#[test]
fn batch_norm_folding_converts_consistently() {
    // A VGG-style net with BatchNorm, trained by QAT from scratch: batch statistics first,
    // then frozen to the running ones, which is what the integer model folds.
    let (train, test) = (mnist(MnistSplit::Train), mnist(MnistSplit::Test));
    let float = zoo::vgg_small([1, 28, 28], &[8, 16], 10, 7).unwrap();
    let cfg = QuantConfig::int8().with_qat(QatOptions {
        freeze_bn_after: Some(60),
        freeze_observers_after: Some(90),
        ..QatOptions::default()
    });
    let mut qat = prepare_qat(&float, &cfg).unwrap();
    qat_fine_tune(&mut qat, &train, 6400, 5);
    // Frozen: a training-mode pass is now the inference pass.
    let x = test.batch(&(0..32).collect::<Vec<_>>()).unwrap().0;
    let mut probe = qat.clone();
    let t = probe
        .trace(&x, Mode::Training, &mut StdRng::seed_from_u64(0))
        .unwrap();
    assert_eq!(t.value(probe.output_id()), &qat.forward(&x).unwrap());

    let int8 = convert(&qat).unwrap();
    let small = test.take(2000);
    let (fake, labels) = outputs(&small, |x| qat.forward(x).unwrap());
    let (real, _) = outputs(&small, |x| int8.forward(x).unwrap());
    let (worst, differ) = compare(&fake, &real, output_step(&qat));
    assert!(differ <= 2, "{differ} of 2000 argmaxes differ");
    assert!(worst <= 1.0 + 1e-3, "outputs differ by {worst} steps");
    // 100 steps of this small net with global average pooling train it only part of the way
    // (measured: 30.7 %; the float net trained the same way: 34.2 %); the point here is that
    // the integer model computes what the graph computes.
    assert!(accuracy(&real, &labels) > 0.2);
    assert_eq!(accuracy(&real, &labels), accuracy(&fake, &labels));
}

#[test]
fn same_seed_same_qat_model() {
    let train = mnist(MnistSplit::Train);
    let float = lenet5_fixture();
    let run = || {
        let mut qat = prepare_qat(&float, &QuantConfig::int8()).unwrap();
        qat_fine_tune(&mut qat, &train, 640, 9);
        let mut bits = Vec::new();
        qat.visit_params(|_, _, v| bits.extend(v.iter().map(|x| x.to_bits())));
        bits
    };
    assert_eq!(run(), run());
}

#[test]
fn a_qat_checkpoint_saves_and_loads_with_its_ranges_and_learned_scales() {
    let train = mnist(MnistSplit::Train);
    let float = lenet5_fixture();
    let cfg = QuantConfig::int8().with_qat(QatOptions {
        learned_scales: true,
        ..QatOptions::default()
    });
    let mut qat = prepare_qat(&float, &cfg).unwrap();
    qat_fine_tune(&mut qat, &train, 640, 4);
    let bytes = nncompress::io::to_safetensors_bytes(&qat).unwrap();
    let mut restored = prepare_qat(&float, &cfg).unwrap();
    nncompress::io::from_safetensors_bytes(&mut restored, &bytes, None).unwrap();
    let x = train.batch(&(0..64).collect::<Vec<_>>()).unwrap().0;
    assert_eq!(qat.forward(&x).unwrap(), restored.forward(&x).unwrap());
    assert_eq!(
        convert(&qat).unwrap().forward(&x).unwrap(),
        convert(&restored).unwrap().forward(&x).unwrap()
    );
    // A learned activation scale moved away from its min-max initialisation.
    let Op::FakeQuant(fq) = &qat.node(qat.id("conv1.fake_quant").unwrap()).op else {
        panic!()
    };
    let from_range = fq.grid.params(fq.range[0], fq.range[1]).0;
    assert_ne!(fq.qparams().0, from_range);
}
