"""An independent float64 NumPy forward of all-MiniLM-L6-v2 (Hugging Face `BertModel`, then
sentence-transformers' mean pooling and L2 normalisation), the reference the crate's
MiniLM test compares against.

    python scripts/minilm_reference.py MODEL_DIR CORPUS_DIR OUT.safetensors

MODEL_DIR holds model.safetensors, config.json and tokenizer.json (scripts/fetch_minilm.sh
puts them there); CORPUS_DIR the Debian fortunes-min files. The sentences are the first
REFERENCE_SENTENCES, evenly spaced, of the corpus's calibration split (see `split` below; the crate's
`train::data::load_fortunes` applies the same rule), tokenised by Hugging Face `tokenizers`
with truncation at MAX_TOKENS, in batches of BATCH padded to their longest sentence, so
every batch has its own padding. Writes, per batch k: `batch{k}.input_ids`,
`.attention_mask`, `.token_type_ids` (i64), `.last_hidden_state` and `.sentence_embedding`
(f32 from the f64 forward), and `batch{k}.text` (the UTF-8 sentences joined by newlines).
"""
import json
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file, save_file
from scipy.special import erf
from tokenizers import Tokenizer

REFERENCE_SENTENCES = 288
BATCH = 32
MAX_TOKENS = 128
MAX_CHARS = 400
FILES = ("fortunes", "literature", "riddles")


def entries(corpus: pathlib.Path):
    """Every fortune, whitespace collapsed, in file order; empty or long ones dropped."""
    out = []
    for name in FILES:
        text = (corpus / name).read_bytes().decode("utf-8")
        chunk = []
        for line in text.split("\n") + ["%"]:
            if line == "%":
                s = " ".join(" ".join(chunk).split())
                if 0 < len(s) <= MAX_CHARS:
                    out.append(s)
                chunk = []
            else:
                chunk.append(line)
    return out


def split(sentences):
    """Every fifth sentence (index 4, 9, ...) is held out for evaluation."""
    calibration = [s for i, s in enumerate(sentences) if i % 5 != 4]
    held_out = [s for i, s in enumerate(sentences) if i % 5 == 4]
    return calibration, held_out


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def bert(p, cfg, ids, mask, types):
    f = lambda k: p[k].astype(np.float64)
    n, s = ids.shape
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    d = h // heads
    eps = cfg["layer_norm_eps"]
    x = f("embeddings.word_embeddings.weight")[ids]
    x = x + f("embeddings.token_type_embeddings.weight")[types]
    x = x + f("embeddings.position_embeddings.weight")[np.arange(s)][None]
    x = layer_norm(x, f("embeddings.LayerNorm.weight"), f("embeddings.LayerNorm.bias"), eps)
    # BERT's additive mask; in f64 the padding scores become -inf-like and vanish.
    bias = (1.0 - mask.astype(np.float64))[:, None, None, :] * np.finfo(np.float32).min
    lin = lambda v, name: v @ f(name + ".weight").T + f(name + ".bias")
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layer.{layer}."
        heads_of = lambda v: v.reshape(n, s, heads, d).transpose(0, 2, 1, 3)
        q = heads_of(lin(x, pre + "attention.self.query"))
        k = heads_of(lin(x, pre + "attention.self.key"))
        v = heads_of(lin(x, pre + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, h)
        a = lin(ctx, pre + "attention.output.dense") + x
        a = layer_norm(a, f(pre + "attention.output.LayerNorm.weight"),
                       f(pre + "attention.output.LayerNorm.bias"), eps)
        m = lin(a, pre + "intermediate.dense")
        m = 0.5 * m * (1.0 + erf(m / np.sqrt(2.0)))
        o = lin(m, pre + "output.dense") + a
        x = layer_norm(o, f(pre + "output.LayerNorm.weight"), f(pre + "output.LayerNorm.bias"), eps)
    w = mask.astype(np.float64)[:, :, None]
    mean = (x * w).sum(1) / np.maximum(w.sum(1), 1e-9)
    emb = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return x, emb


def main():
    model, corpus, out = (pathlib.Path(a) for a in sys.argv[1:4])
    cfg = json.loads((model / "config.json").read_text())
    params = load_file(str(model / "model.safetensors"))
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    calibration, _ = split(entries(corpus))
    # Evenly spaced over the split, so every file (and every length) is in.
    sentences = [calibration[i * len(calibration) // REFERENCE_SENTENCES]
                 for i in range(REFERENCE_SENTENCES)]
    tensors = {}
    for k in range(0, len(sentences), BATCH):
        part = sentences[k:k + BATCH]
        enc = [tok.encode(t) for t in part]
        s = max(len(e.ids) for e in enc)
        ids = np.zeros((len(part), s), np.int64)
        mask = np.zeros((len(part), s), np.int64)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        types = np.zeros_like(ids)
        hidden, emb = bert(params, cfg, ids, mask, types)
        key = f"batch{k // BATCH}"
        tensors[f"{key}.input_ids"] = ids
        tensors[f"{key}.attention_mask"] = mask
        tensors[f"{key}.token_type_ids"] = types
        tensors[f"{key}.last_hidden_state"] = hidden.astype(np.float32)
        tensors[f"{key}.sentence_embedding"] = emb.astype(np.float32)
        tensors[f"{key}.text"] = np.frombuffer("\n".join(part).encode("utf-8"), np.uint8).copy()
        print(f"{key}: {len(part)} sentences, {s} tokens", file=sys.stderr)
    save_file(tensors, str(out))


if __name__ == "__main__":
    main()
