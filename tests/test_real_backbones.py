"""Real-backbone loading paths, checked on the micro model: checkpoint files and folders, open_clip
folders, OpenAI TorchScript archives (QuickGELU), pretrained tags from the Hugging Face cache (with
the tag's QuickGELU), and the fast failure when weights are neither cached nor downloadable."""
import json
import time

import pytest
import torch
from open_clip.transformer import QuickGELU

from benchmark.backbone import BackboneConfig, CLIPBackbone, _reachable
from benchmark.errors import BenchmarkError
from conftest import MICRO, MICRO_CKPT, TESTS


@pytest.fixture(scope="module")
def ref_state():
    return torch.load(MICRO_CKPT, map_location="cpu")


def _same_weights(bb, sd):
    own = bb.model.state_dict()
    return all(torch.equal(own[k].float(), v.float()) for k, v in sd.items() if k in own) and \
        set(k for k in sd if k not in ("input_resolution", "context_length", "vocab_size")) <= set(own)


def _acts(bb):
    return {type(m) for m in bb.model.modules() if isinstance(m, (torch.nn.GELU, QuickGELU))}


def test_checkpoint_file_and_folder(tmp_path, ref_state):
    f = tmp_path / "weights.pt"
    torch.save(ref_state, f)
    a = CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=str(f)))
    assert _same_weights(a, ref_state) and _acts(a) == {torch.nn.GELU}
    b = CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=str(tmp_path)))  # the folder
    assert _same_weights(b, ref_state) and b.identity == a.identity  # same file, same identity
    (tmp_path / "other.safetensors").write_bytes(b"x")
    with pytest.raises(BenchmarkError, match="holds 2 checkpoint files.*other.safetensors, weights.pt"):
        CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="without a checkpoint file"):
        CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=str(tmp_path / "empty")))
    with pytest.raises(BenchmarkError, match="looks like a file path but no file is there"):
        CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=str(tmp_path / "nope.pt")))


def test_open_clip_folder(tmp_path, ref_state):
    d = tmp_path / "hub-style"
    d.mkdir()
    model_cfg = json.loads((TESTS / "assets" / f"{MICRO}.json").read_text())
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))
    torch.save(ref_state, d / "open_clip_pytorch_model.bin")
    bb = CLIPBackbone.load(BackboneConfig(model="ignored-by-folders", pretrained=str(d)))
    assert _same_weights(bb, ref_state)
    assert tuple(bb.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5) and bb.preprocess_cfg["interpolation"] == "bilinear"
    assert bb.identity.startswith("local-dir:")
    tok = bb.tokenize(["a photo of a bird."])
    assert tok.shape == (1, model_cfg["text_cfg"]["context_length"])


def _torchscript_archive(sd, path):
    """A TorchScript archive laid out like OpenAI's released .pt files: CLIP's parameter names plus
    the input_resolution / context_length / vocab_size entries, fp16 weights."""
    root = torch.nn.Module()
    for k, v in sd.items():
        *mods, leaf = k.split(".")
        m = root
        for n in mods:
            if not hasattr(m, n):
                m.add_module(n, torch.nn.Module())
            m = getattr(m, n)
        m.register_buffer(leaf, v.clone().half() if v.is_floating_point() else v.clone())
    for k, v in (("input_resolution", 32), ("context_length", 32), ("vocab_size", 49408)):
        root.register_buffer(k, torch.tensor(v))
    with pytest.warns(Warning):  # torch.jit.script is deprecated, but it is what OpenAI shipped
        torch.jit.save(torch.jit.script(root), str(path))


