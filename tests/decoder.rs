//! The Llama-style decoder on random weights: its logits equal a plain f64 forward written
//! here from Hugging Face's `modeling_llama.py` formulas (not from the crate's ops), it is
//! causal, padding does not leak, it trains, and configs that cannot work are typed errors.

use ndarray::{ArrayD, IxDyn};
use nncompress::model::zoo::{llama_decoder, llama_names as names, LlamaConfig};
use nncompress::model::{Graph, Mode};
use nncompress::tensor::Value;
use nncompress::train::{Adam, Optimizer};
use nncompress::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Width 32, four query heads of width 8 sharing two key/value heads.
fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 500.0,
        example_seq_len: 4,
    }
}

fn params(g: &Graph) -> HashMap<String, ArrayD<f64>> {
    let mut p = HashMap::new();
    g.visit_params(|name, _, v| {
        p.insert(name.to_string(), v.mapv(f64::from));
    });
    p
}

/// `x Wᵀ` for rows `x` (`[S][in]`) and a PyTorch `[out, in]` weight.
fn linear(x: &[Vec<f64>], w: &ArrayD<f64>) -> Vec<Vec<f64>> {
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    x.iter()
        .map(|r| {
            (0..out)
                .map(|o| (0..inp).map(|i| r[i] * w[[o, i]]).sum())
                .collect()
        })
        .collect()
}

fn rms_norm(x: &[Vec<f64>], w: &ArrayD<f64>, eps: f64) -> Vec<Vec<f64>> {
    x.iter()
        .map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            r.iter()
                .enumerate()
                .map(|(k, v)| v * inv * w[[k]])
                .collect()
        })
        .collect()
}

/// `apply_rotary_pos_emb` with `rotate_half`: per head, (x₁, x₂) → (x₁c − x₂s, x₂c + x₁s).
fn rope(x: &mut [Vec<f64>], heads: usize, d: usize, theta: f64) {
    for (pos, row) in x.iter_mut().enumerate() {
        for h in 0..heads {
            for i in 0..d / 2 {
                let inv_freq = 1.0 / theta.powf((2 * i) as f64 / d as f64);
                let (c, s) = ((pos as f64 * inv_freq).cos(), (pos as f64 * inv_freq).sin());
                let (a, b) = (row[h * d + i], row[h * d + i + d / 2]);
                row[h * d + i] = a * c - b * s;
                row[h * d + i + d / 2] = b * c + a * s;
            }
        }
    }
}

/// The logits `[S][vocab]` of one sequence, in f64.
fn reference(
    p: &HashMap<String, ArrayD<f64>>,
    c: &LlamaConfig,
    ids: &[i64],
    mask: &[i64],
) -> Vec<Vec<f64>> {
    let (heads, kv) = (c.num_attention_heads, c.num_key_value_heads);
    let d = c.hidden_size / heads;
    let eps = c.rms_norm_eps as f64;
    let w = |n: &str| &p[n];
    let emb = w("model.embed_tokens.weight");
    let mut h: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| {
            emb.index_axis(ndarray::Axis(0), t as usize)
                .iter()
                .copied()
                .collect()
        })
        .collect();
    let s = ids.len();
    for l in 0..c.num_hidden_layers {
        let n = |x: &str| format!("model.layers.{l}.{x}.weight");
        let x = rms_norm(&h, w(&n("input_layernorm")), eps);
        let mut q = linear(&x, w(&n("self_attn.q_proj")));
        let mut k = linear(&x, w(&n("self_attn.k_proj")));
        let v = linear(&x, w(&n("self_attn.v_proj")));
        rope(&mut q, heads, d, c.rope_theta as f64);
        rope(&mut k, kv, d, c.rope_theta as f64);
        let mut ctx = vec![vec![0.0; heads * d]; s];
        for hd in 0..heads {
            let g = hd / (heads / kv);
            for t in 0..s {
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|e| q[t][hd * d + e] * k[j][g * d + e]).sum();
                        dot / (d as f64).sqrt() + if mask[j] == 0 { f32::MIN as f64 } else { 0.0 }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for dd in 0..d {
                        ctx[t][hd * d + dd] += ej / z * v[j][g * d + dd];
                    }
                }
            }
        }
        let o = linear(&ctx, w(&n("self_attn.o_proj")));
        for (hr, or) in h.iter_mut().zip(&o) {
            hr.iter_mut().zip(or).for_each(|(a, b)| *a += b);
        }
        let x = rms_norm(&h, w(&n("post_attention_layernorm")), eps);
        let gate = linear(&x, w(&n("mlp.gate_proj")));
        let up = linear(&x, w(&n("mlp.up_proj")));
        let act: Vec<Vec<f64>> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| {
                g.iter()
                    .zip(u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect()
            })
            .collect();
        let down = linear(&act, w(&n("mlp.down_proj")));
        for (hr, dr) in h.iter_mut().zip(&down) {
            hr.iter_mut().zip(dr).for_each(|(a, b)| *a += b);
        }
    }
    let h = rms_norm(&h, w("model.norm.weight"), eps);
    linear(&h, w("lm_head.weight"))
}

