# The ztunnel-py agent image: Debian with the tools the agent runs (iptables-save/-restore,
# ip, tc, nsenter, sysctl), bcc for eBPF mode, and the package installed into a virtualenv,
# as scripts/install.sh does.
FROM debian:bookworm-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv iptables iproute2 util-linux procps ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# eBPF mode (REDIRECT_MODE=ebpf, docs/ebpf.md): bcc compiles ebpf/ when the agent starts.
# Debian's headers, merged into one tree for BCC_KERNEL_SOURCE, serve any node kernel
# >= 6.5: the programs use only stable uapi structs. bpftool is for operators (inspecting).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3-bpfcc bpftool "linux-headers-$(dpkg --print-architecture)" \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /opt/ztunnel/kernel-headers \
    && for tree in /usr/src/linux-headers-*-common /usr/src/linux-headers-*[0-9]-"$(dpkg --print-architecture)"; do \
        cp -rsf "$tree/." /opt/ztunnel/kernel-headers/; done
ENV BCC_KERNEL_SOURCE=/opt/ztunnel/kernel-headers \
    ZTUNNEL_EBPF_DIR=/opt/ztunnel/ebpf

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ztunnel ./ztunnel
COPY ebpf /opt/ztunnel/ebpf
RUN python3 -m venv /opt/ztunnel \
    && /opt/ztunnel/bin/pip install --no-cache-dir . \
    && rm -rf /src

WORKDIR /
# Listeners in pod netns are opened by the agent itself; 15020/15021 are its own.
EXPOSE 15020 15021
ENTRYPOINT ["/opt/ztunnel/bin/ztunnel"]
CMD ["run"]
