"""The one typed field reader behind the Istio policy translator and the route parser: each
raises its own error class, with the same message naming the document and the field."""

from __future__ import annotations

import pytest

from ztunnel.docfields import FieldReader
from ztunnel.errors import ConfigError
from ztunnel.policy._fields import PolicyTranslationError, Where
from ztunnel.waypoint.errors import RouteConfigError
from ztunnel.waypoint.routes_yaml import parse_route_documents

READERS = [(FieldReader, ConfigError), (Where, PolicyTranslationError)]


@pytest.mark.parametrize(("reader", "error"), READERS)
def test_bad_fields_name_the_document_and_path(
    reader: type[FieldReader], error: type[ConfigError]
) -> None:
    doc = reader("a.yaml: ns/p")
    with pytest.raises(error, match=r"^a\.yaml: ns/p: spec\.rules: expected a list, got dict$"):
        doc.sequence({}, "spec.rules")
    with pytest.raises(error, match=r"spec: expected a mapping, got list"):
        doc.mapping([], "spec")
    with pytest.raises(error, match=r"spec\.bogus: unknown field"):
        doc.known_keys({"rules": [], "bogus": 1}, "spec", ("rules",))


def test_absent_mappings_and_lists_read_as_empty() -> None:
    doc = FieldReader("x")
    assert doc.mapping(None, "m") == {}
    assert doc.sequence(None, "s") == []
    doc.known_keys({"a": 1}, "m", frozenset({"a"}))  # known keys pass


def test_the_route_parser_reports_through_the_shared_reader() -> None:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": {}},
    }
    with pytest.raises(RouteConfigError, match=r"spec\.rules: expected a list, got dict"):
        parse_route_documents([doc], source="routes.yaml")
