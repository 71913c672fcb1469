"""Reference vectors for QuantizeLinear / DequantizeLinear from ONNX Runtime.

    python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy
    .venv/bin/python scripts/ort_quantize_vectors.py > tests/fixtures/ort_quantize_linear.txt

Each case is one line: `quantize|dequantize dtype axis shape scales zero_points inputs outputs`,
fields separated by spaces, lists by commas; floats as the hex of their f32 bits (exact);
`axis` is `-` for per-tensor. Inputs: planted ties (values whose f32 quotient x / s is exactly
k + 0.5 while the exact quotient is not, and their neighbours one ulp away), saturation
(±1e6, ±3e38, ±inf) and random values. The test `tests/quantizer.rs::ort_quantize_linear`
replays them; it needs no Python.
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

rng = np.random.default_rng(20261202)
DTYPES = {"int8": (TensorProto.INT8, np.int8), "uint8": (TensorProto.UINT8, np.uint8),
          "int32": (TensorProto.INT32, np.int32)}


def run(op, x, scale, zp, dtype, axis):
    onnx_type, np_type = DTYPES[dtype]
    in_type = TensorProto.FLOAT if op == "QuantizeLinear" else onnx_type
    out_type = onnx_type if op == "QuantizeLinear" else TensorProto.FLOAT
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x", "s", "z"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", in_type, list(x.shape))],
        [helper.make_tensor_value_info("y", out_type, list(x.shape))],
        initializer=[
            helper.make_tensor("s", TensorProto.FLOAT, list(scale.shape), scale.tolist()),
            helper.make_tensor("z", onnx_type, list(zp.shape), zp.tolist()),
        ])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def hexf(a):
    return ",".join(f"{v:08x}" for v in np.asarray(a, np.float32).ravel().view(np.uint32))


def ints(a):
    return ",".join(str(int(v)) for v in np.asarray(a).ravel())


def planted(scale, n):
    """f32 values near (k + 0.5)·s whose f32 quotient ties, and their neighbours."""
    out = []
    while len(out) < n:
        k = int(rng.integers(-150, 150))
        x = np.float32((k + 0.5) * float(scale))
        for cand in (np.nextafter(x, np.float32(-np.inf)), x, np.nextafter(x, np.float32(np.inf))):
            out.append(cand)
    return np.array(out[:n], np.float32)


SATURATE = np.array([1e6, -1e6, 3e38, -3e38, np.inf, -np.inf], np.float32)

lines = []
for dtype in ("int8", "uint8"):
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    np_type = DTYPES[dtype][1]
    # Per tensor.
    for scale in (0.0235, 0.1, 0.003921569, 1.7):
        s = np.array(scale, np.float32)
        z = np.array(5 if dtype == "int8" else 131, np_type)
        x = np.concatenate([planted(s, 60), SATURATE, rng.normal(0, 3, 30).astype(np.float32)])
        x = x.reshape(1, -1)
        q = run("QuantizeLinear", x, s, z, dtype, None)
        lines.append(f"quantize {dtype} - {ints(x.shape)} {hexf(s)} {ints(z)} {hexf(x)} {ints(q)}")
    # Per axis, axes 0, 1, -1 of a [3, 4, 5] tensor.
    for axis in (0, 1, -1):
        shape = (3, 4, 5)
        channels = shape[axis]
        s = rng.uniform(0.005, 0.2, channels).astype(np.float32)
        z = rng.integers(lo + 20, hi - 20, channels).astype(np_type)
        # Plant a tie in every element: (k + 0.5)·s of its channel, ±1 ulp.
        idx = np.indices(shape)[axis]
        x = np.empty(shape, np.float32)
        for pos in np.ndindex(shape):
            c = idx[pos]
            x[pos] = planted(s[c], 1)[0] if rng.random() < 0.8 else rng.normal(0, 5)
        x.ravel()[:6] = SATURATE
        q = run("QuantizeLinear", x, s, z, dtype, axis)
        lines.append(f"quantize {dtype} {axis} {ints(shape)} {hexf(s)} {ints(z)} {hexf(x)} {ints(q)}")
        d = run("DequantizeLinear", q, s, z, dtype, axis)
        lines.append(f"dequantize {dtype} {axis} {ints(shape)} {hexf(s)} {ints(z)} {ints(q)} {hexf(d)}")
    q = rng.integers(lo, hi + 1, (2, 7)).astype(np_type)
    s = np.array(0.0371, np.float32)
    z = np.array(lo + 17, np_type)
    d = run("DequantizeLinear", q, s, z, dtype, None)
    lines.append(f"dequantize {dtype} - {ints(q.shape)} {hexf(s)} {ints(z)} {ints(q)} {hexf(d)}")
# int32 dequantize (biases): per tensor and per axis, zero point 0 as ONNX requires.
q = rng.integers(-2**31, 2**31 - 1, (4, 3), dtype=np.int64).astype(np.int32)
q.ravel()[:2] = [-2**31, 2**31 - 1]
for axis, s in ((None, np.array(1.3e-5, np.float32)), (1, rng.uniform(1e-6, 1e-3, 3).astype(np.float32))):
    z = np.zeros(s.shape, np.int32)
    d = run("DequantizeLinear", q, s, z, "int32", axis)
    ax = "-" if axis is None else str(axis)
    lines.append(f"dequantize int32 {ax} {ints(q.shape)} {hexf(s)} {ints(z)} {ints(q)} {hexf(d)}")

print(f"# ONNX Runtime {ort.__version__}, onnx {onnx.__version__}: scripts/ort_quantize_vectors.py")
print("\n".join(lines))
