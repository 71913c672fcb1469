"""The crate's QDQ exports of its int8 MNIST models in ONNX Runtime (issue 16).

    cargo test --release --test onnx_export qdq   # writes target/onnx-qdq/, runs this
    target/models/venv/bin/python scripts/onnx_qdq_check.py   # again, by hand

For each `NAME.onnx` the test wrote: `onnx.checker.check_model(full_check=True)`, then ONNX
Runtime (CPU, all graph optimisations, so its QDQ fusions into QLinearConv / QGemm run) on
the 10,000 MNIST test images the crate's int8 model classified (`NAME.images.f32`,
`NAME.labels.u8`, the crate's predictions `NAME.crate.u8`). Prints both accuracies and
their argmax agreement; fails when the accuracies differ by more than 0.05 points or the
agreement is below 99.9 %.
"""
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIR = ROOT / "target" / "onnx-qdq"


def main():
    models = sorted(DIR.glob("*.onnx"))
    if not models:
        sys.exit(f"no QDQ exports in {DIR}: run cargo test --release --test onnx_export first")
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}\n")
    print("| model | onnx.checker | crate int8 accuracy | ORT accuracy | argmax agreement |")
    print("|---|---|---|---|---|")
    failed = []
    for path in models:
        name = path.stem
        onnx.checker.check_model(onnx.load(path), full_check=True)
        labels = np.fromfile(DIR / f"{name}.labels.u8", np.uint8)
        ours = np.fromfile(DIR / f"{name}.crate.u8", np.uint8)
        shape = [len(labels)] + [int(d) for d in (DIR / f"{name}.shape").read_text().split()]
        x = np.fromfile(DIR / f"{name}.images.f32", np.float32).reshape(shape)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = sess.get_inputs()[0].name
        theirs = np.concatenate([
            sess.run(None, {feed: x[k:k + 1000]})[0].argmax(1) for k in range(0, len(x), 1000)
        ])
        acc_ours = float((ours == labels).mean())
        acc_ort = float((theirs == labels).mean())
        agree = float((ours == theirs).mean())
        print(f"| {name} | passes | {100 * acc_ours:.2f} % | {100 * acc_ort:.2f} % | {100 * agree:.2f} % |")
        if abs(acc_ours - acc_ort) > 0.0005 or agree < 0.999:
            failed.append(name)
    if failed:
        sys.exit(f"ORT and the crate disagree on {failed}")


if __name__ == "__main__":
    main()
