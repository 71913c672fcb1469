//! Every op's backward pass against central finite differences.
//!
//! The loss is `L = Σ out ⊙ R` for a fixed random `R`, evaluated in f64 from the f32 forward
//! pass. Inputs are drawn away from the kinks of ReLU, ReLU6 and max pooling so that a
//! perturbation of `EPS` never crosses one.

use ndarray::{ArrayD, IxDyn};
use nncompress::model::{
    Attention, Binary, BinaryConst, Conv2dConfig, CustomOp, Dim, Graph, GraphBuilder, LayerNorm,
    Mode, Op, Pool2d, Reduction, RmsNorm, Rotary, Unary,
};
use nncompress::tensor::{DType, Tensor, Value};
use nncompress::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const EPS: f32 = 1e-2;
const SAMPLES: usize = 24;

fn random(shape: &[usize], rng: &mut StdRng) -> Tensor {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-1.0f32..1.0))
}

/// Values in ±[0.2, 1.2], far from zero, so ReLU kinks are not crossed.
fn away_from_zero(shape: &[usize], rng: &mut StdRng) -> Tensor {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let m = rng.random_range(0.2f32..1.2);
        if rng.random::<bool>() {
            m
        } else {
            -m
        }
    })
}

/// Distinct values spaced by 0.05, so a max never changes under a 0.01 perturbation.
fn distinct(shape: &[usize], rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.05 - n as f32 * 0.025).collect();
    v.shuffle(rng);
    ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()
}