fn run(g: &Graph, ids: &ArrayD<i64>, mask: &ArrayD<i64>) -> ArrayD<f32> {
    let (ids, mask) = (Value::I64(ids.clone()), Value::I64(mask.clone()));
    let out = g
        .run(&[(names::INPUT_IDS, &ids), (names::ATTENTION_MASK, &mask)])
        .unwrap();
    out[0].as_f32().unwrap().clone()
}

/// Three sequences of lengths 9, 6 and 3, right-padded to 9.
fn batch(seed: u64, vocab: usize) -> (ArrayD<i64>, ArrayD<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let lens = [9, 6, 3];
    let ids = ArrayD::from_shape_simple_fn(IxDyn(&[3, 9]), || rng.random_range(0..vocab as i64));
    let mask = ArrayD::from_shape_fn(IxDyn(&[3, 9]), |i| i64::from(i[1] < lens[i[0]]));
    (ids, mask)
}

#[test]
fn logits_equal_a_plain_f64_forward_with_grouped_query_attention_and_padding() {
    let c = config();
    let g = llama_decoder(&c, 5).unwrap();
    let p = params(&g);
    let (ids, mask) = batch(6, c.vocab_size);
    let logits = run(&g, &ids, &mask);
    assert_eq!(logits.shape(), &[3, 9, c.vocab_size]);
    let mut worst = 0f64;
    let mut scale = 0f64;
    for b in 0..3 {
        let row = |a: &ArrayD<i64>| {
            a.index_axis(ndarray::Axis(0), b)
                .iter()
                .copied()
                .collect::<Vec<_>>()
        };
        let want = reference(&p, &c, &row(&ids), &row(&mask));
        for (t, wt) in want.iter().enumerate() {
            for (v, &w) in wt.iter().enumerate() {
                worst = worst.max((logits[[b, t, v]] as f64 - w).abs());
                scale = scale.max(w.abs());
            }
        }
    }
    assert!(scale > 0.5, "logits too small to test anything: {scale}");
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "max |Δ| {worst:e} (logits up to {scale:.2})"
    );
}

#[test]
fn the_decoder_is_causal_and_padding_does_not_leak() {
    let c = config();
    let g = llama_decoder(&c, 8).unwrap();
    let (ids, mask) = batch(9, c.vocab_size);
    let full = run(&g, &ids, &mask);
    // A later token changed: the logits before it stay.
    let mut changed = ids.clone();
    changed[[0, 7]] = (changed[[0, 7]] + 1) % c.vocab_size as i64;
    let after = run(&g, &changed, &mask);
    let diff = |a: &ArrayD<f32>, b: &ArrayD<f32>, t: std::ops::Range<usize>, s: usize| {
        let mut m = 0f32;
        for tt in t {
            for v in 0..c.vocab_size {
                m = m.max((a[[s, tt, v]] - b[[s, tt, v]]).abs());
            }
        }
        m
    };
    assert!(diff(&full, &after, 0..7, 0) <= 1e-5);
    assert!(
        diff(&full, &after, 7..9, 0) > 1e-3,
        "the changed token changed nothing"
    );
    // The second sequence alone, unpadded, gives its padded logits.
    let alone_ids = ids.slice(ndarray::s![1..2, 0..6]).to_owned().into_dyn();
    let alone = run(&g, &alone_ids, &ArrayD::from_elem(IxDyn(&[1, 6]), 1));
    let mut m = 0f32;
    for t in 0..6 {
        for v in 0..c.vocab_size {
            m = m.max((alone[[0, t, v]] - full[[1, t, v]]).abs());
        }
    }
    assert!(
        m <= 1e-5,
        "padding changed the real tokens' logits by {m:e}"
    );
}

