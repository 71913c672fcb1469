"""Reference outputs of ONNX Runtime's MatMulInteger and QLinearMatMul in every 8-bit convention.

    python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy
    .venv/bin/python scripts/ort_integer_vectors.py > tests/fixtures/ort_integer_matmul.txt

Inputs come from a 32-bit LCG both this script and the test implement
(`x ← 1664525·x + 1013904223 mod 2³²`, the byte is `x >> 24`), seeded per case, so only
the outputs are stored. A is [m, k], B is [k, n]; B's zero point is per tensor or per column.
Lines: `matmul_integer A_T B_T m k n seed za zb_list outputs` and
`qlinear_matmul A_T B_T Y_T m k n seed sa za sb_list zb_list sy zy outputs`, lists comma
separated, floats as f32 hex bits. The test `tests/kernels.rs::ort_integer_matmul` replays
them on every kernel path; it needs no Python.
"""
import numpy as np
from onnx import TensorProto, helper

from ort_common import TYPES, hexf, ints, lcg_bytes, session


def as_type(raw, t):
    return raw.view(np.int8) if t == "int8" else raw


SHAPES = [(1, 1, 1), (3, 5, 7), (13, 37, 17), (40, 129, 70), (2, 300, 65), (25, 64, 33)]
rng = np.random.default_rng(14)
seed = 1
for at in TYPES:
    for bt in TYPES:
        for (m, k, n) in SHAPES:
            for per_column in (False, True):
                seed += 1
                a_raw, x = lcg_bytes(seed, m * k)
                b_raw, _ = lcg_bytes(x, k * n)
                a = as_type(a_raw, at).reshape(m, k)
                b = as_type(b_raw, bt).reshape(k, n)
                lo, hi = (0, 256) if at == "uint8" else (-128, 128)
                za = np.array(rng.integers(lo, hi), TYPES[at][1])
                lo, hi = (0, 256) if bt == "uint8" else (-128, 128)
                zb = rng.integers(lo, hi, size=n if per_column else 1).astype(TYPES[bt][1])
                zb_t = zb if per_column else zb.reshape(())
                ta, tb = TYPES[at][0], TYPES[bt][0]
                node = helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"])
                try:
                    s = session(node,
                                [helper.make_tensor_value_info("a", ta, [m, k]),
                                 helper.make_tensor_value_info("b", tb, [k, n])],
                                helper.make_tensor_value_info("y", TensorProto.INT32, [m, n]),
                                [helper.make_tensor("za", ta, [], [int(za)]),
                                 helper.make_tensor("zb", tb, list(zb_t.shape), zb.tolist())])
                    y = s.run(None, {"a": a, "b": b})[0]
                    # The definition, in int64: ORT must agree with it.
                    want = (a.astype(np.int64) - int(za)) @ (b.astype(np.int64) - zb.astype(np.int64))
                    assert (want == y).all(), (at, bt, m, k, n)
                    print(f"matmul_integer {at} {bt} {m} {k} {n} {seed} {int(za)} {ints(zb)} {ints(y)}")
                except Exception as e:  # a convention ORT does not implement
                    print(f"# MatMulInteger {at} x {bt} {m}x{k}x{n}: ORT refuses: {str(e)[:120]}")
                for yt in TYPES:
                    sa = np.float32(rng.uniform(0.005, 0.05))
                    sb = rng.uniform(0.002, 0.02, size=n if per_column else 1).astype(np.float32)
                    sy = np.float32(sa * float(np.mean(sb)) * np.sqrt(k) * rng.uniform(4, 12))
                    lo, hi = (0, 256) if yt == "uint8" else (-128, 128)
                    zy = np.array(rng.integers(lo, hi), TYPES[yt][1])
                    ty = TYPES[yt][0]
                    sb_t = sb if per_column else sb.reshape(())
                    node = helper.make_node("QLinearMatMul",
                                            ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])
                    try:
                        s = session(node,
                                    [helper.make_tensor_value_info("a", ta, [m, k]),
                                     helper.make_tensor_value_info("b", tb, [k, n])],
                                    helper.make_tensor_value_info("y", ty, [m, n]),
                                    [helper.make_tensor("sa", TensorProto.FLOAT, [], [float(sa)]),
                                     helper.make_tensor("za", ta, [], [int(za)]),
                                     helper.make_tensor("sb", TensorProto.FLOAT, list(sb_t.shape),
                                                        sb.tolist()),
                                     helper.make_tensor("zb", tb, list(zb_t.shape), zb.tolist()),
                                     helper.make_tensor("sy", TensorProto.FLOAT, [], [float(sy)]),
                                     helper.make_tensor("zy", ty, [], [int(zy)])])
                        y = s.run(None, {"a": a, "b": b})[0]
                        print(f"qlinear_matmul {at} {bt} {yt} {m} {k} {n} {seed} {hexf(sa)} {int(za)} "
                              f"{hexf(sb)} {ints(zb)} {hexf(sy)} {int(zy)} {ints(y)}")
                    except Exception as e:
                        print(f"# QLinearMatMul {at} x {bt} -> {yt} {m}x{k}x{n}: ORT refuses: "
                              f"{str(e)[:120]}")
