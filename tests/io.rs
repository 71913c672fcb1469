//! Weights I/O: safetensors round trips, files as PyTorch writes them, and corrupt input.

use ndarray::ArrayD;
use nncompress::io::{from_safetensors_bytes, to_safetensors_bytes};
use nncompress::model::{zoo, Conv2dConfig, Graph, GraphBuilder};
use nncompress::train::{evaluate, load_mnist, MnistSplit};
use nncompress::Error;
use std::path::PathBuf;

fn bits(g: &Graph) -> Vec<(String, Vec<u32>)> {
    let mut v = Vec::new();
    g.visit_params(|n, _, p| v.push((n.to_string(), p.iter().map(|x| x.to_bits()).collect())));
    v
}

#[test]
fn round_trip_is_exact_through_a_file() {
    let g = zoo::resnet_small([3, 8, 8], 4, 2, 10, 17).unwrap();
    let dir = std::env::temp_dir().join(format!("nncompress-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("resnet.safetensors");
    g.save_safetensors(&path).unwrap();
    let fresh = zoo::resnet_small([3, 8, 8], 4, 2, 10, 99).unwrap();
    assert_ne!(bits(&fresh), bits(&g));
    let loaded = Graph::from_safetensors(&path, fresh).unwrap();
    assert_eq!(bits(&loaded), bits(&g));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors file laid out as the Python `safetensors` package writes it: 8-byte
/// little-endian header length, a JSON header padded with spaces to a multiple of 8,
/// then the tensor bytes.
fn python_style(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{start},{}]}}",
            data.len()
        ));
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `features.0` conv 1→2 (3×3, no bias), `features.1` BatchNorm, `classifier` linear 2→3:
/// the names `nn.Sequential` + `nn.Linear` modules give in PyTorch.
fn small_net() -> Graph {
    let mut b = GraphBuilder::new(0);
    b.input("input", &[1, 3, 3])
        .conv2d(
            "features.0",
            "input",
            Conv2dConfig::new(1, 2, 3).with_bias(false),
        )
        .batch_norm2d("features.1", "features.0", 2)
        .flatten("flatten", "features.1")
        .linear("classifier", "flatten", 2, 3, true);
    b.build("classifier").unwrap()
}

fn pytorch_entries() -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
    let conv: Vec<f32> = (0..18).map(|i| i as f32 * 0.1 - 0.9).collect();
    let bias16: Vec<u8> = [0.5f32, -1.25, 2.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    vec![
        (
            "features.0.weight",
            "F32",
            vec![2, 1, 3, 3],
            f32_bytes(&conv),
        ),
        ("features.1.weight", "F32", vec![2], f32_bytes(&[1.5, 0.5])),
        ("features.1.bias", "F32", vec![2], f32_bytes(&[0.1, -0.1])),
        (
            "features.1.running_mean",
            "F32",
            vec![2],
            f32_bytes(&[0.2, 0.3]),
        ),
        (
            "features.1.running_var",
            "F32",
            vec![2],
            f32_bytes(&[0.9, 1.1]),
        ),
        (
            "features.1.num_batches_tracked",
            "I64",
            vec![],
            7i64.to_le_bytes().to_vec(),
        ),
        (
            "classifier.weight",
            "F32",
            vec![3, 2],
            f32_bytes(&[1., 2., 3., 4., 5., 6.]),
        ),
        ("classifier.bias", "F16", vec![3], bias16),
    ]
}

#[test]
fn a_file_written_the_pytorch_way_loads_with_its_values() {
    let bytes = python_style(&pytorch_entries());
    let mut g = small_net();
    from_safetensors_bytes(&mut g, &bytes, None).unwrap();
    let mut got = std::collections::BTreeMap::new();
    g.visit_params(|n, _, p| {
        got.insert(n.to_string(), p.iter().copied().collect::<Vec<f32>>());
    });
    assert_eq!(got["features.0.weight"][17], 17.0 * 0.1 - 0.9);
    assert_eq!(got["features.1.running_var"], [0.9, 1.1]);
    assert_eq!(got["classifier.weight"], [1., 2., 3., 4., 5., 6.]);
    assert_eq!(got["classifier.bias"], [0.5, -1.25, 2.0]);
    // And our own bytes read back through the same parser.
    let again = to_safetensors_bytes(&g).unwrap();
    let mut h = small_net();
    from_safetensors_bytes(&mut h, &again, None).unwrap();
    assert_eq!(bits(&h), bits(&g));
}

