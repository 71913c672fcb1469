//! BERT-family encoders (BERT, MiniLM) with Hugging Face's parameter names, and the
//! sentence-transformers head (mean pooling, L2 normalisation).

use super::attention::Attention;
use super::builder::GraphBuilder;
use super::graph::Graph;
use super::nd::{Binary, BinaryConst, Reduction, Unary};
use super::op::{Dim, Op};
use crate::error::{Error, Result};
use crate::tensor::DType;
use ndarray::{ArrayD, IxDyn};

/// The shape of a BERT-family encoder, as Hugging Face's `config.json` gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Rows of the word embedding table (`vocab_size`).
    pub vocab_size: usize,
    /// Width of every token's vector (`hidden_size`).
    pub hidden_size: usize,
    /// Encoder layers (`num_hidden_layers`).
    pub num_hidden_layers: usize,
    /// Attention heads per layer (`num_attention_heads`); must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer (`intermediate_size`).
    pub intermediate_size: usize,
    /// Rows of the position table (`max_position_embeddings`): the longest sequence.
    pub max_position_embeddings: usize,
    /// Rows of the token type table (`type_vocab_size`).
    pub type_vocab_size: usize,
    /// The LayerNorms' epsilon (`layer_norm_eps`).
    pub layer_norm_eps: f32,
    /// The feed-forward activation (`hidden_act`: `gelu` is [`Unary::Gelu`], `gelu_new`
    /// is [`Unary::GeluTanh`]).
    pub hidden_act: Unary,
    /// Whether the model has BERT's pooler (`pooler.dense`, tanh of the first token).
    pub pooler: bool,
    /// The sequence length shapes are checked with when the graph is built (any length up
    /// to `max_position_embeddings` runs).
    pub example_seq_len: usize,
}

impl BertConfig {
    /// `sentence-transformers/all-MiniLM-L6-v2` (and `nreimers/MiniLM-L6-H384-uncased`):
    /// 6 layers, 384 wide, 12 heads.
    pub fn minilm_l6_h384() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: Unary::Gelu,
            pooler: true,
            example_seq_len: 16,
        }
    }

    /// The 12-layer MiniLM (`all-MiniLM-L12-v2`).
    pub fn minilm_l12_h384() -> Self {
        BertConfig {
            num_hidden_layers: 12,
            ..BertConfig::minilm_l6_h384()
        }
    }

    /// `bert-base-uncased`: 12 layers, 768 wide, 12 heads.
    pub fn bert_base() -> Self {
        BertConfig {
            hidden_size: 768,
            num_hidden_layers: 12,
            intermediate_size: 3072,
            ..BertConfig::minilm_l6_h384()
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::config("bert config", why));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "{} heads do not divide hidden_size {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        let sizes = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.max_position_embeddings,
            self.type_vocab_size,
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
        if !(self.layer_norm_eps >= 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(format!("layer_norm_eps {}", self.layer_norm_eps));
        }
        Ok(())
    }
}

/// The names of a [`bert_encoder`]'s inputs and outputs.
pub mod names {
    /// Token ids, `[N, seq]` i64.
    pub const INPUT_IDS: &str = "input_ids";
    /// 1 for a token, 0 for padding, `[N, seq]` i64.
    pub const ATTENTION_MASK: &str = "attention_mask";
    /// Segment ids (0 for a single sentence), `[N, seq]` i64.
    pub const TOKEN_TYPE_IDS: &str = "token_type_ids";
    /// Every token's final vector, `[N, seq, hidden]`.
    pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
    /// BERT's pooler output (tanh of a dense layer on the first token), `[N, hidden]`.
    pub const POOLER_OUTPUT: &str = "pooler_output";
    /// The sentence-transformers embedding: the mask-weighted mean of
    /// `last_hidden_state`, L2-normalised, `[N, hidden]`.
    pub const SENTENCE_EMBEDDING: &str = "sentence_embedding";
}

/// A BERT-family encoder as Hugging Face's `BertModel` computes it, with its parameter
/// names exactly (`embeddings.word_embeddings.weight`,
/// `encoder.layer.0.attention.self.query.weight`, ...), so a Hub `model.safetensors` loads
/// unchanged (see [`crate::io::load_hf_bert`]).
///
/// Inputs `input_ids`, `attention_mask`, `token_type_ids` (all `[N, seq]` i64, `seq` any
/// length up to `max_position_embeddings`); outputs `last_hidden_state`, then
/// `pooler_output` when the config has the pooler, then `sentence_embedding` (mean pooling
/// over the mask and L2 normalisation, as sentence-transformers does). Padding is masked
/// as BERT does: `(1 − mask) · f32::MIN` added to the attention scores. Weights are
/// initialised from `seed` (load real ones for real use).
///
/// # Errors
/// [`Error::InvalidConfig`] for heads that do not divide the width, zero sizes, or an
/// example length past the position table.
pub fn bert_encoder(config: &BertConfig, seed: u64) -> Result<Graph> {
    bert_encoder_from(config, GraphBuilder::new(seed))
}

