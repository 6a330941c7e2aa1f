"""CLIP backbone wrapper over open_clip: the only code in the suite that knows CLIP internals.

Everything a method needs from CLIP goes through :class:`CLIPBackbone`:

* ``tokenize`` / ``token_embedding`` and ``encode_text_embeddings`` (text tower run from token
  embeddings, CoOp-style learned context, optional deep prompts replacing token positions per layer);
* ``encode_image`` (image tower with optional shallow prompt tokens, optional deep prompts per layer,
  patch tokens mapped into the joint space through ``ln_post`` and ``proj``, the final state of the
  prompt tokens, and LoCoOp's value-path local features);
* ``attention_modules`` (each block's ``nn.MultiheadAttention`` for LoRA).

ResNet CLIPs (open_clip ``RN50``, ``RN101``, ``RN50x4``... with the ``openai`` tag or local files)
are supported too (``image_tower == "resnet"``): ``encode_image`` runs the ModifiedResNet and its
attention pool; ``patches`` are then the attention pool's outputs at the grid positions (the pool
attends from every position, as open_clip's pool already computes, and keeps all outputs, projected by
``c_proj`` like the pooled one: the official PLOT's local features) and ``value_local`` is LoCoOp's
ResNet local feature (``c_proj(v_proj(grid))``). What needs transformer blocks (visual prompt tokens,
vision-tower attention for LoRA, the tower's width and depth) raises :meth:`CLIPBackbone.require_vit`'s
error, which says why.

With nothing injected, ``encode_text_embeddings(token_embedding(t), t)`` equals open_clip's
``encode_text(t)`` (exactly with ``short_text = False``; up to float rounding with the default
shortened text tower, which stops at the batch's last EOT position) and ``encode_image(x).pooled``
equals ``encode_image(x)`` exactly (tested).

Token layout is open_clip's ``[batch, length, width]``. Deep-prompt semantics follow MaPLe/VPT-deep:
shallow ``prompts`` are appended after the patch tokens before ``ln_pre``; ``deep_prompts[j]``
(``j >= 1``) *replaces* the prompt positions at the input of block ``j``; after the last given
layer the prompt tokens propagate. In the text tower, prompts occupy positions
``[prompt_start, prompt_start + n)`` (after SOS), again as in MaPLe.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BackboneConfig  # noqa: F401 - the schema lives in config.py; re-exported here
from .errors import BenchmarkError
from .openai_checkpoint import is_torchscript as _is_torchscript

Tensor = torch.Tensor


@dataclass
class ImageOutput:
    """Result of :meth:`CLIPBackbone.encode_image`. All features are *unnormalised*."""

    pooled: Tensor  # [B, E] CLS feature in the joint space (== open_clip encode_image)
    patches: Optional[Tensor] = None  # [B, P, E] patch tokens through ln_post + proj
    prompts: Optional[Tensor] = None  # [B, n, E] final prompt-token states through ln_post + proj
    value_local: Optional[Tensor] = None  # [B, P, E] LoCoOp/MaskCLIP value-path local features


def _sha256_file(path: Path, _cache: Dict[Tuple[str, int, float], str] = {}) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds (name lookup
    included), so that an offline machine fails at once instead of in the hub's retry loop."""
    import socket
    import threading

    ok = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _download_host(tcfg: dict) -> Optional[str]:
    from open_clip.pretrained import has_hf_hub

    if tcfg.get("hf_hub") and has_hf_hub():
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(tcfg["url"]).hostname if tcfg.get("url") else None


