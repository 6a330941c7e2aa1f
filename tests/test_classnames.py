"""One place turns a class name into prompt text (``benchmark.method.prompt_classname``: "_" -> " ",
as every official implementation): a name with underscores gives the same prompts, text features and
logits as the cleaned name, for every method that builds text from class names."""
import copy

import pytest
import torch
import torch.nn.functional as F

from benchmark.method import MethodContext, prompt_classname
from benchmark.registry import METHODS

RAW = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
CLEAN = ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
TEMPLATE = "a photo of a {}, a type of bird."


def _ctx(names):
    return MethodContext(list(names), TEMPLATE, "toy", 2, 1)


def _images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_prompt_classname_replaces_every_underscore():
    assert [prompt_classname(c) for c in RAW] == CLEAN
    assert prompt_classname("a__b_") == "a  b "  # exactly str.replace, as the official code


def test_the_raw_names_would_change_the_text_features(micro_backbone):
    """The check below can fail: with the underscores kept, the tokens and features differ."""
    bb = micro_backbone
    raw = bb.tokenize([TEMPLATE.format(c) for c in RAW])
    clean = bb.tokenize([TEMPLATE.format(c) for c in CLEAN])
    assert not torch.equal(raw, clean)
    with torch.no_grad():
        assert not torch.allclose(bb.encode_text(raw), bb.encode_text(clean), atol=1e-4)


@pytest.mark.parametrize("method", ["zsclip", "clip_adapter", "clip_lora", "coop", "maple", "plot",
                                    "cfsg_clip"])
def test_underscored_names_give_the_cleaned_names_logits(micro_backbone, method):
    cls = METHODS.get(method)
    cfg = cls.Config() if cls.Config.__dataclass_fields__ else None
    if method == "maple":
        cfg.prompt_depth = 2
    if method == "cfsg_clip":
        cfg.depth, cfg.top_k = 2, 4
    models = []
    for names in (RAW, CLEAN):
        torch.manual_seed(0)  # the same random initialisation of whatever the method learns
        models.append(cls(cfg, copy.deepcopy(micro_backbone), _ctx(names)).eval())
    x = _images()
    with torch.no_grad():
        a, b = models[0].predict(x).logits, models[1].predict(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_shot_text_weights_are_the_cleaned_prompts(micro_backbone):
    m = METHODS.get("zsclip")(None, micro_backbone, _ctx(RAW))
    assert m.class_prompts() == [TEMPLATE.format(c) for c in CLEAN]
    with torch.no_grad():
        want = F.normalize(micro_backbone.encode_text(micro_backbone.tokenize(m.class_prompts())), dim=-1)
    torch.testing.assert_close(m.text_weights, want, rtol=0, atol=0)


def test_clip_lora_tokens_are_the_cleaned_prompts(micro_backbone):
    cls = METHODS.get("clip_lora")
    m = cls(cls.Config(), copy.deepcopy(micro_backbone), _ctx(RAW))
    want = micro_backbone.tokenize(["a photo of a " + c + "." for c in CLEAN])
    assert torch.equal(m.tokens, want)


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f", "linear_probe"])
def test_text_classifiers_use_the_cleaned_names(micro_backbone, method):
    cls = METHODS.get(method)
    cfg = cls.Config() if cls.Config.__dataclass_fields__ else None
    raw, clean = (cls(cfg, micro_backbone, _ctx(n)) for n in (RAW, CLEAN))
    sd_raw, sd_clean = raw.state_dict(), clean.state_dict()
    names = [k for k in sd_clean if "text" in k or k.endswith("weight")]
    assert names
    for k in names:
        torch.testing.assert_close(sd_raw[k], sd_clean[k], rtol=0, atol=0)
