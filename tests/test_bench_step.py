"""scripts/bench_step.py (``bench_speed.py --compare-step``) on the tiny CLIP: the variants agree, and
``--profile`` splits each timed step into its parts without leaving its timers behind."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "scripts" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_splits_each_step_into_parts_that_add_up(tmp_path):
    from benchmark.backbone import CLIPBackbone

    before = (CLIPBackbone.encode_image, CLIPBackbone.encode_text_embeddings, torch.Tensor.backward)
    out = tmp_path / "step.json"
    _load().main(["--backbone", "embedded", "--classes", "6", "--batch-size", "4", "--steps", "2",
                  "--warmup", "0", "--methods", "coop", "--options", "short_text+sdpa_blocks,view_cache",
                  "--profile", "--json", str(out)])
    assert (CLIPBackbone.encode_image, CLIPBackbone.encode_text_embeddings, torch.Tensor.backward) == before
    rows = json.loads(out.read_text())["rows"]
    assert [r["option"] for r in rows] == ["short_text+sdpa_blocks", "view_cache"]
    for r in rows:
        assert r["same_loss"] and r["same_logits"]
        for side in ("off", "on"):
            parts = r["profile_ms"][side]
            assert set(parts) == {"text", "image", "loss", "backward", "optim", "other"}
            assert min(parts.values()) >= 0
            # CoOp's step: a text pass with gradient, a frozen image pass, backward, optimiser
            assert parts["text"] > 0 and parts["backward"] > 0 and parts["optim"] > 0
    cached = rows[1]["profile_ms"]
    assert cached["off"]["image"] > 0 and cached["on"]["image"] == 0  # a cache hit encodes no image


def test_unknown_option_names_the_known_ones():
    with pytest.raises(SystemExit) as e:
        _load().main(["--backbone", "embedded", "--methods", "coop", "--options", "short_text+fast"])
    assert "'fast'" in str(e.value) and "sdpa_blocks" in str(e.value) and "'+'" in str(e.value)
