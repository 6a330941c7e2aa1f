"""The suite's own tiny CLIP: an open_clip ViT CLIP (12 + 12 layers, width 64, 48-px images, 8-px
patches, the real CLIP tokenizer) pretrained by ``scripts/pretrain_tinyclip.py`` on the embedded
synthetic world and committed under ``assets/tinyclip/``. Loaded through open_clip's
local-checkpoint path; the file is checked against its recorded SHA-256 first."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from . import ROOT
from .errors import BenchmarkError

TINY_CLIP_NAME = "ossl-tiny-vit"
ASSETS = ROOT / "assets" / "tinyclip"
CONFIG = ASSETS / f"{TINY_CLIP_NAME}.json"
CHECKPOINT = ASSETS / f"{TINY_CLIP_NAME}.pt"
RECORD = ASSETS / "checkpoint.json"
REGENERATE = "python scripts/pretrain_tinyclip.py"


def register_tiny_clip() -> None:
    """Register the model config with open_clip (idempotent)."""
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(str(CONFIG))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tiny_clip_checkpoint(path: Optional[Path] = None) -> Path:
    """The committed checkpoint, verified against the SHA-256 recorded in checkpoint.json."""
    path = Path(path) if path is not None else CHECKPOINT
    if not path.exists() or not RECORD.exists():
        raise BenchmarkError(f"the tiny CLIP checkpoint {path} (or its record {RECORD}) is missing. "
                             f"Regenerate it with `{REGENERATE}` (about 8 minutes on 2 CPU cores), "
                             f"or restore it with `git checkout -- assets/tinyclip`.")
    expected = json.loads(RECORD.read_text())["sha256"]
    actual = file_sha256(path)
    if actual != expected:
        raise BenchmarkError(f"the tiny CLIP checkpoint {path} is corrupted or was changed: SHA-256 "
                             f"{actual[:16]}… but {RECORD} records {expected[:16]}…. Restore it with "
                             f"`git checkout -- assets/tinyclip` or regenerate it with `{REGENERATE}`.")
    return path
