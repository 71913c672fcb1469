"""ONNX Runtime's latency on a QDQ model, the baseline `cargo bench --bench onnx_qdq` times the
crate against in the same run (issue 16).

    python scripts/ort_qdq_bench.py MODEL.onnx --batch 64 --threads 1

Feeds `batch` MNIST-shaped inputs (`[batch, 1, 28, 28]`, a fixed pattern in [0, 1)) to ORT's
CPU provider with all graph optimisations (its QDQ fusions into QLinearConv / QGemm) on
`threads` intra-op threads; runs 20 warm-up calls, then timed calls for at least 3 s (and at
least 20), and prints `batch<TAB>threads<TAB>median µs`.
"""
import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    a = ap.parse_args()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = ((np.arange(a.batch * 784, dtype=np.int64) * 7919) % 1000).astype(np.float32) / 1000
    feed = {name: x.reshape(a.batch, 1, 28, 28)}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    start = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < 3.0:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e6)
    print(f"{a.batch}\t{a.threads}\t{statistics.median(times):.1f}")


if __name__ == "__main__":
    main()
