"""Serving benchmark (see `kubeinfer bench serve --help`): `python bench/serve.py --launch --concurrency 1,8,32,64`."""

import sys

from kubeinfer.engine.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
