"""Reference outputs of ONNX Runtime's ConvInteger and QLinearConv in every 8-bit convention.

    python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy
    .venv/bin/python scripts/ort_conv_vectors.py > tests/fixtures/ort_integer_conv.txt

Inputs come from the LCG of `ort_integer_vectors.py` (x then w, one stream per case), so only
outputs are stored. x is NCHW, w is [O, C/group, kh, kw]; pads are ONNX's [t, l, b, r].
ConvInteger with per-channel weight zero points, which ORT refuses, is recorded from the
definition in int64 (checked against ORT on every case ORT does run). Lines: `conv_integer XT WT shape wshape stride dilation group pads seed zx zw_list outputs`
and `qlinear_conv XT WT YT shape wshape stride dilation group pads seed sx zx sw_list zw_list
sy zy bias_list outputs`, lists comma separated, floats as f32 hex bits. The test
`tests/kernels.rs::ort_integer_conv` replays them on every kernel path; it needs no Python.
"""
import numpy as np
from onnx import TensorProto, helper

from ort_common import TYPES, hexf, ints, lcg_bytes, session


def conv_definition(x, w, zx, zw, stride, dil, group, pads):
    """ConvInteger by its definition in int64 (for the conventions ORT does not implement)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.full((n, c, h + pads[0] + pads[2], wd + pads[1] + pads[3]), int(zx), np.int64)
    xp[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd] = x
    xp -= int(zx)
    wz = w.astype(np.int64) - zw.astype(np.int64).reshape(-1, 1, 1, 1)
    oh = (xp.shape[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, o, oh, ow), np.int64)
    og = o // group
    for oo in range(o):
        g = oo // og
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg,
                           i * dil[0]:i * dil[0] + stride[0] * (oh - 1) + 1:stride[0],
                           j * dil[1]:j * dil[1] + stride[1] * (ow - 1) + 1:stride[1]]
                y[:, oo] += np.einsum("nchw,c->nhw", patch, wz[oo, :, i, j])
    return y


def lst(a):
    return ",".join(str(v) for v in a)


# (x shape NCHW, O, k, stride, dilation, group, pads [t, l, b, r])
CONVS = [
    ((1, 3, 9, 9), 8, (3, 3), (1, 1), (1, 1), 1, (1, 1, 1, 1)),
    ((2, 8, 7, 6), 16, (3, 3), (2, 2), (1, 1), 1, (0, 0, 1, 1)),   # TF "SAME", stride 2
    ((1, 5, 8, 8), 6, (1, 1), (1, 1), (1, 1), 1, (0, 0, 0, 0)),    # pointwise
    ((1, 4, 10, 9), 4, (3, 2), (1, 2), (2, 1), 1, (1, 2, 0, 1)),   # asymmetric, dilated
    ((1, 6, 8, 8), 6, (3, 3), (1, 1), (1, 1), 6, (1, 1, 1, 1)),    # depthwise
    ((1, 6, 9, 9), 12, (3, 3), (2, 2), (1, 1), 6, (0, 0, 1, 1)),   # depthwise × 2, SAME
    ((1, 8, 6, 6), 8, (3, 3), (1, 1), (1, 1), 2, (2, 1, 0, 1)),    # grouped, asymmetric
    ((1, 16, 12, 12), 32, (3, 3), (1, 1), (1, 1), 1, (1, 0, 1, 2)),
]
rng = np.random.default_rng(15)
seed = 100
for xt in TYPES:
    for wt in TYPES:
        for (shape, o, k, stride, dil, group, pads) in CONVS:
            for per_channel in (False, True):
                seed += 1
                c = shape[1]
                wshape = (o, c // group, k[0], k[1])
                nx, nw = int(np.prod(shape)), int(np.prod(wshape))
                x_raw, st = lcg_bytes(seed, nx)
                w_raw, _ = lcg_bytes(st, nw)
                x = (x_raw.view(np.int8) if xt == "int8" else x_raw).reshape(shape)
                w = (w_raw.view(np.int8) if wt == "int8" else w_raw).reshape(wshape)
                lo, hi = (0, 256) if xt == "uint8" else (-128, 128)
                zx = np.array(rng.integers(lo, hi), TYPES[xt][1])
                lo, hi = (0, 256) if wt == "uint8" else (-128, 128)
                zw = rng.integers(lo, hi, size=o if per_channel else 1).astype(TYPES[wt][1])
                zw_shape = [o] if per_channel else []
                attrs = dict(kernel_shape=list(k), strides=list(stride), dilations=list(dil),
                             group=group, pads=[pads[0], pads[1], pads[2], pads[3]])
                geo = (f"{lst(shape)} {lst(wshape)} {lst(stride)} {lst(dil)} {group} {lst(pads)} "
                       f"{seed}")
                tx, tw = TYPES[xt][0], TYPES[wt][0]
                node = helper.make_node("ConvInteger", ["x", "w", "zx", "zw"], ["y"], **attrs)
                try:
                    s = session(node, [helper.make_tensor_value_info("x", tx, list(shape))],
                                helper.make_tensor_value_info("y", TensorProto.INT32, None),
                                [helper.make_tensor("w", tw, list(wshape), w.ravel().tolist()),
                                 helper.make_tensor("zx", tx, [], [int(zx)]),
                                 helper.make_tensor("zw", tw, zw_shape, zw.tolist())])
                    y = s.run(None, {"x": x})[0]
                    want = conv_definition(x, w, zx, zw, stride, dil, group, pads)
                    assert (want == y).all(), geo
                    print(f"conv_integer {xt} {wt} {geo} {int(zx)} {ints(zw)} {ints(y)}")
                except Exception as e:
                    # ORT refuses per-channel weight zero points here: the definition instead.
                    print(f"# ConvInteger {xt} x {wt} {geo}: ORT refuses: {str(e)[:100]}")
                    y = conv_definition(x, w, zx, zw, stride, dil, group, pads)
                    print(f"conv_integer {xt} {wt} {geo} {int(zx)} {ints(zw)} {ints(y)}")
                for yt in TYPES:
                    sx = np.float32(rng.uniform(0.005, 0.05))
                    sw = rng.uniform(0.002, 0.02, size=o if per_channel else 1).astype(np.float32)
                    kk = (c // group) * k[0] * k[1]
                    sy = np.float32(sx * float(np.mean(sw)) * np.sqrt(kk) * rng.uniform(4, 12))
                    lo, hi = (0, 256) if yt == "uint8" else (-128, 128)
                    zy = np.array(rng.integers(lo, hi), TYPES[yt][1])
                    bias = rng.integers(-3000, 3000, size=o).astype(np.int32)
                    ty = TYPES[yt][0]
                    node = helper.make_node("QLinearConv",
                                            ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"],
                                            ["y"], **attrs)
                    try:
                        s = session(node, [helper.make_tensor_value_info("x", tx, list(shape))],
                                    helper.make_tensor_value_info("y", ty, None),
                                    [helper.make_tensor("sx", TensorProto.FLOAT, [], [float(sx)]),
                                     helper.make_tensor("zx", tx, [], [int(zx)]),
                                     helper.make_tensor("w", tw, list(wshape), w.ravel().tolist()),
                                     helper.make_tensor("sw", TensorProto.FLOAT, zw_shape,
                                                        sw.tolist()),
                                     helper.make_tensor("zw", tw, zw_shape, zw.tolist()),
                                     helper.make_tensor("sy", TensorProto.FLOAT, [], [float(sy)]),
                                     helper.make_tensor("zy", ty, [], [int(zy)]),
                                     helper.make_tensor("b", TensorProto.INT32, [o], bias.tolist())])
                        y = s.run(None, {"x": x})[0]
                        print(f"qlinear_conv {xt} {wt} {yt} {geo} {hexf(sx)} {int(zx)} {hexf(sw)} "
                              f"{ints(zw)} {hexf(sy)} {int(zy)} {ints(bias)} {ints(y)}")
                    except Exception as e:
                        print(f"# QLinearConv {xt} x {wt} -> {yt} {geo}: ORT refuses: {str(e)[:100]}")
