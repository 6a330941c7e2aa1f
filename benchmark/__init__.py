"""OSSL-CLIP benchmark framework.

The framework knows no method or dataset by name: methods live in ``methods/`` and datasets in
``datasets/`` and are discovered by :mod:`benchmark.registry`.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"
