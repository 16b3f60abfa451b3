"""kubeinfer: LLM serving on your own Kubernetes GPUs."""

__version__ = "0.1.0"