#[test]
fn missing_extra_misshaped_and_wrong_dtype_tensors_name_the_tensor() {
    let base = pytorch_entries();
    let without = |name: &str| {
        base.iter()
            .filter(|e| e.0 != name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let check_unchanged = |g: &Graph| assert_eq!(bits(g), bits(&small_net()));

    let mut g = small_net();
    let e = from_safetensors_bytes(&mut g, &python_style(&without("classifier.bias")), None);
    assert!(matches!(e, Err(Error::MissingTensor(n)) if n == "classifier.bias"));
    check_unchanged(&g);

    let mut extra = base.clone();
    extra.push(("head.weight", "F32", vec![1], f32_bytes(&[1.0])));
    let e = from_safetensors_bytes(&mut g, &python_style(&extra), None);
    assert!(matches!(e, Err(Error::UnexpectedTensor(n)) if n == "head.weight"));

    let mut wrong = without("classifier.weight");
    wrong.push(("classifier.weight", "F32", vec![2, 3], f32_bytes(&[0.0; 6])));
    match from_safetensors_bytes(&mut g, &python_style(&wrong), None) {
        Err(Error::TensorShape {
            name,
            expected,
            got,
        }) => {
            assert_eq!(name, "classifier.weight");
            assert_eq!(expected, [3, 2]);
            assert_eq!(got, [2, 3]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }

    let mut ints = without("features.1.bias");
    ints.push(("features.1.bias", "I32", vec![2], vec![0; 8]));
    let e = from_safetensors_bytes(&mut g, &python_style(&ints), None);
    assert!(matches!(e, Err(Error::UnsupportedDtype { name, .. }) if name == "features.1.bias"));

    let mut nan = without("features.1.bias");
    nan.push((
        "features.1.bias",
        "F32",
        vec![2],
        f32_bytes(&[f32::NAN, 0.0]),
    ));
    let e = from_safetensors_bytes(&mut g, &python_style(&nan), None);
    assert!(matches!(e, Err(Error::NonFinite(_))));
    check_unchanged(&g);
}

#[test]
fn lying_headers_and_truncated_files_are_corrupt_file_errors() {
    let mut g = small_net();
    // The header claims 2×4 f32 (32 bytes) but the offsets cover 24.
    let mut lying = pytorch_entries();
    lying[6] = ("classifier.weight", "F32", vec![2, 4], f32_bytes(&[0.0; 6]));
    let e = from_safetensors_bytes(&mut g, &python_style(&lying), None);
    assert!(matches!(e, Err(Error::CorruptFile { .. })), "{e:?}");

    let good = python_style(&pytorch_entries());
    for cut in [0, 4, 8, 20, good.len() / 2, good.len() - 1] {
        let e = from_safetensors_bytes(&mut g, &good[..cut], None);
        assert!(
            matches!(e, Err(Error::CorruptFile { .. })),
            "cut at {cut}: {e:?}"
        );
    }
    // A header length far beyond the file.
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        from_safetensors_bytes(&mut g, &huge, None),
        Err(Error::CorruptFile { .. })
    ));
    // Not JSON at all.
    let mut garbage = good.clone();
    garbage[8] = b'#';
    assert!(matches!(
        from_safetensors_bytes(&mut g, &garbage, None),
        Err(Error::CorruptFile { .. })
    ));
    assert_eq!(bits(&g), bits(&small_net()));
    // A missing file is an I/O error with its path.
    let e = Graph::from_safetensors("/nonexistent/x.safetensors", small_net());
    assert!(matches!(e, Err(Error::Io { path, .. }) if path.ends_with("x.safetensors")));
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn committed_mnist_fixtures_reach_their_recorded_test_error() {
    // Written by `cargo run --release --example train_mnist` (seed 1); see docs/model.md.
    let test = load_mnist(
        concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"),
        MnistSplit::Test,
    )
    .unwrap();
    let mlp = Graph::from_safetensors(
        fixture("lenet_300_100.safetensors"),
        zoo::lenet_300_100(0).unwrap(),
    )
    .unwrap();
    let e = evaluate(&mlp, &test, 1000).unwrap();
    assert!(
        e.error_percent() <= 2.0,
        "LeNet-300-100 test error {:.2}%",
        e.error_percent()
    );
    let lenet5 =
        Graph::from_safetensors(fixture("lenet5.safetensors"), zoo::lenet5(0).unwrap()).unwrap();
    let e = evaluate(&lenet5, &test, 1000).unwrap();
    assert!(
        e.error_percent() <= 1.0,
        "LeNet-5 test error {:.2}%",
        e.error_percent()
    );
    // Fixture files must not change shape under the loaders: batch 1 equals batch 1000.
    let x = ArrayD::from_shape_fn(vec![1, 1, 28, 28], |d| ((d[2] * d[3]) % 7) as f32 / 7.0);
    assert_eq!(lenet5.forward(&x).unwrap().shape(), [1, 10]);
}