/// Integer inputs fed beside the float input `x` (token ids, masks).
type Ints<'a> = &'a [(&'a str, Value)];

fn traced(g: &mut Graph, x: &Tensor, ints: Ints<'_>, mode: Mode) -> nncompress::model::Trace {
    let rng = &mut StdRng::seed_from_u64(99);
    if ints.is_empty() {
        return g.trace(x, mode, rng).unwrap();
    }
    let xv = Value::F32(x.clone());
    let x_name = g.node(g.input_id()).name.clone();
    let mut feeds: Vec<(&str, &Value)> = vec![(x_name.as_str(), &xv)];
    feeds.extend(ints.iter().map(|(n, v)| (*n, v)));
    g.trace_inputs(&feeds, mode, rng).unwrap()
}

fn loss(g: &Graph, x: &Tensor, ints: Ints<'_>, r: &Tensor, mode: Mode) -> f64 {
    let mut g = g.clone();
    let t = traced(&mut g, x, ints, mode);
    let y = t.value(g.output_id());
    y.iter()
        .zip(r.iter())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

fn close(num: f64, ana: f64, what: &str) {
    let tol = 3e-3 + 2e-2 * ana.abs();
    assert!(
        (num - ana).abs() <= tol,
        "{what}: finite difference {num:.6} vs analytic {ana:.6}"
    );
}

/// Checks the input gradient and every trainable parameter's gradient at sampled entries.
fn check(g: &Graph, x: &Tensor, mode: Mode) {
    check_with(g, x, mode, EPS)
}

/// As [`check`] with step `eps` (whole models have ReLU kinks everywhere: a smaller step
/// crosses fewer of them).
fn check_with(g: &Graph, x: &Tensor, mode: Mode, eps: f32) {
    check_typed(g, x, &[], mode, eps)
}

/// As [`check_with`], with integer inputs fed beside `x` (the graph's first input).
fn check_typed(g: &Graph, x: &Tensor, ints: Ints<'_>, mode: Mode, eps: f32) {
    let mut rng = StdRng::seed_from_u64(5);
    let mut gm = g.clone();
    let trace = traced(&mut gm, x, ints, mode);
    let out = trace.value(g.output_id()).clone();
    let r = random(out.shape(), &mut rng);
    let (grads, dx) = g.backward_to_input(&trace, &r).unwrap();
    assert_eq!(dx.shape(), x.shape());

    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.shuffle(&mut rng);
    for &i in idx.iter().take(SAMPLES) {
        let mut xp = x.clone();
        let mut xm = x.clone();
        xp.as_slice_mut().unwrap()[i] += eps;
        xm.as_slice_mut().unwrap()[i] -= eps;
        let num =
            (loss(g, &xp, ints, &r, mode) - loss(g, &xm, ints, &r, mode)) / (2.0 * eps as f64);
        close(
            num,
            dx.as_slice().unwrap()[i] as f64,
            &format!("input[{i}]"),
        );
    }

    let mut names = Vec::new();
    g.visit_params(|name, kind, _| {
        if kind.is_trainable() {
            names.push(name.to_string());
        }
    });
    assert!(!names.is_empty() || g.param_count() == 0);
    for name in names {
        let ana = grads
            .get(&name)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .clone();
        let mut idx: Vec<usize> = (0..ana.len()).collect();
        idx.shuffle(&mut rng);
        for &i in idx.iter().take(SAMPLES) {
            let shifted = |delta: f32| {
                let mut gp = g.clone();
                gp.map_params(|n, _, mut p| {
                    if n == name {
                        let flat: Vec<usize> = p.shape().to_vec();
                        let mut pos = vec![0; flat.len()];
                        let mut rem = i;
                        for a in (0..flat.len()).rev() {
                            pos[a] = rem % flat[a];
                            rem /= flat[a];
                        }
                        p[IxDyn(&pos)] += delta;
                    }
                });
                loss(&gp, x, ints, &r, mode)
            };
            let num = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            close(
                num,
                ana.as_slice().unwrap()[i] as f64,
                &format!("{name}[{i}]"),
            );
        }
    }
}

fn single(input: &[usize], build: impl FnOnce(&mut GraphBuilder)) -> Graph {
    let mut b = GraphBuilder::new(3);
    b.input("x", input);
    build(&mut b);
    b.build("op").unwrap()
}

#[test]
fn linear() {
    let g = single(&[7], |b| {
        b.linear("op", "x", 7, 5, true);
    });
    check(
        &g,
        &random(&[4, 7], &mut StdRng::seed_from_u64(1)),
        Mode::Training,
    );
}

#[test]
fn conv2d_plain_strided_padded_dilated_grouped_depthwise() {
    let configs = [
        Conv2dConfig::new(3, 4, 3),
        Conv2dConfig::new(3, 4, 3).with_stride(2).with_padding(1),
        Conv2dConfig::new(4, 6, 3).with_dilation(2).with_padding(2),
        Conv2dConfig::new(4, 6, 3).with_groups(2).with_stride(2),
        Conv2dConfig::new(4, 4, 3)
            .with_groups(4)
            .with_padding(1)
            .with_bias(false),
        Conv2dConfig::new(3, 2, 1),
    ];
    for (k, cfg) in configs.into_iter().enumerate() {
        let g = single(&[cfg.in_channels, 7, 6], |b| {
            b.conv2d("op", "x", cfg);
        });
        let x = random(
            &[2, cfg.in_channels, 7, 6],
            &mut StdRng::seed_from_u64(k as u64),
        );
        check(&g, &x, Mode::Training);
    }
}

#[test]
fn batch_norm_training_and_inference() {
    let mut g = single(&[3, 4, 4], |b| {
        b.batch_norm2d("op", "x", 3);
    });
    g.map_params(|_, kind, mut p| {
        use nncompress::model::ParamKind::*;
        match kind {
            Weight => p.assign(&ndarray::arr1(&[1.5f32, 0.7, -0.4]).into_dyn()),
            Bias => p.assign(&ndarray::arr1(&[0.1f32, -0.2, 0.3]).into_dyn()),
            RunningMean => p.assign(&ndarray::arr1(&[0.05f32, -0.1, 0.2]).into_dyn()),
            RunningVar => p.assign(&ndarray::arr1(&[0.8f32, 1.2, 0.5]).into_dyn()),
            _ => {}
        }
    });
    let x = random(&[3, 3, 4, 4], &mut StdRng::seed_from_u64(8));
    check(&g, &x, Mode::Training);
    check_with(&g, &x, Mode::Inference, 2e-4);
}

#[test]
fn relu_and_relu6() {
    let g = single(&[10], |b| {
        b.relu("op", "x");
    });
    check(
        &g,
        &away_from_zero(&[3, 10], &mut StdRng::seed_from_u64(2)),
        Mode::Training,
    );
    let g = single(&[10], |b| {
        b.relu6("op", "x");
    });
    let x = away_from_zero(&[3, 10], &mut StdRng::seed_from_u64(3)).mapv(|v| v * 5.0);
    let x = x.mapv(|v| if (v - 6.0).abs() < 0.1 { 5.5 } else { v });
    check(&g, &x, Mode::Training);
}

#[test]
fn max_and_average_pooling() {
    let pools = [
        Pool2d::new(2, 2),
        Pool2d::new(3, 2),
        Pool2d {
            kernel: [3, 3],
            stride: [2, 1],
            padding: [1, 1],
        },
    ];
    for (k, p) in pools.into_iter().enumerate() {
        let g = single(&[2, 7, 6], |b| {
            b.max_pool2d("op", "x", p);
        });
        check(
            &g,
            &distinct(&[2, 2, 7, 6], &mut StdRng::seed_from_u64(k as u64)),
            Mode::Training,
        );
        let g = single(&[2, 7, 6], |b| {
            b.avg_pool2d("op", "x", p);
        });
        check(
            &g,
            &random(&[2, 2, 7, 6], &mut StdRng::seed_from_u64(k as u64)),
            Mode::Training,
        );
    }
}

#[test]
fn global_pool_flatten_softmax() {
    let g = single(&[3, 4, 5], |b| {
        b.global_avg_pool("op", "x");
    });
    check(
        &g,
        &random(&[2, 3, 4, 5], &mut StdRng::seed_from_u64(4)),
        Mode::Training,
    );
    let g = single(&[3, 4, 5], |b| {
        b.flatten("op", "x");
    });
    check(
        &g,
        &random(&[2, 3, 4, 5], &mut StdRng::seed_from_u64(4)),
        Mode::Training,
    );
    let g = single(&[6], |b| {
        b.softmax("op", "x");
    });
    check(
        &g,
        &random(&[3, 6], &mut StdRng::seed_from_u64(4)),
        Mode::Training,
    );
}

#[test]
fn add_and_concat_with_shared_producers() {
    // Residual-style: x feeds both a conv and the Add, so gradients must sum.
    let mut b = GraphBuilder::new(9);
    b.input("x", &[2, 5, 5])
        .conv2d("c1", "x", Conv2dConfig::new(2, 2, 3).with_padding(1))
        .add("sum", &["c1", "x"])
        .conv2d("c2", "sum", Conv2dConfig::new(2, 3, 1))
        .concat("op", &["c2", "sum", "x"]);
    let g = b.build("op").unwrap();
    check(
        &g,
        &random(&[2, 2, 5, 5], &mut StdRng::seed_from_u64(6)),
        Mode::Training,
    );
}

#[test]
fn dropout_uses_the_same_mask_forward_and_backward() {
    let g = single(&[20], |b| {
        b.dropout("op", "x", 0.3);
    });
    check(
        &g,
        &random(&[4, 20], &mut StdRng::seed_from_u64(7)),
        Mode::Training,
    );
    check(
        &g,
        &random(&[4, 20], &mut StdRng::seed_from_u64(7)),
        Mode::Inference,
    );
}

/// `y = x³`, elementwise: a user op with a gradient.
#[derive(Debug, Clone)]
struct Cube;

impl CustomOp for Cube {
    fn kind(&self) -> &str {
        "cube"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Ok(inputs[0].to_vec())
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        Ok(inputs[0].mapv(|v| v * v * v))
    }
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![grad * &inputs[0].mapv(|v| 3.0 * v * v)])
    }
    fn clone_box(&self) -> Box<dyn CustomOp> {
        Box::new(self.clone())
    }
}

#[test]
fn custom_op_gradient_flows_through_the_graph() {
    let mut b = GraphBuilder::new(1);
    b.input("x", &[4])
        .linear("fc", "x", 4, 3, true)
        .custom("op", &["fc"], Box::new(Cube));
    let g = b.build("op").unwrap();
    assert!(matches!(g.node(g.output_id()).op, Op::Custom(_)));
    check(
        &g,
        &random(&[2, 4], &mut StdRng::seed_from_u64(1)),
        Mode::Training,
    );
}

#[test]
fn whole_resnet_every_parameter() {
    // Smaller inputs keep this fast; every layer type of the zoo is on the path.
    let g = nncompress::model::zoo::resnet_small([1, 8, 8], 4, 2, 3, 11).unwrap();
    let x = random(&[3, 1, 8, 8], &mut StdRng::seed_from_u64(12));
    let mut gm = g.clone();
    let t = gm
        .trace(&x, Mode::Training, &mut StdRng::seed_from_u64(0))
        .unwrap();
    let r = random(&[3, 3], &mut StdRng::seed_from_u64(13));
    let (grads, _) = g.backward_to_input(&t, &r).unwrap();
    // Every trainable parameter got a gradient of its own shape.
    g.visit_params(|name, kind, v| {
        if kind.is_trainable() {
            assert_eq!(grads.get(name).unwrap().shape(), v.shape(), "{name}");
        }
    });
    check_with(&g, &x, Mode::Inference, 2e-4);
}

/// A grid so fine (2²⁵ levels) that fake quantization is the identity to f32 precision: the
/// BatchNorm-folding and layer algebra of the QAT ops can then be checked by finite
/// differences (a coarse grid is piecewise constant; its straight-through gradient is checked
/// in `tests/qat.rs`).
fn fine_grid() -> nncompress::tensor::QuantGrid {
    nncompress::tensor::QuantGrid {
        qmin: -(1 << 24),
        qmax: 1 << 24,
        symmetric: true,
    }
}

/// `conv → BatchNorm` of the float graph turned into a QAT conv with the BatchNorm folded.
fn qat_conv_bn(freeze_bn_after: Option<u64>, bias: bool) -> Graph {
    use nncompress::model::{QatConv2d, WeightFakeQuant};
    let mut b = GraphBuilder::new(21);
    b.input("x", &[3, 6, 5])
        .conv2d(
            "conv",
            "x",
            Conv2dConfig::new(3, 4, 3)
                .with_padding(1)
                .with_stride(2)
                .with_bias(bias),
        )
        .batch_norm2d("bn", "conv", 4);
    let mut float = b.build("bn").unwrap();
    float.map_params(|name, _, mut p| {
        let values = [1.3f32, 0.6, -0.8, 1.1];
        match name {
            "bn.weight" => p.assign(&ndarray::arr1(&values).into_dyn()),
            "bn.bias" => p.assign(&ndarray::arr1(&[0.2f32, -0.1, 0.05, 0.3]).into_dyn()),
            "bn.running_mean" => p.assign(&ndarray::arr1(&[0.1f32, -0.2, 0.0, 0.3]).into_dyn()),
            "bn.running_var" => p.assign(&ndarray::arr1(&[0.7f32, 1.3, 0.9, 0.4]).into_dyn()),
            _ => {}
        }
    });
    let (Op::Conv2d(conv), Op::BatchNorm2d(bn)) = (
        float.node(float.id("conv").unwrap()).op.clone(),
        float.node(float.id("bn").unwrap()).op.clone(),
    ) else {
        unreachable!()
    };
    let mut b = GraphBuilder::new(0);
    b.input("x", &[3, 6, 5]).node(
        "op",
        Op::QatConv2d(Box::new(QatConv2d {
            conv,
            bn: Some(bn),
            weight_quant: WeightFakeQuant::new(fine_grid(), true),
            steps: 0,
            freeze_bn_after,
        })),
        &["x"],
    );
    b.build("op").unwrap()
}

#[test]
fn qat_conv_with_batch_norm_folded_on_batch_statistics() {
    // Gradients flow through the batch mean and variance of the float convolution into W, γ,
    // and the input; the conv bias cancels (its gradient is 0 both ways).
    let x = random(&[3, 3, 6, 5], &mut StdRng::seed_from_u64(31));
    check(&qat_conv_bn(None, true), &x, Mode::Training);
    check(&qat_conv_bn(None, false), &x, Mode::Training);
}

#[test]
fn qat_conv_with_batch_norm_frozen_and_at_inference() {
    let x = random(&[3, 3, 6, 5], &mut StdRng::seed_from_u64(32));
    check(&qat_conv_bn(Some(0), true), &x, Mode::Training);
    check(&qat_conv_bn(None, true), &x, Mode::Inference);
}

#[test]
fn qat_linear_and_activation_fake_quant() {
    use nncompress::model::{FakeQuant, QatLinear, WeightFakeQuant};
    let mut b = GraphBuilder::new(4);
    b.input("x", &[6]).linear("fc", "x", 6, 5, true);
    let float = b.build("fc").unwrap();
    let Op::Linear(linear) = float.node(float.id("fc").unwrap()).op.clone() else {
        unreachable!()
    };
    let mut b = GraphBuilder::new(0);
    b.input("x", &[6])
        .node(
            "fc",
            Op::QatLinear(QatLinear {
                linear,
                weight_quant: WeightFakeQuant::new(fine_grid(), false),
            }),
            &["x"],
        )
        .node(
            "op",
            Op::FakeQuant(FakeQuant::new(fine_grid(), 0.01)),
            &["fc"],
        );
    let g = b.build("op").unwrap();
    check(
        &g,
        &random(&[4, 6], &mut StdRng::seed_from_u64(33)),
        Mode::Training,
    );
}

/// One op over a rank-3 per-sample value, checked at a batch of 2.
fn check_nd(input: &[usize], seed: u64, build: impl FnOnce(&mut GraphBuilder)) {
    let g = single(input, build);
    let mut shape = vec![2];
    shape.extend_from_slice(input);
    check(
        &g,
        &away_from_zero(&shape, &mut StdRng::seed_from_u64(seed)),
        Mode::Training,
    );
}

#[test]
fn linear_over_the_last_axis_of_any_rank() {
    check_nd(&[3, 2, 5], 11, |b| {
        b.linear("op", "x", 5, 4, true);
    });
}

#[test]
fn element_wise_functions() {
    for f in [
        Unary::Gelu,
        Unary::GeluTanh,
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Silu,
        Unary::HardSwish,
        Unary::Erf,
        Unary::Exp,
        Unary::Neg,
    ] {
        check_nd(&[3, 4], 12, |b| {
            b.node("op", Op::Unary(f), &["x"]);
        });
    }
    // √ away from zero: of x² + 1.
    check_nd(&[3, 4], 12, |b| {
        b.node(
            "sq",
            Op::BinaryConst(BinaryConst {
                op: Binary::Pow,
                constant: ArrayD::from_elem(IxDyn(&[]), 2.0),
                constant_first: false,
            }),
            &["x"],
        )
        .node(
            "p1",
            Op::BinaryConst(BinaryConst {
                op: Binary::Add,
                constant: ArrayD::from_elem(IxDyn(&[]), 1.0),
                constant_first: false,
            }),
            &["sq"],
        )
        .node("op", Op::Unary(Unary::Sqrt), &["p1"]);
    });
}

#[test]
fn broadcasting_binary_ops_of_two_activations_and_a_constant() {
    let mean_over_rows = Op::Reduce {
        how: Reduction::Mean,
        axes: vec![1],
        keep_dims: false,
    };
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
        // [3, 4] with [4] (rank differs) and with [3, 1] (a stretched axis).
        check_nd(&[3, 4], 13, |b| {
            b.node("m", mean_over_rows.clone(), &["x"])
                .node("d", Op::Binary(Binary::Add), &["m", "m"])
                .node("op", Op::Binary(op), &["x", "d"]);
        });
        check_nd(&[3, 4], 14, |b| {
            b.linear("col", "x", 4, 1, true)
                .node("op", Op::Binary(op), &["col", "x"]);
        });
        for constant_first in [false, true] {
            check_nd(&[3, 4], 15, |b| {
                b.node(
                    "op",
                    Op::BinaryConst(BinaryConst {
                        op,
                        constant: ArrayD::from_shape_fn(IxDyn(&[3, 1]), |i| 0.5 + i[0] as f32),
                        constant_first,
                    }),
                    &["x"],
                );
            });
        }
    }
    // Pow of a positive base, both operands activations.
    check_nd(&[3, 4], 16, |b| {
        b.node("e", Op::Unary(Unary::Exp), &["x"])
            .node("op", Op::Binary(Binary::Pow), &["e", "x"]);
    });
}