def test_openai_torchscript_file_gets_quick_gelu(tmp_path):
    # OpenAI's architecture is read from the shapes (64-wide heads): an OpenAI-shaped micro model
    import open_clip

    open_clip.add_model_config(str(TESTS / "assets" / "test-openai-vit.json"))
    torch.manual_seed(0)
    ref_state = open_clip.create_model("test-openai-vit", pretrained=None).state_dict()
    f = tmp_path / "ViT-micro.pt"
    _torchscript_archive(ref_state, f)
    bb = CLIPBackbone.load(BackboneConfig(model="test-openai-vit", pretrained=str(f)))
    assert _acts(bb) == {QuickGELU}
    half = {k: v.half().float() if v.is_floating_point() else v for k, v in ref_state.items()}
    assert _same_weights(bb, half)
    with torch.no_grad():  # and the wrapper still equals open_clip's own forward on these weights
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert torch.equal(bb.encode_image(x).pooled, bb.model.encode_image(x))


@pytest.fixture()
def micro_tag(monkeypatch):
    """Register an ``openai``-like tag for the micro model (hub repo + quick_gelu, as open_clip's
    table has for ViT-B-16) and return its hub repo."""
    from open_clip import pretrained as P

    repo = "ossl-test/micro-clip.openai"
    table = dict(P._PRETRAINED)
    table[MICRO] = {"openai": P._pcfg(hf_hub=f"{repo}/", quick_gelu=True, mean=(0.1, 0.2, 0.3))}
    monkeypatch.setattr(P, "_PRETRAINED", table)
    return repo


def test_tag_from_hf_cache_uses_tag_quick_gelu_and_preprocessing(tmp_path, ref_state, micro_tag):
    snap = tmp_path / "hub" / f"models--{micro_tag.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    torch.save(ref_state, snap / "open_clip_pytorch_model.bin")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    bb = CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained="openai", cache_dir=str(tmp_path / "hub")))
    assert _same_weights(bb, ref_state)
    assert _acts(bb) == {QuickGELU}  # open_clip 3.3 alone would build GELU and only warn
    assert tuple(bb.preprocess_cfg["mean"]) == (0.1, 0.2, 0.3)
    assert bb.identity == f"{MICRO}:openai"


def test_missing_weights_fail_fast_offline(tmp_path, micro_tag, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(BenchmarkError) as e:
        CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained="openai", cache_dir=str(tmp_path)))
    msg = str(e.value)
    assert time.time() - t < 5
    assert "HF_HUB_OFFLINE is set" in msg and micro_tag in msg and str(tmp_path) in msg
    assert "backbone.pretrained=/path/to/the/file" in msg
    # ViT-B-16 + openai: real open_clip table; nothing cached in an empty cache folder
    t = time.time()
    with pytest.raises(BenchmarkError, match=r"ViT-B-16:openai are not on this machine.*vit_base_patch16_clip_224"):
        CLIPBackbone.load(BackboneConfig(model="ViT-B-16", pretrained="openai", cache_dir=str(tmp_path)))
    assert time.time() - t < 5


def test_missing_weights_fail_fast_without_offline_flag(tmp_path, micro_tag, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(C, "ENDPOINT", "https://ossl-unreachable.invalid")  # never resolves
    t = time.time()
    with pytest.raises(BenchmarkError, match="ossl-unreachable.invalid cannot be reached"):
        CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained="openai", cache_dir=str(tmp_path)))
    assert time.time() - t < 5
    assert not _reachable("ossl-unreachable.invalid", timeout=1.0)


def test_unknown_tag_and_quick_gelu_mismatch(monkeypatch):
    with pytest.raises(BenchmarkError, match="not an open_clip pretrained tag of 'ViT-B-16'.*laion2b_s34b_b88k"):
        CLIPBackbone.load(BackboneConfig(model="ViT-B-16", pretrained="opneai"))
    from open_clip import pretrained as P

    table = dict(P._PRETRAINED)  # a GELU-trained tag on a QuickGELU model config
    table["ViT-B-16-quickgelu"] = {"gelu_tag": P._pcfg(hf_hub="ossl-test/gelu/")}
    monkeypatch.setattr(P, "_PRETRAINED", table)
    with pytest.raises(BenchmarkError, match="use backbone.model='ViT-B-16'"):
        CLIPBackbone.load(BackboneConfig(model="ViT-B-16-quickgelu", pretrained="gelu_tag"))
