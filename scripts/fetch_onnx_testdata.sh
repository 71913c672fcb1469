#!/usr/bin/env bash
# ONNX's own operator conformance tests, for tests/onnx_node.rs:
#   libonnx-testdata   Debian 1.12.0-2 (MIT "Expat", per its copyright file, copied beside it): ~1,070 node tests, each a one-op
#                      model.onnx with input_*.pb / output_*.pb TensorProtos
# unpacked (no root needed) into target/models/onnx-testdata/.
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
echo "ONNX node tests in $out/node ($(ls "$out/node" | wc -l) tests)"
