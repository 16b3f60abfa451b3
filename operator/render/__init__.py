"""Pure render functions: an InferenceModel (and operator settings) → child manifests as dicts."""

from kubeinfer.operator.render.children import render_children

__all__ = ["render_children"]
