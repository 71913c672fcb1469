//! `onnx::export` then `onnx::import` gives back every zoo CNN / MLP: the same parameters
//! (names and values) and bit-identical outputs; ops without an ONNX form are typed errors.
//! The exports also pass `onnx.checker` and run in ONNX Runtime within 1e-4 of the crate
//! (`scripts/onnx_export_check.py`, called here with the venv's Python).

mod fetched;

use ndarray::{ArrayD, IxDyn};
use nncompress::model::{zoo, Graph, GraphBuilder, Op, ParamKind};
use nncompress::onnx::{export, import, ImportOptions};
use std::collections::BTreeMap;

fn params(g: &Graph) -> BTreeMap<String, Vec<u32>> {
    let mut out = BTreeMap::new();
    g.visit_params(|name, kind, v| {
        let kind = match kind {
            ParamKind::Weight => "weight",
            ParamKind::Bias => "bias",
            ParamKind::RunningMean => "running_mean",
            ParamKind::RunningVar => "running_var",
            _ => "other",
        };
        out.insert(
            format!("{name}.{kind}"),
            v.iter().map(|x| x.to_bits()).collect(),
        );
    });
    out
}

fn input(shape: &[usize], batch: usize) -> ArrayD<f32> {
    let mut full = vec![batch];
    full.extend_from_slice(shape);
    let mut x = ArrayD::<f32>::zeros(IxDyn(&full));
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
    }
    x
}

fn zoo_models() -> Vec<(&'static str, Graph)> {
    vec![
        ("lenet_300_100", zoo::lenet_300_100(1).unwrap()),
        ("lenet5", zoo::lenet5(2).unwrap()),
        ("digits_cnn", zoo::digits_cnn(3).unwrap()),
        (
            "vgg_small",
            zoo::vgg_small([3, 16, 16], &[8, 16], 10, 4).unwrap(),
        ),
        (
            "resnet_small",
            zoo::resnet_small([3, 16, 16], 8, 2, 10, 5).unwrap(),
        ),
    ]
}

#[test]
fn every_zoo_model_round_trips_bit_for_bit() {
    for (name, g) in zoo_models() {
        let bytes = export(&g).unwrap();
        let back = import(&bytes, &ImportOptions::default()).unwrap();
        assert_eq!(params(&g), params(&back), "{name}: parameters differ");
        let x = input(g.input_shape(), 3);
        let (a, b) = (g.forward(&x).unwrap(), back.forward(&x).unwrap());
        assert!(
            a.iter()
                .zip(b.iter())
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name}: outputs differ"
        );
        // Exporting the imported graph gives the same file.
        assert_eq!(
            export(&back).unwrap(),
            bytes,
            "{name}: second export differs"
        );
    }
}

/// A Python with `onnx` and `onnxruntime`: `NNCOMPRESS_ORT_PYTHON`, else the venv
/// `scripts/fetch_onnx_testdata.sh` fills. Missing: skip loudly, fail under `CI`.
fn ort_python() -> Option<std::path::PathBuf> {
    fetched::python_with("onnx, onnxruntime")
}

#[test]
fn exports_pass_the_onnx_checker_and_run_in_onnx_runtime() {
    let Some(py) = ort_python() else { return };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/onnx-export");
    std::fs::create_dir_all(&dir).unwrap();
    let raw = |t: &ArrayD<f32>| -> Vec<u8> { t.iter().flat_map(|v| v.to_le_bytes()).collect() };
    for (name, g) in zoo_models() {
        let x = input(g.input_shape(), 3);
        let y = g.forward(&x).unwrap();
        std::fs::write(dir.join(format!("{name}.onnx")), export(&g).unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.input.f32")), raw(&x)).unwrap();
        std::fs::write(dir.join(format!("{name}.output.f32")), raw(&y)).unwrap();
        let shapes = format!("{:?}\n{:?}\n", x.shape(), y.shape());
        std::fs::write(dir.join(format!("{name}.shapes")), shapes).unwrap();
    }
    let out = std::process::Command::new(py)
        .arg(root.join("scripts/onnx_export_check.py"))
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "ONNX Runtime check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ops_without_an_onnx_form_are_typed_errors() {
    let mut b = GraphBuilder::new(0);
    b.input("x", &[4])
        .node("g", Op::Unary(nncompress::model::Unary::Gelu), &["x"]);
    let g = b.build("g").unwrap();
    match export(&g) {
        Err(nncompress::Error::Unsupported(m)) => assert!(m.contains("`g`"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn qdq_exports_keep_the_int8_accuracy_in_onnx_runtime() {
    use nncompress::quantizer::{QuantConfig, Quantizer};
    use nncompress::train::{argmax_rows, load_mnist, Dataset, MnistSplit};
    let Some(py) = ort_python() else { return };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("target/onnx-qdq");
    std::fs::create_dir_all(&dir).unwrap();
    let train = load_mnist(root.join("data/mnist"), MnistSplit::Train).unwrap();
    let test = load_mnist(root.join("data/mnist"), MnistSplit::Test).unwrap();
    // Calibration: 512 training images (the test set is only classified).
    let calib: Vec<ArrayD<f32>> = (0..8)
        .map(|b| {
            train
                .batch(&(b * 64..(b + 1) * 64).collect::<Vec<_>>())
                .unwrap()
                .0
        })
        .collect();
    let all: Vec<usize> = (0..test.len()).collect();
    let (images, labels) = test.batch(&all).unwrap();
    let fixtures = root.join("tests/fixtures");
    // int4 weights for LeNet-5's large fc1 (opset-21 INT4 initializers).
    let int4 = nncompress::quantizer::QuantScheme::int8_weights()
        .with_dtype(nncompress::quantizer::QuantDtype::Int4);
    for (name, arch, file, config) in [
        (
            "lenet5",
            zoo::lenet5(0).unwrap(),
            "lenet5.safetensors",
            QuantConfig::int8(),
        ),
        (
            "lenet5_int4_fc1",
            zoo::lenet5(0).unwrap(),
            "lenet5.safetensors",
            QuantConfig::int8().with_layer_weights("fc1", int4),
        ),
        (
            "lenet_300_100",
            zoo::lenet_300_100(0).unwrap(),
            "lenet_300_100.safetensors",
            QuantConfig::int8(),
        ),
    ] {
        let net = Graph::from_safetensors(fixtures.join(file), arch).unwrap();
        let q = Quantizer::new(config).calibrate(&net, &calib).unwrap();
        let ours = argmax_rows(&q.forward(&images).unwrap()).unwrap();
        let bytes = nncompress::onnx::export_qdq(&q).unwrap();
        std::fs::write(dir.join(format!("{name}.onnx")), bytes).unwrap();
        let raw: Vec<u8> = images.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("{name}.images.f32")), raw).unwrap();
        let shape: Vec<String> = images.shape()[1..].iter().map(|d| d.to_string()).collect();
        std::fs::write(dir.join(format!("{name}.shape")), shape.join(" ")).unwrap();
        let as_u8 = |v: &[usize]| v.iter().map(|&c| c as u8).collect::<Vec<u8>>();
        std::fs::write(dir.join(format!("{name}.labels.u8")), as_u8(&labels)).unwrap();
        std::fs::write(dir.join(format!("{name}.crate.u8")), as_u8(&ours)).unwrap();
    }
    let out = std::process::Command::new(py)
        .arg(root.join("scripts/onnx_qdq_check.py"))
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "ONNX Runtime QDQ check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
