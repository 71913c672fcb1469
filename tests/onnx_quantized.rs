//! A LeNet-5 quantized by ONNX Runtime's own `quantize_static` (per-channel int8 weights,
//! uint8 activations, in QDQ and in operator-oriented form; `scripts/ort_quantize_lenet.py`)
//! imports with `onnx::import_qdq` onto the crate's int8 kernels and classifies the MNIST
//! test set as ORT does. Needs the venv's onnxruntime (`scripts/fetch_onnx_testdata.sh`): skipped
//! loudly without it, failed under `CI`.

mod fetched;

use nncompress::model::{zoo, Graph};
use nncompress::onnx::{export, import_qdq, ImportOptions};
use nncompress::train::{argmax_rows, load_mnist, Dataset, MnistSplit};
use std::path::Path;

fn raw(t: &ndarray::ArrayD<f32>) -> Vec<u8> {
    t.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes the float LeNet-5, its calibration and test images to `dir`, has ORT quantize it
/// (QDQ and operator-oriented), and returns the test images and labels.
fn ort_quantized(py: &Path, dir: &Path) -> (ndarray::ArrayD<f32>, Vec<usize>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir).unwrap();
    let net = Graph::from_safetensors(
        root.join("tests/fixtures/lenet5.safetensors"),
        zoo::lenet5(0).unwrap(),
    )
    .unwrap();
    let train = load_mnist(root.join("data/mnist"), MnistSplit::Train).unwrap();
    let test = load_mnist(root.join("data/mnist"), MnistSplit::Test).unwrap();
    let (calib, _) = train.batch(&(0..512).collect::<Vec<_>>()).unwrap();
    let (images, labels) = test.batch(&(0..test.len()).collect::<Vec<_>>()).unwrap();
    std::fs::write(dir.join("float.onnx"), export(&net).unwrap()).unwrap();
    std::fs::write(dir.join("calib.f32"), raw(&calib)).unwrap();
    std::fs::write(dir.join("test.f32"), raw(&images)).unwrap();
    let as_u8: Vec<u8> = labels.iter().map(|&c| c as u8).collect();
    std::fs::write(dir.join("test_labels.u8"), as_u8).unwrap();
    let out = std::process::Command::new(py)
        .arg(root.join("scripts/ort_quantize_lenet.py"))
        .arg(dir)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "ORT quantization failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (images, labels)
}

