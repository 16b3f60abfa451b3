"""Where the delivery tests find helm, kubeconform and kubectl: the control-plane build's cache.

`hack/k8s/build.sh` builds them once into `${KUBEINFER_CACHE:-~/.cache/kubeinfer}/k8s-<K8S_VERSION>/bin`
(versions pinned in hack/k8s/versions.env). `KUBEINFER_HELM` / `KUBEINFER_KUBECONFORM` /
`KUBEINFER_KUBECTL` override a binary; PATH is the last resort.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO / "hack" / "k8s" / "versions.env"


def pinned_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """KEY=VALUE lines of versions.env (comments and blanks skipped)."""
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip().strip('"') for key, value in pairs}


def shared_bin_dir() -> Path | None:
    version = pinned_versions().get("K8S_VERSION")
    if not version:
        return None
    cache = Path(os.environ.get("KUBEINFER_CACHE", Path.home() / ".cache" / "kubeinfer"))
    return cache / f"k8s-{version}" / "bin"


def find_tool(name: str) -> str | None:
    """Absolute path of `name` (helm, kubeconform, kubectl), or None when it is nowhere."""
    override = os.environ.get(f"KUBEINFER_{name.upper()}")
    if override:
        return override
    bin_dir = shared_bin_dir()
    if bin_dir is not None and (bin_dir / name).is_file():
        return str(bin_dir / name)
    return shutil.which(name)