#[test]
fn layer_norm_over_one_and_two_trailing_axes() {
    check_nd(&[3, 6], 17, |b| {
        let mut ln = LayerNorm::new(6);
        ln.gamma = ArrayD::from_shape_fn(IxDyn(&[6]), |i| 0.5 + 0.25 * i[0] as f32);
        ln.beta = ArrayD::from_shape_fn(IxDyn(&[6]), |i| 0.1 * i[0] as f32);
        b.node("op", Op::LayerNorm(ln), &["x"]);
    });
    check_nd(&[2, 3, 4], 18, |b| {
        let ln = LayerNorm {
            gamma: ArrayD::from_shape_fn(IxDyn(&[3, 4]), |i| 1.0 + 0.1 * (i[0] + i[1]) as f32),
            beta: ArrayD::zeros(IxDyn(&[3, 4])),
            eps: 1e-5,
        };
        b.node("op", Op::LayerNorm(ln), &["x"]);
    });
}

#[test]
fn softmax_over_any_axis_and_masked_by_an_additive_constant() {
    for axis in [1, 2, -1, -3] {
        check_nd(&[2, 3, 4], 19, |b| {
            b.node("op", Op::Softmax { axis }, &["x"]);
        });
    }
    // An attention-style mask: −10⁴ on masked keys before the softmax.
    check_nd(&[3, 4], 20, |b| {
        b.node(
            "masked",
            Op::BinaryConst(BinaryConst {
                op: Binary::Add,
                constant: ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.0, 0.0, -1e4, 0.0]).unwrap(),
                constant_first: false,
            }),
            &["x"],
        )
        .node("op", Op::Softmax { axis: -1 }, &["masked"]);
    });
}

