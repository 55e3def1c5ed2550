"""``python -m proma_accum.demo [--quick] [--seeds N] [--steps N] [--methods ...] [--out DIR]``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
