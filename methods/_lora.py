"""LoRA on the attention of open_clip's residual blocks, as CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024)
does it: separate low-rank deltas on the query, key and value projections (optionally the output
projection), ``W x + (alpha / sqrt(r)) B A dropout(x)``, A kaiming-uniform (a = sqrt(5)), B zero.

Why not ``peft``: open_clip's blocks use ``nn.MultiheadAttention``, whose q, k and v live in one
packed ``in_proj_weight`` ``[3E, E]``. peft's LoRA for ``nn.MultiheadAttention`` adapts that packed
projection (and ``out_proj``) with one rank-r pair for all of q, k and v together, which is a
different (and differently sized, differently initialised) adapter from CLIP-LoRA's three independent
rank-r pairs with dropout on their input; peft also scales by alpha / r, not alpha / sqrt(r). So the
adapter is written here: :class:`LoRAAttention` replaces a block's ``nn.MultiheadAttention``, keeps
the original module (frozen, never written to) and runs the same attention math (packed input
projection split into q, k, v; scaled dot-product attention; output projection).

Merging: on entering eval mode the deltas are merged into a *separate* copy of the weights,
``W' = W + s B A``, which eval forwards use; entering train mode drops that copy (unmerge). The
original CLIP weights are never modified, so they stay bit-identical (the official loralib adds and
later subtracts ``s B A`` in place, which is the same function up to float rounding).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MATRICES = ("q", "k", "v", "o")


def layer_indices(position: str, n_layers: int) -> List[int]:
    """Which blocks get LoRA. Named positions follow the official ``INDEX_POSITIONS_*`` tables for
    12-layer towers (all, bottom = first third, mid, up = last third, half-bottom, half-up, top1,
    top2, top3) and generalise them to any depth; or explicit indices "0,1,2" (negatives count from
    the end)."""
    n = n_layers
    third = n // 3
    named = {
        "all": list(range(n)),
        "bottom": list(range(0, third)),
        "mid": list(range(third, 2 * third)),
        "up": list(range(n - third, n)),
        "half-bottom": list(range(0, n // 2)),
        "half-up": list(range(n // 2, n)),
        "top": [n - 1], "top1": [n - 1], "top2": list(range(n - 2, n)), "top3": list(range(n - 3, n)),
    }
    if position in named:
        return named[position]
    try:
        idx = [int(s) for s in str(position).replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise ValueError(f"LoRA position must be one of {sorted(named)} or comma-separated layer "
                         f"indices, got {position!r}") from None
    idx = sorted({i % n if -n <= i < n else _bad(i, n) for i in idx})
    if not idx:
        raise ValueError("LoRA position selects no layer")
    return idx


def _bad(i: int, n: int) -> int:
    raise ValueError(f"LoRA layer index {i} is out of range for a tower of {n} blocks")


class LoRAAttention(nn.Module):
    """Drop-in replacement of a self-attention ``nn.MultiheadAttention`` with LoRA on chosen matrices.

    ``lora_A_<m>`` ``[r, E]`` and ``lora_B_<m>`` ``[E, r]`` for each ``m`` in ``matrices``
    (q, k, v, o). Training forward: ``W_m x + b_m + scaling * B_m A_m dropout_m(x)`` with an
    independent dropout mask per matrix (each official ``LinearLoRA`` owns its dropout). Eval forward:
    the merged weights, no dropout. ``training`` is driven by :meth:`train` of this module only
    (the backbone wrapper keeps CLIP itself in eval mode).
    """

    def __init__(self, base: nn.MultiheadAttention, matrices: Sequence[str] = ("q", "k", "v"),
                 rank: int = 2, alpha: float = 1.0, dropout: float = 0.25):
        super().__init__()
        if not isinstance(base, nn.MultiheadAttention):
            raise TypeError(f"LoRAAttention wraps nn.MultiheadAttention, got {type(base).__name__}")
        if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
            raise ValueError("LoRAAttention supports self-attention with a packed in_proj, no bias_k/v "
                             "and no add_zero_attn (open_clip's ResidualAttentionBlock)")
        if base.dropout:
            raise ValueError("LoRAAttention does not implement attention dropout (open_clip uses 0)")
        bad = [m for m in matrices if m not in MATRICES]
        if bad or not matrices:
            raise ValueError(f"LoRA matrices must be a non-empty subset of {MATRICES}, got {list(matrices)}")
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.matrices = tuple(dict.fromkeys(matrices))
        self.rank = int(rank)
        self.alpha = float(alpha)
        # [code] CLIP-LoRA's loralib: scaling = lora_alpha / sqrt(r) (the alpha / r line is commented out)
        self.scaling = self.alpha / math.sqrt(self.rank)
        self.dropout_p = float(dropout)
        E = base.embed_dim
        w = base.in_proj_weight
        for m in self.matrices:
            A = nn.Parameter(w.new_empty(self.rank, E))
            B = nn.Parameter(w.new_zeros(E, self.rank))
            # [code] A as nn.Linear's default init, B zero: the adapted model starts as CLIP
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            setattr(self, f"lora_A_{m}", A)
            setattr(self, f"lora_B_{m}", B)
        self._merged: Optional[Dict[str, torch.Tensor]] = None
        self.training = True

    # -- merge / unmerge ---------------------------------------------------------------------
    def delta_weight(self, m: str) -> torch.Tensor:
        """``scaling * B_m A_m`` ``[E, E]``."""
        return (getattr(self, f"lora_B_{m}") @ getattr(self, f"lora_A_{m}")) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Materialise ``W + s B A`` for eval in new tensors (CLIP's own weights are not touched)."""
        E = self.base.embed_dim
        w_in = self.base.in_proj_weight.detach().clone()
        for j, m in enumerate("qkv"):
            if m in self.matrices:
                w_in[j * E:(j + 1) * E] += self.delta_weight(m).to(w_in.dtype)
        w_out = self.base.out_proj.weight.detach()
        if "o" in self.matrices:
            w_out = w_out + self.delta_weight("o").to(w_out.dtype)
        self._merged = {"in": w_in, "out": w_out}

    def unmerge(self) -> None:
        self._merged = None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def train(self, mode: bool = True):
        # only this module's flag: the wrapped CLIP attention stays as the backbone left it (eval)
        self.training = bool(mode)
        if mode:
            self.unmerge()
        else:
            self.merge()
        return self

    # -- forward -------------------------------------------------------------------------------
    def _deltas(self, names: Sequence[str], x: torch.Tensor) -> List[torch.Tensor]:
        """``scaling * B_m A_m dropout_m(x)`` for each m in ``names`` (one independent dropout mask per
        matrix), computed together: the inputs are stacked and multiplied by the stacked A and B."""
        A = torch.stack([getattr(self, f"lora_A_{m}") for m in names]).to(x.dtype)  # [n, r, E]
        B = torch.stack([getattr(self, f"lora_B_{m}") for m in names]).to(x.dtype)  # [n, E, r]
        xs = x.reshape(1, -1, x.shape[-1]).expand(len(names), -1, -1)  # [n, N, E]
        if self.training and self.dropout_p > 0:
            xs = F.dropout(xs, self.dropout_p, training=True)
        d = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)) * self.scaling  # [n, N, E]
        return [t.reshape(x.shape[:-1] + (B.shape[1],)) for t in d.unbind(0)]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if key_padding_mask is not None or is_causal:
            raise NotImplementedError("LoRAAttention: key_padding_mask / is_causal are not used by "
                                      "open_clip and not implemented; pass an attn_mask")
        base = self.base
        batched = query.dim() == 3
        self_attn = query is key and key is value
        if not batched:  # [L, E] -> [1, L, E]
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not base.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        Bsz, L, E = query.shape
        S = key.shape[1]
        H = base.num_heads
        D = E // H
        lora_live = self.training  # eval: the deltas are inside the merged weights
        if not lora_live and self._merged is None:
            self.merge()
        w_in = base.in_proj_weight if lora_live else self._merged["in"]
        w_out = base.out_proj.weight if lora_live else self._merged["out"]
        b_in = base.in_proj_bias
        if self_attn:
            q, k, v = F.linear(query, w_in, b_in).chunk(3, dim=-1)
        else:
            wq, wk, wv = w_in.chunk(3)
            bq, bk, bv = b_in.chunk(3) if b_in is not None else (None, None, None)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        if lora_live:
            qkv = {"q": q, "k": k, "v": v}
            names = [m for m in "qkv" if m in self.matrices]
            if self_attn:
                for m, d in zip(names, self._deltas(names, query)):
                    qkv[m] = qkv[m] + d
            else:
                for m, inp in (("q", query), ("k", key), ("v", value)):
                    if m in names:
                        qkv[m] = qkv[m] + self._deltas([m], inp)[0]
            q, k, v = qkv["q"], qkv["k"], qkv["v"]
        q = q.reshape(Bsz, L, H, D).transpose(1, 2)  # [B, H, L, D]
        k = k.reshape(Bsz, S, H, D).transpose(1, 2)
        v = v.reshape(Bsz, S, H, D).transpose(1, 2)
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:  # nn.MultiheadAttention: True = not allowed to attend
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            mask = mask.to(q.dtype)
            if mask.dim() == 3:  # [B * H, L, S]
                mask = mask.view(Bsz, H, L, S)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(Bsz, L, E)
        out = F.linear(o, w_out, base.out_proj.bias)
        if lora_live and "o" in self.matrices:
            out = out + self._deltas(["o"], o)[0]
        if not batched:
            out = out.squeeze(0)
        elif not base.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _replace_child(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, new)
                return
    raise RuntimeError("attention module not found under the backbone")


def apply_lora(backbone, encoder: str, position: str, matrices: Sequence[str], rank: int,
               alpha: float, dropout: float) -> List[LoRAAttention]:
    """Replace the chosen blocks' attention of ``backbone`` (a :class:`CLIPBackbone`, which the
    caller owns: the engine gives LoRA methods their own copy) by :class:`LoRAAttention`."""
    towers = {"both": ("vision", "text"), "vision": ("vision",), "text": ("text",)}
    if encoder not in towers:
        raise ValueError(f"LoRA encoder must be both, vision or text, got {encoder!r}")
    layers: List[LoRAAttention] = []
    for tower in towers[encoder]:
        mods = backbone.attention_modules(tower)
        chosen = set(layer_indices(position, len(mods)))
        for _, i, mha in mods:
            if i in chosen:
                if isinstance(mha, LoRAAttention):
                    raise RuntimeError("LoRA is already applied to this backbone")
                wrapper = LoRAAttention(mha, matrices, rank, alpha, dropout)
                _replace_child(backbone, mha, wrapper)  # the wrapper owns the CLIP modules
                layers.append(wrapper)
    return layers
