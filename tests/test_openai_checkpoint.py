"""OpenAI-format checkpoints (TorchScript archives, or state dicts with OpenAI's input_resolution /
context_length / vocab_size entries) are always built with QuickGELU and the architecture read from
their shapes: features equal open_clip's own ``load_openai_model`` on the same file, whatever the
model name; an explicit ``quick_gelu: false`` or a model of another shape is a clear error."""
import json
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from benchmark.backbone import BackboneConfig, CLIPBackbone
from benchmark.errors import BenchmarkError
from conftest import MICRO, TESTS
from test_real_backbones import _torchscript_archive

TINY = "test-openai-vit"  # OpenAI-shaped (64-wide heads), no quick_gelu entry: a plain model name
open_clip.add_model_config(str(TESTS / "assets" / f"{TINY}.json"))
EXTRA = {"input_resolution": 32, "context_length": 32, "vocab_size": 49408}


@pytest.fixture(scope="module")
def openai_sd():
    """Random weights in OpenAI's layout and precision (fp16 tensors)."""
    torch.manual_seed(0)
    m = open_clip.create_model(TINY, pretrained=None)
    with torch.no_grad():  # non-trivial layer norms, so every weight matters
        for n, p in m.named_parameters():
            if "ln" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return {k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}


def _with_extra(sd):
    out = dict(sd)
    out.update({k: torch.tensor(v) for k, v in EXTRA.items()})
    return out


def _write(sd, path, fmt):
    if fmt == "pt":
        torch.save(_with_extra(sd), path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _with_extra(sd).items()}, str(path))
    else:
        _torchscript_archive(sd, path)  # TorchScript: weights + the three entries, fp16
    return path


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    return x, ["a photo of a bird.", "a black footed albatross", "x"]


def _features(bb, x, texts):
    with torch.no_grad():
        return bb.encode_image(x).pooled, bb.encode_text(bb.tokenize(texts))


def _reference(path, x, texts):
    """open_clip's own loader of OpenAI checkpoints, on the same file."""
    with warnings.catch_warnings():  # it tries torch.jit.load (deprecated) first
        warnings.simplefilter("ignore", FutureWarning)
        ref = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    tok = open_clip.get_tokenizer(TINY)(texts)
    with torch.no_grad():
        return ref.encode_image(x), ref.encode_text(tok)


def _acts(bb):
    return {type(m) for m in bb.model.modules() if isinstance(m, (torch.nn.GELU, QuickGELU))}


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript"])
def test_openai_format_equals_load_openai_model(tmp_path, openai_sd, fmt):
    f = _write(openai_sd, tmp_path / f"ViT-tiny.{'safetensors' if fmt == 'safetensors' else 'pt'}", fmt)
    x, texts = _inputs()
    bb = CLIPBackbone.load(BackboneConfig(model=TINY, pretrained=str(f)))  # plain name: no quick_gelu
    assert _acts(bb) == {QuickGELU}
    img, txt = _features(bb, x, texts)
    ref_img, ref_txt = _reference(tmp_path / "ViT-tiny.pt", x, texts) if fmt != "safetensors" else (None, None)
    if fmt == "safetensors":  # load_openai_model reads .pt only: compare with the same weights as .pt
        ref_img, ref_txt = _reference(_write(openai_sd, tmp_path / "same.pt", "pt"), x, texts)
    # same weights, same operations; on some CPUs (AMD EPYC here) the two model builds pick kernels that
    # round differently (largest difference 6e-7), so compare to float32 rounding, not bit for bit
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-5, atol=1e-5)  # short text tower: fp32 rounding
    # the comparison can fail: the same weights with GELU give other features
    gelu = open_clip.create_model(TINY, pretrained=None)
    gelu.load_state_dict({k: v.float() for k, v in openai_sd.items()})
    with torch.no_grad():
        assert not torch.allclose(gelu.eval().encode_image(x), ref_img, atol=1e-4)
        assert not torch.allclose(gelu.encode_text(open_clip.get_tokenizer(TINY)(texts)), ref_txt, atol=1e-4)
    # a folder holding the file loads the same way
    d = tmp_path / "folder"
    d.mkdir()
    f.rename(d / f.name)
    img2, _ = _features(CLIPBackbone.load(BackboneConfig(model=TINY, pretrained=str(d))), x, texts)
    assert torch.equal(img2, img)


def test_open_clip_folder_without_quick_gelu_entry_gets_it(tmp_path, openai_sd):
    """Our decision: the weights decide. An open_clip folder whose config has no quick_gelu entry but
    whose checkpoint is OpenAI-format gets QuickGELU; an explicit "quick_gelu": false is an error."""
    d = tmp_path / "hub"
    d.mkdir()
    model_cfg = json.loads((TESTS / "assets" / f"{TINY}.json").read_text())
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))
    _write(openai_sd, d / "open_clip_pytorch_model.bin", "pt")
    bb = CLIPBackbone.load(BackboneConfig(model="ignored-by-folders", pretrained=str(d)))
    assert _acts(bb) == {QuickGELU}
    assert tuple(bb.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5) and bb.preprocess_cfg["size"] in (32, (32, 32))
    assert bb.identity.startswith("local-dir:")
    x, texts = _inputs()
    ref = _reference(d / "open_clip_pytorch_model.bin", x, texts)
    for got, want in zip(_features(bb, x, texts), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(model_cfg, quick_gelu=False)}))
    with pytest.raises(BenchmarkError, match="states quick_gelu: false"):
        CLIPBackbone.load(BackboneConfig(pretrained=str(d)))


