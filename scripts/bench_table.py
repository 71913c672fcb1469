#!/usr/bin/env python3
"""Prints criterion medians (from target/criterion/*/*/*/new/) as a Markdown table.

Usage: scripts/bench_table.py GROUP_PREFIX [BASELINE_FUNCTION]
Each row is one input size; each column a function; cells are the median time and, when the
bench set a throughput: GOP/s for the GEMM and convolution benches (their elements are
multiply-accumulates, 2 operations each), images/s for forward_f32, quantized and pruned (their elements are
images). With BASELINE_FUNCTION, each cell also shows speedup = baseline median / median.
"""
import json
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent / "target" / "criterion"
prefix = sys.argv[1]
base = sys.argv[2] if len(sys.argv) > 2 else None
for group in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)):
    cells = {}
    funcs, inputs = [], []
    for bench in group.glob("*/*/new/benchmark.json"):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        f, v = meta["function_id"], meta["value_str"]
        med = est["median"]["point_estimate"]  # ns
        thr = meta.get("throughput") or {}
        elems = thr.get("Elements")
        cells[(f, v)] = (med, elems)
        if f not in funcs:
            funcs.append(f)
        if v not in inputs:
            inputs.append(v)
    order = ["f32_gemm", "f32_ndarray_dot", "f32_conv", "f32"]
    funcs.sort(key=lambda f: (order.index(f) if f in order else len(order), f))
    print(f"\n### {group.name}\n")
    print("| shape | " + " | ".join(funcs) + " |")
    print("|---|" + "---|" * len(funcs))
    for v in inputs:
        row = []
        for f in funcs:
            if (f, v) not in cells:
                row.append("")
                continue
            med, elems = cells[(f, v)]
            txt = f"{med / 1e3:.1f} µs" if med < 1e6 else f"{med / 1e6:.2f} ms"
            if elems and group.name.startswith(("forward", "quantized", "pruned")):
                txt += f", {elems / med * 1e9:,.0f} img/s"
            elif elems:
                txt += f", {2 * elems / med:.0f} GOP/s"
            if base and (base, v) in cells and f != base:
                txt += f", **{cells[(base, v)][0] / med:.2f}×**"
            row.append(txt)
        print(f"| {v} | " + " | ".join(row) + " |")
