"""kubeinfer: LLM serving on your own Kubernetes GPUs."""

import os as _os

__version__ = "0.1.0"

# Installed, setuptools' package-dir maps engine/ and operator/ onto kubeinfer.engine and kubeinfer.operator.
# Run from a source tree that is not installed (hack/gpu-check.sh on a bare GPU image, through a link to this
# folder), they are found beside it.
_source_tree = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
if _os.path.isfile(_os.path.join(_source_tree, "engine", "__init__.py")) and _source_tree not in __path__:
    __path__.append(_source_tree)
