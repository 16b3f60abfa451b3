"""Offline throughput benchmark (thin wrapper): see ``kubeinfer.engine.bench.offline``.

    .venv/bin/python bench/offline.py [--dtype bfloat16] [--serial-requests 4] [--json out.json]
"""

import sys

from kubeinfer.engine.bench.offline import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
