//! Distillation: every loss's gradient against central finite differences, KD's fixed
//! points and temperature scaling, the distiller's errors, and KD on MNIST.

use ndarray::{ArrayD, IxDyn};
use nncompress::distiller::{AttentionTransfer, DistillationLoss, Distiller, FitNet, Fsp, LogitKd};
use nncompress::model::{zoo, Graph, GraphBuilder};
use nncompress::tensor::Tensor;
use nncompress::train::{evaluate, load_mnist, MnistSplit, Sgd, TrainConfig, Trainer};
use nncompress::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-scale..scale))
}

/// Central differences of `loss.compute(...).value` with respect to every student input and
/// every loss parameter, against the analytic gradients.
fn check(
    loss: &mut dyn DistillationLoss,
    student: &[Tensor],
    teacher: &[Tensor],
    labels: &[usize],
) {
    let eps = 1e-3f32;
    let s: Vec<&Tensor> = student.iter().collect();
    let t: Vec<&Tensor> = teacher.iter().collect();
    let out = loss.compute(&s, &t, labels).unwrap();
    let value = |loss: &dyn DistillationLoss, st: &[Tensor]| -> f64 {
        let s: Vec<&Tensor> = st.iter().collect();
        loss.compute(&s, &t, labels).unwrap().value as f64
    };
    let name = loss.name().to_string();
    let close = |num: f64, ana: f64, what: &str| {
        assert!(
            (num - ana).abs() <= 2e-3 + 3e-2 * ana.abs(),
            "{name}: {what}: finite difference {num:.6} vs analytic {ana:.6}"
        );
    };
    for (k, x) in student.iter().enumerate() {
        for i in (0..x.len()).step_by((x.len() / 20).max(1)) {
            let mut p = student.to_vec();
            let mut m = student.to_vec();
            p[k].as_slice_mut().unwrap()[i] += eps;
            m[k].as_slice_mut().unwrap()[i] -= eps;
            let num = (value(loss, &p) - value(loss, &m)) / (2.0 * eps as f64);
            close(
                num,
                out.student_grads[k].as_slice().unwrap()[i] as f64,
                &format!("input {k}[{i}]"),
            );
        }
    }
    let n_params = loss.params_mut().len();
    for k in 0..n_params {
        let len = loss.params_mut()[k].len();
        for i in (0..len).step_by((len / 10).max(1)) {
            let shift = |loss: &mut dyn DistillationLoss, d: f32| {
                let mut ps = loss.params_mut();
                let flat = ps[k].as_slice_mut().unwrap();
                flat[i] += d;
            };
            shift(loss, eps);
            let up = value(loss, student);
            shift(loss, -2.0 * eps);
            let down = value(loss, student);
            shift(loss, eps);
            let num = (up - down) / (2.0 * eps as f64);
            close(
                num,
                out.param_grads[k].as_slice().unwrap()[i] as f64,
                &format!("param {k}[{i}]"),
            );
        }
    }
}

#[test]
fn every_loss_gradient_matches_finite_differences() {
    let labels = [1usize, 0, 3, 2];
    let mut kd = LogitKd::new("s", "t", 3.0, 0.7).unwrap();
    check(
        &mut kd,
        &[random(&[4, 5], 1, 2.0)],
        &[random(&[4, 5], 2, 2.0)],
        &labels,
    );
    let mut kd1 = LogitKd::new("s", "t", 1.0, 1.0).unwrap();
    check(
        &mut kd1,
        &[random(&[4, 5], 3, 2.0)],
        &[random(&[4, 5], 4, 2.0)],
        &labels,
    );

    let mut hint = FitNet::with_regressor("s", "t", 3, 5, 7);
    check(
        &mut hint,
        &[random(&[2, 3, 4, 3], 5, 1.0)],
        &[random(&[2, 5, 4, 3], 6, 1.0)],
        &[],
    );
    let mut hint_fc = FitNet::with_regressor("s", "t", 6, 4, 8);
    check(
        &mut hint_fc,
        &[random(&[3, 6], 9, 1.0)],
        &[random(&[3, 4], 10, 1.0)],
        &[],
    );
    let mut same = FitNet::identity("s", "t");
    check(
        &mut same,
        &[random(&[2, 3, 4, 4], 11, 1.0)],
        &[random(&[2, 3, 4, 4], 12, 1.0)],
        &[],
    );

    let mut fsp = Fsp::new(("a", "b"), ("a", "b"));
    check(
        &mut fsp,
        &[
            random(&[2, 3, 4, 4], 13, 1.0),
            random(&[2, 2, 4, 4], 14, 1.0),
        ],
        &[
            random(&[2, 3, 4, 4], 15, 1.0),
            random(&[2, 2, 4, 4], 16, 1.0),
        ],
        &[],
    );

    let mut at = AttentionTransfer::new("s", "t", 5.0);
    check(
        &mut at,
        &[random(&[2, 3, 4, 4], 17, 1.0)],
        &[random(&[2, 6, 4, 4], 18, 1.0)],
        &[],
    );
}

