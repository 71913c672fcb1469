"""Helpers shared by the ONNX Runtime reference-vector scripts (imported from scripts/)."""
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ort.set_default_logger_severity(3)
TYPES = {"uint8": (TensorProto.UINT8, np.uint8), "int8": (TensorProto.INT8, np.int8)}


def lcg_bytes(seed, n):
    """`n` bytes of the LCG `x <- 1664525 x + 1013904223 mod 2^32` (byte `x >> 24`), and the
    final state; the Rust tests implement the same generator."""
    x = seed & 0xFFFFFFFF
    out = np.empty(n, np.uint8)
    for i in range(n):
        x = (1664525 * x + 1013904223) & 0xFFFFFFFF
        out[i] = x >> 24
    return out, x


def session(node, inputs, output, inits):
    """An ORT CPU session over a one-node opset-21 graph."""
    graph = helper.make_graph([node], "g", inputs, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def hexf(a):
    """f32 values as the hex of their bits, comma separated."""
    return ",".join(f"{v:08x}" for v in np.asarray(a, np.float32).ravel().view(np.uint32))


def ints(a):
    """Integers, comma separated."""
    return ",".join(str(int(v)) for v in np.asarray(a).ravel())