#[test]
fn batched_matmul_with_broadcast_leading_axes() {
    // q · kᵀ per head: [2, 3, 4] @ [2, 4, 3].
    check_nd(&[2, 3, 4], 21, |b| {
        b.node(
            "kt",
            Op::Permute {
                axes: vec![0, 1, 3, 2],
            },
            &["x"],
        )
        .node("op", Op::MatMul, &["x", "kt"]);
    });
    // A right operand of fewer leading axes, broadcast over the heads: [2, 3, 4] @ [4, 5].
    check_nd(&[2, 3, 4], 22, |b| {
        b.node(
            "m",
            Op::Reduce {
                how: Reduction::Sum,
                axes: vec![1, 2],
                keep_dims: false,
            },
            &["x"],
        )
        .node("r", Op::Reshape { shape: vec![4, 1] }, &["m"])
        .linear("w", "r", 1, 5, true)
        .node("op", Op::MatMul, &["x", "w"]);
    });
}

#[test]
fn reshape_permute_and_reductions() {
    check_nd(&[2, 3, 4], 23, |b| {
        b.node(
            "op",
            Op::Reshape {
                shape: vec![0, -1, 2],
            },
            &["x"],
        );
    });
    check_nd(&[2, 3, 4], 24, |b| {
        b.node(
            "op",
            Op::Permute {
                axes: vec![0, 2, 1, 3],
            },
            &["x"],
        );
    });
    for how in [Reduction::Sum, Reduction::Mean] {
        for keep_dims in [false, true] {
            check_nd(&[2, 3, 4], 25, |b| {
                b.node(
                    "op",
                    Op::Reduce {
                        how,
                        axes: vec![-1, 1],
                        keep_dims,
                    },
                    &["x"],
                );
            });
        }
    }
}