#[test]
fn losses_called_directly_with_mismatched_shapes_return_errors() {
    let hint = FitNet::with_regressor("s", "t", 3, 5, 1);
    let r = hint.compute(
        &[&random(&[2, 3, 4, 4], 1, 1.0)],
        &[&random(&[2, 5, 3, 3], 2, 1.0)],
        &[],
    );
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })));
    let flat = ArrayD::zeros(IxDyn(&[4]));
    assert!(hint.compute(&[&flat], &[&flat], &[]).is_err());
    let fsp = Fsp::new(("a", "b"), ("a", "b"));
    let (sa, sb) = (random(&[2, 3, 4, 4], 3, 1.0), random(&[2, 2, 4, 4], 4, 1.0));
    let (ta, tb) = (random(&[2, 4, 4, 4], 5, 1.0), random(&[2, 2, 4, 4], 6, 1.0));
    assert!(fsp.compute(&[&sa, &sb], &[&ta, &tb], &[]).is_err());
    let other_size = random(&[2, 2, 3, 3], 10, 1.0);
    assert!(fsp.compute(&[&sa, &other_size], &[&sa, &sb], &[]).is_err());
    let at = AttentionTransfer::new("s", "t", 1.0);
    assert!(at
        .compute(&[&sa], &[&random(&[2, 3, 5, 5], 9, 1.0)], &[])
        .is_err());
    let kd = LogitKd::new("s", "t", 2.0, 0.5).unwrap();
    assert!(kd
        .compute(
            &[&random(&[2, 5], 7, 1.0)],
            &[&random(&[3, 5], 8, 1.0)],
            &[0, 1]
        )
        .is_err());
    assert!(kd
        .compute(
            &[&random(&[2, 5], 7, 1.0)],
            &[&random(&[2, 5], 8, 1.0)],
            &[0, 9]
        )
        .is_err());
}

#[test]
fn kd_is_zero_with_zero_gradient_when_the_student_matches_the_teacher() {
    let z = random(&[6, 10], 21, 3.0);
    let kd = LogitKd::new("s", "t", 4.0, 1.0).unwrap();
    let o = kd.compute(&[&z], &[&z], &[0; 6]).unwrap();
    assert!(o.value.abs() < 1e-6, "{}", o.value);
    assert!(o.student_grads[0].iter().all(|g| g.abs() < 1e-7));
}

