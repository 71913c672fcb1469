"""The crate beside ONNX Runtime on the same weights, inputs and thread counts (issue 23).

    python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy
    .venv/bin/python scripts/ort_bench.py [--rounds 5] [--models mlp,lenet5] > table.md

For LeNet-300-100 and LeNet-5 (the committed fixtures' weights) it builds the float ONNX
graph (MatMul + Add, Conv, MaxPool: what a PyTorch export holds), checks ORT's float output
against the crate's on the timed batch, quantizes it with ORT's own tools (`quantize_static`
with min-max on the same four synthetic calibration batches the crate uses, u8 activations
and s8 weights, in QDQ and QOperator form, per tensor and per channel; `quantize_dynamic`
per channel), and times everything at batch 1 and 64 on 1 and 2 threads. Each round runs
the crate's `examples/model_latency.rs` (5 repetitions, median) and then every ORT session
(the same way) precision by precision, so the two sides share the machine's state; the
figure is the median over rounds. ORT's int8 figure is its fastest variant. ORT is called through IO binding with the
input already bound, so a call costs it ~3 µs of Python on top of the native run.

Prints one markdown table of medians in µs and crate/ORT ratios (below 1: the crate is
faster). The machine is shared: compare ratios of one run, not runs of different days.
"""
import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_dynamic, quantize_static)

ROOT = pathlib.Path(__file__).resolve().parent.parent
ort.set_default_logger_severity(3)
logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice


def load_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(body[start:end], np.float32).reshape(meta["shape"])
    return out


def synthetic_batch(n, seed):
    """The crate example's input: (((n + seed)·31 + c·7 + h·3 + w) mod 97) / 97."""
    d0, d1, d2, d3 = np.meshgrid(np.arange(n), np.arange(1), np.arange(28), np.arange(28),
                                 indexing="ij")
    return ((((d0 + seed) * 31 + d1 * 7 + d2 * 3 + d3) % 97) / 97.0).astype(np.float32)


def linear(nodes, inits, name, x, w, b):
    inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.weight_t"),
              numpy_helper.from_array(b, f"{name}.bias")]
    nodes += [helper.make_node("MatMul", [x, f"{name}.weight_t"], [f"{name}.mm"]),
              helper.make_node("Add", [f"{name}.mm", f"{name}.bias"], [name])]
    return name


def build(model, p):
    nodes, inits = [], []
    if model == "mlp":
        nodes.append(helper.make_node("Flatten", ["input"], ["flat"]))
        x = "flat"
        for i, layer in enumerate(["fc1", "fc2", "fc3"]):
            x = linear(nodes, inits, layer, x, p[f"{layer}.weight"], p[f"{layer}.bias"])
            if i < 2:
                nodes.append(helper.make_node("Relu", [x], [f"relu{i + 1}"]))
                x = f"relu{i + 1}"
    else:
        x = "input"
        for conv, pool in (("conv1", "pool1"), ("conv2", "pool2")):
            inits += [numpy_helper.from_array(p[f"{conv}.weight"], f"{conv}.weight"),
                      numpy_helper.from_array(p[f"{conv}.bias"], f"{conv}.bias")]
            nodes.append(helper.make_node("Conv", [x, f"{conv}.weight", f"{conv}.bias"], [conv],
                                          kernel_shape=[5, 5]))
            nodes.append(helper.make_node("MaxPool", [conv], [pool], kernel_shape=[2, 2],
                                          strides=[2, 2]))
            x = pool
        nodes.append(helper.make_node("Flatten", [x], ["flat"]))
        x = linear(nodes, inits, "fc1", "flat", p["fc1.weight"], p["fc1.bias"])
        nodes.append(helper.make_node("Relu", [x], ["relu1"]))
        x = linear(nodes, inits, "fc2", "relu1", p["fc2.weight"], p["fc2.bias"])
    graph = helper.make_graph(
        nodes, model, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                     ["N", 1, 28, 28])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 10])], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


class Calibration(CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"input": synthetic_batch(64, s)} for s in range(4)])

    def get_next(self):
        return next(self.batches, None)