#[test]
fn embedding_where_cast_and_unit_axes_with_integer_inputs() {
    // x [S, 4] floats and ids [S] integers of a dynamic length: the embedding of the ids
    // scales x, a mask built from the ids chooses between that and x itself, and the unit
    // axes go in and out again. Ids repeat, so a table row gathers several gradients.
    let mut b = GraphBuilder::new(8);
    b.typed_input("x", DType::F32, &[Dim::dynamic("seq", 5), Dim::Fixed(4)])
        .typed_input("ids", DType::I64, &[Dim::dynamic("seq", 5)])
        .embedding("emb", "ids", 6, 4)
        .node("prod", Op::Binary(Binary::Mul), &["x", "emb"])
        .node("mask", Op::Cast { to: DType::F32 }, &["ids"])
        .node("mask3", Op::Unsqueeze { axes: vec![-1] }, &["mask"])
        .node("pick", Op::Where, &["mask3", "prod", "x"])
        .node("wide", Op::Unsqueeze { axes: vec![1, 3] }, &["pick"])
        .node("op", Op::Squeeze { axes: vec![1, 3] }, &["wide"]);
    let g = b.build("op").unwrap();
    assert_eq!(g.shape(g.id("wide").unwrap()), [1, 5, 1, 4]);
    let mut rng = StdRng::seed_from_u64(21);
    for seq in [5, 3] {
        let x = away_from_zero(&[2, seq, 4], &mut rng);
        let ids = ArrayD::from_shape_simple_fn(IxDyn(&[2, seq]), || rng.random_range(0..6i64));
        let ints = [("ids", Value::I64(ids))];
        check_typed(&g, &x, &ints, Mode::Training, EPS);
    }
}

