"""OpenAI-format CLIP checkpoints: recognised by their content, built as OpenAI's code builds them.

OpenAI released CLIP as TorchScript archives. Their state dict, and every state dict saved from one,
holds three entries beside the weights, ``input_resolution``, ``context_length`` and ``vocab_size``,
which no open_clip checkpoint holds. Either mark (a TorchScript archive, or a state dict with one of
those entries) makes a file *OpenAI-format*; such weights were trained with QuickGELU, so:

* they are always built with QuickGELU, and with the architecture read from the tensor shapes, as
  OpenAI's ``clip.build_model`` (which CoOp, MaPLe, PLOT, LoCoOp and CLIP-LoRA all call) and open_clip's
  ``build_model_from_openai_state_dict`` (used here) do: heads = width / 64, image size = patch size x
  grid, the text context length and vocabulary from the embeddings;
* the model config the user named (``backbone.model``, or an open_clip folder's
  ``open_clip_config.json``) must describe that architecture (else a clear error), and a config that
  states ``"quick_gelu": false`` is an error rather than a silent switch. A config without a
  ``quick_gelu`` entry (``ViT-B-16``, or a folder config that omits it) names the architecture only:
  QuickGELU is switched on, as it is for the ``openai`` tag;
* the weights keep the file's precision (the fp16 of OpenAI's files is widened to fp32 exactly; a
  fine-tuned fp32 file is not rounded through fp16 as ``open_clip.load_openai_model`` would).

An OpenAI state dict saved *without* those entries (``clip.load(..., jit=False)[0].state_dict()``)
has exactly the key names of an open_clip ``CLIP`` and cannot be told apart from one; there the model
config decides, so name the ``-quickgelu`` model (or put ``"quick_gelu": true`` in the folder's
``model_cfg``), as the README's "Loading your own checkpoint" says.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .errors import BenchmarkError

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's released ``.pt`` files) rather than a pickled state dict."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _unwrap(obj: Any) -> Optional[Dict[str, torch.Tensor]]:
    """A state dict from what a checkpoint file holds ({"state_dict": ...} wrappers and DataParallel
    "module." prefixes removed, as open_clip's ``load_state_dict``); None if it holds none."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def openai_format_state_dict(path: Path) -> Optional[Dict[str, torch.Tensor]]:
    """The state dict of ``path`` if the file is an OpenAI-format checkpoint, else None (the file is
    then left to open_clip's own loader). Reading the keys of a pickled state dict is cheap: the file
    is memory-mapped, so nothing is read unless it is OpenAI-format."""
    path = Path(path)
    if is_torchscript(path):
        with warnings.catch_warnings():  # loading OpenAI's TorchScript archive is intended here
            warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        return {k: v for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if not any(k in OPENAI_EXTRA_KEYS for k in f.keys()):
                return None
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file (mmap needs one): read it whole
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
    except Exception:  # not loadable as plain tensors: open_clip's loader reports it
        return None
    sd = _unwrap(obj)
    if sd is None or not any(k in sd for k in OPENAI_EXTRA_KEYS):
        return None
    return sd


def openai_architecture(sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The architecture OpenAI's ``build_model`` reads from the shapes, as open_clip config fields."""
    try:
        text = {"context_length": sd["positional_embedding"].shape[0],
                "vocab_size": sd["token_embedding.weight"].shape[0],
                "width": sd["ln_final.weight"].shape[0],
                "heads": sd["ln_final.weight"].shape[0] // 64,
                "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})}
        if "visual.proj" in sd:  # ViT
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {"layers": len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")]),
                      "width": sd["visual.conv1.weight"].shape[0], "head_width": 64,
                      "patch_size": patch, "image_size": patch * grid}
        else:  # ModifiedResNet
            layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4))
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {"layers": layers, "width": sd["visual.layer1.0.conv1.weight"].shape[0], "head_width": 64,
                      "image_size": grid * 32}
        return {"embed_dim": sd["text_projection"].shape[1], "vision_cfg": vision, "text_cfg": text}
    except KeyError as exc:
        raise BenchmarkError(f"the checkpoint carries OpenAI's input_resolution / context_length / vocab_size "
                             f"entries but lacks the CLIP weight {exc}; it is not a complete OpenAI CLIP "
                             f"state dict") from exc


def _architecture_mismatches(arch: Dict[str, Any], model_cfg: Dict[str, Any]) -> list:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    out = []
    vdef, tdef = CLIPVisionCfg(), CLIPTextCfg()
    vcfg, tcfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "timm_model_name" in vcfg or "hf_model_name" in tcfg:
        return ["the named model uses a timm / Hugging Face tower, not OpenAI's CLIP architecture"]
    if model_cfg.get("embed_dim") != arch["embed_dim"]:
        out.append(f"embed_dim {model_cfg.get('embed_dim')} vs {arch['embed_dim']}")
    for part, cfg, dflt in (("vision_cfg", vcfg, vdef), ("text_cfg", tcfg, tdef)):
        for key, want in arch[part].items():
            have = cfg.get(key, getattr(dflt, key))
            if isinstance(have, (list, tuple)):
                have = tuple(have)
            if have != want:
                out.append(f"{part}.{key} {have} vs {want}")
    return out


def build_openai_model(sd: Dict[str, torch.Tensor], model_cfg: Optional[Dict[str, Any]], source: str,
                       config_name: str):
    """The open_clip ``CLIP`` of an OpenAI-format state dict: QuickGELU, the architecture read from
    the shapes, fp32 weights of the file's values. ``model_cfg`` (what the user named, or None)
    must describe the same architecture and must not state ``quick_gelu: false``."""
    from open_clip.model import build_model_from_openai_state_dict

    if model_cfg is not None and model_cfg.get("quick_gelu") is False:
        raise BenchmarkError(
            f"{source} is an OpenAI-format checkpoint (TorchScript or OpenAI's input_resolution / "
            f"context_length / vocab_size entries), trained with QuickGELU, but {config_name} states "
            f"quick_gelu: false. Remove that entry (or set it to true); GELU would silently give wrong "
            f"features.")
    arch = openai_architecture(sd)
    if model_cfg is not None:
        bad = _architecture_mismatches(arch, model_cfg)
        if bad:
            import open_clip

            fits = [n for n in open_clip.list_models()
                    if not _architecture_mismatches(arch, open_clip.get_model_config(n) or {})]
            raise BenchmarkError(
                f"{source} is an OpenAI-format checkpoint whose shapes describe another architecture than "
                f"{config_name} ({'; '.join(bad)}; named vs checkpoint, where OpenAI's build_model fixes "
                f"64-wide attention heads). Name the model these weights belong to"
                f"{' (open_clip models of that shape: ' + ', '.join(fits[:6]) + ')' if fits else ''}: an "
                f"open_clip config with embed_dim {arch['embed_dim']}, vision {arch['vision_cfg']}, "
                f"text {arch['text_cfg']}.")
    weights = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    model = build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)
    model.float()
    model.load_state_dict(weights)  # the file's own values in fp32 (the builder rounds through fp16)
    return model.eval()
