"""all-MiniLM-L6-v2 in the crate beside ONNX Runtime f32 on the same weights (issue 15).

    bash scripts/fetch_minilm.sh
    python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy safetensors
    .venv/bin/python scripts/ort_minilm_bench.py [--rounds 3] > table.md
    .venv/bin/python scripts/ort_minilm_bench.py --ort-only   # ORT alone, TSV

Builds the ONNX graph of Hugging Face's BertModel + sentence-transformers' mean pooling and
L2 normalisation from `target/models/all-minilm-l6-v2/model.safetensors` (MatMul + Add,
LayerNormalization, Erf GELU, Softmax, as a PyTorch export holds them; ORT's own graph
optimizations fuse what they fuse), checks its embeddings against the crate's on the
timed batch, and times both at batch 1 and 32 × 128 tokens on 1 and 2 threads. Each round
runs `examples/minilm_latency.rs` (5 repetitions, median) then ORT the same way; the
figure is the median over rounds. Prints a markdown table of crate/ORT ratios.
`--precisions f32,dynamic` (the default) also times the crate's dynamic int8 (activations
per token) beside ORT's `quantize_dynamic` of the same f32 graph (int8 weights per
channel), each model's speed-up over its own f32 in the last column.
"""
import argparse
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file


ROOT = pathlib.Path(__file__).resolve().parent.parent
ort.set_default_logger_severity(3)
HIDDEN, HEADS, LAYERS = 384, 12, 6


