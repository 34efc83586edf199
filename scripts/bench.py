#!/usr/bin/env python
"""Kept for old commands: ``python scripts/bench.py [--quick] [--parts ...] [--out FILE]`` runs the benchmark
package (``python -m benchmarks``, see benchmarks/__init__.py and experiments/benchmarks/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.__main__ import main  # noqa: E402 - the package pins threads and offline flags on import

if __name__ == "__main__":
    main()
