"""kopf wiring: every watch event (InferenceModels and their children) triggers one idempotent reconcile.

Level-triggered on purpose: kopf's create/update/resume handlers would store progress and a
diff-base annotation on each InferenceModel, and timers/daemons would add a finalizer (so deleting
a model would hang while the operator is down). Instead:

- the first listing of InferenceModels at startup is the "resume", later ADDED/MODIFIED events are
  create/update, and the reconcile itself decides what (if anything) to write;
- events of children (labelled `kubeinfer.dev/model`) re-reconcile their owner: drift and pod
  status changes are seen at once;
- a model that waits for a Secret or PVC it names is reconciled again every
  `KUBEINFER_REFERENCE_RECHECK_SECONDS` (2 s) until it appears (Reconciler.recheck_later): that needs only
  `get` on those names, where a watch would need list/watch on every Secret in the namespace;
- a resync loop reconciles everything every `KUBEINFER_RESYNC_SECONDS` (drift that emits no event);
- KEDA ScaledObjects are read by name at each reconcile (the chart names them after the model) and
  KEDA's HPA is not ours to label, so KEDA-mode status follows the resync and the model's own events
  (KEDA writes spec.replicas through the scale subresource, which is an InferenceModel event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf
from kubeinfer.operator.render.common import GROUP, MANAGED_BY, MODEL_LABEL, PLURAL, VERSION

log = logging.getLogger("kubeinfer.operator")

CHILD_LABELS = {MODEL_LABEL: kopf.PRESENT, "app.kubernetes.io/managed-by": MANAGED_BY}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.enabled = False  # our own events only, one per phase transition
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    # Namespaced mode is granted no cluster-scope reads: skip kopf's scan of CRDs and namespaces.
    settings.scanning.disabled = not memo.settings.clusterwide
    memo.resync = asyncio.create_task(_resync_forever(memo))


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _resync_forever(memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(memo.settings.resync_seconds)
        try:
            await asyncio.to_thread(memo.reconciler.reconcile_all)
        except Exception:
            log.exception("resync failed")


@kopf.on.event(GROUP, VERSION, PLURAL)
def inference_model_event(type: str | None, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        memo.reconciler.forget(namespace, name)
        return
    memo.reconciler.reconcile(namespace, name)


def _child_event(labels: kopf.Labels, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.reconcile(namespace, labels[MODEL_LABEL])


for _group, _version, _plural in (("apps", "v1", "deployments"), ("", "v1", "services"), ("", "v1", "pods"),
                                  ("", "v1", "persistentvolumeclaims"),
                                  ("autoscaling", "v2", "horizontalpodautoscalers"),
                                  ("policy", "v1", "poddisruptionbudgets")):
    kopf.on.event(_group, _version, _plural, labels=CHILD_LABELS, id=f"child-{_plural}")(_child_event)
