"""Values that parse but cannot work are refused when the agent starts, naming the setting
(issue 14): frame sizes and windows outside RFC 9113 (by HboneSettings, built from the
config at start), zero or negative durations, log filters with unknown levels, duplicate
workload IPs and zoned addresses in config files."""

from __future__ import annotations

import pytest

from ztunnel.config import DEFAULT_LISTEN_BACKLOG, Config, parse_duration
from ztunnel.errors import ConfigError
from ztunnel.hbone.settings import HboneSettings
from ztunnel.sources.clusterfile.spec import loads_spec
from ztunnel.sources.localconfig import load_local_config


@pytest.mark.parametrize(
    ("env", "variable", "problem"),
    [
        ({"PACKET_MARK": str(2**32)}, "PACKET_MARK", "out of range"),
        ({"SECRET_TTL": "0s"}, "SECRET_TTL", "longer than 0s"),
        ({"SECRET_TTL": "0"}, "SECRET_TTL", "longer than 0s"),
        ({"SECRET_TTL": "-5"}, "SECRET_TTL", "0 or more seconds"),
        ({"SECRET_TTL": "nan"}, "SECRET_TTL", "0 or more seconds"),
        ({"SECRET_TTL": "inf"}, "SECRET_TTL", "0 or more seconds"),
        ({"SECRET_TTL": "99999999999d"}, "SECRET_TTL", "longer than 100 years"),
        ({"CONNECTION_TERMINATION_DEADLINE": "-1"}, "CONNECTION_TERMINATION_DEADLINE", "0 or"),
        ({"RUST_LOG": "ztunnel=verbose"}, "RUST_LOG", "invalid log level 'verbose'"),
        ({"RUST_LOG": "=debug"}, "RUST_LOG", "empty target"),
        ({"RUST_LOG": ","}, "RUST_LOG", "empty log filter"),
        ({"ZTUNNEL_LISTEN_BACKLOG": "0"}, "ZTUNNEL_LISTEN_BACKLOG", "at least 1"),
        ({"ZTUNNEL_LISTEN_BACKLOG": "70000"}, "ZTUNNEL_LISTEN_BACKLOG", "out of range"),
        ({"ZTUNNEL_INBOUND_ADDR": "[fe80::1%eth0]:15008"}, "ZTUNNEL_INBOUND_ADDR", "expected"),
    ],
)
def test_values_that_cannot_work_are_refused(
    env: dict[str, str], variable: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_sources(env)
    assert info.value.source == variable
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"HTTP2_FRAME_SIZE": "99999999999"}, "HTTP2_FRAME_SIZE"),
        ({"HTTP2_FRAME_SIZE": "16777216"}, "HTTP2_FRAME_SIZE"),
        ({"HTTP2_STREAM_WINDOW_SIZE": str(2**31)}, "HTTP2_STREAM_WINDOW_SIZE"),
        ({"HTTP2_CONNECTION_WINDOW_SIZE": str(2**31)}, "HTTP2_CONNECTION_WINDOW_SIZE"),
    ],
)
def test_http2_values_that_cannot_work_are_refused(env: dict[str, str], variable: str) -> None:
    # What the agent does at start (ProxyContext): the config, then its HBONE settings.
    with pytest.raises(ConfigError) as info:
        HboneSettings.from_config(Config.from_sources(env))
    assert info.value.source == variable
    assert "must be an integer in" in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"HTTP2_FRAME_SIZE": "16384"},
        {"HTTP2_FRAME_SIZE": "16777215"},
        {"HTTP2_STREAM_WINDOW_SIZE": str(2**31 - 1), "HTTP2_CONNECTION_WINDOW_SIZE": "65535"},
        {"SECRET_TTL": "1s"},
        {"CONNECTION_TERMINATION_DEADLINE": "0s"},  # drain nothing: a valid choice
        {"RUST_LOG": "ztunnel::proxy=debug,access=off,warn"},
        {"ZTUNNEL_LISTEN_BACKLOG": "65535"},
    ],
)
def test_limits_themselves_are_accepted(env: dict[str, str]) -> None:
    HboneSettings.from_config(Config.from_sources(env))