def _cached_tag_file(tcfg: dict, cache_dir: Optional[str], looked: List[str]) -> Optional[str]:
    """The weights of an open_clip pretrained tag if already on disk, where open_clip would put
    them: the Hugging Face cache (safetensors first, as open_clip prefers) or its URL cache."""
    if tcfg.get("file"):
        looked.append(tcfg["file"])
        return tcfg["file"] if os.path.isfile(tcfg["file"]) else None
    if tcfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache

        repo, fname = os.path.split(tcfg["hf_hub"])
        fname = fname or "open_clip_pytorch_model.bin"
        names = ([fname[:-4] + ".safetensors"] if fname.endswith((".bin", ".pth")) else []) + [fname]
        if fname == "open_clip_pytorch_model.bin":
            names = ["open_clip_model.safetensors", fname]
        for n in names:
            hit = try_to_load_from_cache(repo, n, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        looked.append(f"Hugging Face cache {cache_dir or constants.HF_HUB_CACHE} (repo {repo}, "
                      f"{' or '.join(names)})")
    if tcfg.get("url"):
        folder = cache_dir or os.path.expanduser("~/.cache/clip")
        cand = os.path.join(folder, os.path.basename(tcfg["url"]))
        looked.append(cand)
        if os.path.isfile(cand):
            return cand
    return None

class CLIPBackbone(nn.Module):
    """Frozen-by-default wrapper around an open_clip ``CLIP`` model with a ViT image tower."""

    def __init__(self, model: nn.Module, tokenizer, identity: str, preprocess_cfg: dict):
        super().__init__()
        #: "vit" or "resnet" (a ModifiedResNet image tower with an attention pool)
        self.image_tower = self._check_supported(model)
        self.model = model
        self.tokenizer = tokenizer
        #: identifies the weights: the checkpoint's SHA-256 or "name:tag" (feature-cache key)
        self.identity = identity
        self.preprocess_cfg = dict(preprocess_cfg)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: BackboneConfig, device: str | torch.device = "cpu") -> "CLIPBackbone":
        """Build the backbone from ``cfg.model`` (an open_clip model name, ``hf-hub:org/repo`` or
        ``local-dir:/path``) and ``cfg.pretrained``:

        * ``embedded``: the suite's tiny CLIP (SHA-256 checked);
        * a checkpoint file (state dict ``.pt/.pth/.bin/.safetensors``); an OpenAI-format file (a
          TorchScript archive, or a state dict with OpenAI's ``input_resolution`` / ``context_length``
          / ``vocab_size`` entries) is always built with QuickGELU and the architecture read from its
          shapes (``benchmark/openai_checkpoint.py``), in a folder too;
        * a folder: an open_clip HF-hub-style folder (``open_clip_config.json`` + weights; the
          config wins over ``cfg.model``), or any folder holding exactly one checkpoint file;
        * an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``...): taken from the Hugging
          Face cache (or open_clip's URL cache) when there, downloaded by open_clip when online, and
          otherwise a fast error saying where we looked and how to provide the weights. QuickGELU
          follows the tag (OpenAI weights need it; open_clip 3.3 only warns on a mismatch).
        """
        import open_clip

        from .errors import UnknownNameError
        from .tinyclip import register_tiny_clip, tiny_clip_checkpoint

        from .openai_checkpoint import openai_format_state_dict

        register_tiny_clip()  # the suite's own model config is always known to open_clip
        model_name, pretrained = cfg.model, cfg.pretrained or ""
        kwargs: Dict[str, object] = {}
        if pretrained == "embedded":
            path = tiny_clip_checkpoint()
            pretrained, identity = str(path), f"{cfg.model}@sha256:{_sha256_file(path)}"
        elif pretrained and Path(os.path.expanduser(pretrained)).exists():
            path = Path(os.path.expanduser(pretrained)).resolve()
            if path.is_dir() and (path / "open_clip_config.json").is_file():
                ckpt = cls._checkpoint_in_folder(path, open_clip_folder=True)
                model_name, pretrained = f"local-dir:{path}", ""
                identity = (f"local-dir:{_sha256_file(path / 'open_clip_config.json')[:16]}"
                            f"@sha256:{_sha256_file(ckpt)}")
                openai_sd = openai_format_state_dict(ckpt)
                if openai_sd is not None:  # OpenAI's format: QuickGELU, architecture from the shapes
                    return cls._from_openai_state_dict(openai_sd, model_name, ckpt, identity, device,
                                                       folder_config=path / "open_clip_config.json")
            else:
                if path.is_dir():
                    path = cls._checkpoint_in_folder(path)
                pretrained, identity = str(path), f"{cfg.model}@sha256:{_sha256_file(path)}"
                openai_sd = openai_format_state_dict(path)
                if openai_sd is not None:  # OpenAI's format: QuickGELU, architecture from the shapes
                    return cls._from_openai_state_dict(openai_sd, cfg.model, path, identity, device)
        elif model_name.startswith("hf-hub:"):
            snapshot = cls._hf_hub_snapshot(model_name[len("hf-hub:"):], cfg.cache_dir)
            if snapshot is not None:
                model_name = f"local-dir:{snapshot}"
            identity, pretrained = cfg.model, ""
        else:
            if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
                raise BenchmarkError(
                    f"backbone.pretrained={pretrained!r} looks like a file path but no file is there. "
                    f"Give an existing checkpoint file or folder, or an open_clip pretrained tag "
                    f"(open_clip.list_pretrained_tags_by_model({cfg.model!r})).")
            identity = f"{cfg.model}:{pretrained}"
            if pretrained:
                if cfg.model not in open_clip.list_models():
                    raise UnknownNameError("open_clip model", cfg.model, open_clip.list_models())
                pretrained = cls._resolve_tag(cfg, kwargs)
        if not model_name.startswith(("local-dir:", "hf-hub:")) and model_name not in open_clip.list_models():
            raise UnknownNameError("open_clip model", model_name, open_clip.list_models())
        import warnings

        try:
            with warnings.catch_warnings():  # loading an OpenAI TorchScript file is intended here
                warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
                warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated.*")
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained or None, cache_dir=cfg.cache_dir, device=device, **kwargs)
        except (RuntimeError, ValueError, FileNotFoundError, KeyError) as exc:
            raise BenchmarkError(
                f"could not load weights {cfg.pretrained!r} for {cfg.model!r}: {type(exc).__name__}: "
                f"{exc}. Without internet, give a local checkpoint file or folder as "
                f"backbone.pretrained.") from exc
        tokenizer = open_clip.get_tokenizer(model_name)
        pcfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        pcfg.setdefault("size", model.visual.image_size)
        return cls(model, tokenizer, identity, pcfg)

    @classmethod
    def _from_openai_state_dict(cls, sd: Dict[str, Tensor], model_name: str, path: Path, identity: str,
                                device, folder_config: Optional[Path] = None) -> "CLIPBackbone":
        """An OpenAI-format checkpoint (``benchmark/openai_checkpoint.py``): built with QuickGELU and
        the architecture read from the shapes; the named model (or the open_clip folder's config)
        must describe that architecture and gives the tokenizer and preprocessing."""
        import json
        from dataclasses import asdict

        import open_clip
        from open_clip.model import set_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg

        from .errors import UnknownNameError
        from .openai_checkpoint import build_openai_model

        if folder_config is not None:
            conf = json.loads(folder_config.read_text())
            model_cfg, pre, where = conf.get("model_cfg", {}), conf.get("preprocess_cfg", {}), str(folder_config)
        else:
            if model_name not in open_clip.list_models():
                raise UnknownNameError("open_clip model", model_name, open_clip.list_models())
            model_cfg, pre, where = open_clip.get_model_config(model_name), {}, f"backbone.model={model_name!r}"
        model = build_openai_model(sd, model_cfg, f"backbone.pretrained={str(path)!r}", where).to(device)
        pcfg = asdict(PreprocessCfg())  # OpenAI's mean / std, bicubic (what open_clip defaults to)
        pcfg.update({k: v for k, v in pre.items() if k in pcfg})
        pcfg["size"] = model.visual.image_size
        set_model_preprocess_cfg(model, pcfg)
        return cls(model, open_clip.get_tokenizer(model_name), identity, pcfg)

    CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")

    @classmethod
    def _checkpoint_in_folder(cls, folder: Path, open_clip_folder: bool = False) -> Path:
        """The single checkpoint file in ``folder`` (for an open_clip folder, the file open_clip
        itself would pick: its preferred names first)."""
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in cls.CHECKPOINT_SUFFIXES)
        if open_clip_folder:
            prefer = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                      "pytorch_model.bin", "pytorch_model.pth", "model.pth"]
            named = [p for n in prefer for p in files if p.name == n]
            files = named[:1] or [p for p in files if p.suffix in (".safetensors", ".bin", ".pth")]
        if len(files) == 1:
            return files[0]
        what = "an open_clip folder (open_clip_config.json) " if open_clip_folder else ""
        if not files:
            raise BenchmarkError(
                f"backbone.pretrained={str(folder)!r} is {what}a folder without a checkpoint file "
                f"({', '.join(cls.CHECKPOINT_SUFFIXES)}). Put the weights there or give the file itself.")
        raise BenchmarkError(
            f"backbone.pretrained={str(folder)!r} holds {len(files)} checkpoint files "
            f"({', '.join(p.name for p in files)}); give the one to use as backbone.pretrained.")

    @staticmethod
    def _resolve_tag(cfg: BackboneConfig, kwargs: Dict[str, object]) -> str:
        """A pretrained tag: set QuickGELU from the tag, and return a local file when the weights
        are cached (with the tag's preprocessing), the tag itself when open_clip may download them,
        or raise at once when they cannot be had (no 40-second hub retry loop offline)."""
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg

        tag = cfg.pretrained
        tcfg = get_pretrained_cfg(cfg.model, tag)
        if not tcfg:
            raise BenchmarkError(
                f"{tag!r} is not an open_clip pretrained tag of {cfg.model!r}; its tags: "
                f"{', '.join(open_clip.list_pretrained_tags_by_model(cfg.model)) or '(none)'}. "
                f"A local checkpoint file or folder also works as backbone.pretrained.")
        model_qg = bool((open_clip.get_model_config(cfg.model) or {}).get("quick_gelu", False))
        if tcfg.get("quick_gelu", False) and not model_qg:
            kwargs["force_quick_gelu"] = True  # e.g. ViT-B-16 + openai == ViT-B-16-quickgelu + openai
        elif model_qg and not tcfg.get("quick_gelu", False):
            plain = cfg.model.replace("-quickgelu", "")
            raise BenchmarkError(f"{cfg.model!r} uses QuickGELU but the {tag!r} weights were trained with "
                                 f"GELU: use backbone.model={plain!r}.")
        looked: List[str] = []
        local = _cached_tag_file(tcfg, cfg.cache_dir, looked)
        if local:
            for k in ("mean", "std", "interpolation", "resize_mode"):  # what the tag would have set
                if k in tcfg:
                    kwargs[f"image_{k}"] = tcfg[k]
            if _is_torchscript(Path(local)):
                kwargs["weights_only"] = False
            return local
        offline = _hf_offline()
        host = _download_host(tcfg)
        if not offline and host and _reachable(host):
            return tag  # online: open_clip downloads (and caches) the weights
        reason = ("HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached")
        url = tcfg.get("url") or (f"https://huggingface.co/{tcfg['hf_hub'].rstrip('/')}" if tcfg.get("hf_hub") else "")
        raise BenchmarkError(
            f"the weights {cfg.model}:{tag} are not on this machine and cannot be downloaded ({reason}). "
            f"Looked in: {'; '.join(looked)}. To provide them: (a) on a machine with internet run "
            f"`python -c \"import open_clip; open_clip.create_model({cfg.model!r}, pretrained={tag!r})\"` "
            f"and copy its Hugging Face cache (~/.cache/huggingface/hub) here (or point HF_HUB_CACHE / "
            f"backbone.cache_dir at it); or (b) download the checkpoint{f' ({url})' if url else ''} and set "
            f"backbone.pretrained=/path/to/the/file (an OpenAI .pt file works as it is; a folder holding "
            f"one checkpoint, or an open_clip folder with open_clip_config.json, works too).")

    @staticmethod
    def _hf_hub_snapshot(repo: str, cache_dir: Optional[str]) -> Optional[Path]:
        """The cached snapshot folder of an ``hf-hub:`` model (config and weights present), None
        when open_clip may download it, or a fast error when offline."""
        from huggingface_hub import try_to_load_from_cache

        conf = try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=cache_dir)
        if isinstance(conf, str):
            snap = Path(conf).parent
            if any((snap / n).is_file() for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
                return snap
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        if not _hf_offline() and _reachable(host):
            return None
        raise BenchmarkError(
            f"hf-hub:{repo} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) and "
            f"cannot be downloaded ({'HF_HUB_OFFLINE is set' if _hf_offline() else host + ' cannot be reached'}). "
            f"Copy the repository's files (open_clip_config.json and the weights) into a folder and set "
            f"backbone.pretrained=/that/folder.")

    @staticmethod
    def _check_supported(model: nn.Module) -> str:
        visual = getattr(model, "visual", None)
        from open_clip.modified_resnet import ModifiedResNet

        if isinstance(visual, ModifiedResNet) and hasattr(model, "token_embedding"):
            return "resnet"
        ok = (hasattr(model, "token_embedding") and hasattr(visual, "conv1")
              and getattr(visual, "attn_pool", None) is None
              and getattr(visual, "pool_type", "tok") == "tok"
              and not getattr(visual, "final_ln_after_pool", False))
        if not ok:
            raise BenchmarkError(
                "the CLIP backbone wrapper supports open_clip CLIP models with a ViT image tower "
                "(class-token pooling, no attentional pool) and the built-in text tower, like "
                "ViT-B-16 / ViT-L-14, or a ResNet image tower with an attention pool, like RN50 / "
                "RN101 / RN50x4; this model is neither.")
        return "vit"

    def require_vit(self, what: str) -> None:
        """Raise a clear error when the image tower is not a ViT; ``what`` names the feature
        that needs one (e.g. "MaPLe's deep visual prompts")."""
        if self.image_tower != "vit":
            raise BenchmarkError(
                f"{what}: this needs a ViT image tower, but the backbone ({self.identity}) is a ResNet CLIP: "
                f"its image tower is a ModifiedResNet (convolutions and an attention pool), with no "
                f"transformer blocks, class token or patch tokens to prompt or adapt. Use a ViT CLIP "
                f"(e.g. backbone.model=ViT-B-16-quickgelu backbone.pretrained=openai).")

    def train(self, mode: bool = True):  # CLIP stays in eval mode (no dropout), whatever the caller
        super().train(False)
        return self

    # -- shapes -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1] if self.model.text_projection is not None else self.text_width

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def vision_width(self) -> int:
        self.require_vit("the image tower's token width (visual prompt tokens)")
        return self.model.visual.conv1.out_channels

    @property
    def text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def vision_layers(self) -> int:
        self.require_vit("the image tower's transformer depth (per-layer visual prompts)")
        return len(self.model.visual.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return self.model.positional_embedding.shape[0]

    @property
    def grid_size(self) -> Tuple[int, int]:
        """(rows, columns) of the image patch grid (a ResNet's attention-pool grid: image_size // 32)."""
        if self.image_tower == "resnet":
            n = self.model.visual.attnpool.positional_embedding.shape[0] - 1
            side = int(round(n ** 0.5))
            return side, n // side
        return tuple(self.model.visual.grid_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size  # a ResNet's attention-pool grid included
        return gh * gw

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(list(texts))
        return tokens.to(self.device)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self.model.token_embedding(tokens)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.encode_text_embeddings(self.token_embedding(tokens), tokens)

    def encode_text_embeddings(self, embeddings: Tensor, tokens: Tensor,
                               deep_prompts: Optional[Sequence[Optional[Tensor]]] = None,
                               prompt_start: int = 1) -> Tensor:
        """Run the text tower from token embeddings ``[N, L, W]``.

        ``tokens`` ``[N, L]`` are only used to find the pooled (EOT) position, exactly as open_clip
        does; when learned context replaces words, pass tokens whose EOT sits where it sits in the
        embeddings. ``deep_prompts[j]`` (``[n, W]`` or ``[N, n, W]``) replaces positions
        ``prompt_start:prompt_start+n`` at the input of block ``j >= 1``.
        """
        from open_clip.transformer import text_global_pool

        m = self.model
        cast = m.transformer.get_cast_dtype()
        n = self._text_positions(tokens, deep_prompts, prompt_start)
        if n < tokens.shape[1]:  # shortened tower: positions after the last EOT cannot reach it
            embeddings, tokens = embeddings[:, :n], tokens[:, :n]
        mask = m.attn_mask[:n, :n].contiguous() if m.attn_mask is not None else None
        x = embeddings.to(cast) + m.positional_embedding[:n].to(cast)
        x = self._run_blocks(m.transformer, x, deep_prompts, attn_mask=mask,
                             at=lambda k: slice(prompt_start, prompt_start + k))
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return x

    #: run the text tower only over the positions up to the last pooled (EOT) token of the batch
    #: (``train.short_text``): with a causal mask no later position reaches a pooled token, so the
    #: features equal the full tower's up to float rounding; False runs all context positions.
    short_text: bool = True

    def _text_positions(self, tokens: Tensor, deep_prompts, prompt_start: int) -> int:
        """How many leading positions the text tower must run for ``tokens``: all of them unless
        ``short_text`` is on, the pooled position comes from the tokens (argmax / eos pooling) and
        the attention mask is causal up to there; deep prompt positions are always kept."""
        m = self.model
        full = tokens.shape[1]
        pool = getattr(m, "text_pool_type", "argmax")
        if not self.short_text or m.attn_mask is None or pool not in ("argmax", "eos"):
            return full
        if pool == "argmax":
            pos = tokens.argmax(dim=-1)
        else:
            pos = (tokens == m.text_eos_id).int().argmax(dim=-1)
        n = int(pos.max()) + 1
        if deep_prompts is not None:
            n = max([n] + [prompt_start + p.shape[-2] for p in deep_prompts if p is not None])
        n = min(n, full)
        mask = m.attn_mask
        if n < full and not bool(torch.isneginf(mask[:n, n:]).all()):  # not causal: no shortcut
            return full
        return n

    # -- image --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, prompts: Optional[Tensor] = None,
                     deep_prompts: Optional[Sequence[Optional[Tensor]]] = None,
                     return_patches: bool = False, return_prompts: bool = False,
                     return_value_local: bool = False) -> ImageOutput:
        """Run the image tower.

        ``prompts`` ``[n, W]`` or ``[B, n, W]``: shallow prompt tokens appended after the patch
        tokens (after the positional embedding, before ``ln_pre``). ``deep_prompts[j]`` for
        ``j >= 1`` replaces the prompt tokens at the input of block ``j`` (``deep_prompts[0]`` must
        be ``None``: use ``prompts``). ``return_value_local`` gives LoCoOp's local features: the
        last block's value path (in_proj value slice, out_proj, residual, MLP) for patch tokens,
        then ``ln_post`` and ``proj``. On a ResNet CLIP see :meth:`_encode_image_resnet`.
        """
        if self.image_tower == "resnet":
            return self._encode_image_resnet(images, prompts, deep_prompts, return_patches, return_value_local)
        v = self.model.visual
        x = self._embed_no_ln(images)  # conv1, CLS, positional embedding, patch dropout
        n_prompt = 0
        if prompts is not None:
            p = self._expand(prompts, x.shape[0]).to(x.dtype)
            n_prompt = p.shape[1]
            x = torch.cat([x, p], dim=1)
        x = v.ln_pre(x)
        if deep_prompts is not None:
            if len(deep_prompts) and deep_prompts[0] is not None:
                raise ValueError("deep_prompts[0] must be None: pass first-layer tokens as `prompts`")
            if n_prompt == 0 and any(d is not None for d in deep_prompts):
                raise ValueError("deep prompts need shallow `prompts` to define their positions")
        blocks = v.transformer.resblocks
        n_tok = x.shape[1]
        last = len(blocks) - 1
        # only the pooled (CLS) output is read: the last block may compute that one query
        cls_only = not (return_patches or return_prompts)
        x = self._run_blocks(v.transformer, x, deep_prompts, attn_mask=None,
                             at=lambda n: slice(n_tok - n, n_tok),
                             stop_before=last if return_value_local else None, cls_only_last=cls_only)
        value_local = None
        if return_value_local:
            blk = blocks[last]
            if deep_prompts is not None and len(deep_prompts) > last and deep_prompts[last] is not None:
                x = self._replace(x, deep_prompts[last], slice(n_tok - n_prompt, n_tok))
            value_local = self._value_path(blk, x)[:, 1:1 + self.num_patches]
            value_local = self._to_joint(v.ln_post(value_local))
            x = self._run_block(blk, x, None, getattr(v.transformer, "batch_first", True),
                                n_query=1 if cls_only else None)
        x = v.ln_post(x)
        pooled = self._to_joint(x[:, 0])
        out = ImageOutput(pooled=pooled, value_local=value_local)
        if return_patches:
            out.patches = self._to_joint(x[:, 1:1 + self.num_patches])
        if return_prompts:
            out.prompts = self._to_joint(x[:, n_tok - n_prompt:]) if n_prompt else None
        return out

    # -- image, ResNet CLIP ---------------------------------------------------------------------
    def _encode_image_resnet(self, images: Tensor, prompts, deep_prompts, return_patches: bool,
                             return_value_local: bool) -> ImageOutput:
        """ModifiedResNet trunk, then the attention pool with every output kept.

        ``pooled``: the pool's output at the mean token (== open_clip ``encode_image``).
        ``patches`` ``[B, HW, E]``: its outputs at the HW grid positions, each the attention from that
        position over all positions, through ``c_proj`` like the pooled one: the official PLOT's
        local features (CHENGY12/PLOT ``plot-coop/clip/model.py`` keeps ``x[1:]`` of the pool).
        ``value_local`` ``[B, HW, E]``: the official LoCoOp's ResNet local features,
        ``c_proj(v_proj(grid))`` on the last stage's feature map (no positional embedding).
        Visual prompt tokens have no place in a ResNet: they raise :meth:`require_vit`'s error."""
        if prompts is not None or (deep_prompts is not None and any(d is not None for d in deep_prompts)):
            self.require_vit("visual prompt tokens (shallow or deep)")
        v = self.model.visual
        x = v.stem(images.to(self.dtype))
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # [B, C, H, W]
        tokens = self._attnpool_tokens(v.attnpool, x)  # [B, 1 + HW, E]
        out = ImageOutput(pooled=tokens[:, 0])
        if return_patches:
            out.patches = tokens[:, 1:]
        if return_value_local:
            pool = v.attnpool
            grid = x.flatten(2).transpose(1, 2)  # [B, HW, C], row-major over (h, w)
            out.value_local = pool.c_proj(pool.v_proj(grid))
        return out

    @staticmethod
    def _attnpool_tokens(pool: nn.Module, x: Tensor) -> Tensor:
        """open_clip's ``AttentionPool2d.forward`` with every query's output returned: it already
        attends from all HW + 1 tokens and keeps only the first (the same call, so the first output
        equals open_clip's bit for bit)."""
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + pool.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False)
        return x.permute(1, 0, 2)

    def _embed_no_ln(self, images: Tensor) -> Tensor:
        v = self.model.visual
        x = v.conv1(images.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.patch_dropout(x)

    def _to_joint(self, x: Tensor) -> Tensor:
        proj = self.model.visual.proj
        return x @ proj if proj is not None else x

    @staticmethod
    def _value_path(blk: nn.Module, x: Tensor) -> Tensor:
        """LoCoOp's local branch of one block: out_proj(W_v ln_1(x) + b_v) + x, then + MLP."""
        attn: nn.MultiheadAttention = blk.attn
        width = x.shape[-1]
        w_v = attn.in_proj_weight[2 * width:]
        b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
        val = F.linear(F.linear(blk.ln_1(x), w_v, b_v), attn.out_proj.weight, attn.out_proj.bias)
        y = x + blk.ls_1(val)
        return y + blk.ls_2(blk.mlp(blk.ln_2(y)))

    @staticmethod
    def _expand(p: Tensor, batch: int) -> Tensor:
        return p.unsqueeze(0).expand(batch, -1, -1) if p.dim() == 2 else p

    def _replace(self, x: Tensor, p: Tensor, pos: slice) -> Tensor:
        p = self._expand(p, x.shape[0]).to(x.dtype)
        return torch.cat([x[:, :pos.start], p, x[:, pos.stop:]], dim=1)

    def _run_blocks(self, transformer: nn.Module, x: Tensor, deep_prompts, attn_mask, at,
                    stop_before: Optional[int] = None, cls_only_last: bool = False) -> Tensor:
        """The tower's blocks in order, deep prompts replaced at each block's input. With
        ``cls_only_last`` (the caller reads only token 0 of the output) the last block may return
        token 0 alone: see :meth:`_run_block`."""
        batch_first = getattr(transformer, "batch_first", True)
        blocks = transformer.resblocks
        if deep_prompts is not None and len(deep_prompts) > len(blocks):
            raise ValueError(f"{len(deep_prompts)} deep prompt layers given but the tower has "
                             f"{len(blocks)} blocks")
        for j, blk in enumerate(blocks):
            if stop_before is not None and j == stop_before:
                break
            if deep_prompts is not None and j >= 1 and j < len(deep_prompts) and deep_prompts[j] is not None:
                p = deep_prompts[j]
                x = self._replace(x, p, at(p.shape[-2]))
            last_cls = cls_only_last and j == len(blocks) - 1 and attn_mask is None
            x = self._run_block(blk, x, attn_mask, batch_first, n_query=1 if last_cls else None)
        return x

    def _run_block(self, blk: nn.Module, x: Tensor, attn_mask, batch_first: bool,
                   n_query: Optional[int] = None) -> Tensor:
        """One residual block on batch-first tokens. ``n_query``: only the first ``n_query`` tokens'
        outputs are wanted; with ``sdpa_blocks`` on a plain block computes just those queries
        (keys and values from every token, the MLP on those tokens: the same outputs up to float
        rounding, since a token's output depends on the others only through its attention), and
        returns ``[B, n_query, W]``; otherwise all tokens, as before."""
        if self.sdpa_blocks and _plain_block(blk):
            return _sdpa_block(blk, x, attn_mask, n_query)
        if batch_first:
            return blk(x, attn_mask=attn_mask)
        return blk(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)  # built batch_first=False

    #: run open_clip's plain residual blocks as one packed q/k/v projection and
    #: ``F.scaled_dot_product_attention`` on the batch-first tokens (``train.sdpa_blocks``) instead of
    #: through ``nn.MultiheadAttention`` (whose general path transposes the tokens to sequence-first
    #: and back, and whose no-grad fast path is a different kernel): the same function, equal up to
    #: float rounding; False (here; the engine sets it from the run's config, on by default) calls
    #: the blocks themselves (bit-identical to open_clip). On, an image pass whose caller reads
    #: only the pooled feature (no patches, no prompt outputs) also runs the last image block for
    #: the CLS query alone (:meth:`_run_block`)
    sdpa_blocks: bool = False

    # -- torch.compile ------------------------------------------------------------------------
    def set_compiled(self, on: bool, backend: str = "inductor") -> None:
        """``torch.compile`` every residual block of both towers in place (``train.compile``), or
        undo it. Blocks rather than the whole model: the methods run the towers block by block
        (prompts, deep prompts, value path), which a whole-model compile would never see. Weights
        and the state dict are untouched; the first call of each shape pays the compilation."""
        v = self.model.visual
        vision = ([v.layer1, v.layer2, v.layer3, v.layer4] if self.image_tower == "resnet"
                  else list(v.transformer.resblocks))  # ResNet: its four stages
        blocks = vision + list(self.model.transformer.resblocks)
        if on:
            # every block shares one forward code object, traced again for each grad mode, token
            # count (prompts) and batch shape: dynamo's default limit of 8 variants would silently
            # fall back to eager for most of them (measured on an H100)
            import torch._dynamo

            dcfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dcfg, name):
                    setattr(dcfg, name, max(getattr(dcfg, name), 64))
        for blk in blocks:
            if on and getattr(blk, "_compiled_call_impl", None) is None:
                blk.compile(backend=backend)
            elif not on:
                blk._compiled_call_impl = None

    # -- LoRA access --------------------------------------------------------------------------
    def attention_modules(self, tower: str = "both") -> List[Tuple[str, int, nn.MultiheadAttention]]:
        """``(tower, layer index, nn.MultiheadAttention)`` for every block of the chosen tower(s)."""
        if tower not in ("vision", "text", "both"):
            raise ValueError(f"tower must be 'vision', 'text' or 'both', got {tower!r}")
        out = []
        if tower in ("vision", "both"):
            self.require_vit("attention modules of the image tower (LoRA on the vision tower)")
            out += [("vision", i, b.attn) for i, b in enumerate(self.model.visual.transformer.resblocks)]
        if tower in ("text", "both"):
            out += [("text", i, b.attn) for i, b in enumerate(self.model.transformer.resblocks)]
        return out


_RESBLOCK = None  # open_clip's ResidualAttentionBlock, once imported


def _plain_block(blk: nn.Module) -> bool:
    """Whether ``blk`` is open_clip's plain ``ResidualAttentionBlock`` (self-attention through a
    packed ``nn.MultiheadAttention`` without extra biases or dropout), not compiled and without
    hooks: the blocks :func:`_sdpa_block` computes. A LoRA-wrapped attention, a compiled or hooked
    block, or any other block type runs its own forward. Checked at every call: hooks and
    compilation can change between passes."""
    global _RESBLOCK
    if _RESBLOCK is None:  # open_clip is imported lazily by this module
        from open_clip.transformer import ResidualAttentionBlock as _RESBLOCK
    attn = getattr(blk, "attn", None)
    return (type(blk) is _RESBLOCK and type(attn) is nn.MultiheadAttention
            and getattr(blk, "_compiled_call_impl", None) is None and not hasattr(blk, "ln_1_kv")
            and not (blk._forward_hooks or blk._forward_pre_hooks or attn._forward_hooks
                     or attn._forward_pre_hooks)
            and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
            and not attn.dropout)


def _sdpa_block(blk: nn.Module, x: Tensor, attn_mask: Optional[Tensor],
                n_query: Optional[int] = None) -> Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` on batch-first tokens ``[B, L, W]``:
    ``x + ls_1(attn(ln_1(x)))`` then ``x + ls_2(mlp(ln_2(x)))``, the attention as one packed q/k/v
    projection, ``F.scaled_dot_product_attention`` per head (with the block's additive mask) and the
    output projection, which is what ``nn.MultiheadAttention`` computes. ``n_query``: the outputs
    of the first ``n_query`` tokens only, ``[B, n_query, W]`` (their queries, the output projection,
    residual and MLP; keys and values of all tokens; ``attn_mask`` must then be None)."""
    attn: nn.MultiheadAttention = blk.attn
    B, L, W = x.shape
    H = attn.num_heads
    y = blk.ln_1(x)
    if n_query is None:
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, H, W // H).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, D] each
    else:
        if attn_mask is not None:
            raise ValueError("a query subset needs attn_mask=None (the mask's rows are per query)")
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(y[:, :n_query], w[:W], b[:W] if b is not None else None)
        q = q.view(B, n_query, H, W // H).transpose(1, 2)
        kv = F.linear(y, w[W:], b[W:] if b is not None else None)
        k, v = kv.view(B, L, 2, H, W // H).permute(2, 0, 3, 1, 4).unbind(0)
        x, L = x[:, :n_query], n_query
    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = F.linear(o.transpose(1, 2).reshape(B, L, W), attn.out_proj.weight, attn.out_proj.bias)
    x = x + blk.ls_1(o)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
