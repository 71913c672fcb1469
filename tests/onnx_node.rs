//! ONNX's own operator conformance tests (Debian `libonnx-testdata`, unpacked by
//! `scripts/fetch_onnx_testdata.sh`) on every op the importer maps: each one-node test
//! model is imported, fed its `input_*.pb` and compared with its `output_*.pb` (f32 within
//! 1e-5 relative, integers exactly). A test the importer refuses must be refused with a
//! typed error; a wrong result or a panic fails. The per-op tally printed here is the
//! table in `docs/onnx.md`. Without the data the test skips loudly, and fails under `CI`.

use nncompress::limits::Limits;
use nncompress::onnx::{decode_model, import, tensor_from_proto, ImportOptions};
use nncompress::tensor::Value;
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The ops the importer claims, with how many of their node tests it must pass (the rest
/// it refuses with a typed error; `docs/onnx.md` says which and why).
const CLAIMED: &[(&str, usize)] = &[
    ("Add", 1),
    ("Div", 2),
    ("Erf", 1),
    ("Exp", 2),
    ("HardSwish", 1),
    ("Identity", 1),
    ("Max", 4),
    ("Mean", 3),
    ("Min", 4),
    ("Mul", 2),
    ("Neg", 2),
    ("Pow", 2),
    ("Relu", 1),
    ("Sigmoid", 2),
    ("Softmax", 6),
    ("Sqrt", 2),
    ("Sub", 2),
    ("Sum", 3),
    ("Tanh", 2),
];

fn node_tests() -> Option<PathBuf> {
    let dir = std::env::var_os("NNCOMPRESS_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models"))
        .join("onnx-testdata/node");
    if dir.is_dir() {
        return Some(dir);
    }
    let msg = format!(
        "ONNX node tests missing under {} (run scripts/fetch_onnx_testdata.sh)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn read_tensor(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let t = nncompress::onnx::proto::TensorProto::decode(bytes.as_slice()).unwrap();
    tensor_from_proto(&t, &Limits::default()).unwrap()
}

/// The `prefix_N.pb` files of a test data set, in order.
fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    (0..)
        .map(|i| dir.join(format!("{prefix}_{i}.pb")))
        .take_while(|p| p.is_file())
        .collect()
}

enum Outcome {
    Pass,
    Refused(String),
    Wrong(String),
}

fn close(got: &Value, want: &Value) -> Result<(), String> {
    match (got, want) {
        (Value::F32(g), Value::F32(w)) => {
            if g.shape() != w.shape() {
                return Err(format!("shape {:?}, want {:?}", g.shape(), w.shape()));
            }
            for (a, b) in g.iter().zip(w.iter()) {
                let ok = (a.is_nan() && b.is_nan())
                    || a == b
                    || (a - b).abs() <= 1e-5 * b.abs().max(1.0);
                if !ok {
                    return Err(format!("{a} vs {b}"));
                }
            }
            Ok(())
        }
        (Value::I64(g), Value::I64(w)) if g == w => Ok(()),
        _ => Err("element type or integer values differ".into()),
    }
}

fn run_test(dir: &Path) -> Outcome {
    let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
    let model = decode_model(&bytes).unwrap();
    let graph = match import(&bytes, &ImportOptions::default()) {
        Ok(g) => g,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let data = dir.join("test_data_set_0");
    let inputs: Vec<Value> = numbered(&data, "input")
        .iter()
        .map(|p| read_tensor(p))
        .collect();
    let names: Vec<String> = model
        .graph
        .as_ref()
        .unwrap()
        .input
        .iter()
        .map(|i| i.name.clone().unwrap_or_default())
        .collect();
    let feeds: Vec<(&str, &Value)> = names.iter().map(String::as_str).zip(&inputs).collect();
    let outputs = match graph.run(&feeds) {
        Ok(o) => o,
        Err(e) => return Outcome::Refused(format!("run: {e}")),
    };
    for (got, path) in outputs.iter().zip(numbered(&data, "output")) {
        if let Err(e) = close(got, &read_tensor(&path)) {
            return Outcome::Wrong(e);
        }
    }
    Outcome::Pass
}

#[test]
fn every_claimed_op_passes_onnx_node_tests_or_refuses_them_with_a_typed_error() {
    let Some(root) = node_tests() else { return };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    // op → (tests, passed, refused names)
    let mut tally: BTreeMap<&str, (usize, usize, Vec<String>)> = BTreeMap::new();
    let mut wrong = Vec::new();
    for dir in &dirs {
        let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
        let model = decode_model(&bytes).unwrap();
        let nodes = &model.graph.as_ref().unwrap().node;
        let [node] = nodes.as_slice() else { continue };
        let op = node.op_type.as_deref().unwrap_or("");
        let Some(&(claimed, _)) = CLAIMED.iter().find(|(o, _)| *o == op) else {
            continue;
        };
        let test = dir.file_name().unwrap().to_string_lossy().to_string();
        let entry = tally.entry(claimed).or_default();
        entry.0 += 1;
        match std::panic::catch_unwind(|| run_test(dir)) {
            Ok(Outcome::Pass) => entry.1 += 1,
            Ok(Outcome::Refused(why)) => entry.2.push(format!("{test}: {why}")),
            Ok(Outcome::Wrong(why)) => wrong.push(format!("{test}: {why}")),
            Err(_) => wrong.push(format!("{test}: panicked")),
        }
    }
    println!("| op | node tests | pass | refused (typed error) |");
    println!("|---|---|---|---|");
    for (op, (n, pass, refused)) in &tally {
        println!("| {op} | {n} | {pass} | {} |", refused.len());
        for r in refused {
            println!("  refused {r}");
        }
    }
    assert!(wrong.is_empty(), "wrong results: {wrong:#?}");
    for &(op, want) in CLAIMED {
        let pass = tally.get(op).map_or(0, |t| t.1);
        assert!(
            pass >= want,
            "{op}: {pass} node tests pass, {want} did before"
        );
    }
}