#[test]
fn an_ort_quantized_lenet5_runs_on_the_crate_int8_kernels_as_ort_runs_it() {
    let Some(py) = fetched::python_with("onnxruntime.quantization") else {
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/onnx-ort-qdq");
    let (images, labels) = ort_quantized(&py, &dir);
    for stem in ["ort_qdq", "ort_qop"] {
        let bytes = std::fs::read(dir.join(format!("{stem}.onnx"))).unwrap();
        let q = import_qdq(&bytes, &ImportOptions::default()).unwrap();
        println!("{}", q.report_table());
        let theirs: Vec<usize> = std::fs::read(dir.join(format!("{stem}_pred.u8")))
            .unwrap()
            .into_iter()
            .map(usize::from)
            .collect();
        let ours = argmax_rows(&q.forward(&images).unwrap()).unwrap();
        let n = labels.len() as f64;
        let accuracy =
            |p: &[usize]| p.iter().zip(&labels).filter(|(a, b)| a == b).count() as f64 / n;
        let agree = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count() as f64 / n;
        println!(
            "{stem}: crate int8 {:.2} %, ORT {:.2} %, argmax agreement {:.2} %",
            100.0 * accuracy(&ours),
            100.0 * accuracy(&theirs),
            100.0 * agree
        );
        assert!(
            (accuracy(&ours) - accuracy(&theirs)).abs() <= 0.0005,
            "{stem}"
        );
        assert!(agree >= 0.999, "{stem}: agreement {agree}");
    }
}

/// The crate's own QDQ export of the LeNet-5 fixture (calibrated on 512 training images)
/// and the model it came from.
fn crate_qdq(
    config: nncompress::quantizer::QuantConfig,
) -> (
    Vec<u8>,
    nncompress::quantizer::QuantizedModel,
    ndarray::ArrayD<f32>,
) {
    use nncompress::quantizer::Quantizer;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let net = Graph::from_safetensors(
        root.join("tests/fixtures/lenet5.safetensors"),
        zoo::lenet5(0).unwrap(),
    )
    .unwrap();
    let train = load_mnist(root.join("data/mnist"), MnistSplit::Train).unwrap();
    let calib: Vec<_> = (0..8)
        .map(|b| {
            train
                .batch(&(b * 64..(b + 1) * 64).collect::<Vec<_>>())
                .unwrap()
                .0
        })
        .collect();
    let q = Quantizer::new(config).calibrate(&net, &calib).unwrap();
    let (x, _) = train.batch(&(1000..1256).collect::<Vec<_>>()).unwrap();
    (nncompress::onnx::export_qdq(&q).unwrap(), q, x)
}

#[test]
fn the_crate_qdq_export_imports_back_to_the_same_integer_model() {
    use nncompress::quantizer::{QuantConfig, QuantDtype, QuantScheme};
    let int4 = QuantScheme::int8_weights().with_dtype(QuantDtype::Int4);
    for config in [
        QuantConfig::int8(),
        QuantConfig::int8().with_layer_weights("fc1", int4),
    ] {
        let (bytes, q, x) = crate_qdq(config);
        let back = import_qdq(&bytes, &ImportOptions::default()).unwrap();
        let (a, b) = (q.forward(&x).unwrap(), back.forward(&x).unwrap());
        let worst = a
            .iter()
            .zip(b.iter())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        // Same integers, same scales: the outputs agree to the last bit or nearly (a bias
        // rescaled through f32 may move one accumulator unit).
        assert!(worst <= 1e-3, "max |Δ| {worst}");
        assert_eq!(argmax_rows(&a).unwrap(), argmax_rows(&b).unwrap());
        // int4 layers come back as int4 (half the bytes).
        assert_eq!(q.stored_bytes(), back.stored_bytes());
    }
}

#[test]
fn hostile_qdq_files_are_typed_errors() {
    use nncompress::onnx::{decode_model, proto};
    use nncompress::Error;
    use prost::Message;
    let (bytes, _, _) = crate_qdq(nncompress::quantizer::QuantConfig::int8());
    let model = decode_model(&bytes).unwrap();
    let edit = |f: &dyn Fn(&mut proto::GraphProto)| {
        let mut m = model.clone();
        f(m.graph.as_mut().unwrap());
        import_qdq(&m.encode_to_vec(), &ImportOptions::default())
    };
    let init = |g: &mut proto::GraphProto, suffix: &str| -> usize {
        g.initializer
            .iter()
            .position(|t| t.name.as_deref().unwrap_or("").ends_with(suffix))
            .unwrap()
    };
    // int8 activations (a zero point of type int8): the integer model's are u8.
    let got = edit(&|g| {
        let k = init(g, "input/dq/zero");
        g.initializer[k].data_type = Some(3);
    });
    assert!(matches!(got, Err(Error::Unsupported(_))), "{got:?}");
    // A zero scale.
    let got = edit(&|g| {
        let k = init(g, "input/dq/scale");
        g.initializer[k].raw_data = Some(0f32.to_le_bytes().to_vec());
    });
    assert!(matches!(got, Err(Error::CorruptFile { .. })), "{got:?}");
    // Weight bytes fewer than the dims say.
    let got = edit(&|g| {
        let k = init(g, "conv1.weight/q");
        g.initializer[k].raw_data.as_mut().unwrap().truncate(7);
    });
    assert!(matches!(got, Err(Error::CorruptFile { .. })), "{got:?}");
    // A weight zero point that is not 0.
    let got = edit(&|g| {
        let k = init(g, "conv1.weight/zero");
        g.initializer[k].raw_data.as_mut().unwrap()[0] = 3;
    });
    assert!(matches!(got, Err(Error::Unsupported(_))), "{got:?}");
    // Per-channel scales along an axis of another length.
    let got = edit(&|g| {
        let n = g
            .node
            .iter_mut()
            .find(|n| n.name.as_deref() == Some("conv1.weight/dequantize"))
            .unwrap();
        n.attribute[0].i = Some(1);
    });
    assert!(matches!(got, Err(Error::CorruptFile { .. })), "{got:?}");
    // A dequantize with other parameters than its quantize.
    let got = edit(&|g| {
        let n = g
            .node
            .iter_mut()
            .find(|n| n.name.as_deref() == Some("input/dq/dequantize"))
            .unwrap();
        n.input[1] = "conv1/dq/scale".into();
    });
    assert!(matches!(got, Err(Error::Unsupported(_))), "{got:?}");
    // A layer reading the quantized bytes themselves.
    let got = edit(&|g| {
        let n = g
            .node
            .iter_mut()
            .find(|n| n.op_type.as_deref() == Some("Conv"))
            .unwrap();
        n.input[0] = "input/dq/q".into();
    });
    assert!(matches!(got, Err(Error::Unsupported(_))), "{got:?}");
    // 400 truncations and 600 three-bit flips only ever return.
    for cut in (0..bytes.len()).step_by(bytes.len() / 400) {
        let r = std::panic::catch_unwind(|| import_qdq(&bytes[..cut], &ImportOptions::default()));
        assert!(r.is_ok(), "panicked at truncation {cut}");
    }
    let mut state = 0x9e37_79b9u32;
    for _ in 0..600 {
        let mut m = bytes.clone();
        for _ in 0..3 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let at = (state as usize >> 3) % m.len();
            m[at] ^= 1 << (state % 8);
        }
        let r = std::panic::catch_unwind(|| import_qdq(&m, &ImportOptions::default()));
        assert!(r.is_ok(), "a bit-flipped file panicked");
    }
}

