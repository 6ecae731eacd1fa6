#!/usr/bin/env bash
# What cross-building the C++ runtime for aarch64 and running it under emulation needs (Debian
# 12/13, as root, e.g. in CI): the cross compiler, qemu-user, and the arm64 builds of libpng and
# libjpeg through multiarch (`dpkg --add-architecture arm64`; they install beside the host's own
# and change nothing of it). Only what is missing is installed.
set -euo pipefail
packages=(g++-aarch64-linux-gnu qemu-user libpng-dev:arm64 libjpeg62-turbo-dev:arm64)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "aarch64 cross-build dependencies already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run as root: dpkg --add-architecture arm64 && apt-get update && apt-get install ${missing[*]})" >&2
  exit 3
fi
dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
