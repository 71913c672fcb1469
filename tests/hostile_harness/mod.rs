//! What every fuzz target runs on one input, shared by the libFuzzer targets in `fuzz/`
//! (included there with `#[path]`) and by the stable mutation test `tests/hostile_files.rs`
//! that CI runs. Each `run_*` function feeds bytes to a reader of the crate and, when the
//! reader accepts them, uses the result (runs the model, serialises it again), so that a
//! model that loads but cannot run is found too. None of them may panic, abort or allocate
//! past the crate's documented limits, whatever the bytes.
#![allow(dead_code)]

use nncompress::model::{Conv2dConfig, Graph, GraphBuilder, Pool2d};
use nncompress::pruner::deep_compression::Compressed;
use nncompress::quantizer::QuantizedModel;
use nncompress::train::{self, MnistSplit};
use std::path::PathBuf;

/// The formats, as the fuzz targets and seed folders are named.
pub const FORMATS: [&str; 6] = ["nnq", "nndc", "safetensors", "idx", "digits", "onnx"];

/// The architecture every model-file target loads into: a convolution with BatchNorm, a
/// pooling, a flatten and a linear layer (every parameter kind the formats store), small
/// enough that one execution takes microseconds.
pub fn architecture() -> Graph {
    let mut b = GraphBuilder::new(7);
    b.input("input", &[1, 6, 6])
        .conv2d("conv", "input", Conv2dConfig::new(1, 2, 3).with_bias(false))
        .batch_norm2d("bn", "conv", 2)
        .relu("relu", "bn")
        .max_pool2d("pool", "relu", Pool2d::new(2, 2))
        .flatten("flat", "pool")
        .linear("fc", "flat", 8, 3, true);
    b.build("fc").expect("the fuzz architecture is valid")
}

fn sample_input() -> nncompress::tensor::Tensor {
    ndarray::Array::from_shape_fn(ndarray::IxDyn(&[2, 1, 6, 6]), |i| {
        ((i[0] * 36 + i[2] * 6 + i[3]) % 7) as f32 / 7.0
    })
}

/// The crate's file envelope (magic, version, payload length, CRC-32) around `payload`, so
/// that a mutated payload sits behind a valid envelope (a CRC shields the parser from blind
/// mutation otherwise). The CRC is flate2's, as the crate's own writer computes it.
pub fn envelope(magic: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut crc = flate2::Crc::new();
    crc.update(payload);
    let mut out = Vec::with_capacity(20 + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A fuzz input: its first byte chooses the mode (even: the rest is a whole file; odd:
/// the rest is a payload, put behind a valid envelope for the enveloped formats, or
/// gzip-compressed for the gzip readers).
fn split(data: &[u8]) -> (bool, &[u8]) {
    match data.split_first() {
        Some((&mode, rest)) => (mode % 2 == 1, rest),
        None => (false, data),
    }
}

/// `.nnq`: parse for [`architecture`], then run and re-serialise what loads.
pub fn run_nnq(data: &[u8]) -> bool {
    let (wrap, rest) = split(data);
    let bytes = if wrap {
        envelope(b"NNQM", rest)
    } else {
        rest.to_vec()
    };
    let Ok(q) = QuantizedModel::from_bytes(&bytes, &architecture(), None) else {
        return false;
    };
    let _ = q.forward(&sample_input());
    let _ = q.to_bytes();
    true
}

/// `.nndc`: parse, decompress into [`architecture`], run, report.
pub fn run_nndc(data: &[u8]) -> bool {
    let (wrap, rest) = split(data);
    let bytes = if wrap {
        envelope(b"NNDC", rest)
    } else {
        rest.to_vec()
    };
    let Ok(c) = Compressed::from_bytes(&bytes, None) else {
        return false;
    };
    let _ = c.report_table();
    let _ = c.shared();
    if let Ok(g) = c.decompress(&architecture()) {
        let _ = g.forward(&sample_input());
    }
    true
}

/// safetensors weights into [`architecture`], then a forward pass.
pub fn run_safetensors(data: &[u8]) -> bool {
    let (_, rest) = split(data);
    let mut g = architecture();
    if nncompress::io::from_safetensors_bytes(&mut g, rest, None).is_err() {
        return false;
    }
    let _ = g.forward(&sample_input());
    true
}

/// A scratch folder of this process for the readers that take paths.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nncompress-hostile-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let _ = z.write_all(data);
    z.finish().unwrap_or_default()
}

/// IDX images and labels: parsed from bytes, and (odd mode) through `load_mnist`'s gzip
/// reader, as an image file beside a valid label file and as a label file beside valid
/// images. Even mode hands the rest to the gzip reader as it is (a hostile gzip stream).
pub fn run_idx(data: &[u8]) -> bool {
    let (compress, rest) = split(data);
    let mut accepted = train::parse_idx_images(rest, None).is_ok();
    accepted |= train::parse_idx_labels(rest, None).is_ok();
    let dir = scratch().join("idx");
    let _ = std::fs::create_dir_all(&dir);
    let file = if compress { gzip(rest) } else { rest.to_vec() };
    let labels = [0, 0, 8, 1, 0, 0, 0, 2, 3, 4];
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
    images.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    for (image_file, label_file) in [(file.clone(), gzip(&labels)), (gzip(&images), file)] {
        let _ = std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), image_file);
        let _ = std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), label_file);
        if let Ok(d) = train::load_mnist(&dir, MnistSplit::Test) {
            let _ = nncompress::train::Dataset::batch(&d, &[0]);
            accepted = true;
        }
    }
    accepted
}

