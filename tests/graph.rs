//! The graph IR: construction errors, shape checks, surgery, taps, costs.

use ndarray::ArrayD;
use nncompress::model::{zoo, Conv2dConfig, Graph, GraphBuilder, NodeSpec, Op, Pool2d};
use nncompress::Error;

#[test]
fn lenet5_has_the_caffe_shapes_and_parameter_count() {
    let g = zoo::lenet5(0).unwrap();
    let shape = |n: &str| g.shape(g.id(n).unwrap()).to_vec();
    assert_eq!(shape("conv1"), [20, 24, 24]);
    assert_eq!(shape("pool1"), [20, 12, 12]);
    assert_eq!(shape("conv2"), [50, 8, 8]);
    assert_eq!(shape("pool2"), [50, 4, 4]);
    assert_eq!(shape("flatten"), [800]);
    // 520 + 25,050 + 400,500 + 5,010
    assert_eq!(g.param_count(), 431_080);
    let macs: u64 = g.cost().iter().map(|c| c.macs).sum();
    // conv1 20·24·24·25 + conv2 50·8·8·500 + fc 800·500 + 500·10
    assert_eq!(macs, 288_000 + 1_600_000 + 400_000 + 5_000);
    assert_eq!(zoo::lenet_300_100(0).unwrap().param_count(), 266_610);
}

#[test]
fn unknown_input_is_an_error_naming_both_nodes() {
    let mut b = GraphBuilder::new(0);
    b.input("x", &[4]).linear("fc", "nope", 4, 2, true);
    match b.build("fc") {
        Err(Error::UnknownNode { node, input }) => {
            assert_eq!(node, "fc");
            assert_eq!(input, "nope");
        }
        other => panic!("expected UnknownNode, got {other:?}"),
    }
    let mut b = GraphBuilder::new(0);
    b.input("x", &[4]).relu("r", "x");
    assert!(matches!(b.build("missing"), Err(Error::UnknownNode { .. })));
}

#[test]
fn duplicate_names_cycles_and_input_count_are_errors() {
    let mut b = GraphBuilder::new(0);
    b.input("x", &[4]).relu("r", "x").relu("r", "x");
    assert!(matches!(b.build("r"), Err(Error::DuplicateNode(n)) if n == "r"));

    let specs = vec![
        NodeSpec::new("x", Op::input(&[4]), &[]),
        NodeSpec::new("a", Op::ReLU, &["b"]),
        NodeSpec::new("b", Op::ReLU, &["a"]),
        NodeSpec::new("c", Op::ReLU, &["x"]),
    ];
    match Graph::from_specs(specs, "c") {
        Err(Error::Cycle { nodes }) => assert_eq!(nodes, ["a", "b"]),
        other => panic!("expected Cycle, got {other:?}"),
    }

    let specs = vec![NodeSpec::new("r", Op::ReLU, &[])];
    assert!(matches!(
        Graph::from_specs(specs, "r"),
        Err(Error::InputCount { found: 0 })
    ));
}

#[test]
fn specs_out_of_order_are_sorted_topologically() {
    let specs = vec![
        NodeSpec::new("out", Op::Add, &["a", "b"]),
        NodeSpec::new("b", Op::ReLU6, &["x"]),
        NodeSpec::new("a", Op::ReLU, &["x"]),
        NodeSpec::new("x", Op::input(&[3]), &[]),
    ];
    let g = Graph::from_specs(specs, "out").unwrap();
    let order: Vec<&str> = g.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(order, ["x", "b", "a", "out"]);
    let y = g
        .forward(&ndarray::arr2(&[[-1.0f32, 2.0, 7.0]]).into_dyn())
        .unwrap();
    assert_eq!(y, ndarray::arr2(&[[0.0f32, 4.0, 13.0]]).into_dyn());
}

