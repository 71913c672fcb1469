"""Reference ranges from ONNX Runtime's entropy calibration, stacked and per batch.

    python3 -m venv .venv && .venv/bin/pip install onnxruntime numpy
    .venv/bin/python scripts/ort_entropy_vectors.py > tests/fixtures/ort_entropy_ranges.txt

`quantize_static` (and `create_calibrator(..., CalibrationMethod.Entropy).collect_data`) runs the
model over every calibration batch, stacks the outputs and histograms them **once**; calling
`HistogramCollector.collect` per batch (what `max_intermediate_outputs` style streaming does)
widens the histogram by whole bins instead. Both are recorded for every (case, setting).

Lines: `case NAME` then one `batch HEX,HEX,...` per batch (f32 bits), then
`range MODE BINS QBINS LO HI` with LO / HI the hex of ORT's f32 range. The test
`tests/quantizer.rs::ort_entropy_multi_batch` replays them; it needs no Python.
"""
import contextlib
import io

import numpy as np
from onnxruntime.quantization.calibrate import HistogramCollector

rng = np.random.default_rng(20261202)
N = 1000


def f32(a):
    return np.asarray(a, dtype=np.float32)


def cases():
    yield "widening N(0,s)", [f32(rng.normal(0, s, N)) for s in (0.5, 1.0, 2.0, 4.0)]
    yield "shrinking N(0,s)", [f32(rng.normal(0, s, N)) for s in (3.0, 1.5, 1.0, 0.5)]
    yield "relu", [f32(np.maximum(rng.normal(0.3, 1.0, N), 0)) for _ in range(4)]
    yield "N(-1,0.1)", [f32(rng.normal(-1.0, 0.1, N)) for _ in range(4)]
    yield "N(2,0.5)", [f32(rng.normal(2.0, 0.5, N)) for _ in range(4)]
    yield "Laplace", [f32(rng.laplace(0, 1.0, N)) for _ in range(4)]
    yield "Student-t(3)", [f32(rng.standard_t(3, N)) for _ in range(4)]
    sparse = []
    for _ in range(4):
        x = np.abs(rng.normal(0, 1, N))
        x[rng.random(N) < 0.9] = 0
        sparse.append(f32(x))
    yield "90 % sparse relu", sparse
    late = [f32(rng.normal(0, 1, N)) for _ in range(3)]
    late.append(f32(np.concatenate([rng.normal(0, 1, N - 1), [1000.0]])))
    yield "late 1000 outlier", late


SETTINGS = [(128, 128), (256, 64), (512, 128), (2048, 128), (1001, 128)]


def ort_range(batches, bins, qbins, stacked):
    c = HistogramCollector("entropy", False, bins, qbins, 99.99, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        if stacked:
            c.collect({"t": list(batches)})
        else:
            for b in batches:
                c.collect({"t": [b]})
        r = c.compute_collection_result()["t"]
    return f32(r[0]).item(), f32(r[1]).item()


def hexf(v):
    return f"{np.float32(v).view(np.uint32):08x}"


for name, batches in cases():
    print(f"case {name}")
    for b in batches:
        print("batch " + ",".join(f"{u:08x}" for u in b.view(np.uint32)))
    for bins, qbins in SETTINGS:
        for mode in ("stacked", "per-batch"):
            if mode == "per-batch" and name.startswith("late"):
                # ORT widens by whole bins to ~±1000 (36k bins at 128, 580k at 2048) and its
                # search then runs for minutes to hours; the crate rebins there instead.
                continue
            lo, hi = ort_range(batches, bins, qbins, mode == "stacked")
            print(f"range {mode} {bins} {qbins} {hexf(lo)} {hexf(hi)}")