/// The digits CSV, parsed from text and (odd mode) through `load_digits`' gzip reader.
pub fn run_digits(data: &[u8]) -> bool {
    let (compress, rest) = split(data);
    let parsed = train::parse_digits_csv(&String::from_utf8_lossy(rest), None).is_ok();
    let path = scratch().join("digits.csv.gz");
    let file = if compress { gzip(rest) } else { rest.to_vec() };
    let _ = std::fs::write(&path, file);
    train::load_digits(&path).is_ok() || parsed
}

/// ONNX models: imported, and when they import, run on a batch of one (ones for float
/// inputs, zeros for integer ones, at each input's example sizes).
pub fn run_onnx(data: &[u8]) -> bool {
    use nncompress::model::Op;
    use nncompress::tensor::{DType, Value};
    let (_, rest) = split(data);
    // The QDQ reader shares the decoding and the float import, then builds an integer model.
    let _ = nncompress::onnx::import_qdq(rest, &nncompress::onnx::ImportOptions::default());
    let Ok(g) = nncompress::onnx::import(rest, &nncompress::onnx::ImportOptions::default()) else {
        return false;
    };
    let mut feeds = Vec::new();
    for (&id, name) in g.input_ids().iter().zip(g.input_names()) {
        if let Op::Input { shape, dtype, .. } = &g.node(id).op {
            let mut full = vec![1usize];
            full.extend(shape.iter().copied());
            if full.iter().product::<usize>() > 1 << 20 {
                return true;
            }
            let dim = ndarray::IxDyn(&full);
            let v = match dtype {
                DType::F32 => Value::F32(ndarray::ArrayD::ones(dim)),
                DType::I64 => Value::I64(ndarray::ArrayD::zeros(dim)),
                _ => return true,
            };
            feeds.push((name.to_string(), v));
        }
    }
    let refs: Vec<(&str, &Value)> = feeds.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let _ = g.run(&refs);
    true
}

/// The runner of a format by name (it returns whether the reader accepted the input).
pub fn runner(format: &str) -> fn(&[u8]) -> bool {
    match format {
        "nnq" => run_nnq,
        "nndc" => run_nndc,
        "safetensors" => run_safetensors,
        "idx" => run_idx,
        "onnx" => run_onnx,
        _ => run_digits,
    }
}

