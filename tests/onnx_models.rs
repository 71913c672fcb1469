//! Whole models from the `onnx` wheel's `backend/test/data/light/` (AlexNet, DenseNet-121,
//! Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512: the real graphs
//! with weights as ConstantOfShape fills), unpacked by `scripts/fetch_onnx_testdata.sh`.
//! Each is imported, fed ONNX's own dummy input (`arange(n) / n` in the input's shape, as
//! `onnx.backend.test.runner` makes it) and compared with the expected output shipped
//! beside it. A model the importer refuses must be refused with a typed error; the
//! test fails if a model that imported before stops doing so or gives a different output.

mod fetched;

use ndarray::{ArrayD, IxDyn};
use nncompress::limits::Limits;
use nncompress::onnx::{decode_model, import, proto, tensor_from_proto, ImportOptions};
use nncompress::tensor::Value;
use prost::Message;
use std::path::PathBuf;

/// The models that import and reproduce their output (the others are refused: the table
/// in docs/onnx.md says why).
const PASSING: &[&str] = &[
    "light_bvlc_alexnet",
    "light_densenet121",
    "light_inception_v1",
    "light_inception_v2",
    "light_resnet50",
    "light_shufflenet",
    "light_squeezenet",
    "light_vgg19",
    "light_zfnet512",
];

fn light_dir() -> Option<PathBuf> {
    fetched::require(&["onnx-light"], "scripts/fetch_onnx_testdata.sh")
        .map(|d| d.join("onnx-light"))
}

#[test]
fn onnx_light_models_reproduce_their_expected_outputs_or_are_refused() {
    let Some(dir) = light_dir() else { return };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.strip_suffix(".onnx").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 9, "found only {names:?}");
    let mut passing = Vec::new();
    println!("| model | result |");
    println!("|---|---|");
    for name in &names {
        let bytes = std::fs::read(dir.join(format!("{name}.onnx"))).unwrap();
        let model = decode_model(&bytes).unwrap();
        let graph = match import(&bytes, &ImportOptions::default()) {
            Ok(g) => g,
            Err(e) => {
                println!("| {name} | refused: {e} |");
                continue;
            }
        };
        let g = model.graph.as_ref().unwrap();
        let inits: Vec<&str> = g
            .initializer
            .iter()
            .filter_map(|i| i.name.as_deref())
            .collect();
        let input = g
            .input
            .iter()
            .find(|i| !inits.contains(&i.name.as_deref().unwrap_or("")))
            .unwrap();
        let shape: Vec<usize> = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(proto::type_proto::Value::TensorType(t)) => t
                .shape
                .as_ref()
                .unwrap()
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) => v as usize,
                    _ => 1,
                })
                .collect(),
            _ => panic!("{name}: input is not a tensor"),
        };
        let n: usize = shape.iter().product();
        let mut dummy = ArrayD::<f32>::zeros(IxDyn(&shape));
        for (i, v) in dummy.iter_mut().enumerate() {
            *v = (i as f64 / n as f64) as f32;
        }
        let x = Value::F32(dummy);
        let out = match graph.run(&[(input.name.as_deref().unwrap(), &x)]) {
            Ok(o) => o,
            Err(e) => {
                println!("| {name} | refused at run: {e} |");
                continue;
            }
        };
        let want_bytes = std::fs::read(dir.join(format!("{name}_output_0.pb"))).unwrap();
        let want = proto::TensorProto::decode(want_bytes.as_slice()).unwrap();
        let want = tensor_from_proto(&want, &Limits::default()).unwrap();
        let (got, want) = (out[0].as_f32().unwrap(), want.as_f32().unwrap());
        assert_eq!(got.shape(), want.shape(), "{name}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        let worst = got
            .iter()
            .zip(want.iter())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale.max(1.0),
            "{name}: max |Δ| {worst:e} (outputs up to {scale:e})"
        );
        println!("| {name} | max abs diff {worst:.1e} (outputs up to {scale:.2e}) |");
        passing.push(name.clone());
    }
    for p in PASSING {
        assert!(
            passing.iter().any(|n| n == p),
            "{p} no longer imports and matches"
        );
    }
}
