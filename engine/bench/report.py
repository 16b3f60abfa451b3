"""Where a benchmark's ``--json`` goes: a file path, or ``-`` for standard output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def write_json(destination: str, payload: Any) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(text)
    else:
        Path(destination).write_text(text)