def build(p):
    nodes, inits = [], []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], **kw))
        return out

    def linear(name, x):
        w = init(f"{name}.weight_t", p[f"{name}.weight"].T)
        b = init(f"{name}.bias", p[f"{name}.bias"])
        return node("Add", [node("MatMul", [x, w], f"{name}.mm"), b], name)

    def layer_norm(name, x):
        return node("LayerNormalization",
                    [x, init(f"{name}.weight", p[f"{name}.weight"]),
                     init(f"{name}.bias", p[f"{name}.bias"])], name, axis=-1, epsilon=1e-12)

    i64 = lambda name, v: init(name, np.array(v, np.int64))
    f32 = lambda name, v: init(name, np.array(v, np.float32))
    words = node("Gather", [init("word", p["embeddings.word_embeddings.weight"]), "input_ids"],
                 "words")
    types = node("Gather", [init("types", p["embeddings.token_type_embeddings.weight"]),
                            "token_type_ids"], "type_emb")
    # As Hugging Face's export: the position_ids buffer [1, 512] sliced to the length.
    seq = node("Slice", [node("Shape", ["input_ids"], "ids_shape"), i64("from1", [1]),
                         i64("to2", [2])], "seq1")
    pos_ids = node("Slice", [i64("position_ids", np.arange(512)[None]), i64("zero", [0]), seq,
                             i64("axis1", [1])], "pos_ids")
    pos = node("Gather", [init("pos", p["embeddings.position_embeddings.weight"]), pos_ids],
               "pos_emb")
    x = node("Add", [node("Add", [words, types], "wt"), pos], "emb_sum")
    x = layer_norm("embeddings.LayerNorm", x)
    maskf = node("Cast", ["attention_mask"], "maskf", to=TensorProto.FLOAT)
    bias = node("Mul", [node("Sub", [f32("onef", 1.0), maskf], "inv"),
                        f32("min", np.finfo(np.float32).min)], "bias2")
    bias = node("Unsqueeze", [bias, i64("ax12", [1, 2])], "bias4")
    split = i64("split_shape", [0, 0, HEADS, HIDDEN // HEADS])
    merge = i64("merge_shape", [0, 0, HIDDEN])
    for layer in range(LAYERS):
        pre = f"encoder.layer.{layer}"
        heads = {}
        for which, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]),
                            ("value", [0, 2, 1, 3])):
            y = linear(f"{pre}.attention.self.{which}", x)
            y = node("Reshape", [y, split], f"{y}.heads")
            heads[which] = node("Transpose", [y], f"{y}.t", perm=perm)
        s = node("MatMul", [heads["query"], heads["key"]], f"{pre}.scores")
        s = node("Div", [s, f32(f"{pre}.sqrt_d", np.sqrt(HIDDEN // HEADS))], f"{pre}.scaled")
        s = node("Add", [s, bias], f"{pre}.masked")
        s = node("Softmax", [s], f"{pre}.probs", axis=-1)
        c = node("MatMul", [s, heads["value"]], f"{pre}.context")
        c = node("Transpose", [c], f"{pre}.context_t", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, merge], f"{pre}.context_merged")
        a = node("Add", [linear(f"{pre}.attention.output.dense", c), x], f"{pre}.res1")
        a = layer_norm(f"{pre}.attention.output.LayerNorm", a)
        m = linear(f"{pre}.intermediate.dense", a)
        g = node("Erf", [node("Div", [m, f32(f"{pre}.sqrt2", np.sqrt(2.0))], f"{pre}.m2")],
                 f"{pre}.erf")
        g = node("Mul", [node("Mul", [m, node("Add", [g, f32(f"{pre}.onef", 1.0)],
                                               f"{pre}.erf1")], f"{pre}.mg"),
                         f32(f"{pre}.half", 0.5)], f"{pre}.gelu")
        o = node("Add", [linear(f"{pre}.output.dense", g), a], f"{pre}.res2")
        x = layer_norm(f"{pre}.output.LayerNorm", o)
    w = node("Unsqueeze", [maskf, i64("axm1", [-1])], "pool_mask")
    total = node("ReduceSum", [node("Mul", [x, w], "masked_h"), i64("ax1", [1])], "pool_sum",
                 keepdims=0)
    count = node("Max", [node("ReduceSum", [w, i64("ax1b", [1])], "count", keepdims=0),
                         f32("eps9", 1e-9)], "count_c")
    mean = node("Div", [total, count], "mean")
    norm = node("Sqrt", [node("ReduceSum", [node("Mul", [mean, mean], "sq"),
                                            i64("axl", [-1])], "ss", keepdims=1)], "norm")
    node("Div", [mean, node("Max", [norm, f32("eps12", 1e-12)], "norm_c")],
         "sentence_embedding")
    ids = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "S"])
    graph = helper.make_graph(
        nodes, "minilm", [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT,
                                       ["N", HIDDEN])], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def token_ids(batch, seq):
    """examples/minilm_latency.rs's ids: [CLS], (n·7919 + t·104729) mod 28000 + 1000, [SEP]."""
    n, t = np.meshgrid(np.arange(batch), np.arange(seq), indexing="ij")
    ids = (n * 7919 + t * 104729) % 28000 + 1000
    ids[:, 0], ids[:, -1] = 101, 102
    return ids.astype(np.int64)


def ort_session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_ort(sess, feeds):
    binding = sess.io_binding()
    for name, v in feeds.items():
        binding.bind_cpu_input(name, v)
    binding.bind_output("sentence_embedding")
    t = time.perf_counter()
    for _ in range(3):
        sess.run_with_iobinding(binding)
    per_call = (time.perf_counter() - t) / 3
    iters = int(min(max(0.5 / per_call, 2), 10_000))
    reps = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            sess.run_with_iobinding(binding)
        reps.append((time.perf_counter() - t) / iters * 1e6)
    return statistics.median(reps)


def dynamic_model(path):
    """ORT's own dynamic int8 of the f32 model: `quantize_dynamic`, int8 weights per channel
    (MatMulInteger + DynamicQuantizeLinear; LayerNorm, GELU, softmax stay float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = path.with_name("minilm.dynamic.onnx")
    if not out.exists():
        quantize_dynamic(str(path), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


def crate_run(binary, batch, seq, threads, embeddings=None, precision="f32"):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [str(binary), "--batch", str(batch), "--seq", str(seq), "--tsv",
           "--precision", precision]
    if embeddings:
        cmd += ["--embeddings", str(embeddings)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split("\t")[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--precisions", default="f32,dynamic",
                    help="f32 and / or dynamic (the crate's dynamic int8 per token beside "
                         "ORT's quantize_dynamic per channel)")
    ap.add_argument("--ort-only", action="store_true",
                    help="time ORT alone and print `batch<TAB>threads<TAB>median µs` lines "
                         "(benches/minilm.rs calls this for its baseline)")
    args = ap.parse_args()
    if args.ort_only:
        weights = ROOT / "target" / "models" / "all-minilm-l6-v2" / "model.safetensors"
        path = pathlib.Path(tempfile.mkdtemp(prefix="ort_minilm_")) / "minilm.onnx"
        onnx.save(build(load_file(str(weights))), path)
        if "dynamic" in args.precisions.split(","):
            path = dynamic_model(path)
        for batch in map(int, args.batches.split(",")):
            ids = token_ids(batch, args.seq)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                     "token_type_ids": np.zeros_like(ids)}
            for threads in map(int, args.threads.split(",")):
                print(f"{batch}\t{threads}\t{time_ort(ort_session(path, threads), feeds):.1f}",
                      flush=True)
        return
    subprocess.run(["cargo", "build", "--release", "--example", "minilm_latency"], cwd=ROOT,
                   check=True, stderr=subprocess.DEVNULL)
    binary = ROOT / "target" / "release" / "examples" / "minilm_latency"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ort_minilm_"))
    weights = ROOT / "target" / "models" / "all-minilm-l6-v2" / "model.safetensors"
    params = load_file(str(weights))
    path = tmp / "minilm.onnx"
    onnx.save(build(params), path)
    paths = {"f32": path}
    if "dynamic" in args.precisions.split(","):
        paths["dynamic"] = dynamic_model(path)
    rows = []
    for batch in map(int, args.batches.split(",")):
        ids = token_ids(batch, args.seq)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "token_type_ids": np.zeros_like(ids)}
        reference = ort_session(path, 1).run(None, feeds)[0]
        for precision in args.precisions.split(","):
            crate_run(binary, batch, args.seq, 1, embeddings=tmp / "emb", precision=precision)
            ours = np.fromfile(tmp / "emb", np.float32).reshape(batch, HIDDEN)
            theirs = ort_session(paths[precision], 1).run(None, feeds)[0]
            # Each against ORT's f32 model on this batch (synthetic ids: a sanity check).
            cos = [float(np.min(np.sum(e * reference, 1))) for e in (ours, theirs)]
            print(f"b{batch} {precision}: worst cosine vs ORT f32: crate {cos[0]:.6f}, "
                  f"ORT {cos[1]:.6f}", file=sys.stderr)
            if precision == "f32" and float(np.max(np.abs(ours - reference))) > 1e-4:
                sys.exit("crate and ORT f32 embeddings differ")
            for threads in map(int, args.threads.split(",")):
                sess = ort_session(paths[precision], threads)
                c, o = [], []
                for _ in range(args.rounds):
                    c.append(crate_run(binary, batch, args.seq, threads, precision=precision))
                    o.append(time_ort(sess, feeds))
                ours_t, theirs_t = statistics.median(c), statistics.median(o)
                rows.append((precision, batch, threads, ours_t, theirs_t))
                print(f"{precision} b{batch} t{threads}: crate {ours_t:.0f} µs, ORT "
                      f"{theirs_t:.0f} µs, ratio {ours_t / theirs_t:.2f}", file=sys.stderr)
    cpu = next((line.split(":", 1)[1].strip() for line in
                open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; onnxruntime {ort.__version__}; {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d')}\n")
    f32 = {(b, t): (c, o) for p, b, t, c, o in rows if p == "f32"}
    print("| model | batch × tokens | threads | crate ms | ORT ms | crate / ORT "
          "| speed-up over own f32: crate / ORT |")
    print("|---|---|---|---|---|---|---|")
    for precision, batch, threads, ours_t, theirs_t in rows:
        base = f32.get((batch, threads))
        gain = (f"{base[0] / ours_t:.2f}× / {base[1] / theirs_t:.2f}×" if base else "")
        name = {"f32": "f32", "dynamic": "dynamic int8"}[precision]
        print(f"| all-MiniLM-L6-v2 {name} | {batch} × {args.seq} | {threads} "
              f"| {ours_t / 1e3:.1f} | {theirs_t / 1e3:.1f} | **{ours_t / theirs_t:.2f}** "
              f"| {gain} |")


if __name__ == "__main__":
    main()
