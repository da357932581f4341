#!/usr/bin/env bash
# Installs what ztunnel-py and its tests need on a fresh Debian machine:
# system tools (as root: iptables, iproute2, nsenter, iperf3, tcpdump, curl, nghttp2-client,
# wrk, nginx-light; chromium for the UI's browser tests; stunnel4, the C reference tunnel of
# bench/compare.py, and gcc, which builds its C load generator at run time), what eBPF redirection needs (bcc, kernel headers
# linked for the running kernel, bpftool, a mounted bpffs; skipped with ZTUNNEL_SKIP_EBPF=1)
# and a virtualenv at .venv with the package and its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iptables iproute2 util-linux iperf3 tcpdump procps curl stunnel4 gcc libc6-dev)
# HTTP in the simulated cluster's pods: nghttp/h2load, wrk (tests, benchmark), nginx (benchmark app).
APT_PACKAGES+=(nghttp2-client wrk nginx-light)
if [ "${ZTUNNEL_SKIP_EBPF:-0}" != 1 ] && command -v dpkg >/dev/null; then
    # bcc compiles ebpf/*.c at agent start; its Python bindings stay in Debian's dist-packages
    # and ztunnel/redirect/ebpf/environment.py imports just that package from there.
    APT_PACKAGES+=(bpfcc-tools python3-bpfcc bpftool "linux-headers-$(dpkg --print-architecture)")
fi

# bcc looks for the running kernel's headers in /lib/modules/$(uname -r)/build. Debian only
# ships headers for its own kernels; when the running kernel has none (a VM's own kernel),
# point build/source at the newest Debian headers. The BPF programs only use stable uapi
# structs (verified with 6.1 headers on 6.18). A working build dir or link (a Debian kernel's
# own) is never touched; a dangling one (headers upgraded) is re-pointed.
link_kernel_headers() {
    local mod arch hdr common
    mod="/lib/modules/$(uname -r)"
    arch=$(dpkg --print-architecture)
    if [ -d "$mod/build/include" ]; then
        return 0
    fi
    hdr=$(find /usr/src -maxdepth 1 -name "linux-headers-*-$arch" | sort -V | tail -n 1)
    common="${hdr%-"$arch"}-common"
    if [ -z "$hdr" ] || ! [ -d "$common" ]; then
        echo "no Debian kernel headers in /usr/src: eBPF mode will report missing headers"
        return 0
    fi
    mkdir -p "$mod"
    ln -sfn "$hdr" "$mod/build"
    ln -sfn "$common" "$mod/source"
}

mount_bpffs() {
    if ! mountpoint -q /sys/fs/bpf; then
        mount -t bpf bpf /sys/fs/bpf || echo "cannot mount bpffs at /sys/fs/bpf: eBPF mode unavailable"
    fi
}

# Headless browser for the admin UI's browser tests (driven by Playwright via executable_path).
APT_PACKAGES+=(chromium)

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
    # nginx is only a pod program of the benchmark: never a service of this machine.
    if command -v systemctl >/dev/null && systemctl is-enabled nginx >/dev/null 2>&1; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
    if [ "${ZTUNNEL_SKIP_EBPF:-0}" != 1 ]; then
        link_kernel_headers
        mount_bpffs
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
# An editable install leaves the package uncompiled; with PYTHONDONTWRITEBYTECODE set (as in
# many containers) every agent, worker and pod program would compile it again at each start.
.venv/bin/python -m compileall -q ztunnel >/dev/null
echo "installed: $(.venv/bin/ztunnel --version 2>/dev/null || echo ztunnel)"
