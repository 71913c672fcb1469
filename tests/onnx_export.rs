//! `onnx::export` then `onnx::import` gives back every zoo model (CNNs, MLPs, a BERT encoder,
//! a Llama decoder): the same parameters (names and values), the same nodes and
//! bit-identical outputs; ops without an ONNX form are typed errors.
//! The exports also pass `onnx.checker` and run in ONNX Runtime within 1e-4 of the crate
//! (`scripts/onnx_export_check.py`, called here with the venv's Python).

mod fetched;

use ndarray::{ArrayD, IxDyn};
use nncompress::model::{zoo, Graph, GraphBuilder, Op, ParamKind, Unary};
use nncompress::onnx::{export, import, ImportOptions};
use nncompress::tensor::Value;
use prost::Message;
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

/// `[n, seq]` ids below `below`, or a padding mask (1 then 0s) when `below` is 0.
fn ids(n: usize, seq: usize, below: i64) -> Value {
    Value::I64(ArrayD::from_shape_fn(IxDyn(&[n, seq]), |i| {
        if below == 0 {
            i64::from(i[1] < seq - i[0] % 3)
        } else {
            ((i[0] * 31 + i[1] * 17) as i64 * 7919) % below
        }
    }))
}

/// Named inputs of a graph.
type Feeds = Vec<(String, Value)>;

/// The zoo, each model with the inputs it is checked on.
fn zoo_models() -> Vec<(&'static str, Graph, Feeds)> {
    use nncompress::model::zoo::{bert_encoder, llama_decoder, BertConfig, LlamaConfig};
    let image = |g: &Graph| {
        vec![(
            g.input_names()[0].to_string(),
            Value::F32(input(g.input_shape(), 3)),
        )]
    };
    let mut out: Vec<(&'static str, Graph, Feeds)> = [
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
    .into_iter()
    .map(|(name, g)| {
        let feeds = image(&g);
        (name, g, feeds)
    })
    .collect();
    // A sequence length other than the build-time one, with padding.
    let (n, seq) = (3, 7);
    let bert = BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 32,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        example_seq_len: 5,
        ..BertConfig::minilm_l6_h384()
    };
    for (name, act) in [
        ("bert_gelu", Unary::Gelu),
        ("bert_gelu_tanh", Unary::GeluTanh),
    ] {
        let config = BertConfig {
            hidden_act: act,
            ..bert.clone()
        };
        out.push((
            name,
            bert_encoder(&config, 6).unwrap(),
            vec![
                ("input_ids".into(), ids(n, seq, 50)),
                ("attention_mask".into(), ids(n, seq, 0)),
                ("token_type_ids".into(), ids(n, seq, 2)),
            ],
        ));
    }
    out.push((
        "llama_tiny",
        llama_decoder(&LlamaConfig::tiny(), 7).unwrap(),
        vec![
            ("input_ids".into(), ids(n, seq, 256)),
            ("attention_mask".into(), ids(n, seq, 0)),
        ],
    ));
    out
}

fn run(g: &Graph, feeds: &[(String, Value)]) -> Vec<ArrayD<f32>> {
    let refs: Vec<(&str, &Value)> = feeds.iter().map(|(k, v)| (k.as_str(), v)).collect();
    g.run(&refs)
        .unwrap()
        .into_iter()
        .map(|v| v.as_f32().unwrap().clone())
        .collect()
}

