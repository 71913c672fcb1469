"""ONNX Runtime's own static quantization of a float model, the input tests/onnx_quantized.rs
imports onto the crate's int8 kernels (issue 16).

    python scripts/ort_quantize_lenet.py DIR

DIR holds what the test wrote: `float.onnx` (the crate's float export of the trained
LeNet-5 fixture), `calib.f32` (512 MNIST training images, [512, 1, 28, 28]), `test.f32` and
`test_labels.u8` (the 10,000 test images). Quantizes with `quantize_static`:
per-channel int8 weights, uint8 activations (ORT's advice for x86 with VNNI), min-max
calibration on `calib.f32`, in both of ORT's formats: `ort_qdq.onnx` (QDQ) and
`ort_qop.onnx` (operator-oriented: QLinearConv, com.microsoft QGemm, MaxPool on uint8),
with ORT's predictions on the test images (CPU, all graph optimisations) in
`ort_qdq_pred.u8` / `ort_qop_pred.u8`; prints ORT's accuracies.
"""
import pathlib
import sys

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)


class Images(CalibrationDataReader):
    def __init__(self, name, x):
        self.batches = iter([{name: x[k:k + 64]} for k in range(0, len(x), 64)])

    def get_next(self):
        return next(self.batches, None)


def main():
    d = pathlib.Path(sys.argv[1])
    calib = np.fromfile(d / "calib.f32", np.float32).reshape(-1, 1, 28, 28)
    test = np.fromfile(d / "test.f32", np.float32).reshape(-1, 1, 28, 28)
    labels = np.fromfile(d / "test_labels.u8", np.uint8)
    name = ort.InferenceSession(str(d / "float.onnx"), providers=["CPUExecutionProvider"]) \
        .get_inputs()[0].name
    for fmt, stem in [(QuantFormat.QDQ, "ort_qdq"), (QuantFormat.QOperator, "ort_qop")]:
        quantize_static(str(d / "float.onnx"), str(d / f"{stem}.onnx"), Images(name, calib),
                        quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(d / f"{stem}.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
        pred = np.concatenate([sess.run(None, {name: test[k:k + 1000]})[0].argmax(1)
                               for k in range(0, len(test), 1000)]).astype(np.uint8)
        pred.tofile(d / f"{stem}_pred.u8")
        print(f"ORT {ort.__version__} {stem} LeNet-5: accuracy {100 * (pred == labels).mean():.2f} %")


if __name__ == "__main__":
    main()
