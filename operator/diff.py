"""Desired-vs-live comparison, so that the operator writes only when something really changed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubeinfer.operator.render.common import HASH_ANNOTATION


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Stable hash of a rendered manifest: catches fields we stopped rendering (a subset check cannot)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def with_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    stamped = json.loads(json.dumps(manifest))
    stamped["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = manifest_hash(manifest)
    return stamped


def is_subset(desired: Any, live: Any) -> bool:
    """True when every field of `desired` has the same value in `live` (API defaults may add more).

    Lists must have the same length and match element by element, so a deleted or added
    container, port or env var counts as drift.
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(key in live and is_subset(value, live[key])
                                              for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(live, list) and len(desired) == len(live)
                and all(is_subset(d, v) for d, v in zip(desired, live, strict=True)))
    if isinstance(desired, bool) or isinstance(live, bool):
        return desired is live
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return desired == live
    return desired == live


def up_to_date(stamped: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """The live object carries our current hash and nobody changed a field we own."""
    if live is None:
        return False
    live_hash = (live.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    desired_hash = stamped["metadata"]["annotations"][HASH_ANNOTATION]
    return live_hash == desired_hash and is_subset(stamped, live)