#[test]
fn the_same_seed_gives_the_same_bits_on_one_and_two_threads() {
    let c = config();
    let (ids, mask) = batch(10, c.vocab_size);
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| run(&llama_decoder(&c, 11).unwrap(), &ids, &mask))
    };
    assert_eq!(on(1), on(2));
}

#[test]
fn a_tiny_decoder_learns_to_count() {
    // Next token = current + 1 (mod vocab): cross-entropy over every real position.
    let c = LlamaConfig {
        vocab_size: 12,
        hidden_size: 16,
        intermediate_size: 24,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        ..config()
    };
    let mut g = llama_decoder(&c, 12).unwrap();
    let (ids, mask) = batch(13, c.vocab_size);
    let feeds = [
        (names::INPUT_IDS, Value::I64(ids.clone())),
        (names::ATTENTION_MASK, Value::I64(mask.clone())),
    ];
    let feeds: Vec<(&str, &Value)> = feeds.iter().map(|(k, v)| (*k, v)).collect();
    let v = c.vocab_size;
    let loss_and_grad = |logits: &ArrayD<f32>| {
        let mut grad = ArrayD::<f32>::zeros(logits.raw_dim());
        let (mut loss, mut count) = (0f64, 0f64);
        for b in 0..3 {
            for t in 0..9 {
                if mask[[b, t]] == 0 {
                    continue;
                }
                let target = ((ids[[b, t]] + 1) % v as i64) as usize;
                let row: Vec<f64> = (0..v).map(|k| logits[[b, t, k]] as f64).collect();
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
                loss += z.ln() + max - row[target];
                count += 1.0;
                for k in 0..v {
                    let p = (row[k] - max).exp() / z;
                    grad[[b, t, k]] = (p - f64::from(k == target)) as f32;
                }
            }
        }
        (loss / count, grad.mapv(|x| x / count as f32))
    };
    let before = loss_and_grad(g.run(&feeds).unwrap()[0].as_f32().unwrap()).0;
    let mut opt = Adam::new(1e-2);
    for _ in 0..40 {
        let trace = g
            .trace_inputs(&feeds, Mode::Training, &mut StdRng::seed_from_u64(1))
            .unwrap();
        let (_, grad) = loss_and_grad(trace.value(g.output_id()));
        let grads = g.backward(&trace, &grad).unwrap();
        for p in [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "model.norm.weight",
        ] {
            assert!(grads.get(p).is_some(), "no gradient for {p}");
        }
        opt.step(&mut g, &grads).unwrap();
    }
    let after = loss_and_grad(g.run(&feeds).unwrap()[0].as_f32().unwrap()).0;
    assert!(after < 0.5 * before, "loss {before:.3} → {after:.3}");
}

#[test]
fn configs_and_inputs_that_cannot_work_are_typed_errors() {
    let bad = [
        LlamaConfig {
            num_key_value_heads: 3,
            ..config()
        },
        LlamaConfig {
            num_attention_heads: 5,
            ..config()
        },
        LlamaConfig {
            hidden_size: 36,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            ..config()
        }, // head width 9 is odd
        LlamaConfig {
            example_seq_len: 65,
            ..config()
        },
    ];
    for c in bad {
        assert!(
            matches!(llama_decoder(&c, 1), Err(Error::InvalidConfig { .. })),
            "{c:?}"
        );
    }
    let g = llama_decoder(&config(), 1).unwrap();
    let ids = Value::I64(ArrayD::from_elem(IxDyn(&[1, 5]), 3));
    let short_mask = Value::I64(ArrayD::from_elem(IxDyn(&[1, 4]), 1));
    let out_of_vocab = Value::I64(ArrayD::from_elem(IxDyn(&[1, 5]), 50));
    let mask = Value::I64(ArrayD::from_elem(IxDyn(&[1, 5]), 1));
    assert!(g
        .run(&[
            (names::INPUT_IDS, &ids),
            (names::ATTENTION_MASK, &short_mask)
        ])
        .is_err());
    assert!(matches!(
        g.run(&[
            (names::INPUT_IDS, &out_of_vocab),
            (names::ATTENTION_MASK, &mask)
        ]),
        Err(Error::IndexOutOfRange { .. })
    ));
}
