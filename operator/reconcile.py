"""One level-triggered reconcile: read the InferenceModel, converge its children, report status.

Every write is skipped when the live object already matches, so a resync or an operator restart
leaves resourceVersions alone.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kubeinfer.operator.diff import is_subset, up_to_date, with_hash
from kubeinfer.operator.kube import KindNotServed, Kube, now_rfc3339
from kubeinfer.operator.render import render_children
from kubeinfer.operator.render.children import Child
from kubeinfer.operator.render.common import API_VERSION, FIELD_MANAGER, KIND, selector_string
from kubeinfer.operator.settings import OperatorSettings
from kubeinfer.operator.spec import InferenceModel
from kubeinfer.operator.status import Problem, compute_status, status_changed
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

log = logging.getLogger("kubeinfer.operator")

WARNING_PHASES = ("Degraded", "Failed")
HANDOVER_MANAGER = "kubeinfer-operator-handover"


def api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.reason)


def validation_message(error: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
                     for e in error.errors())


def owned_by(live: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in live["metadata"].get("ownerReferences") or [])


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings):
        self.kube = kube
        self.settings = settings
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    def reconcile_all(self) -> None:
        """The periodic resync: every InferenceModel in the watched namespaces."""
        for namespace in self.settings.namespaces or [None]:
            for body in self.kube.list(API_VERSION, KIND, namespace=namespace):
                try:
                    self.reconcile(body["metadata"]["namespace"], body["metadata"]["name"])
                except Exception:
                    log.exception("resync of %s/%s failed", body["metadata"]["namespace"], body["metadata"]["name"])

    def reconcile(self, namespace: str, name: str) -> None:
        with self._lock(namespace, name):
            body = self.kube.get(API_VERSION, KIND, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return  # deleted: the garbage collector removes the children through ownerReferences
            self._reconcile(body)

    def _reconcile(self, body: dict[str, Any]) -> None:
        try:
            im = InferenceModel.from_body(body)
        except ValidationError as error:
            self._report_invalid(body, Problem("InvalidSpec", validation_message(error)))
            return
        problem = self.check_references(im)
        warning: Problem | None = None
        if problem is None:
            for child in render_children(im, self.settings):
                try:
                    self.sync_child(im, body, child)
                except KindNotServed as error:
                    if child.manifest is not None:
                        warning = Problem("KindNotServed", str(error))
                except ApiException as error:
                    if error.status == 403 and "being terminated" in api_message(error):
                        return  # the namespace is going away, and the model with it
                    problem = Problem("ApplyFailed", f"{child.kind} {child.name}: {api_message(error)}")
                    break
                except NameTaken as error:
                    problem = Problem("NameConflict", str(error))
                    break
        deployment = self.kube.get("apps/v1", "Deployment", im.namespace, im.name)
        if deployment is not None and not owned_by(deployment, im.uid):
            deployment = None
        pods = self.kube.list("v1", "Pod", im.namespace, selector_string(im)) if deployment else []
        status = compute_status(im, deployment, pods, problem, body.get("status") or {}, now_rfc3339())
        if warning and status["phase"] != "Failed":
            degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
            if degraded["status"] == "False":
                degraded.update(status="True", reason=warning.reason, message=warning.message)
        self._write_status(body, status)

    def check_references(self, im: InferenceModel) -> Problem | None:
        """What the schema cannot know: do the referenced Secrets (and keys) and PVCs exist?"""
        spec = im.spec
        for field, ref in (("model.tokenSecretRef", spec.model.token_secret_ref),
                           ("apiKeySecretRef", spec.api_key_secret_ref)):
            if ref is None:
                continue
            secret = self.kube.get("v1", "Secret", im.namespace, ref.name)
            if secret is None:
                return Problem("SecretNotFound", f'secret "{ref.name}" ({field}) not found in namespace {im.namespace}')
            if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
                return Problem("SecretKeyNotFound", f'secret "{ref.name}" ({field}) has no key "{ref.key}"')
        claims = []
        if spec.model.cache and spec.model.cache.claim_name:
            claims.append(("model.cache.claimName", spec.model.cache.claim_name))
        if claim_and_path := spec.model.pvc_claim_and_path:
            claims.append(("model.source", claim_and_path[0]))
        for field, claim in claims:
            if self.kube.get("v1", "PersistentVolumeClaim", im.namespace, claim) is None:
                return Problem("PVCNotFound", f'PersistentVolumeClaim "{claim}" ({field}) not found in namespace {im.namespace}')
        return None

    def sync_child(self, im: InferenceModel, body: dict[str, Any], child: Child) -> None:
        live = self.kube.get(child.api_version, child.kind, im.namespace, child.name)
        if child.manifest is None:
            if live is not None and owned_by(live, im.uid):
                self.kube.delete(child.api_version, child.kind, im.namespace, child.name)
                log.info("deleted %s %s/%s: no longer wanted", child.kind, im.namespace, child.name)
            return
        if live is not None and not owned_by(live, im.uid):
            raise NameTaken(f"{child.kind} {im.namespace}/{child.name} exists and is not owned by this InferenceModel")
        stamped = with_hash(child.manifest)
        if up_to_date(stamped, live):
            return
        if live is not None and child.kind == "Deployment" and "replicas" not in child.manifest["spec"]:
            self._hand_replicas_over(live)
        self.kube.apply(stamped)
        if live is None:
            log.info("created %s %s/%s", child.kind, im.namespace, child.name)
        elif is_subset({"metadata": {"annotations": stamped["metadata"]["annotations"]}}, live):
            log.info("restored %s %s/%s: it drifted from the spec", child.kind, im.namespace, child.name)
            self.kube.event(body, "Normal", "DriftCorrected", f"{child.kind} {child.name} was changed; restored it")
        else:
            log.info("updated %s %s/%s", child.kind, im.namespace, child.name)

    def _hand_replicas_over(self, live: dict[str, Any]) -> None:
        """Autoscaling was just turned on: before our apply drops `spec.replicas` (which would reset it to 1),
        let a hand-over manager co-own the current value; the HPA takes it from there."""
        owned = any(entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply"
                    and "f:replicas" in (entry.get("fieldsV1") or {}).get("f:spec", {})
                    for entry in live["metadata"].get("managedFields") or [])
        if owned:
            meta = live["metadata"]
            self.kube.apply({"apiVersion": "apps/v1", "kind": "Deployment",
                             "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                             "spec": {"replicas": live["spec"]["replicas"]}}, field_manager=HANDOVER_MANAGER)
            log.info("handed replicas of Deployment %s/%s (%s) over to its HPA", meta["namespace"], meta["name"],
                     live["spec"]["replicas"])

    def _report_invalid(self, body: dict[str, Any], problem: Problem) -> None:
        now = now_rfc3339()
        previous = body.get("status") or {}
        old = {c["type"]: c for c in previous.get("conditions") or []}
        conditions = []
        for kind, value in (("Ready", "False"), ("Progressing", "False"), ("Degraded", "True")):
            before = old.get(kind, {})
            since = before.get("lastTransitionTime", now) if before.get("status") == value else now
            conditions.append({"type": kind, "status": value, "reason": problem.reason, "message": problem.message,
                               "lastTransitionTime": since, "observedGeneration": body["metadata"].get("generation", 1)})
        status = {**previous, "phase": "Failed", "conditions": conditions,
                  "observedGeneration": body["metadata"].get("generation", 1)}
        self._write_status(body, status)

    def _write_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        previous = body.get("status") or {}
        if not status_changed(status, previous):
            return
        meta = body["metadata"]
        try:
            self.kube.patch_status(meta["namespace"], meta["name"], status)
        except ApiException as error:
            if error.status == 404:
                return
            raise
        if status["phase"] != previous.get("phase"):
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
            why = degraded if status["phase"] in WARNING_PHASES else ready
            log.info("%s/%s is %s: %s", meta["namespace"], meta["name"], status["phase"], why["message"])
            self.kube.event(body, "Warning" if status["phase"] in WARNING_PHASES else "Normal", status["phase"],
                            f"{why['reason']}: {why['message']}")


class NameTaken(Exception):
    """A child's name is used by an object this InferenceModel does not own: never take it over."""