#[test]
fn mismatched_add_and_wrong_layer_sizes_are_shape_errors() {
    let mut b = GraphBuilder::new(0);
    b.input("x", &[3, 8, 8])
        .conv2d("a", "x", Conv2dConfig::new(3, 4, 3).with_padding(1))
        .conv2d("b", "x", Conv2dConfig::new(3, 4, 3))
        .add("sum", &["a", "b"]);
    match b.build("sum") {
        Err(Error::ShapeMismatch { op, node, got, .. }) => {
            assert_eq!(op, "add");
            assert_eq!(node.as_deref(), Some("sum"));
            assert_eq!(got, [4, 6, 6]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let mut b = GraphBuilder::new(0);
    b.input("x", &[5]).linear("fc", "x", 4, 2, true);
    assert!(matches!(b.build("fc"), Err(Error::ShapeMismatch { .. })));
    let mut b = GraphBuilder::new(0);
    b.input("x", &[3, 8, 8])
        .conv2d("c", "x", Conv2dConfig::new(3, 4, 3).with_groups(2));
    assert!(matches!(b.build("c"), Err(Error::InvalidConfig { .. })));
    let mut b = GraphBuilder::new(0);
    b.input("x", &[3, 4, 4])
        .conv2d("c", "x", Conv2dConfig::new(3, 4, 7));
    assert!(matches!(b.build("c"), Err(Error::InvalidConfig { .. })));
    let mut b = GraphBuilder::new(0);
    b.input("x", &[4]).dropout("d", "x", 1.0);
    assert!(matches!(b.build("d"), Err(Error::InvalidConfig { .. })));
    let mut b = GraphBuilder::new(0);
    b.input("x", &[4]).add("a", &["x"]);
    assert!(matches!(b.build("a"), Err(Error::Arity { .. })));
}

#[test]
fn wrong_input_shape_and_empty_batch_are_errors_not_panics() {
    let g = zoo::lenet5(0).unwrap();
    for shape in [vec![2, 1, 28, 27], vec![2, 784], vec![1, 3, 28, 28]] {
        match g.forward(&ArrayD::zeros(shape.clone())) {
            Err(Error::ShapeMismatch { got, expected, .. }) => {
                assert_eq!(got, shape);
                assert!(expected.contains("1, 28, 28"), "{expected}");
            }
            other => panic!("expected ShapeMismatch for {shape:?}, got {other:?}"),
        }
    }
    assert!(matches!(
        g.forward(&ArrayD::zeros(vec![0, 1, 28, 28])),
        Err(Error::Empty(_))
    ));
}

#[test]
fn taps_see_every_node_and_the_output_matches_forward() {
    let g = zoo::resnet_small([1, 8, 8], 4, 2, 5, 3).unwrap();
    let x = ArrayD::from_shape_fn(vec![2, 1, 8, 8], |d| {
        (d[2] * 8 + d[3]) as f32 / 64.0 - d[0] as f32
    });
    let mut seen = Vec::new();
    let y = g
        .forward_with(&x, &mut |id, node, out| {
            assert_eq!(&out.shape()[1..], g.shape(id), "{}", node.name);
            seen.push(node.name.clone());
        })
        .unwrap();
    assert_eq!(seen.len(), g.nodes().len());
    assert_eq!(y, g.forward(&x).unwrap());
    assert_eq!(y.shape(), [2, 5]);
}

#[test]
fn surgery_insert_replace_and_consumers() {
    let mut g = zoo::lenet5(0).unwrap();
    let pool1 = g.id("pool1").unwrap();
    assert_eq!(g.consumers(pool1), [g.id("conv2").unwrap()]);
    let x = ArrayD::from_shape_fn(vec![1, 1, 28, 28], |d| ((d[2] + d[3]) % 5) as f32);
    let before = g.forward(&x).unwrap();

    // A ReLU inserted after conv2 is consumed by pool2.
    g.insert_after("conv2", "conv2.relu", Op::ReLU).unwrap();
    let relu = g.id("conv2.relu").unwrap();
    assert_eq!(g.consumers(relu), [g.id("pool2").unwrap()]);
    assert_ne!(g.forward(&x).unwrap(), before);
    // Inserting after the output moves the output.
    g.insert_after("fc2", "probs", Op::Softmax { axis: 1 })
        .unwrap();
    assert_eq!(g.node(g.output_id()).name, "probs");

    // A replacement that breaks shapes is refused and leaves the graph as it was.
    let count = g.param_count();
    let bad = Op::MaxPool2d(Pool2d::new(30, 30));
    assert!(g.replace_op("pool1", bad).is_err());
    assert_eq!(g.param_count(), count);
    assert!(g.forward(&x).is_ok());
    // A shape-preserving replacement goes through.
    let old = g.replace_op("conv2.relu", Op::ReLU6).unwrap();
    assert!(matches!(old, Op::ReLU));
}

#[test]
fn params_are_visited_with_pytorch_names() {
    let g = zoo::vgg_small([1, 16, 16], &[8, 16], 10, 0).unwrap();
    let mut names = Vec::new();
    g.visit_params(|n, _, _| names.push(n.to_string()));
    assert_eq!(
        names,
        [
            "features.0.conv.weight",
            "features.0.bn.weight",
            "features.0.bn.bias",
            "features.0.bn.running_mean",
            "features.0.bn.running_var",
            "features.1.conv.weight",
            "features.1.bn.weight",
            "features.1.bn.bias",
            "features.1.bn.running_mean",
            "features.1.bn.running_var",
            "classifier.weight",
            "classifier.bias",
        ]
    );
    let mut g2 = g.clone();
    g2.map_params(|_, _, mut p| p.fill(0.0));
    let mut all_zero = true;
    g2.visit_params(|_, _, p| all_zero &= p.iter().all(|&v| v == 0.0));
    assert!(all_zero);
}

#[test]
fn same_seed_same_initial_weights_bit_for_bit() {
    let bits = |g: &Graph| {
        let mut v = Vec::new();
        g.visit_params(|_, _, p| v.extend(p.iter().map(|x| x.to_bits())));
        v
    };
    assert_eq!(
        bits(&zoo::lenet5(42).unwrap()),
        bits(&zoo::lenet5(42).unwrap())
    );
    assert_ne!(
        bits(&zoo::lenet5(42).unwrap()),
        bits(&zoo::lenet5(43).unwrap())
    );
}

#[test]
fn summary_lists_every_node_and_totals() {
    let s = zoo::lenet_300_100(0).unwrap().summary();
    assert!(s.contains("fc1"));
    assert!(s.lines().last().unwrap().contains("266610"));
}

#[test]
fn inference_matches_the_traced_pass_bit_for_bit_and_sees_weight_edits() {
    // Inference keeps packed Linear weights and runs convolutions image by image; the
    // traced (training) pass does neither. Both must give the same bits, and an edit of the
    // weights after an inference call must reach the next one (the packed copy is dropped).
    use nncompress::model::Mode;
    use rand::SeedableRng;
    for mut net in [zoo::lenet5(3).unwrap(), zoo::lenet_300_100(3).unwrap()] {
        let x = ndarray::ArrayD::from_shape_fn(vec![5, 1, 28, 28], |d| {
            ((d[0] * 31 + d[2] * 7 + d[3]) % 17) as f32 / 17.0 - 0.3
        });
        let before = net.forward(&x).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let traced = net.trace(&x, Mode::Inference, &mut rng).unwrap();
        let out = traced.value(net.output_id()).clone();
        assert!(before
            .iter()
            .zip(out.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        net.map_params(|name, _, mut v| {
            if name.ends_with(".bias") {
                v.mapv_inplace(|b| b + 1.0);
            }
        });
        let after = net.forward(&x).unwrap();
        let traced = net.trace(&x, Mode::Inference, &mut rng).unwrap();
        let out = traced.value(net.output_id()).clone();
        assert!(after
            .iter()
            .zip(out.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(after.iter().zip(before.iter()).any(|(a, b)| a != b));
    }
}

/// Float and int8 inference give the same bits on 1, 2 and 3 threads, at batch 64 and 1
/// (the work splits differently; every output is still computed by one task with the same
/// operations).
#[test]
fn inference_is_bit_identical_at_any_thread_count() {
    use nncompress::quantizer::{QuantConfig, Quantizer};
    let net = zoo::lenet5(7).unwrap();
    let x = ArrayD::from_shape_fn(vec![64, 1, 28, 28], |d| {
        ((d[0] * 31 + d[2] * 7 + d[3] * 3) % 97) as f32 / 97.0
    });
    let int8 = Quantizer::new(QuantConfig::int8())
        .calibrate(&net, std::slice::from_ref(&x))
        .unwrap();
    let dynamic = Quantizer::new(QuantConfig::dynamic_int8())
        .calibrate(&net, std::slice::from_ref(&x))
        .unwrap();
    // Batch 64 splits by images, batch 1 splits inside a layer.
    for x in [
        x.clone(),
        x.slice(ndarray::s![..1, .., .., ..]).to_owned().into_dyn(),
    ] {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                (
                    net.forward(&x).unwrap(),
                    int8.forward(&x).unwrap(),
                    dynamic.forward(&x).unwrap(),
                )
            })
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(
                run(threads) == one,
                "{threads} threads, batch {}",
                x.shape()[0]
            );
        }
    }
}

/// Inference reads its input in place, reshapes it as a view and reuses a buffer once its
/// last reader runs. None of that may change a value another node still reads: on a graph
/// where the input, a flattened view of it and ReLU outputs each feed several nodes, the
/// inference pass gives the traced pass's bits, for a standard and a transposed input.
#[test]
fn buffer_reuse_never_changes_a_value_still_read() {
    use nncompress::model::Mode;
    use rand::SeedableRng;
    let mut b = GraphBuilder::new(4);
    b.input("x", &[2, 3, 4])
        .relu("r0", "x")
        .flatten("f_x", "x")
        .flatten("f_r0", "r0")
        .relu("r1", "f_x")
        .linear("l1", "f_x", 24, 24, true)
        .relu("r2", "l1")
        .add("sum", &["r1", "f_r0", "r2", "l1"])
        .flatten("out", "sum");
    let net = b.build("out").unwrap();
    let standard = ArrayD::from_shape_fn(vec![3, 2, 3, 4], |d| {
        ((d[0] * 29 + d[1] * 11 + d[2] * 5 + d[3]) % 13) as f32 / 6.0 - 1.0
    });
    let mut transposed = ArrayD::zeros(vec![4, 3, 2, 3]);
    transposed.assign(&standard.view().permuted_axes(vec![3, 2, 1, 0]));
    let transposed = transposed.permuted_axes(vec![3, 2, 1, 0]);
    assert!(!transposed.is_standard_layout());
    assert_eq!(transposed, standard);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut net_for_trace = net.clone();
    let traced = net_for_trace
        .trace(&standard, Mode::Inference, &mut rng)
        .unwrap();
    let want = traced.value(net.output_id());
    for x in [&standard, &transposed] {
        let got = net.forward(x).unwrap();
        assert_eq!(got.shape(), want.shape());
        assert!(got
            .iter()
            .zip(want.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut tapped = Vec::new();
        let with_taps = net
            .forward_with(x, &mut |id, _, v| tapped.push((id, v.clone())))
            .unwrap();
        assert_eq!(with_taps, got);
        for (id, v) in tapped {
            assert_eq!(&v, traced.value(id), "{}", net.node(id).name);
        }
    }
    // A graph whose output is a view of its input still returns an owned tensor.
    let mut b = GraphBuilder::new(0);
    b.input("x", &[2, 3, 4]).flatten("f", "x");
    let flat = b.build("f").unwrap().forward(&standard).unwrap();
    assert_eq!(flat.shape(), [3, 24]);
    assert_eq!(flat.as_slice().unwrap(), standard.as_slice().unwrap());
}

/// The dynamic-range pass reads its input in place and flattens it as a view: a transposed
/// (non-standard) input, which has to be copied instead, gives the same bits.
#[test]
fn dynamic_inference_reads_its_input_in_place_and_agrees_with_a_copy() {
    use nncompress::quantizer::{QuantConfig, Quantizer};
    let net = zoo::lenet_300_100(5).unwrap();
    let standard = ArrayD::from_shape_fn(vec![7, 1, 28, 28], |d| {
        ((d[0] * 13 + d[2] * 5 + d[3] * 3) % 29) as f32 / 29.0
    });
    let dynamic = Quantizer::new(QuantConfig::dynamic_int8())
        .calibrate(&net, std::slice::from_ref(&standard))
        .unwrap();
    let mut transposed = ArrayD::zeros(vec![28, 28, 1, 7]);
    transposed.assign(&standard.view().permuted_axes(vec![3, 2, 1, 0]));
    let transposed = transposed.permuted_axes(vec![3, 2, 1, 0]);
    assert!(!transposed.is_standard_layout());
    let want = dynamic.forward(&standard).unwrap();
    assert_eq!(dynamic.forward(&transposed).unwrap(), want);
    assert_eq!(transposed, standard);
    // A non-finite input is refused before anything runs, by every non-integer body.
    let float16 = Quantizer::new(QuantConfig::float16())
        .calibrate(&net, std::slice::from_ref(&standard))
        .unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = standard.clone();
        x[[3, 0, 5, 5]] = bad;
        for model in [&dynamic, &float16] {
            assert!(
                matches!(model.forward(&x), Err(Error::NonFinite(_))),
                "{bad}"
            );
        }
    }
}

#[test]
fn a_zeroed_builder_draws_nothing_and_a_seeded_one_is_reproducible() {
    let build = |mut b: GraphBuilder| {
        b.input("x", &[1, 4, 4])
            .conv2d("c", "x", nncompress::model::Conv2dConfig::new(1, 2, 3))
            .flatten("f", "c")
            .linear("fc", "f", 8, 3, true);
        b.build("fc").unwrap()
    };
    let zero = build(GraphBuilder::zeroed());
    zero.visit_params(|name, _, v| assert!(v.iter().all(|&x| x == 0.0), "{name}"));
    let (a, b) = (build(GraphBuilder::new(5)), build(GraphBuilder::new(5)));
    let mut values = Vec::new();
    a.visit_params(|_, _, v| values.extend(v.iter().copied()));
    let mut again = Vec::new();
    b.visit_params(|_, _, v| again.extend(v.iter().copied()));
    assert_eq!(values, again);
    assert!(values.iter().any(|&x| x != 0.0));
}
