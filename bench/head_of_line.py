"""Head-of-line benchmark (see `kubeinfer bench head-of-line --help`): `python bench/head_of_line.py --launch`."""

import sys

from kubeinfer.engine.bench.head_of_line import main

if __name__ == "__main__":
    sys.exit(main())
