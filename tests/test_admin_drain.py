"""The drain deadline ztunnel derives from its environment (reference §2.6)."""

from __future__ import annotations

import pytest

from ztunnel.admin.drain import termination_deadline
from ztunnel.errors import ConfigError


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
def test_deadline(env: dict[str, str], expected: float) -> None:
    assert termination_deadline(env) == expected


@pytest.mark.parametrize(
    "env",
    [{"CONNECTION_TERMINATION_DEADLINE": "soon"}, {"TERMINATION_GRACE_PERIOD_SECONDS": "30s"}],
)
def test_bad_values_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        termination_deadline(env)
    assert info.value.field == next(iter(env))
