"""``python -m srgan.bench``: as ``python src/bench.py``; exit status 1 if a measurement failed."""

import sys

from .cli import main

sys.exit(1 if main()["summary"]["errors"] else 0)