#[test]
fn where_broadcasts_a_float_condition_over_both_branches() {
    let mut b = GraphBuilder::new(9);
    // The condition, [3, 1] per sample, is a sum of squares (never zero) times 1, 0, 1: a
    // perturbation of x never flips it.
    let rows = ArrayD::from_shape_vec(IxDyn(&[3, 1]), vec![1.0, 0.0, 1.0]).unwrap();
    b.input("x", &[3, 4])
        .node("sq", Op::Binary(Binary::Mul), &["x", "x"])
        .node(
            "ss",
            Op::Reduce {
                how: Reduction::Sum,
                axes: vec![-1],
                keep_dims: true,
            },
            &["sq"],
        )
        .node(
            "cond",
            Op::BinaryConst(BinaryConst {
                op: Binary::Mul,
                constant: rows,
                constant_first: false,
            }),
            &["ss"],
        )
        .node("neg", Op::Unary(Unary::Neg), &["x"])
        .node("op", Op::Where, &["cond", "x", "neg"]);
    let g = b.build("op").unwrap();
    check(
        &g,
        &away_from_zero(&[2, 3, 4], &mut StdRng::seed_from_u64(4)),
        Mode::Training,
    );
}

#[test]
fn max_and_min_send_the_gradient_to_the_operand_taken() {
    for op in [Binary::Max, Binary::Min] {
        let mut b = GraphBuilder::new(2);
        b.input("x", &[3, 4])
            .node("neg", Op::Unary(Unary::Neg), &["x"])
            .node("op", Op::Binary(op), &["x", "neg"]);
        let g = b.build("op").unwrap();
        check(
            &g,
            &away_from_zero(&[2, 3, 4], &mut StdRng::seed_from_u64(6)),
            Mode::Training,
        );
    }
}

