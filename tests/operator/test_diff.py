"""Desired-vs-live comparison that decides whether the operator writes at all."""

from __future__ import annotations

from kubeinfer.operator.diff import is_subset, manifest_hash, up_to_date, with_hash

DESIRED = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "labels": {"a": "1"}},
           "spec": {"ports": [{"name": "http", "port": 8000}], "selector": {"a": "1"}}}


def live_of(manifest: dict) -> dict:
    """What the API server returns: our fields plus defaults and bookkeeping."""
    live = with_hash(manifest)
    live["metadata"] |= {"resourceVersion": "7", "uid": "u"}
    live["spec"]["ports"][0]["protocol"] = "TCP"
    live["spec"]["clusterIP"] = "10.0.0.1"
    return live


def test_defaults_added_by_the_server_are_not_drift() -> None:
    assert up_to_date(with_hash(DESIRED), live_of(DESIRED))


def test_changed_or_removed_fields_are_drift() -> None:
    live = live_of(DESIRED)
    live["spec"]["ports"][0]["port"] = 9000
    assert not up_to_date(with_hash(DESIRED), live)
    live = live_of(DESIRED)
    live["spec"]["ports"].append({"name": "extra", "port": 1})
    assert not up_to_date(with_hash(DESIRED), live)
    assert not up_to_date(with_hash(DESIRED), None)


def test_a_field_we_stop_rendering_changes_the_hash() -> None:
    smaller = {**DESIRED, "metadata": {"name": "m"}}
    assert is_subset(with_hash(smaller)["spec"], live_of(DESIRED)["spec"])
    assert manifest_hash(smaller) != manifest_hash(DESIRED)
    assert not up_to_date(with_hash(smaller), live_of(DESIRED))


def test_bool_and_int_are_not_confused() -> None:
    assert not is_subset({"x": True}, {"x": 1})
    assert is_subset({"x": 1}, {"x": 1.0})
