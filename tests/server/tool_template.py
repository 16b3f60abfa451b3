"""The tool-aware chat template the tests serve with ``--chat-template`` (the bundled model's has no tools)."""

from pathlib import Path

TEMPLATE = Path(__file__).parent / "templates" / "hermes_tools.jinja"
