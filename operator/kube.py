"""A thin, synchronous Kubernetes client for the reconciler (the official client's DynamicClient)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from kubeinfer.operator.render.common import API_VERSION, FIELD_MANAGER, KIND
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

log = logging.getLogger(__name__)


class KindNotServed(Exception):
    """The cluster has no such kind (e.g. ServiceMonitor without prometheus-operator's CRD)."""


def load_api_client() -> client.ApiClient:
    """In-cluster service account when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kube:
    # A miss makes the discovery client re-read all of discovery: remember misses for a while.
    UNSERVED_RECHECK_SECONDS = 60.0

    def __init__(self, api_client: client.ApiClient | None = None):
        self.dynamic = DynamicClient(api_client or load_api_client())
        self._unserved: dict[tuple[str, str], float] = {}

    def _resource(self, api_version: str, kind: str):
        if time.monotonic() < self._unserved.get((api_version, kind), 0.0):
            raise KindNotServed(f"{kind}.{api_version} is not served by this cluster")
        try:
            return self.dynamic.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError as error:
            self._unserved[(api_version, kind)] = time.monotonic() + self.UNSERVED_RECHECK_SECONDS
            raise KindNotServed(f"{kind}.{api_version} is not served by this cluster") from error

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        result = self._resource(api_version, kind).get(namespace=namespace, label_selector=label_selector)
        return [item.to_dict() if hasattr(item, "to_dict") else item for item in result.to_dict()["items"]]

    def apply(self, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply as `kubeinfer-operator`, forcing ownership of the fields we render."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        return self.dynamic.server_side_apply(resource, body=manifest, name=meta["name"], namespace=meta["namespace"],
                                              field_manager=field_manager, force_conflicts=True).to_dict()

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace,
                                                     body={"propagationPolicy": "Background"})
        except ApiException as error:
            if error.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        resource = self._resource(API_VERSION, KIND)
        self.dynamic.patch(resource.subresources["status"], body={"status": status}, name=name, namespace=namespace,
                           content_type="application/merge-patch+json")

    def replace(self, manifest: dict[str, Any]) -> dict[str, Any]:
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        return resource.replace(body=manifest, namespace=manifest["metadata"].get("namespace")).to_dict()

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        return resource.create(body=manifest, namespace=manifest["metadata"].get("namespace")).to_dict()

    def event(self, owner: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the InferenceModel (what `kubectl describe im` shows)."""
        meta = owner["metadata"]
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.create(event)
        except ApiException as error:  # an event is best effort; never fail a reconcile for it
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], error.reason)
