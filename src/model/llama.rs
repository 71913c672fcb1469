//! A decoder-only language model in the Llama family (Llama 2–3, Mistral, Qwen 2, SmolLM):
//! RMSNorm, rotary position embeddings, causal grouped-query attention and a SiLU-gated
//! MLP, with Hugging Face's `LlamaForCausalLM` parameter names.

use super::attention::Attention;
use super::bert::additive_padding_mask;
use super::builder::GraphBuilder;
use super::decoder::{RmsNorm, Rotary};
use super::graph::Graph;
use super::nd::{Binary, Unary};
use super::op::{Dim, Op};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The shape of a Llama-family decoder, with the names of Hugging Face's `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Rows of the token embedding table and columns of the logits (`vocab_size`).
    pub vocab_size: usize,
    /// Width of every token's vector (`hidden_size`).
    pub hidden_size: usize,
    /// Width of the gated MLP (`intermediate_size`).
    pub intermediate_size: usize,
    /// Decoder layers (`num_hidden_layers`).
    pub num_hidden_layers: usize,
    /// Query heads (`num_attention_heads`); must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Key/value heads (`num_key_value_heads`); must divide the query heads (equal for
    /// multi-head attention, fewer for grouped-query attention).
    pub num_key_value_heads: usize,
    /// The longest sequence (`max_position_embeddings`).
    pub max_position_embeddings: usize,
    /// The RMSNorms' epsilon (`rms_norm_eps`).
    pub rms_norm_eps: f32,
    /// The rotary frequency base (`rope_theta`).
    pub rope_theta: f32,
    /// The sequence length shapes are checked with when the graph is built (any length up
    /// to `max_position_embeddings` runs).
    pub example_seq_len: usize,
}

impl LlamaConfig {
    /// A small decoder for tests and examples: 2 layers, width 64, 4 query heads sharing 2
    /// key/value heads, vocabulary 256.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 172,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 512,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            example_seq_len: 16,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::config("llama config", why));
        let (heads, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return bad(format!(
                "{heads} heads do not divide hidden_size {}",
                self.hidden_size
            ));
        }
        if kv == 0 || !heads.is_multiple_of(kv) {
            return bad(format!(
                "{kv} key/value heads do not divide {heads} query heads"
            ));
        }
        if !(self.hidden_size / heads).is_multiple_of(2) {
            return bad(format!(
                "the head width {} is odd; rotary embeddings turn pairs",
                self.hidden_size / heads
            ));
        }
        let sizes = [
            self.vocab_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.max_position_embeddings,
            self.example_seq_len,
        ];
        if sizes.contains(&0) {
            return bad("every size must be at least 1".into());
        }
        if self.example_seq_len > self.max_position_embeddings {
            return bad(format!(
                "example_seq_len {} passes max_position_embeddings {}",
                self.example_seq_len, self.max_position_embeddings
            ));
        }
        Ok(())
    }
}

/// The names of a [`llama_decoder`]'s inputs and outputs.
pub mod names {
    /// Token ids, `[N, seq]` i64.
    pub const INPUT_IDS: &str = "input_ids";
    /// 1 for a token, 0 for padding, `[N, seq]` i64.
    pub const ATTENTION_MASK: &str = "attention_mask";
    /// The next-token scores at every position, `[N, seq, vocab]`.
    pub const LOGITS: &str = "logits";
    /// Every token's final vector after the last RMSNorm, `[N, seq, hidden]`.
    pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
}