def test_listen_backlog_is_configurable_with_a_larger_default() -> None:
    assert DEFAULT_LISTEN_BACKLOG == 1024
    assert Config.from_sources({}).listen_backlog == 1024
    assert Config.from_sources({"ZTUNNEL_LISTEN_BACKLOG": "4096"}).listen_backlog == 4096
    assert Config.from_sources({}, {"listen_backlog": "16"}).listen_backlog == 16
    assert Config.from_sources({}).to_dump()["listenBacklog"] == 1024


def test_durations_still_parse() -> None:
    assert parse_duration("1h30m", "X") == 5400
    assert parse_duration("0.5", "X") == 0.5
    assert parse_duration("0s", "X") == 0


# -- local config ---------------------------------------------------------------------------

TWO = """
workloads:
- {uid: a, namespace: ns, workloadIps: [10.0.0.1, fd00::1]}
- {uid: b, namespace: ns, workloadIps: [10.0.0.2, %s]}
"""


@pytest.mark.parametrize("dup", ["10.0.0.1", "fd00::1", "'fd00:0::1'"])
def test_duplicate_workload_ips_are_refused(dup: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_local_config(TWO % dup, "cfg.yaml")
    assert info.value.source == "cfg.yaml"
    assert info.value.field == "workloads[1].workloadIps[1]"
    assert "already the address of workloads[0] (a)" in info.value.problem


def test_same_ip_in_different_networks_is_allowed() -> None:
    text = (
        "workloads:\n- {uid: a, namespace: ns, network: n1, workloadIps: [10.0.0.1]}\n"
        "- {uid: b, namespace: ns, network: n2, workloadIps: [10.0.0.1]}\n"
    )
    assert len(load_local_config(text, "cfg").workloads) == 2


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("workloads: [{uid: a, namespace: ns, workloadIps: ['fe80::1%eth0']}]",
         "workloads[0].workloadIps[0]"),
        ("services: [{name: s, namespace: ns, hostname: s.ns, vips: ['/fe80::1%eth0']}]",
         "services[0].vips[0]"),
        ("workloads: [{uid: a, namespace: ns, workloadIps: [],"
         " waypoint: {destination: '/fe80::1%2'}}]", "workloads[0].waypoint.destination"),
    ],
)  # fmt: skip
def test_link_local_addresses_with_a_zone_are_refused(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_local_config(text, "cfg")
    assert info.value.field == field
    assert "fe80::1%" in info.value.problem


def test_zoned_cidr_in_a_policy_is_refused() -> None:
    text = (
        "policies: [{name: p, namespace: ns, scope: Namespace, action: Deny,"
        " rules: [[[{sourceIps: ['fe80::%eth0/64']}]]]}]"
    )
    with pytest.raises(ConfigError, match="without a zone"):
        load_local_config(text, "cfg")


@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_deeply_nested_local_config_is_one_config_error(opener: str) -> None:
    text = "workloads: " + opener * 50_000
    with pytest.raises(ConfigError) as info:
        load_local_config(text, "LOCAL_XDS")
    assert info.value.source == "LOCAL_XDS"
    assert "YAML" in info.value.problem


# -- cluster file ---------------------------------------------------------------------------


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deeply_nested_cluster_file_is_one_config_error(opener: str) -> None:
    with pytest.raises(ConfigError, match="YAML"):
        loads_spec("pods: " + opener * 50_000, "cluster.yaml")


def test_zoned_service_vip_in_a_cluster_file_is_refused() -> None:
    text = (
        "namespaces: {default: {}}\nnodes: [n1]\n"
        "services: [{name: s, namespace: default, vip: 'fe80::1%eth0', ports: {80: 8080},"
        " selector: {app: a}}]\n"
    )
    with pytest.raises(ConfigError) as info:
        loads_spec(text, "cluster.yaml")
    assert "has a zone" in info.value.problem
    assert info.value.field.startswith("services[0]")