def variants(model, f32_path, tmp):
    """Paths of the ORT models: float, the int8 variants and dynamic int8."""
    out = {"f32": [("f32", f32_path)], "int8": [], "dynamic": []}
    for fmt_name, fmt in (("QDQ", QuantFormat.QDQ), ("QOperator", QuantFormat.QOperator)):
        for per_channel in (False, True):
            path = tmp / f"{model}_{fmt_name}_{'pc' if per_channel else 'pt'}.onnx"
            quantize_static(str(f32_path), str(path), Calibration(), quant_format=fmt,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
            out["int8"].append((f"{fmt_name} {'per channel' if per_channel else 'per tensor'}",
                                path))
    path = tmp / f"{model}_dynamic.onnx"
    quantize_dynamic(str(f32_path), str(path), per_channel=True, weight_type=QuantType.QInt8)
    out["dynamic"].append(("per channel", path))
    return out


def ort_session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_ort(sess, x):
    """Median µs per call over 5 repetitions of ~0.2 s, as the crate example does."""
    binding = sess.io_binding()
    binding.bind_cpu_input("input", x)
    binding.bind_output(sess.get_outputs()[0].name)
    for _ in range(20):
        sess.run_with_iobinding(binding)
    t = time.perf_counter()
    for _ in range(20):
        sess.run_with_iobinding(binding)
    per_call = (time.perf_counter() - t) / 20
    iters = int(min(max(0.2 / per_call, 5), 100_000))
    reps = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(iters):
            sess.run_with_iobinding(binding)
        reps.append((time.perf_counter() - t) / iters * 1e6)
    return statistics.median(reps)


def crate_run(binary, model, batch, threads, precision=None, logits=None):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [str(binary), "--model", model, "--batch", str(batch), "--tsv"]
    if precision:
        cmd += ["--precision", precision]
    if logits:
        cmd += ["--logits", str(logits)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return {line.split("\t")[0]: float(line.split("\t")[1]) for line in out.splitlines()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="mlp,lenet5")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--example", "model_latency"], cwd=ROOT,
                   check=True, stderr=subprocess.DEVNULL)
    binary = ROOT / "target" / "release" / "examples" / "model_latency"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ort_bench_"))
    fixtures = {"mlp": "lenet_300_100.safetensors", "lenet5": "lenet5.safetensors"}
    rows = []
    for model in args.models.split(","):
        f32_path = tmp / f"{model}.onnx"
        onnx.save(build(model, load_safetensors(ROOT / "tests" / "fixtures" / fixtures[model])),
                  f32_path)
        paths = variants(model, f32_path, tmp)
        for batch in map(int, args.batches.split(",")):
            x = synthetic_batch(batch, 9)
            crate_run(binary, model, batch, 1, logits=tmp / "logits")
            for precision, tol in (("f32", 1e-4), ("int8", None), ("dynamic", None)):
                ours = np.fromfile(tmp / f"logits.{precision}", np.float32).reshape(batch, 10)
                theirs = ort_session(paths[precision][0][1], 1).run(None, {"input": x})[0]
                if tol is not None:
                    err = np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-6)
                    if err > tol:
                        sys.exit(f"{model} b{batch}: crate and ORT float outputs differ ({err:.2e})")
                agree = np.mean(ours.argmax(1) == theirs.argmax(1))
                print(f"{model} b{batch} {precision}: argmax agreement with ORT {agree:.3f}",
                      file=sys.stderr)
            for threads in map(int, args.threads.split(",")):
                sessions = {p: [(n, ort_session(path, threads)) for n, path in v]
                            for p, v in paths.items()}
                crate_times = {p: [] for p in paths}
                ort_times = {p: {n: [] for n, _ in v} for p, v in sessions.items()}
                for _ in range(args.rounds):
                    # Per precision, the crate then every ORT variant, so that a slow spell
                    # of the shared machine hits both sides of a ratio.
                    for p, v in sessions.items():
                        crate_times[p].append(crate_run(binary, model, batch, threads, p)[p])
                        for n, sess in v:
                            ort_times[p][n].append(time_ort(sess, x))
                for p in paths:
                    ours = statistics.median(crate_times[p])
                    best_name, theirs = min(((n, statistics.median(t))
                                             for n, t in ort_times[p].items()),
                                            key=lambda e: e[1])
                    rows.append((model, p, batch, threads, ours, theirs, best_name))
                    print(f"{model} {p} b{batch} t{threads}: crate {ours:.1f} µs, "
                          f"ORT {theirs:.1f} µs ({best_name}), ratio {ours / theirs:.2f}",
                          file=sys.stderr)
    cpu = next((line.split(":", 1)[1].strip() for line in
                open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; onnxruntime {ort.__version__}; {args.rounds} rounds; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| model | precision | batch | threads | crate µs | ORT µs (fastest variant) "
          "| crate / ORT |")
    print("|---|---|---|---|---|---|---|")
    names = {"mlp": "LeNet-300-100", "lenet5": "LeNet-5"}
    for model, p, batch, threads, ours, theirs, best_name in rows:
        print(f"| {names[model]} | {p} | {batch} | {threads} | {ours:.1f} | {theirs:.1f} "
              f"({best_name}) | **{ours / theirs:.2f}** |")


if __name__ == "__main__":
    main()