/// A Llama-family decoder as Hugging Face's `LlamaForCausalLM` computes it, with its
/// parameter names (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`,
/// `model.layers.0.mlp.gate_proj.weight`, `model.norm.weight`, `lm_head.weight`, ...).
///
/// Inputs `input_ids` and `attention_mask` (`[N, seq]` i64); outputs `logits` then
/// `last_hidden_state`. Each layer: `h + o_proj(attention(rope(q), rope(k), v))` on the
/// RMS-normalised input, then `h + down_proj(silu(gate_proj(x)) · up_proj(x))`; attention is
/// causal, and padding (mask 0) adds `f32::MIN` to the scores of its keys, as Hugging Face
/// does. Positions count `0..seq` (right padding). No projection has a bias. Weights are
/// initialised from `seed`; a checkpoint with tied embeddings has no `lm_head.weight`: copy
/// `model.embed_tokens.weight` into it (the graph keeps the two apart, so training unties
/// them).
///
/// # Errors
/// [`Error::InvalidConfig`] for heads that do not divide the width or the query heads, an
/// odd head width, zero sizes, or an example length past the position limit.
///
/// # Examples
/// ```
/// use nncompress::model::zoo::{llama_decoder, llama_names, LlamaConfig};
/// use nncompress::tensor::Value;
/// use ndarray::{ArrayD, IxDyn};
/// let g = llama_decoder(&LlamaConfig::tiny(), 7)?;
/// let ids = Value::I64(ArrayD::from_elem(IxDyn(&[1, 5]), 3));
/// let mask = Value::I64(ArrayD::from_elem(IxDyn(&[1, 5]), 1));
/// let out = g.run(&[(llama_names::INPUT_IDS, &ids), (llama_names::ATTENTION_MASK, &mask)])?;
/// assert_eq!(out[0].shape(), &[1, 5, 256]);
/// # Ok::<(), nncompress::Error>(())
/// ```
pub fn llama_decoder(config: &LlamaConfig, seed: u64) -> Result<Graph> {
    config.check()?;
    let c = config;
    let mut b = GraphBuilder::new(seed);
    let seq = || Dim::dynamic("seq", c.example_seq_len);
    b.typed_input(names::INPUT_IDS, DType::I64, &[seq()])
        .typed_input(names::ATTENTION_MASK, DType::I64, &[seq()])
        .embedding(
            "model.embed_tokens",
            names::INPUT_IDS,
            c.vocab_size,
            c.hidden_size,
        );
    additive_padding_mask(&mut b, "padding_mask", names::ATTENTION_MASK);
    let mut h = "model.embed_tokens".to_string();
    for layer in 0..c.num_hidden_layers {
        h = decoder_layer(&mut b, layer, &h, c);
    }
    rms_norm(&mut b, "model.norm", &h, c);
    b.node(names::LAST_HIDDEN_STATE, Op::Identity, &["model.norm"])
        .linear(
            "lm_head",
            names::LAST_HIDDEN_STATE,
            c.hidden_size,
            c.vocab_size,
            false,
        )
        .node(names::LOGITS, Op::Identity, &["lm_head"]);
    b.build_with_outputs(&[names::LOGITS, names::LAST_HIDDEN_STATE])
}

fn rms_norm(b: &mut GraphBuilder, name: &str, input: &str, c: &LlamaConfig) {
    let mut n = RmsNorm::new(c.hidden_size);
    n.eps = c.rms_norm_eps;
    b.node(name, Op::RmsNorm(n), &[input]);
}

/// One `LlamaDecoderLayer`; returns the name of its output node.
fn decoder_layer(b: &mut GraphBuilder, layer: usize, input: &str, c: &LlamaConfig) -> String {
    let (hidden, heads, kv) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads);
    let head_dim = hidden / heads;
    let p = format!("model.layers.{layer}");
    let n = |s: &str| format!("{p}.{s}");
    rms_norm(b, &n("input_layernorm"), input, c);
    let normed = n("input_layernorm");
    b.linear(
        &n("self_attn.q_proj"),
        &normed,
        hidden,
        heads * head_dim,
        false,
    )
    .linear(
        &n("self_attn.k_proj"),
        &normed,
        hidden,
        kv * head_dim,
        false,
    )
    .linear(
        &n("self_attn.v_proj"),
        &normed,
        hidden,
        kv * head_dim,
        false,
    );
    let rope = Rotary::new(head_dim, c.rope_theta);
    b.node(
        &n("self_attn.q_rotary"),
        Op::Rotary(rope.clone()),
        &[&n("self_attn.q_proj")],
    )
    .node(
        &n("self_attn.k_rotary"),
        Op::Rotary(rope),
        &[&n("self_attn.k_proj")],
    )
    .node(
        &n("self_attn"),
        Op::Attention(Attention::new(heads, head_dim).with_kv_heads(kv).causal()),
        &[
            &n("self_attn.q_rotary"),
            &n("self_attn.k_rotary"),
            &n("self_attn.v_proj"),
            "padding_mask",
        ],
    )
    .linear(
        &n("self_attn.o_proj"),
        &n("self_attn"),
        heads * head_dim,
        hidden,
        false,
    )
    .node(
        &n("attention_residual"),
        Op::Binary(Binary::Add),
        &[input, &n("self_attn.o_proj")],
    );
    let attended = n("attention_residual");
    rms_norm(b, &n("post_attention_layernorm"), &attended, c);
    let normed = n("post_attention_layernorm");
    b.linear(
        &n("mlp.gate_proj"),
        &normed,
        hidden,
        c.intermediate_size,
        false,
    )
    .linear(
        &n("mlp.up_proj"),
        &normed,
        hidden,
        c.intermediate_size,
        false,
    )
    .node(
        &n("mlp.act"),
        Op::Unary(Unary::Silu),
        &[&n("mlp.gate_proj")],
    )
    .node(
        &n("mlp.gated"),
        Op::Binary(Binary::Mul),
        &[&n("mlp.act"), &n("mlp.up_proj")],
    )
    .linear(
        &n("mlp.down_proj"),
        &n("mlp.gated"),
        c.intermediate_size,
        hidden,
        false,
    )
    .node(
        &n("mlp_residual"),
        Op::Binary(Binary::Add),
        &[&attended, &n("mlp.down_proj")],
    );
    n("mlp_residual")
}