def test_explicit_gelu_or_another_shape_is_an_error(tmp_path, openai_sd):
    f = _write(openai_sd, tmp_path / "w.pt", "pt")
    gelu_cfg = dict(json.loads((TESTS / "assets" / f"{TINY}.json").read_text()), quick_gelu=False)
    (tmp_path / f"{TINY}-gelu.json").write_text(json.dumps(gelu_cfg))
    open_clip.add_model_config(str(tmp_path / f"{TINY}-gelu.json"))
    with pytest.raises(BenchmarkError, match="states quick_gelu: false"):
        CLIPBackbone.load(BackboneConfig(model=f"{TINY}-gelu", pretrained=str(f)))
    with pytest.raises(BenchmarkError, match="another architecture.*vision_cfg.width 32 vs 64"):
        CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=str(f)))


def test_fp32_openai_format_keeps_its_precision(tmp_path, openai_sd):
    sd32 = {k: v.float() + (torch.randn_like(v.float()) * 1e-3 if v.is_floating_point() else 0)
            for k, v in openai_sd.items()}
    f = _write(sd32, tmp_path / "ft.pt", "pt")
    bb = CLIPBackbone.load(BackboneConfig(model=TINY, pretrained=str(f)))
    own = bb.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd32.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rounded = open_clip.load_openai_model(str(f), precision="fp32", device="cpu").state_dict()
    assert not all(torch.equal(rounded[k], v) for k, v in sd32.items())  # open_clip's goes through fp16


def test_plain_state_dict_follows_the_model_name(tmp_path, openai_sd):
    """Without the extra entries an OpenAI state dict is an open_clip state dict by its keys: the
    model name decides (the README says to name the -quickgelu model)."""
    f = tmp_path / "plain.pt"
    torch.save(dict(openai_sd), f)
    qg = dict(json.loads((TESTS / "assets" / f"{TINY}.json").read_text()), quick_gelu=True)
    (tmp_path / f"{TINY}-quickgelu.json").write_text(json.dumps(qg))
    open_clip.add_model_config(str(tmp_path / f"{TINY}-quickgelu.json"))
    bb = CLIPBackbone.load(BackboneConfig(model=f"{TINY}-quickgelu", pretrained=str(f)))
    assert _acts(bb) == {QuickGELU}
    x, texts = _inputs()
    ref = _reference(_write(openai_sd, tmp_path / "ref.pt", "pt"), x, texts)
    for got, want in zip(_features(bb, x, texts), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _acts(CLIPBackbone.load(BackboneConfig(model=TINY, pretrained=str(f)))) == {torch.nn.GELU}


def test_resnet_openai_state_dict_builds_as_load_openai_model(tmp_path):
    """The shape reading covers OpenAI's ModifiedResNet CLIPs too (RN50-shaped, tiny)."""
    from benchmark.openai_checkpoint import build_openai_model, openai_format_state_dict

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    (tmp_path / "test-openai-rn.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "test-openai-rn.json"))
    torch.manual_seed(0)
    sd = {k: v.half() if v.is_floating_point() else v
          for k, v in open_clip.create_model("test-openai-rn", pretrained=None).state_dict().items()}
    f = tmp_path / "RN-tiny.pt"
    torch.save(dict(sd, input_resolution=torch.tensor(64), context_length=torch.tensor(16),
                    vocab_size=torch.tensor(49408)), f)
    loaded = openai_format_state_dict(f)
    model = build_openai_model(loaded, open_clip.get_model_config("test-openai-rn"), "f", "cfg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = open_clip.load_openai_model(str(f), precision="fp32", device="cpu")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), rtol=0, atol=0)
    assert {type(m) for m in model.modules() if isinstance(m, (torch.nn.GELU, QuickGELU))} == {QuickGELU}
    with pytest.raises(BenchmarkError, match=r"vision_cfg.layers \(1, 1, 1, 1\) vs \(1, 1, 1, 2\)|another architecture"):
        build_openai_model(loaded, dict(cfg, vision_cfg=dict(cfg["vision_cfg"], layers=[1, 1, 1, 2])), "f", "cfg")
    assert openai_format_state_dict(tmp_path / "test-openai-rn.json") is None  # not a checkpoint at all
    bb = CLIPBackbone.load(BackboneConfig(model="test-openai-rn", pretrained=str(f)))  # the wrapper
    assert bb.image_tower == "resnet" and _acts(bb) == {QuickGELU}
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(x).pooled, ref.encode_image(x), rtol=0, atol=0)
