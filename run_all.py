#!/usr/bin/env python
"""Regenerate the benchmark tables: ``python run_all.py --help`` for the options."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
