#!/usr/bin/env python
"""Thin wrapper kept so ``python scripts/aggregate.py DIR`` still works: the code is ``flexlora-aggregate``
(:mod:`flexlora.aggregate.cli`); see ``flexlora-aggregate --help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, even without `pip install -e .`

from flexlora.aggregate.cli import main

if __name__ == "__main__":
    sys.exit(main())
