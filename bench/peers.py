"""Peer benchmark (see `kubeinfer bench peers --help`): `python bench/peers.py --json peers.json`."""

import sys

from kubeinfer.engine.bench.peers import main

if __name__ == "__main__":
    sys.exit(main())
