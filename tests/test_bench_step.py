"""scripts/bench_step.py (``bench_speed.py --compare-step``) on the tiny CLIP: the variants agree, and
``--profile`` splits each timed step into its parts without leaving its timers behind."""
import json

import pytest
import torch




def test_profile_splits_each_step_into_its_parts(tmp_path, load_script):
    from benchmark.backbone import CLIPBackbone

    before = (CLIPBackbone.encode_image, CLIPBackbone.encode_text_embeddings, torch.Tensor.backward)
    out = tmp_path / "step.json"
    load_script("bench_step").main(["--backbone", "embedded", "--classes", "6", "--batch-size", "4", "--steps", "2",
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


def test_unknown_option_names_the_known_ones(load_script):
    with pytest.raises(SystemExit) as e:
        load_script("bench_step").main(["--backbone", "embedded", "--methods", "coop", "--options", "short_text+fast"])
    assert "'fast'" in str(e.value) and "sdpa_blocks" in str(e.value) and "'+'" in str(e.value)
