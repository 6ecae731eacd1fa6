#!/usr/bin/env bash
# ONNX Runtime C/C++ headers for the onnxruntime backend, into DEST (default build/ort-sdk).
#
# The PyPI wheels ship libonnxruntime.so but no headers. Debian 13 (trixie) packages them as
# libonnxruntime-dev (1.21; the C API is versioned, so they drive the newer wheel library).
# On Debian 13: apt-get install libonnxruntime-dev and skip this script. On Debian 12 this
# downloads that one .deb (85 kB) through a private apt directory for suite trixie, without
# touching the system's sources or installing anything, and unpacks it with dpkg-deb.
set -euo pipefail
dest="${1:-build/ort-sdk}"
if [ -f "$dest/usr/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sl" "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/sl/trixie.sources" <<SOURCES
Types: deb
URIs: ${DEBIAN_MIRROR:-http://deb.debian.org/debian}
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
apt_private=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/sl" -o "Dir::State::Lists=$work/lists"
             -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
apt-get "${apt_private[@]}" -qq update
(cd "$work" && apt-get "${apt_private[@]}" -qq download libonnxruntime-dev)
mkdir -p "$dest"
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$dest"
echo "ONNX Runtime headers ($(basename "$work"/libonnxruntime-dev_*.deb)) in $dest/usr/include/onnxruntime"
