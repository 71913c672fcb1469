"""The crate's ONNX exports in ONNX Runtime (issue 16).

    cargo test --release --test onnx_export      # writes target/onnx-export/, runs this
    .venv/bin/python scripts/onnx_export_check.py  # again, by hand (onnx, onnxruntime, numpy)

Each exported zoo model passes `onnx.checker.check_model(full_check=True)` and runs in ONNX
Runtime (CPU, all optimizations) on the input the test fed the crate; prints the largest
difference from the crate's output and fails above 1e-4.
"""
import ast
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIR = ROOT / "target" / "onnx-export"


def main():
    models = sorted(DIR.glob("*.onnx"))
    if not models:
        sys.exit(f"no exports in {DIR}: run cargo test --release --test onnx_export first")
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}\n")
    print("| model | onnx.checker | max abs diff vs the crate |")
    print("|---|---|---|")
    worst = 0.0
    for path in models:
        name = path.stem
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        in_shape, out_shape = (ast.literal_eval(l) for l in (DIR / f"{name}.shapes").read_text().split("\n")[:2])
        x = np.fromfile(DIR / f"{name}.input.f32", np.float32).reshape(in_shape)
        want = np.fromfile(DIR / f"{name}.output.f32", np.float32).reshape(out_shape)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        diff = float(np.max(np.abs(got - want)))
        worst = max(worst, diff)
        print(f"| {name} | passes | {diff:.2e} |")
    if worst > 1e-4:
        sys.exit(f"ORT and the crate differ by {worst:.2e}")


if __name__ == "__main__":
    main()
