"""Agent settings from ztunnel's environment variables and flags."""

from __future__ import annotations

import pytest

from ztunnel.config import Config, ProxyMode, WorkloadInfo, termination_deadline
from ztunnel.errors import ConfigError


def test_defaults_are_ztunnels() -> None:
    c = Config.from_sources({})
    assert c.proxy_mode is ProxyMode.SHARED
    assert c.outbound_addr == ("::", 15001)
    assert c.inbound_addr == ("::", 15008)
    assert c.inbound_plaintext_addr == ("::", 15006)
    assert c.admin_addr == ("127.0.0.1", 15000)
    assert c.stats_addr == ("::", 15020)
    assert c.readiness_addr == ("::", 15021)
    assert c.socks5_addr == ("127.0.0.1", 15080) and not c.socks5_enabled
    assert c.secret_ttl == 86400
    assert c.pool_max_streams_per_connection == 100
    assert c.pool_unused_release_timeout == 300
    assert (c.http2_stream_window_size, c.http2_connection_window_size) == (4 << 20, 16 << 20)
    assert c.http2_frame_size == 1 << 20
    assert c.packet_mark == 0x539
    assert c.trust_domain == "cluster.local"


def test_flags_override_environment() -> None:
    c = Config.from_sources(
        {"TRUST_DOMAIN": "env.example", "SECRET_TTL": "1h30m", "ZTUNNEL_ADMIN_ADDR": "[::1]:9"},
        {"trust_domain": "flag.example"},
    )
    assert c.trust_domain == "flag.example"
    assert c.secret_ttl == 5400
    assert c.admin_addr == ("::1", 9)


def test_dedicated_mode_needs_workload_info() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_sources({"PROXY_MODE": "dedicated"})
    assert info.value.source == "PROXY_WORKLOAD_INFO"
    c = Config.from_sources({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/name/sa"})
    assert c.proxy_workload_info == WorkloadInfo("ns", "name", "sa")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PROXY_WORKLOAD_INFO": "ns/name"}, "PROXY_WORKLOAD_INFO"),
        ({"FAKE_CA": "maybe"}, "FAKE_CA"),
        ({"POOL_MAX_STREAMS_PER_CONNECTION": "0"}, "POOL_MAX_STREAMS_PER_CONNECTION"),
        ({"HTTP2_FRAME_SIZE": "1024"}, "HTTP2_FRAME_SIZE"),
        ({"ZTUNNEL_INBOUND_ADDR": "1.2.3.4:70000"}, "ZTUNNEL_INBOUND_ADDR"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOCAL_XDS_PATH": "a", "LOCAL_XDS": "b"}, "LOCAL_XDS_PATH"),
        ({"FAKE_CA": "true", "CA_DIR": "/x"}, "CA_DIR"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_sources(env)
    assert info.value.source == variable


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 5.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "30"}, 25.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "11"}, 6.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "10"}, 9.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "1"}, 1.0),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "0"}, 1.0),
        (
            {"CONNECTION_TERMINATION_DEADLINE": "500ms", "TERMINATION_GRACE_PERIOD_SECONDS": "30"},
            0.5,
        ),
        ({"CONNECTION_TERMINATION_DEADLINE": "2m"}, 120.0),
        ({"CONNECTION_TERMINATION_DEADLINE": "7"}, 7.0),
    ],
)
def test_drain_deadline_follows_ztunnel(env: dict[str, str], expected: float) -> None:
    assert termination_deadline(env) == expected
    assert Config.from_sources(env).connection_termination_deadline == expected


@pytest.mark.parametrize(
    "env",
    [{"CONNECTION_TERMINATION_DEADLINE": "soon"}, {"TERMINATION_GRACE_PERIOD_SECONDS": "30s"}],
)
def test_bad_drain_values_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_sources(env)
    assert info.value.source == next(iter(env))


def test_config_dump_is_camel_case() -> None:
    dump = Config.from_sources({}).to_dump()
    assert dump["proxyMode"] == "shared"
    assert dump["inboundAddr"] == "[::]:15008"
    assert dump["http2StreamWindowSize"] == 4 << 20


def test_control_plane_settings_use_ztunnels_names() -> None:
    c = Config.from_sources(
        {
            "XDS_ADDRESS": "istiod.istio-system.svc:15012",
            "ISTIO_META_CLUSTER_ID": "east",
            "CA_HEADER_X_TENANT": "secret-value",
            "XDS_HEADER_X_B": "2",
            "ISTIO_METAJSON_LABELS": '{"app": "ztunnel"}',
        }
    )
    assert c.cluster_id == "east"  # CLUSTER_ID's fallback, as ztunnel
    assert Config.from_sources({"CLUSTER_ID": "a", "ISTIO_META_CLUSTER_ID": "b"}).cluster_id == "a"
    assert c.ca_headers == (("x-tenant", "secret-value"),)
    assert c.xds_headers == (("x-b", "2"),)
    # ztunnel's defaults: the CA is istiod, pods come from istio-cni's default socket
    assert c.ca_target == "istiod.istio-system.svc:15012"
    assert c.zds_path == "/var/run/ztunnel/ztunnel.sock"
    assert c.xds_root_ca == c.ca_root_ca == "./var/run/secrets/istio/root-cert.pem"
    assert c.auth_token == "./var/run/secrets/tokens/istio-token"
    dump = c.to_dump()
    assert dump["caHeaders"] == ["x-tenant"]  # names only: values may be credentials
    assert "secret-value" not in str(dump)
    assert dump["xdsMetadata"] == {"LABELS": {"app": "ztunnel"}}


def test_a_local_ca_or_no_istiod_means_no_remote_ca() -> None:
    assert Config.from_sources({}).ca_target is None
    assert Config.from_sources({"XDS_ADDRESS": "i:1", "FAKE_CA": "true"}).ca_target is None
    assert Config.from_sources({"CA_ADDRESS": "ca:1"}).ca_target == "ca:1"
    assert Config.from_sources({}).zds_path is None
    dedicated = {"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "a/b/c", "XDS_ADDRESS": "i:1"}
    assert Config.from_sources(dedicated).zds_path is None


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CA_ADDRESS": "ca:1", "CA_DIR": "/x"}, "CA_ADDRESS"),
        ({"CA_ADDRESS": "ca:1", "FAKE_CA": "true"}, "CA_ADDRESS"),
        ({"XDS_ADDRESS": "i:1", "LOCAL_XDS_PATH": "/f"}, "XDS_ADDRESS"),
        ({"INPOD_UDS": "/s", "PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "a/b/c"},
         "INPOD_UDS"),
        ({"INPOD_UDS": "/s", "REDIRECT_MODE": "iptables"}, "REDIRECT_MODE"),
        ({"INPOD_UDS": "/s", "REDIRECT_MODE": "ebpf"}, "REDIRECT_MODE"),  # istio-cni's job
        ({"ZTUNNEL_BPF_PIN_DIR": "relative/pins"}, "ZTUNNEL_BPF_PIN_DIR"),
        ({"ISTIO_METAJSON_X": "{"}, "ISTIO_METAJSON_X"),
    ],
)  # fmt: skip
def test_inconsistent_control_plane_settings(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_sources(env)
    assert info.value.source == variable