/// Seed inputs of a format (with their mode byte), made from real files of the crate's own
/// writers: a trained-looking model of [`architecture`] saved in every mode.
pub fn seeds(format: &str) -> Vec<Vec<u8>> {
    use nncompress::pruner::deep_compression::{DeepCompressionConfig, SharedWeights};
    use nncompress::quantizer::{QuantConfig, Quantizer};
    let g = architecture();
    let batches = vec![sample_input()];
    let payload = |file: &[u8]| file.get(20..).unwrap_or_default().to_vec();
    let both = |file: Vec<u8>| {
        let mut whole = vec![0u8];
        whole.extend_from_slice(&file);
        let mut inner = vec![1u8];
        inner.extend_from_slice(&payload(&file));
        vec![whole, inner]
    };
    match format {
        "nnq" => [
            QuantConfig::int8(),
            QuantConfig::dynamic_int8(),
            QuantConfig::float16(),
        ]
        .into_iter()
        .flat_map(|cfg| {
            let q = Quantizer::new(cfg)
                .calibrate(&g, &batches)
                .expect("calibrates");
            both(q.to_bytes().expect("serialises"))
        })
        .collect(),
        "nndc" => {
            let shared =
                SharedWeights::from_graph(&g, &DeepCompressionConfig::default()).expect("shares");
            let mut out = both(shared.compress(&g, false).expect("compresses").to_bytes());
            out.extend(both(
                shared.compress(&g, true).expect("compresses").to_bytes(),
            ));
            out
        }
        "safetensors" => {
            let mut s = vec![0u8];
            s.extend(nncompress::io::to_safetensors_bytes(&g).expect("serialises"));
            vec![s]
        }
        "onnx" => onnx_seeds(),
        "idx" => {
            let mut images = vec![0u8, 0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
            images.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
            let mut odd = images.clone();
            odd[0] = 1;
            vec![images, odd, vec![1, 0, 0, 8, 1, 0, 0, 0, 2, 3, 4]]
        }
        _ => {
            let row = |label: usize| {
                let mut r: Vec<String> = (0..64)
                    .map(|i| ((i * 5 + label) % 17).to_string())
                    .collect();
                r.push(label.to_string());
                r.join(",")
            };
            let text = format!("{}\n{}\n", row(3), row(7));
            let mut plain = vec![0u8];
            plain.extend_from_slice(text.as_bytes());
            let mut odd = vec![1u8];
            odd.extend_from_slice(text.as_bytes());
            vec![plain, odd]
        }
    }
}

/// Small ONNX models written with the crate's bindings (mode byte 0): a convolution block
/// (Conv, BatchNormalization, Relu, MaxPool, Flatten, Gemm) and a transformer-style block
/// (MatMul with a weight, Add, LayerNormalization, Softmax, Reshape of a folded constant),
/// and the crate's exports of a tiny BERT encoder and Llama decoder.
fn onnx_seeds() -> Vec<Vec<u8>> {
    use nncompress::onnx::{proto, tensor_to_proto};
    use nncompress::tensor::Value;
    use prost::Message;
    let dims = |v: &[i64]| proto::TensorShapeProto {
        dim: v
            .iter()
            .map(|&d| proto::tensor_shape_proto::Dimension {
                value: Some(proto::tensor_shape_proto::dimension::Value::DimValue(d)),
                ..Default::default()
            })
            .collect(),
    };
    let value = |name: &str, shape: &[i64]| proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(dims(shape)),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let node =
        |op: &str, ins: &[&str], out: &str, attrs: Vec<proto::AttributeProto>| proto::NodeProto {
            op_type: Some(op.into()),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            attribute: attrs,
            ..Default::default()
        };
    let ints = |name: &str, v: &[i64]| proto::AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(7),
        ..Default::default()
    };
    let f32s = |name: &str, shape: &[usize], f: f32| {
        let n: usize = shape.iter().product();
        let t = ndarray::ArrayD::from_shape_vec(
            ndarray::IxDyn(shape),
            (0..n).map(|i| (i % 7) as f32 * f - 0.3 * f).collect(),
        )
        .expect("shape");
        tensor_to_proto(name, &Value::F32(t))
    };
    let model = |nodes, inits, input: proto::ValueInfoProto, output| {
        let m = proto::ModelProto {
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
        };
        let mut bytes = vec![0u8];
        bytes.extend(m.encode_to_vec());
        bytes
    };
    let cnn = model(
        vec![
            node(
                "Conv",
                &["x", "w", "b"],
                "c",
                vec![ints("pads", &[1, 1, 1, 1])],
            ),
            node(
                "BatchNormalization",
                &["c", "g", "be", "m", "v"],
                "n",
                vec![],
            ),
            node("Relu", &["n"], "r", vec![]),
            node(
                "MaxPool",
                &["r"],
                "p",
                vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
            ),
            node("Flatten", &["p"], "f", vec![]),
            node("Gemm", &["f", "fw", "fb"], "y", vec![]),
        ],
        vec![
            f32s("w", &[4, 1, 3, 3], 0.1),
            f32s("b", &[4], 0.01),
            f32s("g", &[4], 0.2),
            f32s("be", &[4], 0.1),
            f32s("m", &[4], 0.0),
            tensor_to_proto(
                "v",
                &Value::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4]), 0.5)),
            ),
            f32s("fw", &[16, 3], 0.05),
            f32s("fb", &[3], 0.1),
        ],
        value("x", &[1, 1, 4, 4]),
        value("y", &[1, 3]),
    );
    let shape = tensor_to_proto(
        "shape",
        &Value::I64(ndarray::arr1(&[0i64, 4, 2, 3]).into_dyn()),
    );
    let transformer = model(
        vec![
            node("MatMul", &["x", "wq"], "q", vec![]),
            node("Add", &["q", "x"], "s", vec![]),
            node("LayerNormalization", &["s", "g", "b"], "l", vec![]),
            node("Reshape", &["l", "shape"], "r", vec![]),
            node("Softmax", &["r"], "y", vec![]),
        ],
        vec![
            f32s("wq", &[6, 6], 0.1),
            f32s("g", &[6], 0.3),
            f32s("b", &[6], 0.1),
            shape,
        ],
        value("x", &[1, 4, 6]),
        value("y", &[1, 4, 2, 3]),
    );
    // The crate's own exports of a one-layer BERT encoder and Llama decoder: opset 23
    // (Attention, RMSNormalization, Gelu), the `ai.nncompress` functions, fused patterns.
    use nncompress::model::zoo::{bert_encoder, llama_decoder, BertConfig, LlamaConfig};
    let bert = BertConfig {
        vocab_size: 8,
        hidden_size: 4,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 4,
        max_position_embeddings: 8,
        type_vocab_size: 2,
        example_seq_len: 3,
        pooler: false,
        ..BertConfig::minilm_l6_h384()
    };
    let llama = LlamaConfig {
        vocab_size: 8,
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        example_seq_len: 3,
        ..LlamaConfig::tiny()
    };
    let export = |g: nncompress::Result<nncompress::model::Graph>| {
        let mut bytes = vec![0u8];
        bytes.extend(nncompress::onnx::export(&g.expect("builds")).expect("exports"));
        bytes
    };
    vec![
        cnn,
        transformer,
        export(bert_encoder(&bert, 1)),
        export(llama_decoder(&llama, 2)),
    ]
}

