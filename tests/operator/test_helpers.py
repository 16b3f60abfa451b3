"""Small pure pieces of the reconciler and the leader election."""

from __future__ import annotations

import datetime as dt

import pytest
from kubeinfer.operator.leader import LeaseElector
from kubeinfer.operator.reconcile import api_message, owned_by, validation_message
from kubeinfer.operator.spec import InferenceModelSpec
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError


def test_validation_message_names_the_field() -> None:
    with pytest.raises(ValidationError) as raised:
        InferenceModelSpec.model_validate({"model": {"source": "hf://o/n"}, "replicas": -2})
    assert validation_message(raised.value) == "spec.replicas: Input should be greater than or equal to 0"


def test_api_message_reads_the_status_body() -> None:
    error = ApiException(status=422, reason="Unprocessable Entity")
    error.body = '{"kind": "Status", "message": "spec.x: Invalid value"}'
    assert api_message(error) == "spec.x: Invalid value"
    error.body = "not json"
    assert api_message(error) == "Unprocessable Entity"


def test_owned_by_checks_the_uid() -> None:
    live = {"metadata": {"ownerReferences": [{"uid": "a"}]}}
    assert owned_by(live, "a") and not owned_by(live, "b") and not owned_by({"metadata": {}}, "a")


def test_lease_expiry_and_takeover_bookkeeping() -> None:
    elector = LeaseElector(kube=None, namespace="ns", name="lease", identity="me", duration_seconds=10)  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    fresh = (now - dt.timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    stale = (now - dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert not elector._expired({"renewTime": fresh, "leaseDurationSeconds": 10})
    assert elector._expired({"renewTime": stale, "leaseDurationSeconds": 10})
    assert elector._expired({})
    taken = elector._spec({"holderIdentity": "other", "leaseTransitions": 4, "acquireTime": stale})
    assert (taken["holderIdentity"], taken["leaseTransitions"]) == ("me", 5) and taken["acquireTime"] != stale
    renewed = elector._spec({"holderIdentity": "me", "leaseTransitions": 5, "acquireTime": stale})
    assert (renewed["leaseTransitions"], renewed["acquireTime"]) == (5, stale)