/// [`bert_encoder`] with every weight zero, the graph [`crate::io::load_hf_bert`] loads
/// into (no random draws for weights about to be overwritten).
///
/// # Errors
/// As [`bert_encoder`].
pub fn bert_encoder_zeroed(config: &BertConfig) -> Result<Graph> {
    bert_encoder_from(config, GraphBuilder::zeroed())
}

fn bert_encoder_from(config: &BertConfig, mut b: GraphBuilder) -> Result<Graph> {
    config.check()?;
    let c = config;
    let hidden = c.hidden_size;
    let heads = c.num_attention_heads;
    let head_dim = hidden / heads;
    let seq = || Dim::dynamic("seq", c.example_seq_len);
    b.typed_input(names::INPUT_IDS, DType::I64, &[seq()])
        .typed_input(names::ATTENTION_MASK, DType::I64, &[seq()])
        .typed_input(names::TOKEN_TYPE_IDS, DType::I64, &[seq()])
        .embedding(
            "embeddings.word_embeddings",
            names::INPUT_IDS,
            c.vocab_size,
            hidden,
        )
        .node(
            "embeddings.position_ids",
            Op::Positions { axis: 1 },
            &[names::INPUT_IDS],
        )
        .embedding(
            "embeddings.position_embeddings",
            "embeddings.position_ids",
            c.max_position_embeddings,
            hidden,
        )
        .embedding(
            "embeddings.token_type_embeddings",
            names::TOKEN_TYPE_IDS,
            c.type_vocab_size,
            hidden,
        )
        // BertEmbeddings: words + token types, then + positions.
        .node(
            "embeddings.sum_types",
            Op::Binary(Binary::Add),
            &[
                "embeddings.word_embeddings",
                "embeddings.token_type_embeddings",
            ],
        )
        .node(
            "embeddings.sum",
            Op::Binary(Binary::Add),
            &["embeddings.sum_types", "embeddings.position_embeddings"],
        );
    layer_norm(&mut b, "embeddings.LayerNorm", "embeddings.sum", c);
    additive_padding_mask(&mut b, "extended_attention_mask", names::ATTENTION_MASK);
    let mut h = "embeddings.LayerNorm".to_string();
    for layer in 0..c.num_hidden_layers {
        h = encoder_layer(&mut b, layer, &h, c, heads, head_dim);
    }
    b.node(names::LAST_HIDDEN_STATE, Op::Identity, &[&h]);
    let mut outputs = vec![names::LAST_HIDDEN_STATE];
    if c.pooler {
        b.node(
            "pooler.first_token",
            Op::Slice {
                axis: 1,
                start: 0,
                end: 1,
            },
            &[names::LAST_HIDDEN_STATE],
        )
        .node(
            "pooler.first",
            Op::Squeeze { axes: vec![1] },
            &["pooler.first_token"],
        )
        .linear("pooler.dense", "pooler.first", hidden, hidden, true)
        .node(
            names::POOLER_OUTPUT,
            Op::Unary(Unary::Tanh),
            &["pooler.dense"],
        );
        outputs.push(names::POOLER_OUTPUT);
    }
    mean_pool_normalised(&mut b, names::LAST_HIDDEN_STATE);
    outputs.push(names::SENTENCE_EMBEDDING);
    b.build_with_outputs(&outputs)
}

fn layer_norm(b: &mut GraphBuilder, name: &str, input: &str, c: &BertConfig) {
    let mut ln = super::nd::LayerNorm::new(c.hidden_size);
    ln.eps = c.layer_norm_eps;
    b.node(name, Op::LayerNorm(ln), &[input]);
}

/// An op between a value and a scalar constant.
/// Adds the nodes that turn a `[N, seq]` 0/1 integer mask into the additive mask attention
/// takes, `[N, 1, 1, seq]`: 0 for a token, `f32::MIN` for padding. The last node is called
/// `name`; the intermediate ones are prefixed with it.
pub(super) fn additive_padding_mask(b: &mut GraphBuilder, name: &str, mask_input: &str) {
    let float = format!("{name}.float");
    let inverted = format!("{name}.inverted");
    let scaled = format!("{name}.scaled");
    b.node(&float, Op::Cast { to: DType::F32 }, &[mask_input])
        .node(&inverted, scalar_op(Binary::Sub, 1.0, true), &[&float])
        .node(
            &scaled,
            scalar_op(Binary::Mul, f32::MIN, false),
            &[&inverted],
        )
        .node(name, Op::Unsqueeze { axes: vec![1, 2] }, &[&scaled]);
}

