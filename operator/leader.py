"""Leader election on a coordination.k8s.io/v1 Lease, so that only one operator replica acts.

Chosen over kopf peering: a Lease is the Kubernetes-standard lock (what controller-runtime and
kube-controller-manager use), needs no extra CRDs, and a standby takes over within one lease
duration. kopf itself then runs `standalone` (peering off).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubeinfer.operator.kube import Kube
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("kubeinfer.operator.leader")


def _micro_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _format(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, duration_seconds: int):
        self.kube, self.namespace, self.name = kube, namespace, name
        self.identity, self.duration = identity, duration_seconds

    def _spec(self, old: dict[str, Any] | None) -> dict[str, Any]:
        now = _format(_micro_now())
        old = old or {}
        taking_over = old.get("holderIdentity") != self.identity
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "acquireTime": now if taking_over else old.get("acquireTime", now),
            "renewTime": now,
            "leaseTransitions": old.get("leaseTransitions", 0) + (1 if taking_over and old else 0),
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt; optimistic concurrency (resourceVersion) makes two candidates never both win."""
        try:
            lease = self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
            if lease is None:
                self.kube.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                  "metadata": {"name": self.name, "namespace": self.namespace},
                                  "spec": self._spec(None)})
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder and holder != self.identity and not self._expired(spec):
                return False
            lease["spec"] = self._spec(spec)
            self.kube.replace(lease)
            return True
        except ApiException as error:
            if error.status not in (409, 404):
                log.warning("lease %s/%s: %s", self.namespace, self.name, error.reason)
            return False

    def _expired(self, spec: dict[str, Any]) -> bool:
        renewed = spec.get("renewTime") or spec.get("acquireTime")
        if not renewed:
            return True
        renewed_at = dt.datetime.fromisoformat(renewed.replace("Z", "+00:00"))
        return _micro_now() > renewed_at + dt.timedelta(seconds=spec.get("leaseDurationSeconds") or self.duration)

    def release(self) -> None:
        """Hand the lease over at once on a clean shutdown instead of letting it expire."""
        try:
            lease = self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                lease["spec"]["renewTime"] = None
                self.kube.replace(lease)
        except ApiException as error:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, error.reason)

    def wait_until_leader(self, retry_seconds: float, stop: threading.Event) -> bool:
        log.info("waiting for leadership of lease %s/%s as %s", self.namespace, self.name, self.identity)
        while not stop.is_set():
            if self.try_acquire_or_renew():
                log.info("became leader as %s", self.identity)
                return True
            stop.wait(retry_seconds)
        return False

    def keep_renewing(self, renew_seconds: float, stop: threading.Event, on_lost: Callable[[], None]) -> None:
        """Renew until `stop`; if renewals fail for a whole lease duration, call `on_lost` and return."""
        last_success = _micro_now()
        while not stop.wait(renew_seconds):
            if self.try_acquire_or_renew():
                last_success = _micro_now()
            elif _micro_now() - last_success > dt.timedelta(seconds=self.duration - renew_seconds):
                log.error("lost leadership of lease %s/%s; stopping", self.namespace, self.name)
                on_lost()
                return
