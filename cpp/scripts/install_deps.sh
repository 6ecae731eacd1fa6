#!/usr/bin/env bash
# The Debian packages the C++ runtime builds against (Debian 12/13; run as root, e.g. in CI).
# Only what is missing is installed.
set -euo pipefail
packages=(cmake g++ make nlohmann-json3-dev libpng-dev libjpeg-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "C++ build dependencies already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
  exit 3
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
