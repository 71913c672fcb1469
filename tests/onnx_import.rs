//! The ONNX importer on models written here with the generated bindings: what it maps,
//! and the typed error of each malformed or hostile file (never a panic, never a graph
//! that computes something else). Mutations of a valid file (every truncation, bit flips)
//! check that decoding and import only ever return.

mod fetched;

use ndarray::{ArrayD, IxDyn};
use nncompress::onnx::{import, proto, tensor_to_proto, ImportOptions};
use nncompress::tensor::Value;
use nncompress::Error;
use prost::Message;

fn dim(v: i64) -> proto::tensor_shape_proto::Dimension {
    proto::tensor_shape_proto::Dimension {
        value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)),
        ..Default::default()
    }
}

fn value(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(proto::TensorShapeProto {
                        dim: dims.iter().map(|&d| dim(d)).collect(),
                    }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> proto::NodeProto {
    proto::NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn model(nodes: Vec<proto::NodeProto>, inits: Vec<proto::TensorProto>, out: &str) -> Vec<u8> {
    model_of(nodes, inits, value("x", &[2, 3, 4]), value(out, &[2, 3, 4]))
}

/// An opset-17 model of one input and one output.
fn model_of(
    nodes: Vec<proto::NodeProto>,
    inits: Vec<proto::TensorProto>,
    input: proto::ValueInfoProto,
    output: proto::ValueInfoProto,
) -> Vec<u8> {
    proto::ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(proto::GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![input],
            output: vec![output],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn x() -> Value {
    Value::F32(ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |d| {
        (d[0] * 12 + d[1] * 4 + d[2]) as f32 - 10.0
    }))
}

#[test]
fn a_constant_broadcasts_as_numpy_does() {
    // x [2, 3, 4] · c [1, 3, 1] (as long as x: leading axis 1), then + d [4] (shorter).
    let c = Value::F32(ArrayD::from_shape_vec(IxDyn(&[1, 3, 1]), vec![1.0, 2.0, 3.0]).unwrap());
    let d = Value::F32(ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.5, 0.0, -0.5, 1.0]).unwrap());
    let bytes = model(
        vec![node("Mul", &["x", "c"], "m"), node("Add", &["m", "d"], "y")],
        vec![tensor_to_proto("c", &c), tensor_to_proto("d", &d)],
        "y",
    );
    let g = import(&bytes, &ImportOptions::default()).unwrap();
    let xv = x();
    let y = g.run(&[("x", &xv)]).unwrap();
    let y = y[0].as_f32().unwrap();
    let xs = xv.as_f32().unwrap();
    for n in 0..2 {
        for ch in 0..3 {
            for w in 0..4 {
                let want = xs[[n, ch, w]] * (ch as f32 + 1.0) + [0.5, 0.0, -0.5, 1.0][w];
                assert_eq!(y[[n, ch, w]], want);
            }
        }
    }
    // A constant with a batch axis of its own cannot be a per-sample constant.
    let c2 = Value::F32(ArrayD::zeros(IxDyn(&[2, 3, 4])));
    let bytes = model(
        vec![node("Mul", &["x", "c"], "y")],
        vec![tensor_to_proto("c", &c2)],
        "y",
    );
    assert!(matches!(
        import(&bytes, &ImportOptions::default()),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn malformed_graphs_are_typed_errors() {
    let opts = ImportOptions::default();
    // An op the importer does not map: named with its node and opset.
    let bytes = model(vec![node("Hardmax", &["x"], "y")], vec![], "y");
    match import(&bytes, &opts) {
        Err(Error::Unsupported(m)) => {
            assert!(m.contains("Hardmax") && m.contains("opset 17"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // A node reading a value nobody produces, and a cycle (a node reading its own output or
    // a later one), are the same error: nothing earlier produces it.
    for nodes in [
        vec![node("Relu", &["nothing"], "y")],
        vec![node("Relu", &["y"], "y")],
        vec![node("Relu", &["z"], "y"), node("Relu", &["y"], "z")],
    ] {
        let bytes = model(nodes, vec![], "y");
        assert!(matches!(
            import(&bytes, &opts),
            Err(Error::CorruptFile { .. })
        ));
    }
    // A value produced twice, an output never produced, an attribute the mapping does not
    // read, a domain it does not know.
    let bytes = model(
        vec![node("Relu", &["x"], "y"), node("Relu", &["x"], "y")],
        vec![],
        "y",
    );
    assert!(matches!(
        import(&bytes, &opts),
        Err(Error::CorruptFile { .. })
    ));
    let bytes = model(vec![node("Relu", &["x"], "z")], vec![], "y");
    assert!(matches!(
        import(&bytes, &opts),
        Err(Error::CorruptFile { .. })
    ));
    let mut n = node("Relu", &["x"], "y");
    n.attribute.push(proto::AttributeProto {
        name: Some("alpha".into()),
        f: Some(0.1),
        ..Default::default()
    });
    assert!(matches!(
        import(&model(vec![n], vec![], "y"), &opts),
        Err(Error::Unsupported(_))
    ));
    let mut n = node("Relu", &["x"], "y");
    n.domain = Some("com.microsoft".into());
    assert!(matches!(
        import(&model(vec![n], vec![], "y"), &opts),
        Err(Error::Unsupported(_))
    ));
    // Not protobuf at all, and a model without a graph.
    assert!(matches!(
        import(b"\xff\xff\xff\xff", &opts),
        Err(Error::CorruptFile { .. })
    ));
    assert!(matches!(import(&[], &opts), Err(Error::CorruptFile { .. })));
}

#[test]
fn a_lying_initializer_is_refused_before_allocation() {
    let opts = ImportOptions::default();
    let mut t = tensor_to_proto("c", &Value::F32(ArrayD::zeros(IxDyn(&[4]))));
    t.dims = vec![1 << 31, 1 << 31, 1 << 31];
    let bytes = model(vec![node("Add", &["x", "c"], "y")], vec![t], "y");
    assert!(matches!(
        import(&bytes, &opts),
        Err(Error::LimitExceeded { .. })
    ));
    let mut t = tensor_to_proto("c", &Value::F32(ArrayD::zeros(IxDyn(&[4]))));
    t.dims = vec![5];
    let bytes = model(vec![node("Add", &["x", "c"], "y")], vec![t], "y");
    assert!(matches!(
        import(&bytes, &opts),
        Err(Error::CorruptFile { .. })
    ));
}

#[test]
fn folding_a_constant_to_a_lying_shape_is_a_typed_error() {
    // Reshape of an initializer to a target whose product overflows, then Add to x.
    let c = Value::F32(ArrayD::zeros(IxDyn(&[4])));
    let target = Value::I64(ndarray::arr1(&[1i64 << 40, 1 << 40, 1 << 40]).into_dyn());
    let bytes = model(
        vec![
            node("Reshape", &["c", "t"], "r"),
            node("Add", &["x", "r"], "y"),
        ],
        vec![tensor_to_proto("c", &c), tensor_to_proto("t", &target)],
        "y",
    );
    assert!(matches!(
        import(&bytes, &ImportOptions::default()),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn huge_axis_lists_and_dilations_are_typed_errors() {
    let opts = ImportOptions::default();
    // A million Unsqueeze axes (as an opset-11 attribute, on the activation and on a
    // constant): refused at once instead of building a value of a million axes.
    let axes = proto::AttributeProto {
        name: Some("axes".into()),
        ints: (0..1_000_000).collect(),
        r#type: Some(7),
        ..Default::default()
    };
    let c = Value::F32(ArrayD::zeros(IxDyn(&[4])));
    for input in ["x", "c"] {
        let mut n = node("Unsqueeze", &[input], "u");
        n.attribute.push(axes.clone());
        let mut m = proto::ModelProto::decode(
            model(
                vec![n, node("Add", &["x", "u"], "y")],
                vec![tensor_to_proto("c", &c)],
                "y",
            )
            .as_slice(),
        )
        .unwrap();
        m.opset_import[0].version = Some(11);
        let r = import(&m.encode_to_vec(), &opts);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{input}: {r:?}");
    }
    // A constant of 40 axes.
    let mut t = tensor_to_proto("c", &c);
    t.dims = vec![1; 40];
    t.dims[0] = 4;
    let bytes = model(vec![node("Add", &["x", "c"], "y")], vec![t], "y");
    assert!(matches!(import(&bytes, &opts), Err(Error::Unsupported(_))));
    // SAME padding from dilations near i64::MAX: refused (the span overflows, or the
    // padded size does, which the convolution geometry checks).
    let w = Value::F32(ArrayD::zeros(IxDyn(&[2, 3, 3, 3])));
    let mut n = node("Conv", &["x4", "w"], "y");
    n.attribute.push(proto::AttributeProto {
        name: Some("dilations".into()),
        ints: vec![i64::MAX, i64::MAX],
        r#type: Some(7),
        ..Default::default()
    });
    n.attribute.push(proto::AttributeProto {
        name: Some("auto_pad".into()),
        s: Some(b"SAME_UPPER".to_vec()),
        r#type: Some(3),
        ..Default::default()
    });
    let mut m =
        proto::ModelProto::decode(model(vec![n], vec![tensor_to_proto("w", &w)], "y").as_slice())
            .unwrap();
    let g = m.graph.as_mut().unwrap();
    g.input = vec![value("x4", &[1, 3, 8, 8])];
    let r = import(&m.encode_to_vec(), &opts);
    assert!(r.is_err(), "{r:?}");
    let w5 = Value::F32(ArrayD::zeros(IxDyn(&[2, 3, 5, 5])));
    m.graph.as_mut().unwrap().initializer = vec![tensor_to_proto("w", &w5)];
    let r = import(&m.encode_to_vec(), &opts);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}

#[test]
fn truncated_and_bit_flipped_files_only_ever_return() {
    let c = Value::F32(ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0, 2.0, 3.0, 4.0]).unwrap());
    let bytes = model(
        vec![node("Add", &["x", "c"], "a"), node("Softmax", &["a"], "y")],
        vec![tensor_to_proto("c", &c)],
        "y",
    );
    let opts = ImportOptions::default();
    assert!(import(&bytes, &opts).is_ok());
    let xv = x();
    let check = |b: &[u8]| {
        let r = std::panic::catch_unwind(|| {
            if let Ok(g) = import(b, &opts) {
                let _ = g.run(&[("x", &xv)]);
            }
        });
        assert!(r.is_ok(), "a mutated file panicked: {b:?}");
    };
    for len in 0..bytes.len() {
        check(&bytes[..len]);
    }
    for m in fetched::bit_flipped(&bytes, 0x9e37_79b9_7f4a_7c15u64, 4000) {
        check(&m);
    }
}

/// A model over `x` of shape [batch, seq, 4] (both symbolic), reading int64 initializers.
fn dynamic_model(nodes: Vec<proto::NodeProto>, inits: Vec<proto::TensorProto>) -> Vec<u8> {
    let symbolic = |name: &str, rank: usize| {
        let mut v = value(name, &vec![4; rank]);
        if let Some(proto::type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            let dims = &mut t.shape.as_mut().unwrap().dim;
            for (d, p) in dims.iter_mut().zip(["batch", "seq"]) {
                d.value = Some(proto::tensor_shape_proto::dimension::Value::DimParam(
                    p.into(),
                ));
            }
        }
        v
    };
    model_of(nodes, inits, symbolic("x", 3), symbolic("y", 3))
}

fn ints(name: &str, v: &[i64]) -> proto::TensorProto {
    tensor_to_proto(name, &Value::I64(ndarray::arr1(v).into_dyn()))
}

fn int_scalar(name: &str, v: i64) -> proto::TensorProto {
    tensor_to_proto(name, &Value::I64(ArrayD::from_elem(IxDyn(&[]), v)))
}

/// The shape sub-graph of a transformer export: Reshape(x, [B, S, 2, 2]) built from
/// `Shape → Gather → Unsqueeze → Concat`, then a sum over the last axis and back.
fn split_heads_nodes() -> Vec<proto::NodeProto> {
    vec![
        node("Shape", &["x"], "s"),
        node("Gather", &["s", "zero"], "b"),
        node("Gather", &["s", "one"], "n"),
        node("Unsqueeze", &["b", "axis0"], "bu"),
        node("Unsqueeze", &["n", "axis0"], "nu"),
        node("Concat", &["bu", "nu", "two", "two"], "target"),
        node("Reshape", &["x", "target"], "heads"),
        node("ReduceSum", &["heads", "last"], "summed"),
        node("Concat", &["summed", "summed"], "y"),
    ]
}

fn split_heads_inits() -> Vec<proto::TensorProto> {
    vec![
        int_scalar("zero", 0),
        int_scalar("one", 1),
        ints("axis0", &[0]),
        ints("two", &[2]),
        ints("last", &[-1]),
    ]
}

#[test]
fn shape_sub_graphs_fold_to_a_graph_that_runs_at_any_sequence_length() {
    let mut nodes = split_heads_nodes();
    nodes[5].attribute.push(proto::AttributeProto {
        name: Some("axis".into()),
        i: Some(0),
        r#type: Some(2),
        ..Default::default()
    });
    // ReduceSum keeps its axis by default: [B, S, 2, 1], concatenated along it.
    nodes[8].attribute.push(proto::AttributeProto {
        name: Some("axis".into()),
        i: Some(-1),
        r#type: Some(2),
        ..Default::default()
    });
    let graph = import(
        &dynamic_model(nodes, split_heads_inits()),
        &ImportOptions::default(),
    )
    .unwrap();
    for seq in [3, 5] {
        let x = ArrayD::from_shape_fn(IxDyn(&[2, seq, 4]), |d| {
            (d[0] * 100 + d[1] * 10 + d[2]) as f32
        });
        let y = graph.run(&[("x", &Value::F32(x.clone()))]).unwrap();
        let y = y[0].as_f32().unwrap();
        assert_eq!(y.shape(), &[2, seq, 2, 2]);
        for b in 0..2 {
            for s in 0..seq {
                for h in 0..2 {
                    let want = x[[b, s, 2 * h]] + x[[b, s, 2 * h + 1]];
                    assert_eq!(y[[b, s, h, 0]], want);
                    assert_eq!(y[[b, s, h, 1]], want);
                }
            }
        }
    }
}

#[test]
fn shape_arithmetic_the_crate_cannot_fold_is_a_typed_error() {
    let refused = |nodes: Vec<proto::NodeProto>, inits: Vec<proto::TensorProto>| match import(
        &dynamic_model(nodes, inits),
        &ImportOptions::default(),
    ) {
        Err(Error::Unsupported(m)) => m,
        other => panic!("expected Unsupported, got {other:?}"),
    };
    // An index past the shape vector.
    let m = refused(
        vec![
            node("Shape", &["x"], "s"),
            node("Gather", &["s", "seven"], "g"),
            node("Add", &["x", "x"], "y"),
        ],
        vec![int_scalar("seven", 7)],
    );
    assert!(m.contains("index 7"), "{m}");
    // A size derived from a symbol (seq · 2): the crate has no run-time op for it.
    let m = refused(
        vec![
            node("Shape", &["x"], "s"),
            node("Mul", &["s", "two"], "g"),
            node("Add", &["x", "x"], "y"),
        ],
        vec![ints("two", &[2])],
    );
    assert!(m.contains("Mul"), "{m}");
    // A shape value read as data.
    let mut cast = node("Cast", &["s"], "f");
    cast.attribute.push(proto::AttributeProto {
        name: Some("to".into()),
        i: Some(1),
        r#type: Some(2),
        ..Default::default()
    });
    let m = refused(
        vec![
            node("Shape", &["x"], "s"),
            cast,
            node("Add", &["x", "f"], "y"),
        ],
        vec![],
    );
    assert!(m.contains("run time"), "{m}");
    // A Range of 2^40 entries is stopped by the limits, not allocated.
    let got = import(
        &dynamic_model(
            vec![
                node("Range", &["zero", "huge", "one"], "r"),
                node("Add", &["x", "x"], "y"),
            ],
            vec![
                int_scalar("zero", 0),
                int_scalar("huge", 1 << 40),
                int_scalar("one", 1),
            ],
        ),
        &ImportOptions::default(),
    );
    assert!(matches!(got, Err(Error::LimitExceeded { .. })), "{got:?}");
    // A buffer sliced to the sequence length (batch 1) read by a reduction over the batch.
    let buffer = tensor_to_proto(
        "buffer",
        &Value::F32(ArrayD::from_shape_fn(IxDyn(&[1, 16]), |d| d[1] as f32)),
    );
    let m = refused(
        vec![
            node("Shape", &["x"], "s"),
            node("Gather", &["s", "one"], "n"),
            node("Unsqueeze", &["n", "axis0"], "nu"),
            node("Slice", &["buffer", "start", "nu", "axis1"], "positions"),
            node("ReduceSum", &["positions", "axis0"], "p"),
            node("Add", &["x", "x"], "y"),
        ],
        vec![
            buffer,
            int_scalar("one", 1),
            ints("axis0", &[0]),
            ints("axis1", &[1]),
            ints("start", &[0]),
        ],
    );
    assert!(m.contains("broadcast over the batch"), "{m}");
}

/// A pool node over a [1, 1, 6, 6] input with these attributes.
fn pool_model(op: &str, pads: &[i64], extra: Vec<proto::AttributeProto>) -> Vec<u8> {
    let ints = |name: &str, v: &[i64]| proto::AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(7),
        ..Default::default()
    };
    let mut n = node(op, &["x"], "y");
    n.attribute = vec![
        ints("kernel_shape", &[3, 3]),
        ints("strides", &[2, 2]),
        ints("pads", pads),
    ];
    n.attribute.extend(extra);
    model_of(
        vec![n],
        vec![],
        value("x", &[1, 1, 6, 6]),
        value("y", &[1, 1, 3, 3]),
    )
}

#[test]
fn pools_padded_at_the_end_or_excluding_their_padding_match_a_direct_reference() {
    let x = ArrayD::from_shape_fn(IxDyn(&[1, 1, 6, 6]), |d| {
        ((d[2] * 7 + d[3] * 3) % 11) as f32 - 5.0
    });
    // ONNX's definition, directly: windows of 3 with stride 2 from -pad_begin; padded cells
    // are skipped (a max ignores them, the average excludes them from its divisor).
    let reference = |max: bool, begin: usize, out: usize| {
        ArrayD::from_shape_fn(IxDyn(&[1, 1, out, out]), |d| {
            let mut cells = Vec::new();
            for i in 0..3 {
                for j in 0..3 {
                    let (r, c) = (
                        (d[2] * 2 + i) as isize - begin as isize,
                        (d[3] * 2 + j) as isize - begin as isize,
                    );
                    if (0..6).contains(&r) && (0..6).contains(&c) {
                        cells.push(x[[0, 0, r as usize, c as usize]]);
                    }
                }
            }
            if max {
                cells.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            } else {
                cells.iter().sum::<f32>() / cells.len() as f32
            }
        })
    };
    let xv = Value::F32(x.clone());
    for (op, pads, begin, max) in [
        ("MaxPool", [0i64, 0, 1, 1], 0, true),
        ("AveragePool", [0, 0, 1, 1], 0, false),
        ("AveragePool", [1, 1, 1, 1], 1, false),
    ] {
        let g = import(&pool_model(op, &pads, vec![]), &ImportOptions::default()).unwrap();
        let y = g.run(&[("x", &xv)]).unwrap();
        let want = reference(max, begin, 3);
        let got = y[0].as_f32().unwrap();
        assert_eq!(got.shape(), want.shape(), "{op} {pads:?}");
        for (a, b) in got.iter().zip(want.iter()) {
            assert!((a - b).abs() <= 1e-6, "{op} {pads:?}: {got} vs {want}");
        }
    }
    // End padding counted in an average's divisor is not what the pieces compute: refused.
    let counted = proto::AttributeProto {
        name: Some("count_include_pad".into()),
        i: Some(1),
        r#type: Some(2),
        ..Default::default()
    };
    let got = import(
        &pool_model("AveragePool", &[0, 0, 1, 1], vec![counted]),
        &ImportOptions::default(),
    );
    assert!(matches!(got, Err(Error::Unsupported(_))), "{got:?}");
}

#[test]
fn external_data_is_read_from_the_model_folder_and_never_outside_it() {
    use nncompress::onnx::{decode_model, import_file};
    let dir = std::env::temp_dir().join(format!("nncompress-external-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("model")).unwrap();
    let c = Value::F32(ArrayD::from_shape_fn(IxDyn(&[3, 4]), |d| {
        (d[0] * 4 + d[1]) as f32 * 0.5
    }));
    let bytes = model(
        vec![node("Add", &["x", "c"], "y")],
        vec![tensor_to_proto("c", &c)],
        "y",
    );
    let in_memory = import(&bytes, &ImportOptions::default()).unwrap();
    // The initializer's 48 bytes at offset 16 of a shared file, as onnx.save writes them.
    let mut m = decode_model(&bytes).unwrap();
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    let raw = t.raw_data.take().unwrap();
    let mut file = vec![0xAAu8; 16];
    file.extend_from_slice(&raw);
    std::fs::write(dir.join("model/weights.bin"), &file).unwrap();
    std::fs::write(dir.join("outside.bin"), &file).unwrap();
    t.data_location = Some(1);
    let entry = |k: &str, v: &str| proto::StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    let write = |location: &str, offset: &str, length: &str| {
        let mut m = m.clone();
        m.graph.as_mut().unwrap().initializer[0].external_data = vec![
            entry("location", location),
            entry("offset", offset),
            entry("length", length),
        ];
        let path = dir.join("model/model.onnx");
        std::fs::write(&path, m.encode_to_vec()).unwrap();
        import_file(&path, &ImportOptions::default())
    };
    let g = write("weights.bin", "16", "48").unwrap();
    let x = x();
    assert_eq!(
        g.run(&[("x", &x)]).unwrap()[0].as_f32().unwrap(),
        in_memory.run(&[("x", &x)]).unwrap()[0].as_f32().unwrap()
    );
    // The same bytes in memory, with no folder to read from, are refused.
    assert!(matches!(
        import(
            &std::fs::read(dir.join("model/model.onnx")).unwrap(),
            &ImportOptions::default()
        ),
        Err(Error::Unsupported(_))
    ));
    let corrupt = |r: nncompress::Result<nncompress::model::Graph>| {
        assert!(matches!(r, Err(Error::CorruptFile { .. })), "{r:?}");
    };
    corrupt(write("../outside.bin", "16", "48"));
    corrupt(write(dir.join("outside.bin").to_str().unwrap(), "16", "48"));
    corrupt(write("missing.bin", "16", "48"));
    corrupt(write("weights.bin", "16", "44"));
    corrupt(write("weights.bin", "40", "48"));
    corrupt(write("weights.bin", "18446744073709551615", "48"));
    corrupt(write("weights.bin", "-1", "48"));
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(dir.join("outside.bin"), dir.join("model/link.bin")).unwrap();
        corrupt(write("link.bin", "16", "48"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