#[test]
fn fused_attention_with_a_broadcast_mask() {
    // q, k, v of width 6 (two heads of 3) over 4 positions; the additive mask ([1, 4] per
    // sample, broadcast over heads and query rows) is an activation too, so its gradient is
    // checked as well.
    let mut b = GraphBuilder::new(12);
    b.input("x", &[4, 6])
        .node("k", Op::Unary(Unary::Tanh), &["x"])
        .node("v", Op::Unary(Unary::Sigmoid), &["x"])
        .node(
            "m1",
            Op::Slice {
                axis: -1,
                start: 0,
                end: 1,
            },
            &["x"],
        )
        .node(
            "mask",
            Op::Permute {
                axes: vec![0, 2, 1],
            },
            &["m1"],
        )
        .node(
            "op",
            Op::Attention(Attention::new(2, 3)),
            &["x", "k", "v", "mask"],
        );
    let g = b.build("op").unwrap();
    check(
        &g,
        &away_from_zero(&[2, 4, 6], &mut StdRng::seed_from_u64(13)),
        Mode::Training,
    );
}

#[test]
fn causal_grouped_query_attention_with_a_mask() {
    // Four query heads of width 2 share two key/value heads (k, v of width 4); causal, with
    // an additive [1, 1, 5] mask per sample that is an activation (its gradient is checked).
    // Six keys for five queries: query i sees keys 0..=i + 1.
    let mut b = GraphBuilder::new(21);
    b.input("x", &[6, 8])
        .node(
            "q",
            Op::Slice {
                axis: 1,
                start: 1,
                end: 6,
            },
            &["x"],
        )
        .linear("k", "x", 8, 4, true)
        .node("kt", Op::Unary(Unary::Tanh), &["k"])
        .linear("v", "x", 8, 4, false)
        .node(
            "m1",
            Op::Slice {
                axis: -1,
                start: 0,
                end: 1,
            },
            &["x"],
        )
        .node(
            "mask",
            Op::Permute {
                axes: vec![0, 2, 1],
            },
            &["m1"],
        )
        .node(
            "op",
            Op::Attention(Attention::new(4, 2).with_kv_heads(2).causal()),
            &["q", "kt", "v", "mask"],
        );
    let g = b.build("op").unwrap();
    assert_eq!(g.output_shape(), &[5, 8]);
    check(
        &g,
        &away_from_zero(&[2, 6, 8], &mut StdRng::seed_from_u64(22)),
        Mode::Training,
    );
}

