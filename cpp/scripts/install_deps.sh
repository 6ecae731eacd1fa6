#!/usr/bin/env bash
# The Debian packages the C++ runtime builds against (Debian 12/13; run as root, e.g. in CI).
# Only what is missing is installed.
#
#   install_deps.sh            the native build: compiler, CMake, nlohmann-json, libpng, libjpeg
#   install_deps.sh aarch64    cross-building for aarch64 and running it under emulation: the
#                              cross compiler, qemu-user, and the arm64 builds of libpng and libjpeg
#                              through multiarch (dpkg --add-architecture arm64; they install beside
#                              the host's own and change nothing of it)
set -euo pipefail
target="${1:-native}"
case "$target" in
  native) packages=(cmake g++ make nlohmann-json3-dev libpng-dev libjpeg-dev) ;;
  aarch64) packages=(g++-aarch64-linux-gnu qemu-user libpng-dev:arm64 libjpeg62-turbo-dev:arm64) ;;
  *) echo "install_deps.sh: unknown target '$target' (native or aarch64)" >&2; exit 2 ;;
esac
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "C++ build dependencies ($target) already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run as root: $0 $target)" >&2
  exit 3
fi
if [ "$target" = aarch64 ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
