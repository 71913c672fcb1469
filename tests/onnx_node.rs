//! ONNX's own operator conformance tests (Debian `libonnx-testdata`, unpacked by
//! `scripts/fetch_onnx_testdata.sh`) on every op the importer maps: each one-node test
//! model is imported, fed its `input_*.pb` and compared with its `output_*.pb` (f32 within
//! 1e-5 relative, integers exactly); weights fed as inputs are baked in as initializers
//! when the model is refused as it is (see `run_test`). A test the importer refuses must be refused with a
//! typed error; a wrong result or a panic fails. The per-op tally printed here is the
//! table in `docs/onnx.md`. Without the data the test skips loudly, and fails under `CI`.

mod fetched;

use nncompress::limits::Limits;
use nncompress::onnx::{decode_model, import, tensor_from_proto, tensor_to_proto, ImportOptions};
use nncompress::tensor::Value;
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The ops the importer claims, with how many of their node tests it must pass (the rest
/// it refuses with a typed error; `docs/onnx.md` says which and why).
const CLAIMED: &[(&str, usize)] = &[
    ("Add", 2),
    ("AveragePool", 5),
    ("BatchNormalization", 2),
    ("Cast", 0),
    ("Clip", 8),
    ("ConstantOfShape", 0),
    ("Concat", 6),
    ("Conv", 5),
    ("Div", 3),
    ("Dropout", 4),
    ("Erf", 1),
    ("Equal", 0),
    ("Exp", 2),
    ("Expand", 0),
    ("Flatten", 3),
    ("Gather", 0),
    ("Gelu", 0),
    ("Gemm", 8),
    ("GlobalAveragePool", 2),
    ("HardSwish", 1),
    ("Identity", 1),
    ("LayerNormalization", 0),
    ("LRN", 2),
    ("MatMul", 3),
    ("Max", 4),
    ("MaxPool", 4),
    ("Mean", 3),
    ("Min", 4),
    ("Mul", 3),
    ("Neg", 2),
    ("Pow", 4),
    ("Range", 0),
    ("ReduceMean", 6),
    ("ReduceSum", 5),
    ("Relu", 1),
    ("Reshape", 6),
    ("Shape", 0),
    ("Sigmoid", 2),
    ("Slice", 2),
    ("Softmax", 6),
    ("Sqrt", 2),
    ("Squeeze", 1),
    ("Sub", 3),
    ("Sum", 3),
    ("Tanh", 2),
    ("Transpose", 2),
    ("Unsqueeze", 7),
    ("Where", 2),
];

fn node_tests() -> Option<PathBuf> {
    fetched::require(&["onnx-testdata/node"], "scripts/fetch_onnx_testdata.sh")
        .map(|d| d.join("onnx-testdata/node"))
}

/// A test's tensor; an element type the crate does not read is the importer's refusal too.
fn read_tensor(path: &Path) -> Result<Value, String> {
    let bytes = std::fs::read(path).unwrap();
    let t = nncompress::onnx::proto::TensorProto::decode(bytes.as_slice()).unwrap();
    tensor_from_proto(&t, &Limits::default()).map_err(|e| e.to_string())
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

/// Runs one node test. Node tests feed weights (a Conv's W, a Reshape's shape) as graph
/// inputs, while the importer maps weights from initializers, as exporters write them:
/// when the model as it is is refused, it is tried again with every input after the first
/// baked in as an initializer holding the test's value (`baked` says so).
fn run_test(dir: &Path) -> (Outcome, bool) {
    let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
    let mut model = decode_model(&bytes).unwrap();
    let data = dir.join("test_data_set_0");
    let inputs: Vec<Value> = match numbered(&data, "input")
        .iter()
        .map(|p| read_tensor(p))
        .collect()
    {
        Ok(v) => v,
        Err(e) => return (Outcome::Refused(format!("test input: {e}")), false),
    };
    let names: Vec<String> = model
        .graph
        .as_ref()
        .unwrap()
        .input
        .iter()
        .map(|i| i.name.clone().unwrap_or_default())
        .collect();
    let mut fed = inputs.len();
    let mut baked = false;
    let graph = match import(&bytes, &ImportOptions::default()) {
        Ok(g) => g,
        Err(first) => {
            let g = model.graph.as_mut().unwrap();
            for (name, value) in names.iter().zip(&inputs).skip(1) {
                g.initializer.push(tensor_to_proto(name, value));
            }
            match import(&model.encode_to_vec(), &ImportOptions::default()) {
                Ok(g) => {
                    fed = 1;
                    baked = true;
                    g
                }
                Err(e) => return (Outcome::Refused(format!("{first}; baked: {e}")), false),
            }
        }
    };
    let feeds: Vec<(&str, &Value)> = names
        .iter()
        .map(String::as_str)
        .zip(&inputs)
        .take(fed)
        .collect();
    let outputs = match graph.run(&feeds) {
        Ok(o) => o,
        Err(e) => return (Outcome::Refused(format!("run: {e}")), baked),
    };
    for (got, path) in outputs.iter().zip(numbered(&data, "output")) {
        let want = match read_tensor(&path) {
            Ok(w) => w,
            Err(e) => return (Outcome::Refused(format!("test output: {e}")), baked),
        };
        if let Err(e) = close(got, &want) {
            return (Outcome::Wrong(e), baked);
        }
    }
    (Outcome::Pass, baked)
}

#[test]
fn every_claimed_op_passes_onnx_node_tests_or_refuses_them_with_a_typed_error() {
    let Some(root) = node_tests() else { return };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    // op → (tests, passed, refused names, passed with weights baked in)
    let mut tally: BTreeMap<&str, (usize, usize, Vec<String>, usize)> = BTreeMap::new();
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
            Ok((Outcome::Pass, baked)) => {
                entry.1 += 1;
                entry.3 += usize::from(baked);
            }
            Ok((Outcome::Refused(why), _)) => entry.2.push(format!("{test}: {why}")),
            Ok((Outcome::Wrong(why), _)) => wrong.push(format!("{test}: {why}")),
            Err(_) => wrong.push(format!("{test}: panicked")),
        }
    }
    println!("| op | node tests | pass | of which weights baked in | refused (typed error) |");
    println!("|---|---|---|---|---|");
    for (op, (n, pass, refused, baked)) in &tally {
        println!("| {op} | {n} | {pass} | {baked} | {} |", refused.len());
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
