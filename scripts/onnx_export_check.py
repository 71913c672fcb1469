"""The crate's ONNX exports in ONNX Runtime (issue 16).

    cargo test --release --test onnx_export      # writes target/onnx-export/, runs this
    .venv/bin/python scripts/onnx_export_check.py  # again, by hand (onnx, onnxruntime, numpy)

Each exported zoo model passes `onnx.checker.check_model(full_check=True)` and runs in ONNX
Runtime (CPU, all optimizations) on the inputs the test fed the crate (`NAME.manifest`:
`in|out name dtype dims` lines, raw little-endian data in `NAME.in0`, `NAME.out0`, ...);
prints the largest difference from the crate's outputs and fails above 1e-4.
"""
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
        feeds, want = {}, []
        lines = (DIR / f"{name}.manifest").read_text().split("\n")
        for line in filter(None, lines):
            kind, value, dtype, dims = line.split(" ")
            shape = [int(d) for d in dims.split(",") if d]
            k = len(feeds) if kind == "in" else len(want)
            data = np.fromfile(DIR / f"{name}.{kind}{k}", np.float32 if dtype == "f32" else np.int64)
            if kind == "in":
                feeds[value] = data.reshape(shape)
            else:
                want.append(data.reshape(shape))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds)
        diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
        worst = max(worst, diff)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        print(f"| {name} | opset {opset}, passes | {diff:.2e} |")
    if worst > 1e-4:
        sys.exit(f"ORT and the crate differ by {worst:.2e}")


if __name__ == "__main__":
    main()