fn scalar_op(op: Binary, value: f32, constant_first: bool) -> Op {
    Op::BinaryConst(BinaryConst {
        op,
        constant: ArrayD::from_elem(IxDyn(&[]), value),
        constant_first,
    })
}

/// One `BertLayer`: self-attention with a residual LayerNorm, then the feed-forward block
/// with another. Returns the name of its output node.
fn encoder_layer(
    b: &mut GraphBuilder,
    layer: usize,
    input: &str,
    c: &BertConfig,
    heads: usize,
    head_dim: usize,
) -> String {
    let hidden = c.hidden_size;
    let p = format!("encoder.layer.{layer}");
    let att = format!("{p}.attention.self");
    let n = |s: &str| format!("{att}.{s}");
    for which in ["query", "key", "value"] {
        b.linear(&n(which), input, hidden, hidden, true);
    }
    b.node(
        &att,
        Op::Attention(Attention::new(heads, head_dim)),
        &[
            &n("query"),
            &n("key"),
            &n("value"),
            "extended_attention_mask",
        ],
    );
    let out = format!("{p}.attention.output");
    b.linear(&format!("{out}.dense"), &att, hidden, hidden, true)
        .node(
            &format!("{out}.residual"),
            Op::Binary(Binary::Add),
            &[&format!("{out}.dense"), input],
        );
    layer_norm(
        b,
        &format!("{out}.LayerNorm"),
        &format!("{out}.residual"),
        c,
    );
    let attended = format!("{out}.LayerNorm");
    b.linear(
        &format!("{p}.intermediate.dense"),
        &attended,
        hidden,
        c.intermediate_size,
        true,
    )
    .node(
        &format!("{p}.intermediate.act"),
        Op::Unary(c.hidden_act),
        &[&format!("{p}.intermediate.dense")],
    )
    .linear(
        &format!("{p}.output.dense"),
        &format!("{p}.intermediate.act"),
        c.intermediate_size,
        hidden,
        true,
    )
    .node(
        &format!("{p}.output.residual"),
        Op::Binary(Binary::Add),
        &[&format!("{p}.output.dense"), &attended],
    );
    layer_norm(
        b,
        &format!("{p}.output.LayerNorm"),
        &format!("{p}.output.residual"),
        c,
    );
    format!("{p}.output.LayerNorm")
}

/// sentence-transformers' `Pooling(mean)` then `Normalize`: `Σ h·m / max(Σ m, 1e-9)`, then
/// `x / max(‖x‖₂, 1e-12)`.
fn mean_pool_normalised(b: &mut GraphBuilder, hidden_state: &str) {
    let sum = |axes: Vec<isize>, keep_dims: bool| Op::Reduce {
        how: Reduction::Sum,
        axes,
        keep_dims,
    };
    b.node(
        "pooling.mask",
        Op::Unsqueeze { axes: vec![-1] },
        &["extended_attention_mask.float"],
    )
    .node(
        "pooling.masked",
        Op::Binary(Binary::Mul),
        &[hidden_state, "pooling.mask"],
    )
    .node("pooling.sum", sum(vec![1], false), &["pooling.masked"])
    .node("pooling.count", sum(vec![1], false), &["pooling.mask"])
    .node(
        "pooling.count_clamped",
        scalar_op(Binary::Max, 1e-9, false),
        &["pooling.count"],
    )
    .node(
        "pooling.mean",
        Op::Binary(Binary::Div),
        &["pooling.sum", "pooling.count_clamped"],
    )
    .node(
        "normalize.square",
        Op::Binary(Binary::Mul),
        &["pooling.mean", "pooling.mean"],
    )
    .node("normalize.sum", sum(vec![-1], true), &["normalize.square"])
    .node("normalize.norm", Op::Unary(Unary::Sqrt), &["normalize.sum"])
    .node(
        "normalize.norm_clamped",
        scalar_op(Binary::Max, 1e-12, false),
        &["normalize.norm"],
    )
    .node(
        names::SENTENCE_EMBEDDING,
        Op::Binary(Binary::Div),
        &["pooling.mean", "normalize.norm_clamped"],
    );
}

/// Hugging Face buffers a BERT `model.safetensors` may hold that are not parameters (the
/// position ids `0..max_position_embeddings`, which [`Op::Positions`] computes).
pub const HF_BERT_BUFFERS: &[&str] = &["embeddings.position_ids"];
