//! The `nncompress` command line on the LeNet-5 fixture exported to ONNX: `inspect`,
//! `quantize` (calibration from a `.npy`, QDQ out, the same file the library writes) and
//! `prune` (a smaller float model out), and its errors.

use nncompress::io::npy_to_bytes;
use nncompress::model::{zoo, Graph};
use nncompress::onnx::{export, import_file, import_qdq, ImportOptions};
use nncompress::quantizer::{Calibration, QuantConfig, Quantizer};
use nncompress::train::{evaluate, load_mnist, Dataset, MnistSplit};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nncompress"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn workspace(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nncompress-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lenet5() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Graph::from_safetensors(
        root.join("tests/fixtures/lenet5.safetensors"),
        zoo::lenet5(0).unwrap(),
    )
    .unwrap()
}

#[test]
fn inspect_quantize_and_prune_an_onnx_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = workspace("flow");
    let net = lenet5();
    let model = dir.join("lenet5.onnx");
    std::fs::write(&model, export(&net).unwrap()).unwrap();
    let train = load_mnist(root.join("data/mnist"), MnistSplit::Train).unwrap();
    let (calib, _) = train.batch(&(0..256).collect::<Vec<_>>()).unwrap();
    std::fs::write(dir.join("calib.npy"), npy_to_bytes(&calib)).unwrap();
    let m = model.to_str().unwrap();

    let o = run(&["inspect", m]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for want in ["conv2d", "MACs per sample", "int8 conv", "u8 max pooling"] {
        assert!(t.contains(want), "inspect lacks `{want}`:\n{t}");
    }

    let q_path = dir.join("lenet5.int8.onnx");
    let calib_path = dir.join("calib.npy");
    let o = run(&[
        "quantize",
        m,
        "--calib",
        calib_path.to_str().unwrap(),
        "--method",
        "minmax",
        "--batch",
        "64",
        "--per-channel",
        "-o",
        q_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("int8 per-channel weights"),
        "{}",
        text(&o)
    );
    // The very file the library writes for the same model, data and settings.
    let batches: Vec<_> = (0..4)
        .map(|b| {
            calib
                .slice_axis(ndarray::Axis(0), ndarray::Slice::from(b * 64..(b + 1) * 64))
                .to_owned()
        })
        .collect();
    let graph = import_file(&model, &ImportOptions::default()).unwrap();
    let q = Quantizer::new(QuantConfig::int8().calibration(Calibration::MinMax))
        .calibrate(&graph, &batches)
        .unwrap();
    let written = std::fs::read(&q_path).unwrap();
    assert_eq!(written, nncompress::onnx::export_qdq(&q).unwrap());
    assert!(import_qdq(&written, &ImportOptions::default()).is_ok());

    let p_path = dir.join("lenet5.pruned.onnx");
    let o = run(&["prune", m, "--ratio", "0.5", "-o", p_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("channels removed"), "{}", text(&o));
    let small = import_file(&p_path, &ImportOptions::default()).unwrap();
    assert!(small.param_count() < net.param_count() * 3 / 4);
    let test = load_mnist(root.join("data/mnist"), MnistSplit::Test).unwrap();
    assert!(evaluate(&small, &test, 1000).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_and_hostile_files_are_reported_not_panicked() {
    let dir = workspace("errors");
    let model = dir.join("lenet5.onnx");
    std::fs::write(&model, export(&lenet5()).unwrap()).unwrap();
    let m = model.to_str().unwrap();
    let bad_npy = dir.join("bad.npy");
    std::fs::write(&bad_npy, b"\x93NUMPY\x01\x00\xff\xffnot a header").unwrap();
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"\x0a\xff\xff\xff\xff\x0f").unwrap();
    for (args, want) in [
        (vec![], "usage"),
        (vec!["frobnicate"], "unknown command"),
        (vec!["inspect"], "no model"),
        (vec!["inspect", m, "--bogus", "1"], "unknown option"),
        (
            vec![
                "quantize",
                m,
                "--calib",
                bad_npy.to_str().unwrap(),
                "-o",
                "x.onnx",
            ],
            "npy",
        ),
        (vec!["quantize", m, "-o", "x.onnx"], "--calib"),
        (vec!["prune", m, "--ratio", "1.5", "-o", "x.onnx"], "ratio"),
        (vec!["inspect", junk.to_str().unwrap()], "not an ONNX model"),
        (vec!["inspect", "/nonexistent/model.onnx"], "model.onnx"),
    ] {
        let o = run(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(
            o.status.code().map(|c| c <= 2),
            Some(true),
            "{args:?}: {o:?}"
        );
        assert!(
            text(&o).to_lowercase().contains(&want.to_lowercase()),
            "{args:?}: {}",
            text(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
