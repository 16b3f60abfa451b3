"""Soak run (see `kubeinfer bench soak --help`): `python bench/soak.py --launch --minutes 10`."""

import sys

from kubeinfer.engine.bench.soak import main

if __name__ == "__main__":
    sys.exit(main())
