# The ztunnel-py agent image: Debian with the tools the agent runs (iptables-save/-restore,
# ip, nsenter) and the package installed into a virtualenv, as scripts/install.sh does.
FROM debian:bookworm-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv iptables iproute2 util-linux procps ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ztunnel ./ztunnel
RUN python3 -m venv /opt/ztunnel \
    && /opt/ztunnel/bin/pip install --no-cache-dir . \
    && rm -rf /src

WORKDIR /
# Listeners in pod netns are opened by the agent itself; 15020/15021 are its own.
EXPOSE 15020 15021
ENTRYPOINT ["/opt/ztunnel/bin/ztunnel"]
CMD ["run"]