#[test]
fn operator_oriented_ops_without_a_qdq_form_are_refused_by_name() {
    use nncompress::onnx::proto;
    use nncompress::tensor::Value;
    use nncompress::Error;
    use prost::Message;
    let raw = |name: &str, dtype: i32, dims: &[i64], bytes: Vec<u8>| proto::TensorProto {
        name: Some(name.into()),
        data_type: Some(dtype),
        dims: dims.to_vec(),
        raw_data: Some(bytes),
        ..Default::default()
    };
    let f32s = |name: &str, v: &[f32]| {
        nncompress::onnx::tensor_to_proto(
            name,
            &Value::F32(ndarray::Array1::from(v.to_vec()).into_dyn()),
        )
    };
    let node = |op: &str, domain: &str, ins: &[&str], out: &str| proto::NodeProto {
        op_type: Some(op.into()),
        domain: Some(domain.into()),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        ..Default::default()
    };
    let value = |name: &str| proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(proto::TensorShapeProto {
                        dim: [1, 1, 4, 4]
                            .iter()
                            .map(|&d| proto::tensor_shape_proto::Dimension {
                                value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(
                                    d,
                                )),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    // x → QuantizeLinear → QLinearConv (1×1) → `middle` on uint8 → DequantizeLinear → y.
    let with_middle = |middle: proto::NodeProto| {
        proto::ModelProto {
            ir_version: Some(8),
            opset_import: vec![proto::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(proto::GraphProto {
                node: vec![
                    node("QuantizeLinear", "", &["x", "s", "z"], "xq"),
                    node(
                        "QLinearConv",
                        "",
                        &["xq", "s", "z", "w", "ws", "wz", "s", "z"],
                        "cq",
                    ),
                    middle,
                    node("DequantizeLinear", "", &["mq", "s", "z"], "y"),
                ],
                initializer: vec![
                    f32s("s", &[0.1]),
                    raw("z", 2, &[], vec![128]),
                    raw("w", 3, &[1, 1, 1, 1], vec![64]),
                    f32s("ws", &[0.01]),
                    raw("wz", 3, &[1], vec![0]),
                ],
                input: vec![value("x")],
                output: vec![value("y")],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    // A layout op on uint8 is read; a Relu or a com.microsoft op on uint8 is not.
    let ok = with_middle(node("Identity", "", &["cq"], "mq"));
    assert!(import_qdq(&ok, &ImportOptions::default()).is_ok());
    for (middle, name) in [
        (node("Relu", "", &["cq"], "mq"), "Relu"),
        (
            node(
                "QLinearAdd",
                "com.microsoft",
                &["cq", "s", "z", "cq", "s", "z", "s", "z"],
                "mq",
            ),
            "QLinearAdd",
        ),
    ] {
        match import_qdq(&with_middle(middle), &ImportOptions::default()) {
            Err(Error::Unsupported(m)) => assert!(m.contains(name), "{m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}