#[test]
fn every_zoo_model_round_trips_bit_for_bit() {
    for (name, g, feeds) in zoo_models() {
        let bytes = export(&g).unwrap();
        let back = import(&bytes, &ImportOptions::default()).unwrap();
        assert_eq!(params(&g), params(&back), "{name}: parameters differ");
        assert_eq!(
            g.nodes().len(),
            back.nodes().len(),
            "{name}: node count differs"
        );
        let (a, b) = (run(&g, &feeds), run(&back, &feeds));
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(&b) {
            assert!(
                a.iter()
                    .zip(b.iter())
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "{name}: outputs differ"
            );
        }
        // Exporting the imported graph gives the same file.
        let again = export(&back).unwrap();
        if again != bytes {
            let text = |b: &[u8]| {
                let m = nncompress::onnx::proto::ModelProto::decode(b).unwrap();
                format!("{:#?}", m.graph.unwrap().node)
            };
            let dir = std::env::temp_dir();
            std::fs::write(dir.join(format!("{name}.first.txt")), text(&bytes)).unwrap();
            std::fs::write(dir.join(format!("{name}.second.txt")), text(&again)).unwrap();
            panic!(
                "{name}: second export differs (nodes in {}/{name}.{{first,second}}.txt)",
                dir.display()
            );
        }
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
    // Per model: a manifest of `in|out name dtype dims` lines and raw little-endian data.
    for (name, g, feeds) in zoo_models() {
        let outputs = run(&g, &feeds);
        std::fs::write(dir.join(format!("{name}.onnx")), export(&g).unwrap()).unwrap();
        let mut manifest = String::new();
        let dims = |s: &[usize]| {
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        for (k, (input, value)) in feeds.iter().enumerate() {
            let (dtype, shape, bytes): (&str, Vec<usize>, Vec<u8>) = match value {
                Value::F32(t) => ("f32", t.shape().to_vec(), raw(t)),
                Value::I64(t) => (
                    "i64",
                    t.shape().to_vec(),
                    t.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            };
            std::fs::write(dir.join(format!("{name}.in{k}")), bytes).unwrap();
            manifest += &format!("in {input} {dtype} {}\n", dims(&shape));
        }
        for (k, (y, output)) in outputs.iter().zip(g.output_names()).enumerate() {
            std::fs::write(dir.join(format!("{name}.out{k}")), raw(y)).unwrap();
            manifest += &format!("out {output} f32 {}\n", dims(y.shape()));
        }
        std::fs::write(dir.join(format!("{name}.manifest")), manifest).unwrap();
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
    // A causal attention of 2 queries over 4 keys: ONNX aligns the causal mask top-left,
    // the crate bottom-right.
    b.input("q", &[2, 8])
        .input("k", &[4, 8])
        .input("v", &[4, 8])
        .node(
            "g",
            Op::Attention(nncompress::model::Attention::new(2, 4).causal()),
            &["q", "k", "v"],
        );
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

/// The exported model of zoo entry `which`, decoded.
fn exported(which: &str) -> (nncompress::onnx::proto::ModelProto, Feeds) {
    let (_, g, feeds) = zoo_models()
        .into_iter()
        .find(|(n, _, _)| *n == which)
        .unwrap();
    (nncompress::onnx::export_model(&g).unwrap(), feeds)
}

fn unsupported(model: &nncompress::onnx::proto::ModelProto) -> String {
    match import(&model.encode_to_vec(), &ImportOptions::default()) {
        Err(nncompress::Error::Unsupported(m)) => m,
        other => panic!(
            "expected Unsupported, got {:?}",
            other.map(|g| g.nodes().len())
        ),
    }
}

fn nodes_of<'m>(
    model: &'m mut nncompress::onnx::proto::ModelProto,
    op: &str,
) -> Vec<&'m mut nncompress::onnx::proto::NodeProto> {
    let g = model.graph.as_mut().unwrap();
    g.node
        .iter_mut()
        .filter(|n| n.op_type.as_deref() == Some(op))
        .collect()
}

fn attribute(
    name: &str,
    i: Option<i64>,
    f: Option<f32>,
) -> nncompress::onnx::proto::AttributeProto {
    use nncompress::onnx::proto::attribute_proto::AttributeType;
    nncompress::onnx::proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(if i.is_some() {
            AttributeType::Int
        } else {
            AttributeType::Float
        } as i32),
        i,
        f,
        ..Default::default()
    }
}

#[test]
fn transformer_nodes_the_crate_would_run_differently_are_typed_errors() {
    // Rotary: runtimes read num_heads, the crate the width; they must agree.
    let (mut m, _) = exported("llama_tiny");
    for n in nodes_of(&mut m, "Rotary") {
        for a in n.attribute.iter_mut() {
            if a.name.as_deref() == Some("num_heads") {
                a.i = Some(3);
            }
        }
    }
    assert!(unsupported(&m).contains("num_heads 3"));
    // Attention: a softcap, an output mode, a key cache.
    let (m, _) = exported("bert_gelu");
    let mut capped = m.clone();
    nodes_of(&mut capped, "Attention")[0]
        .attribute
        .push(attribute("softcap", None, Some(30.0)));
    assert!(unsupported(&capped).contains("softcap"));
    let mut cached = m.clone();
    let att = &mut nodes_of(&mut cached, "Attention")[0];
    let k = att.input[1].clone();
    att.input.push(k);
    assert!(unsupported(&cached).contains("cache"));
    // RMSNormalization over an axis other than the last.
    let (mut m, _) = exported("llama_tiny");
    nodes_of(&mut m, "RMSNormalization")[0].attribute[0] = attribute("axis", Some(1), None);
    assert!(unsupported(&m).contains("axis 1"));
    // The importer's own fused domain, and unknown ops of the crate's domain.
    let (mut m, _) = exported("llama_tiny");
    nodes_of(&mut m, "Sigmoid")[0].domain = Some("nncompress.fused".into());
    assert!(unsupported(&m).contains("importer's own"));
    let (mut m, _) = exported("llama_tiny");
    nodes_of(&mut m, "Rotary")[0].op_type = Some("Rotate".into());
    assert!(unsupported(&m).contains("Rotate"));
    // A mask broadcast read by something other than an attention is not dropped.
    let (mut m, _) = exported("bert_gelu");
    let g = m.graph.as_mut().unwrap();
    let mask = g
        .node
        .iter()
        .find(|n| n.op_type.as_deref() == Some("BroadcastMask"))
        .unwrap()
        .output[0]
        .clone();
    g.output[0].name = Some(mask);
    assert!(unsupported(&m).contains("BroadcastMask"));
}

#[test]
fn mutated_transformer_exports_only_ever_return() {
    for which in ["bert_gelu", "llama_tiny"] {
        let (m, feeds) = exported(which);
        let bytes = m.encode_to_vec();
        let refs: Vec<(&str, &Value)> = feeds.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let check = |b: &[u8]| {
            let r = std::panic::catch_unwind(|| {
                if let Ok(g) = import(b, &ImportOptions::default()) {
                    let _ = g.run(&refs);
                }
            });
            assert!(r.is_ok(), "{which}: a mutated export panicked");
        };
        for m in fetched::bit_flipped(&bytes, 0x2545_f491_4f6c_dd1du64, 400) {
            check(&m);
        }
        for len in (0..bytes.len()).step_by(bytes.len() / 200 + 1) {
            check(&bytes[..len]);
        }
    }
}
