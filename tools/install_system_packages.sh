#!/usr/bin/env bash
# The system packages the test suite needs beyond Python: an X server without a screen (Xvfb)
# and Mesa's software OpenGL (llvmpipe), so that napari's canvas draws in the napari plugin's
# tests (tests/test_napari_plugin.py). pytest-xvfb starts the server; Qt runs on its offscreen
# platform (tests/conftest.py), which takes OpenGL from that server's GLX.
#
# Idempotent and quick when everything is there (no apt-get at all). Debian/Ubuntu (apt-get);
# run as root or with sudo. Elsewhere it names what to install and fails.
set -euo pipefail

PACKAGES=(xvfb libgl1 libglx-mesa0 libgl1-mesa-dri)

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    if command -v Xvfb >/dev/null 2>&1; then
        exit 0
    fi
    echo "install_system_packages: no apt-get here; install Xvfb and Mesa's OpenGL (llvmpipe)" \
         "with this system's package manager" >&2
    exit 1
fi

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$package")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install_system_packages: ${missing[*]} missing; run this script as root" >&2
    exit 1
fi
echo "install_system_packages: installing ${missing[*]}" >&2
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
command -v Xvfb >/dev/null