#[test]
fn rms_norm_with_a_learned_scale() {
    let mut norm = RmsNorm::new(6);
    norm.weight = ndarray::Array1::from_shape_fn(6, |i| 0.5 + 0.2 * i as f32);
    norm.eps = 1e-3;
    let g = single(&[3, 6], |b| {
        b.node("op", Op::RmsNorm(norm), &["x"]);
    });
    check(
        &g,
        &random(&[2, 3, 6], &mut StdRng::seed_from_u64(23)),
        Mode::Training,
    );
}

#[test]
fn rotary_embeddings_rotate_half_and_interleaved() {
    for interleaved in [false, true] {
        // Two heads of width 4 over 5 positions; a small base gives large angles.
        let mut rope = Rotary::new(4, 7.0);
        rope.interleaved = interleaved;
        let g = single(&[5, 8], |b| {
            b.linear("lin", "x", 8, 8, true)
                .node("op", Op::Rotary(rope), &["lin"]);
        });
        check(
            &g,
            &random(&[2, 5, 8], &mut StdRng::seed_from_u64(24)),
            Mode::Training,
        );
    }
}

#[test]
fn concat_along_any_axis() {
    // Parts of different sizes along the joined axis, the other axes equal.
    for (axis, a_shape, b_shape) in [(-1, [3, 2], [3, 4]), (1, [2, 4], [1, 4])] {
        let mut b = GraphBuilder::new(14);
        b.input("x", &[3, 4])
            .node(
                "a",
                Op::Slice {
                    axis: if axis == 1 { 1 } else { -1 },
                    start: 0,
                    end: a_shape[if axis == 1 { 0 } else { 1 }] as i64,
                },
                &["x"],
            )
            .node("t", Op::Unary(Unary::Tanh), &["x"])
            .node(
                "b",
                Op::Slice {
                    axis: if axis == 1 { 1 } else { -1 },
                    start: 0,
                    end: b_shape[if axis == 1 { 0 } else { 1 }] as i64,
                },
                &["t"],
            )
            .node("op", Op::ConcatAxis { axis }, &["a", "b", "x"]);
        let g = b.build("op").unwrap();
        let joined = if axis == 1 {
            [a_shape[0] + b_shape[0] + 3, 4]
        } else {
            [3, a_shape[1] + b_shape[1] + 4]
        };
        assert_eq!(g.output_shape(), joined);
        check(
            &g,
            &away_from_zero(&[2, 3, 4], &mut StdRng::seed_from_u64(15)),
            Mode::Training,
        );
    }
}
