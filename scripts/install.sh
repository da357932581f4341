#!/usr/bin/env bash
# Installs what ztunnel-py and its tests need on a fresh Debian machine:
# system tools (as root: iptables, iproute2, nsenter, iperf3, tcpdump, curl) and a
# virtualenv at .venv with the package and its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iptables iproute2 util-linux iperf3 tcpdump procps curl)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing system packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
else
    echo "not root: skipping system packages (${APT_PACKAGES[*]}); root-only tests will be skipped"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "installed: $(.venv/bin/ztunnel --version 2>/dev/null || echo ztunnel)"
