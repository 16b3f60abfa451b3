"""One level-triggered reconcile: read the InferenceModel, converge its children, report status.

Every write is skipped when the live object already matches, so a resync or an operator restart
leaves resourceVersions alone.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kubeinfer.operator.autoscaling_status import AUTOSCALING, degradation, derive
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
KEDA_API = "keda.sh/v1alpha1"
# check_references() reasons that the user fixes by creating an object: rechecked soon, not at the next resync.
MISSING_REFERENCES = ("SecretNotFound", "SecretKeyNotFound", "PVCNotFound")


def api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(error.reason)


def validation_message(error: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
                     for e in error.errors())


def _was(previous: dict[str, Any], kind: str, value: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == value for c in previous.get("conditions") or [])


def _since(previous: dict[str, Any], kind: str, value: str, now: str) -> str:
    """lastTransitionTime: kept while the condition's status stays `value`, else now."""
    for c in previous.get("conditions") or []:
        if c.get("type") == kind and c.get("status") == value:
            return c.get("lastTransitionTime") or now
    return now


def owned_by(live: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in live["metadata"].get("ownerReferences") or [])


class Reconciler:
    def __init__(self, kube: Kube, settings: OperatorSettings):
        self.kube = kube
        self.settings = settings
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._rechecks: dict[tuple[str, str], threading.Timer] = {}

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            timer = self._rechecks.pop((namespace, name), None)
        if timer is not None:
            timer.cancel()

    def recheck_later(self, namespace: str, name: str) -> None:
        """Reconcile again in `reference_recheck_seconds`: a model waiting for a Secret or PVC it names turns
        Ready seconds after the object appears, without watching (or being allowed to list) every Secret."""
        key = (namespace, name)
        with self._locks_guard:
            if key in self._rechecks:
                return
            timer = threading.Timer(self.settings.reference_recheck_seconds, self._recheck, key)
            timer.daemon = True
            self._rechecks[key] = timer
        timer.start()

    def _recheck(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._rechecks.pop((namespace, name), None)
        try:
            self.reconcile(namespace, name)
        except Exception:
            log.exception("recheck of %s/%s failed", namespace, name)

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
        if problem is not None and problem.reason in MISSING_REFERENCES:
            self.recheck_later(im.namespace, im.name)
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
        previous = body.get("status") or {}
        now = now_rfc3339()
        status = compute_status(im, deployment, pods, problem, previous, now)
        verdict, summary = derive(*self.autoscaler_of(im), name=im.name) if problem is None else (None, None)
        warning = warning or degradation(verdict)
        if warning and status["phase"] != "Failed":
            degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
            if degraded["status"] == "False":
                degraded.update(status="True", reason=warning.reason, message=warning.message)
                degraded["lastTransitionTime"] = _since(previous, "Degraded", "True", now)
        if verdict is not None:
            verdict["lastTransitionTime"] = _since(previous, AUTOSCALING, verdict["status"], now)
            verdict["observedGeneration"] = im.generation
            status["conditions"].append(verdict)
        status["autoscaling"] = summary  # None removes it (merge patch) once nothing autoscales
        self._write_status(body, status)

    def autoscaler_of(self, im: InferenceModel) -> tuple[str | None, dict[str, Any] | None, dict[str, Any] | None]:
        """(mode, autoscaler, its HPA): the operator's HPA, or a KEDA ScaledObject named after the model
        whose scaleTargetRef is this InferenceModel (the chart's KEDA mode), or (None, None, None)."""
        if im.spec.autoscaled:
            hpa = self.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", im.namespace, im.name)
            hpa = hpa if hpa is not None and owned_by(hpa, im.uid) else None
            return "HPA", hpa, hpa
        try:
            scaled = self.kube.get(KEDA_API, "ScaledObject", im.namespace, im.name)
        except KindNotServed:
            return None, None, None
        except ApiException as error:
            if error.status != 403:
                raise
            log.warning("cannot read ScaledObject %s/%s (RBAC without keda.sh scaledobjects get)", im.namespace,
                        im.name)
            return None, None, None
        target = ((scaled or {}).get("spec") or {}).get("scaleTargetRef") or {}
        if scaled is None or target.get("kind") != KIND or target.get("name") != im.name:
            return None, None, None
        hpa_name = (scaled.get("status") or {}).get("hpaName") or f"keda-hpa-{im.name}"
        return "KEDA", scaled, self.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", im.namespace, hpa_name)

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
        self._autoscaling_event(body, previous, status)
        if status["phase"] != previous.get("phase"):
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
            why = degraded if status["phase"] in WARNING_PHASES else ready
            log.info("%s/%s is %s: %s", meta["namespace"], meta["name"], status["phase"], why["message"])
            self.kube.event(body, "Warning" if status["phase"] in WARNING_PHASES else "Normal", status["phase"],
                            f"{why['reason']}: {why['message']}")


    def _autoscaling_event(self, body: dict[str, Any], previous: dict[str, Any], status: dict[str, Any]) -> None:
        """One event when the Autoscaling condition turns True or False (Unknown is the HPA not looked at yet)."""
        new = next((c for c in status["conditions"] if c["type"] == AUTOSCALING), None)
        if new is None or new["status"] == "Unknown" or _was(previous, AUTOSCALING, new["status"]):
            return
        meta = body["metadata"]
        if new["status"] == "True":
            log.info("%s/%s autoscaling works: %s", meta["namespace"], meta["name"], new["message"])
            self.kube.event(body, "Normal", "AutoscalingActive", f"{new['reason']}: {new['message']}")
        else:
            log.info("%s/%s autoscaling fails: %s: %s", meta["namespace"], meta["name"], new["reason"], new["message"])
            self.kube.event(body, "Warning", "AutoscalingFailed", f"{new['reason']}: {new['message']}")


class NameTaken(Exception):
    """A child's name is used by an object this InferenceModel does not own: never take it over."""