#[test]
fn t_squared_keeps_the_soft_gradient_comparable_across_temperatures() {
    let (s, t) = (random(&[16, 10], 31, 3.0), random(&[16, 10], 32, 3.0));
    let norm = |temp: f32| {
        let o = LogitKd::new("s", "t", temp, 1.0)
            .unwrap()
            .compute(&[&s], &[&t], &[0; 16])
            .unwrap();
        o.student_grads[0]
            .iter()
            .map(|g| (*g as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (n2, n4, n8, n16) = (norm(2.0), norm(4.0), norm(8.0), norm(16.0));
    // With T² the norm settles as T grows (without it, it would fall as 1/T²: 64× from 2 to 16).
    for (a, b) in [(n2, n4), (n4, n8), (n8, n16)] {
        assert!((0.5..2.0).contains(&(a / b)), "{n2} {n4} {n8} {n16}");
    }
}

fn student_cnn(widths: [usize; 2], seed: u64) -> Graph {
    zoo::vgg_small([1, 12, 12], &widths, 4, seed).unwrap()
}

#[test]
fn bad_input_gives_typed_errors() {
    let teacher = student_cnn([8, 16], 1);
    let data = nncompress::train::InMemoryDataset::new(
        random(&[8, 1, 12, 12], 1, 1.0),
        vec![0, 1, 2, 3, 0, 1, 2, 3],
        4,
    )
    .unwrap();
    let cfg = TrainConfig::new(1, 4, 0);
    // Temperature, weights.
    assert!(matches!(
        LogitKd::new("a", "b", 0.0, 0.5),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        LogitKd::new("a", "b", -1.0, 0.5),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        LogitKd::new("a", "b", 2.0, 1.5),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Distiller::new(&teacher, cfg, Sgd::new(0.1)).with_loss(-1.0, FitNet::identity("a", "b")),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        Distiller::new(&teacher, cfg, Sgd::new(0.1)).with_hard_labels(f32::NAN),
        Err(Error::InvalidConfig { .. })
    ));
    // Unknown node names, on either side.
    let mut student = student_cnn([4, 8], 2);
    for (s, t) in [("nope", "classifier"), ("classifier", "nope")] {
        let mut d = Distiller::new(&teacher, cfg, Sgd::new(0.1))
            .with_loss(1.0, LogitKd::new(s, t, 2.0, 0.5).unwrap())
            .unwrap();
        assert!(matches!(
            d.fit(&mut student, &data),
            Err(Error::UnknownNode { .. })
        ));
    }
    // Paired layers of different shapes without a regressor; FSP / attention across sizes.
    let mut d = Distiller::new(&teacher, cfg, Sgd::new(0.1))
        .with_loss(1.0, FitNet::identity("features.1.relu", "features.1.relu"))
        .unwrap();
    assert!(matches!(
        d.fit(&mut student, &data),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut d = Distiller::new(&teacher, cfg, Sgd::new(0.1))
        .with_loss(
            1.0,
            AttentionTransfer::new("features.0.relu", "features.1.relu", 1.0),
        )
        .unwrap();
    assert!(matches!(
        d.fit(&mut student, &data),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut d = Distiller::new(&teacher, cfg, Sgd::new(0.1))
        .with_loss(
            1.0,
            Fsp::new(
                ("features.0.pool", "features.1.relu"),
                ("features.0.pool", "features.1.relu"),
            ),
        )
        .unwrap();
    assert!(matches!(
        d.fit(&mut student, &data),
        Err(Error::ShapeMismatch { .. })
    ));
    // No loss at all.
    let mut d = Distiller::new(&teacher, cfg, Sgd::new(0.1));
    assert!(matches!(
        d.fit(&mut student, &data),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn losses_on_intermediate_nodes_train_the_student_toward_the_teacher() {
    // A hint alone moves the student's guided layer toward the teacher's (through the
    // regressor), attention alone aligns the maps: the losses fall.
    let teacher = student_cnn([8, 16], 1);
    let x = random(&[64, 1, 12, 12], 5, 1.0);
    let data =
        nncompress::train::InMemoryDataset::new(x, (0..64).map(|i| i % 4).collect(), 4).unwrap();
    for loss in [
        Box::new(FitNet::with_regressor(
            "features.1.relu",
            "features.1.relu",
            8,
            16,
            3,
        )) as Box<dyn DistillationLoss>,
        Box::new(AttentionTransfer::new(
            "features.1.relu",
            "features.1.relu",
            10.0,
        )),
        Box::new(Fsp::new(
            ("features.0.pool", "features.1.relu"),
            ("features.0.pool", "features.1.relu"),
        )),
    ] {
        struct Boxed(Box<dyn DistillationLoss>);
        impl DistillationLoss for Boxed {
            fn name(&self) -> &str {
                self.0.name()
            }
            fn student_nodes(&self) -> Vec<String> {
                self.0.student_nodes()
            }
            fn teacher_nodes(&self) -> Vec<String> {
                self.0.teacher_nodes()
            }
            fn check(&self, s: &[&[usize]], t: &[&[usize]]) -> nncompress::Result<()> {
                self.0.check(s, t)
            }
            fn compute(
                &self,
                s: &[&Tensor],
                t: &[&Tensor],
                y: &[usize],
            ) -> nncompress::Result<nncompress::distiller::LossOutput> {
                self.0.compute(s, t, y)
            }
            fn params_mut(&mut self) -> Vec<ndarray::ArrayViewMutD<'_, f32>> {
                self.0.params_mut()
            }
        }
        let fsp = loss.name() == "FSP";
        let mut student = if fsp {
            student_cnn([8, 16], 9)
        } else {
            student_cnn([4, 8], 9)
        };
        let mut d = Distiller::new(
            &teacher,
            TrainConfig::new(8, 16, 1),
            Sgd::new(0.05).with_momentum(0.9),
        )
        .with_loss(1.0, Boxed(loss))
        .unwrap();
        let r = d.fit(&mut student, &data).unwrap();
        let (first, last) = (r.epochs[0].train_loss, r.epochs.last().unwrap().train_loss);
        assert!(
            last < 0.7 * first,
            "{}: {first} → {last}",
            d.losses().next().unwrap().name()
        );
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A 784-100-10 MLP.
fn small_mlp(seed: u64) -> Graph {
    let mut b = GraphBuilder::new(seed);
    b.input("input", &[1, 28, 28])
        .flatten("flatten", "input")
        .linear("fc1", "flatten", 784, 100, true)
        .relu("relu1", "fc1")
        .linear("fc2", "relu1", 100, 10, true);
    b.build("fc2").unwrap()
}

#[test]
fn kd_from_lenet5_cuts_a_small_students_errors_on_mnist() {
    let train = load_mnist(root().join("data/mnist"), MnistSplit::Train).unwrap();
    let test = load_mnist(root().join("data/mnist"), MnistSplit::Test).unwrap();
    let teacher = Graph::from_safetensors(
        root().join("tests/fixtures/lenet5.safetensors"),
        zoo::lenet5(0).unwrap(),
    )
    .unwrap();
    let subset = train.take(20_000);
    let cfg = TrainConfig::new(3, 64, 1);
    let mut alone = small_mlp(1);
    Trainer::new(cfg, Sgd::new(0.05).with_momentum(0.9))
        .fit(&mut alone, &subset, None)
        .unwrap();
    let mut taught = small_mlp(1);
    Distiller::new(&teacher, cfg, Sgd::new(0.05).with_momentum(0.9))
        .with_loss(1.0, LogitKd::new("fc2", "fc2", 4.0, 1.0).unwrap())
        .unwrap()
        .cache_teacher(true)
        .fit(&mut taught, &subset)
        .unwrap();
    let (a, k) = (
        evaluate(&alone, &test, 1000).unwrap().errors,
        evaluate(&taught, &test, 1000).unwrap().errors,
    );
    // Measured: 435 errors alone, 282 with KD (3 epochs on 20,000 images; the example's 10
    // epochs on all 60,000, mean of 3 seeds: 202.3 → 151.3).
    assert!((k as f64) < 0.85 * a as f64, "KD {k} errors vs alone {a}");
}

#[test]
fn any_graph_can_teach_a_pruned_or_fake_quantized_one_too() {
    use nncompress::pruner::{L1Norm, StructuredPruner};
    use nncompress::quantizer::{prepare_qat, QuantConfig};
    let train = load_mnist(root().join("data/mnist"), MnistSplit::Train)
        .unwrap()
        .take(2000);
    let lenet = Graph::from_safetensors(
        root().join("tests/fixtures/lenet5.safetensors"),
        zoo::lenet5(0).unwrap(),
    )
    .unwrap();
    // A fake-quantized LeNet-5 (its ranges seen on one batch) and a channel-pruned one.
    let mut qat = prepare_qat(&lenet, &QuantConfig::int8()).unwrap();
    let x = nncompress::train::Dataset::batch(&train, &(0..64).collect::<Vec<_>>())
        .unwrap()
        .0;
    qat.trace(
        &x,
        nncompress::model::Mode::Training,
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap();
    let (pruned, _) = StructuredPruner::new(L1Norm)
        .with_ratio(0.25)
        .unwrap()
        .prune(&lenet, None)
        .unwrap();
    for (teacher, out) in [(&qat, "fc2.fake_quant"), (&pruned, "fc2")] {
        let mut student = small_mlp(3);
        Distiller::new(
            teacher,
            TrainConfig::new(2, 64, 1),
            Sgd::new(0.05).with_momentum(0.9),
        )
        .with_loss(1.0, LogitKd::new("fc2", out, 4.0, 0.9).unwrap())
        .unwrap()
        .fit(&mut student, &train)
        .unwrap();
        assert!(evaluate(&student, &train, 500).unwrap().accuracy > 0.8);
    }
}
