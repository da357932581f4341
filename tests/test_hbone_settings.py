"""HboneSettings: ztunnel's defaults, built from the config, values that cannot work refused."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h2.settings
import pytest

from ztunnel.config import Config
from ztunnel.errors import ConfigError
from ztunnel.hbone.engine import HboneEngine
from ztunnel.hbone.settings import HboneSettings

ROOT = Path(__file__).resolve().parent.parent
KIB, MIB = 1024, 1024 * 1024


def test_defaults_are_ztunnels() -> None:
    s = HboneSettings()
    assert (s.stream_window, s.connection_window, s.max_frame_size) == (4 * MIB, 16 * MIB, MIB)
    assert (s.client_max_header_list_size, s.server_max_header_list_size) == (16 * KIB, 64 * KIB)
    assert (s.max_concurrent_streams, s.pool_max_streams, s.pool_idle_timeout) == (200, 100, 300)
    assert (s.ping_interval, s.ping_timeout) == (10.0, 20.0)
    assert (s.connect_response_timeout, s.tls_handshake_timeout) == (10.0, 10.0)
    assert HboneSettings.from_config(Config()) == s


def test_from_config_takes_ztunnels_environment_variables() -> None:
    config = Config.from_sources(
        {
            "HTTP2_STREAM_WINDOW_SIZE": "1048576",
            "HTTP2_CONNECTION_WINDOW_SIZE": "2097152",
            "HTTP2_FRAME_SIZE": "65536",
            "POOL_MAX_STREAMS_PER_CONNECTION": "7",
            "POOL_UNUSED_RELEASE_TIMEOUT": "90s",
        }
    )
    s = HboneSettings.from_config(config)
    assert (s.stream_window, s.connection_window, s.max_frame_size) == (MIB, 2 * MIB, 64 * KIB)
    assert (s.pool_max_streams, s.pool_idle_timeout) == (7, 90.0)


def _advertised(engine: HboneEngine) -> dict[int, int]:
    return dict(engine._h2.local_settings.items())


def test_each_role_advertises_its_part_of_the_settings() -> None:
    s = HboneSettings(stream_window=MIB, max_frame_size=32 * KIB, max_concurrent_streams=9)
    codes = h2.settings.SettingCodes
    client = _advertised(HboneEngine(client=True, settings=s))
    server = _advertised(HboneEngine(client=False, settings=s))
    for side in (client, server):
        assert side[codes.INITIAL_WINDOW_SIZE] == MIB
        assert side[codes.MAX_FRAME_SIZE] == 32 * KIB
        assert side[codes.ENABLE_PUSH] == 0
    assert client[codes.MAX_HEADER_LIST_SIZE] == 16 * KIB
    assert server[codes.MAX_HEADER_LIST_SIZE] == 64 * KIB
    assert server[codes.MAX_CONCURRENT_STREAMS] == 9
    assert codes.MAX_CONCURRENT_STREAMS not in client  # the client advertises no limit


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("max_frame_size", 16_383, "HTTP2_FRAME_SIZE"),
        ("max_frame_size", 16_777_216, "HTTP2_FRAME_SIZE"),
        ("stream_window", 0, "HTTP2_STREAM_WINDOW_SIZE"),
        ("stream_window", 2**31, "HTTP2_STREAM_WINDOW_SIZE"),
        ("connection_window", 65_534, "HTTP2_CONNECTION_WINDOW_SIZE"),
        ("pool_max_streams", 0, "POOL_MAX_STREAMS_PER_CONNECTION"),
        ("pool_max_streams", True, "POOL_MAX_STREAMS_PER_CONNECTION"),
        ("pool_idle_timeout", -1.0, "POOL_UNUSED_RELEASE_TIMEOUT"),
        ("max_concurrent_streams", 0, "hbone max_concurrent_streams"),
        ("server_max_header_list_size", 0, "hbone server_max_header_list_size"),
        ("ping_interval", 0.0, "hbone ping_interval"),
        ("ping_timeout", math.nan, "hbone ping_timeout"),
        ("connect_response_timeout", -1.0, "hbone connect_response_timeout"),
        ("drain_timeout", -0.5, "hbone drain_timeout"),
        ("tls_handshake_timeout", 0, "hbone tls_handshake_timeout"),
    ],
)
def test_values_that_cannot_work_are_refused_naming_the_setting(
    field: str, value: Any, named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(HboneSettings(), **{field: value})
    assert info.value.source == named
    assert str(info.value).startswith(f"{named}: must be")


def test_edges_that_can_work_are_accepted() -> None:
    HboneSettings(max_frame_size=16_384, stream_window=65_535, connection_window=65_535)
    HboneSettings(max_frame_size=16_777_215, stream_window=2**31 - 1)
    HboneSettings(ping_interval=None, pool_idle_timeout=0, drain_timeout=0)


def test_a_frame_size_http2_forbids_is_refused_from_the_environment() -> None:
    config = Config.from_sources({"HTTP2_FRAME_SIZE": "16777216"})  # parses as an integer
    with pytest.raises(ConfigError, match="HTTP2_FRAME_SIZE"):
        HboneSettings.from_config(config)


def test_ztunnel_run_refuses_it_at_startup() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_XDS_PATH", "CA_DIR")}
    env.update(
        PROXY_MODE="dedicated",
        PROXY_WORKLOAD_INFO="default/app/app",
        FAKE_CA="true",
        HTTP2_FRAME_SIZE="16777216",
    )
    result = subprocess.run(
        [sys.executable, "-m", "ztunnel.cli", "run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ztunnel: configuration error: HTTP2_FRAME_SIZE: must be an integer in "
        "16384..16777215, got 16777216"
    ]


def test_limits_from_the_environment() -> None:
    config = Config.from_sources({"HBONE_IDLE_TIMEOUT": "90s", "HBONE_MAX_PENDING_CONNECTS": "7"})
    s = HboneSettings.from_config(config)
    assert (s.idle_timeout, s.max_pending_connects) == (90.0, 7)
    never = HboneSettings.from_config(Config.from_sources({"HBONE_IDLE_TIMEOUT": "0"}))
    assert never.idle_timeout is None
    with pytest.raises(ConfigError, match="HBONE_MAX_PENDING_CONNECTS"):
        Config.from_sources({"HBONE_MAX_PENDING_CONNECTS": "0"})
