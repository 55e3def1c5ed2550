"""``python -m proma_accum.demo [options]``: the same as ``proma-accum demo [options]``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
