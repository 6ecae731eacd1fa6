#!/usr/bin/env bash
# ONNX Runtime's aarch64 shared library, into DEST (default build/ort-aarch64), for the
# cross-built C++ runtime (make cpp-aarch64). The library comes from the PyPI wheel pinned with
# its sha256 in onnxruntime-aarch64.txt beside this script; only capi/libonnxruntime.so.<version>
# is unpacked (the backend dlopen-s it), nothing is installed. PYTHON (default python3) runs pip.
set -euo pipefail
dest="${1:-build/ort-aarch64}"
python="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"
if compgen -G "$dest/libonnxruntime.so.*" >/dev/null; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_27_aarch64 \
    --python-version 3.11 --require-hashes -r "$here/onnxruntime-aarch64.txt" -d "$work"
wheel="$(ls "$work"/onnxruntime-*.whl)"
"$python" - "$wheel" "$work/lib" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    names = [n for n in wheel.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so.")]
    if len(names) != 1:
        sys.exit(f"{sys.argv[1]}: expected one capi/libonnxruntime.so.<version>, found {names}")
    wheel.extract(names[0], sys.argv[2])
PY
mkdir -p "$dest"
# Renamed into place last: an interrupted fetch leaves nothing that the check above would take.
lib="$(ls "$work"/lib/onnxruntime/capi/libonnxruntime.so.*)"
mv "$lib" "$dest/$(basename "$lib").part"
mv "$dest/$(basename "$lib").part" "$dest/$(basename "$lib")"
echo "ONNX Runtime aarch64 library: $dest/$(basename "$lib")"
