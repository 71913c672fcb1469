"""A direct NumPy (float64) port of GPTQ's `fasterquant` (IST-DASLab/gptq, gptq.py, with
its `Quantizer.find_params` / `quantize` from quant.py), the oracle of tests/gptq.rs.

    python scripts/gptq_reference.py W.npy X.npy OUT_PREFIX --bits 4 --group 16 \
        --block 32 --damp 0.01 [--act-order] [--sym]

W: [out, in] weights, X: [tokens, in] calibration inputs. Writes OUT_PREFIX.deq.npy (the
dequantized weights, f32) and OUT_PREFIX.rtn.npy (round to nearest with the same grid).
"""
import argparse

import numpy as np


def find_params(x, bits, sym):
    maxq = 2 ** bits - 1
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = np.where(both_zero, -1, xmin)
    xmax = np.where(both_zero, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale[:, None], zero[:, None]


def quantize(x, scale, zero, maxq):
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def gptq(W, H, bits, group, block, damp, act_order, sym):
    W = W.astype(np.float64).copy()
    H = H.copy()
    cols = W.shape[1]
    maxq = 2 ** bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = np.argsort(perm)
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)
    Hinv = np.linalg.inv(L).T @ np.linalg.inv(L)
    Hinv = np.linalg.cholesky(Hinv).T  # upper
    Q = np.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if (i1 + i) % group == 0:
                scale, zero = find_params(W[:, i1 + i:i1 + i + group], bits, sym)
            q = quantize(w[:, None], scale, zero, maxq)[:, 0]
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, invperm]
    return Q


def rtn(W, bits, group, sym):
    W = W.astype(np.float64)
    out = np.zeros_like(W)
    for g in range(0, W.shape[1], group):
        scale, zero = find_params(W[:, g:g + group], bits, sym)
        out[:, g:g + group] = quantize(W[:, g:g + group], scale, zero, 2 ** bits - 1)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("w")
    ap.add_argument("x")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--sym", action="store_true")
    a = ap.parse_args()
    W = np.load(a.w).astype(np.float64)
    X = np.load(a.x).astype(np.float64)
    H = 2.0 / X.shape[0] * X.T @ X
    Q = gptq(W, H, a.bits, a.group, a.block, a.damp, a.act_order, a.sym)
    np.save(a.out + ".deq.npy", np.ascontiguousarray(Q, dtype=np.float32))
    np.save(a.out + ".rtn.npy", np.ascontiguousarray(rtn(W, a.bits, a.group, a.sym), dtype=np.float32))


if __name__ == "__main__":
    main()