/// The audit's file reproducers (mode byte 0: whole files), kept in `fuzz/regressions/`:
/// `(format, name, bytes)`.
pub fn audit_reproducers() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use nncompress::pruner::deep_compression::{DeepCompressionConfig, SharedWeights};
    let whole = |file: Vec<u8>| {
        let mut v = vec![0u8];
        v.extend(file);
        v
    };
    let g = architecture();
    let shared = SharedWeights::from_graph(&g, &DeepCompressionConfig::default()).expect("shares");
    let c = shared.compress(&g, false).expect("compresses");
    // Layer 0's shape made 5.6 PB, CRC recomputed by the writer.
    let mut planted = c.clone();
    planted.layers[0].shape = vec![1 << 26, 1 << 26, 4, 4];
    // An entry count of 2^32 − 1 behind a valid CRC.
    let mut lying = c.clone();
    lying.layers[0].entries = u32::MAX as usize;
    // 64 MiB of zeros in a 64 KiB gzip stream, and an IDX header asking for 2^32 pixels
    // followed by 1 MiB of zeros.
    let mut idx = vec![0u8, 0, 8, 3];
    for d in [1u32 << 16, 1 << 8, 1 << 8] {
        idx.extend_from_slice(&d.to_be_bytes());
    }
    idx.resize(idx.len() + (1 << 20), 0);
    vec![
        ("nndc", "audit-planted-shape", whole(planted.to_bytes())),
        ("nndc", "audit-lying-entry-count", whole(lying.to_bytes())),
        (
            "digits",
            "audit-gzip-bomb",
            whole(gzip(&vec![0u8; 64 << 20])),
        ),
        ("idx", "audit-idx-header-2e32", whole(gzip(&idx))),
    ]
}
