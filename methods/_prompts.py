"""Shared code of the prompt-learning baselines (CoOp, LoCoOp, PLOT, MaPLe).

:class:`PromptLearner` is the CoOp-family text prompt ``[SOS] v1..vn CLASS . [EOS]`` with the class
token at the end, generalised to ``n_prompts`` context sets (PLOT's N prompts per class) and deep
text prompts (MaPLe). Token layout follows the official PromptLearner of CoOp / LoCoOp / PLOT /
MaPLe: each prompt is tokenised as ``"<prefix> <classname>."`` where ``<prefix>`` is the init
string (or ``"X X ... X"`` for the random init); the learnable context replaces token positions
``1..n_ctx`` (right after SOS), every other position keeps its frozen word embedding, and the EOT
position (where the text feature is pooled) comes from those tokens, as open_clip does. CoOp's
class-specific context (CSC) and middle / front class-token positions are options of the learner.

With an init string, the context starts from the word embeddings of its first ``n_ctx`` tokens;
tokens of the init string beyond ``n_ctx`` stay as fixed words (MaPLe: n_ctx = 2 from
"a photo of a" learns "a photo" and keeps "of a"). CoOp, LoCoOp and PLOT set n_ctx to the number of
words of the init string (their official code does), which :func:`check_ctx_init_words` enforces.

:func:`sinkhorn` is PLOT's entropic optimal-transport solver, :class:`EvalCache` the cache of class
text features while the method is in eval mode.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from benchmark.errors import ConfigError
from benchmark.method import prompt_classname

Tensor = torch.Tensor


def clean_classname(name: str) -> str:
    return prompt_classname(name)  # "_" -> " ", as every official PromptLearner does


def check_ctx_init_words(method: str, n_ctx: int, ctx_init: Union[str, Sequence[str]]) -> None:
    """CoOp / LoCoOp / PLOT derive n_ctx from the init string (``len(ctx_init.split(" "))``);
    we keep ``n_ctx`` explicit in the config and refuse a mismatch instead of silently ignoring it."""
    inits = [ctx_init] if isinstance(ctx_init, str) else list(ctx_init)
    for s in inits:
        if s and len(s.replace("_", " ").split()) != n_ctx:
            raise ConfigError(f"{method}.params.ctx_init {s!r} has {len(s.split())} words but "
                              f"n_ctx={n_ctx}; the official code sets n_ctx to the number of words "
                              f"of the init, so set {method}.params.n_ctx={len(s.split())}")


CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """Learnable text context, shared by all classes or class-specific (CoOp's CSC).

    ``inits``: "" (random N(0, 0.02) init, CoOp's) or one init string for every prompt, or a list
    of ``n_prompts`` init strings (PLOT++'s per-prompt templates). The parameter ``ctx`` has shape
    ``[n_ctx, W]`` for one prompt (as CoOp's checkpoint), ``[n_prompts, n_ctx, W]`` for several,
    and ``[K, n_ctx, W]`` with ``csc`` (CoOp's class-specific context: one prompt, random init).
    ``forward()`` returns unnormalised text features ``[n_prompts * K, E]``, prompt-major (row
    ``n * K + k`` is prompt n of class k, PLOT's layout).

    ``class_token_position`` (CoOp's CLASS_TOKEN_POSITION) places the class name's tokens: "end"
    ``[SOS] ctx CLASS . [EOS]``, "middle" ``[SOS] ctx[:n//2] CLASS ctx[n//2:] . [EOS]`` or "front"
    ``[SOS] CLASS ctx . [EOS]``. As in the official code, "the class" is the first ``name_len``
    tokens after the context in ``"<prefix> <name>."``, where ``name_len`` is the BPE length of the
    cleaned name on its own; the EOT (pooled) position does not move."""

    def __init__(self, backbone, classnames: List[str], n_ctx: int,
                 inits: Union[str, Sequence[str]] = "", n_prompts: int = 1, csc: bool = False,
                 class_token_position: str = "end"):
        super().__init__()
        self._bb = [backbone]  # a list: not registered as a submodule (the method owns the backbone)
        if n_ctx < 1 or n_prompts < 1:
            raise ConfigError(f"n_ctx and the number of prompts must be >= 1 (got {n_ctx}, {n_prompts})")
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ConfigError(f"class_token_position must be one of {', '.join(CLASS_TOKEN_POSITIONS)}, "
                              f"got {class_token_position!r}")
        if csc and n_prompts != 1:
            raise ConfigError(f"class-specific context (csc) is CoOp's option for one prompt per class, "
                              f"not for {n_prompts} prompts")
        names = [clean_classname(c) for c in classnames]
        if isinstance(inits, str):
            inits = [inits] * n_prompts
        inits = [s.replace("_", " ").strip() for s in inits]
        if len(inits) != n_prompts:
            raise ConfigError(f"{len(inits)} context init strings for {n_prompts} prompts")
        if any(inits) and not all(inits):
            raise ConfigError("either every prompt's context is initialised from words or none")
        if csc and inits[0]:
            raise ConfigError(
                f"class-specific context (csc: true) starts from the random N(0, 0.02) init; with "
                f"ctx_init {inits[0]!r} the official CoOp ignores CSC and learns one shared context. "
                f"Set ctx_init: '' for CSC, or csc: false for the word init")
        width = backbone.text_width
        if inits[0]:
            vecs = []
            for s in inits:
                tok = backbone.tokenize([s])
                n_tok = int(tok.argmax(-1)) - 1  # tokens between SOS and EOT
                if n_tok < n_ctx:
                    raise ConfigError(f"context init {s!r} has {n_tok} tokens, fewer than n_ctx={n_ctx}")
                with torch.no_grad():
                    vecs.append(backbone.token_embedding(tok)[0, 1:1 + n_ctx].clone())
            ctx = torch.stack(vecs)
            prefixes = inits
        else:
            rows = len(names) if csc else n_prompts  # [code] CSC: torch.empty(n_cls, n_ctx, dim)
            ctx = torch.empty(rows, n_ctx, width, dtype=backbone.dtype, device=backbone.device)
            nn.init.normal_(ctx, std=0.02)  # [code] CoOp/PLOT random init
            prefixes = [" ".join(["X"] * n_ctx)] * n_prompts
        self.n_ctx, self.n_prompts, self.num_classes = n_ctx, n_prompts, len(names)
        self.csc, self.class_token_position = csc, class_token_position
        self.ctx = nn.Parameter(ctx if csc else ctx[0] if n_prompts == 1 else ctx)
        tokens = torch.cat([backbone.tokenize([f"{p} {name}." for name in names]) for p in prefixes])
        with torch.no_grad():
            emb = backbone.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)  # CLASS . EOT pad
        order = None  # "end": the concatenation is the layout
        if class_token_position != "end":
            name_lens = [int(t.argmax()) - 1 for t in backbone.tokenize(names)]  # [code] BPE length
            order = torch.stack([self._order(n_ctx, n, tokens.shape[1], class_token_position)
                                 for n in name_lens * n_prompts]).to(tokens.device)
        self.register_buffer("layout", order, persistent=False)

    @staticmethod
    def _order(n_ctx: int, name_len: int, length: int, position: str) -> Tensor:
        """Source positions (in the "end" layout ``SOS ctx CLASS rest``) of each output position."""
        if 1 + n_ctx + name_len > length:
            raise ConfigError(f"a class name of {name_len} tokens and {n_ctx} context tokens do not fit "
                              f"the text context length {length}")
        ctx = list(range(1, 1 + n_ctx))
        cls = list(range(1 + n_ctx, 1 + n_ctx + name_len))
        rest = list(range(1 + n_ctx + name_len, length))
        half = n_ctx // 2  # [code] half_n_ctx = n_ctx // 2
        mid = ctx[:half] + cls + ctx[half:] if position == "middle" else cls + ctx
        return torch.tensor([0] + mid + rest)

    def context(self) -> Tensor:
        """``[n_prompts, n_ctx, W]``, or ``[K, n_ctx, W]`` (one context per class) with ``csc``."""
        return self.ctx.unsqueeze(0) if self.ctx.dim() == 2 else self.ctx

    def embeddings(self, ctx: Optional[Tensor] = None) -> Tensor:
        """Token embeddings ``[n_prompts * K, L, W]``: the context at positions 1..n_ctx with the
        class token at the end, else rearranged to the middle / front layout."""
        ctx = self.context() if ctx is None else ctx
        k = self.num_classes
        if not self.csc:
            ctx = ctx.unsqueeze(1).expand(-1, k, -1, -1).reshape(-1, self.n_ctx, ctx.shape[-1])
        emb = torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)
        if self.layout is not None:
            emb = emb.gather(1, self.layout.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
        return emb

    def forward(self, deep_prompts: Optional[Sequence[Optional[Tensor]]] = None,
                ctx: Optional[Tensor] = None) -> Tensor:
        if deep_prompts is not None and self.layout is not None:
            raise ConfigError("deep text prompts replace the context positions right after SOS: they "
                              "need class_token_position 'end'")
        return self._bb[0].encode_text_embeddings(self.embeddings(ctx), self.tokens,
                                                  deep_prompts=deep_prompts, prompt_start=1)


def param_versions(module: nn.Module) -> tuple:
    """The version counters of ``module``'s trainable parameters: they change with every in-place
    update (optimiser step, loaded state), so equal versions mean equal parameters."""
    return tuple(p._version for p in module.parameters() if p.requires_grad)


def detached(obj):
    """``obj`` (a tensor, or tuples / lists of them and None) without its autograd graph."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached(o) for o in obj)
    return obj


class EvalCache:
    """Memoises a value (class text features) while the owning module is in eval mode; training
    recomputes it at every step (the prompts change), except that a no-grad pass of the same step
    (a weak view's pseudo-labels) reuses the value the step already computed, detached: same
    parameters, same numbers, one text-tower run fewer. Call :meth:`clear` from ``train()``."""

    def __init__(self):
        self.value = None
        self.step = None  # (parameter versions, value computed with grad in training)

    def get(self, module: nn.Module, compute: Callable[[], object]):
        if module.training:
            self.value = None
            key = param_versions(module)
            if not torch.is_grad_enabled() and self.step is not None and self.step[0] == key:
                return detached(self.step[1])
            value = compute()
            self.step = (key, value) if torch.is_grad_enabled() else None
            return value
        if self.value is None:
            with torch.no_grad():
                self.value = compute()
        return self.value

    def clear(self) -> None:
        self.value = None
        self.step = None


def sinkhorn(K: Tensor, u: Tensor, v: Tensor, max_iter: int = 100, tol: float = 1e-2) -> Tensor:
    """Entropic OT plan ``diag(r) K diag(c)`` for a batch of kernels ``K`` ``[B, M, N]`` with
    marginals ``u`` ``[B, M]`` and ``v`` ``[B, N]``, as the official PLOT ``Sinkhorn``: alternate
    ``r = u / (K c)``, ``c = v / (K^T r)`` from ones, at most ``max_iter`` rounds, stopping when the
    mean absolute change of ``r`` over the whole batch is below ``tol``."""
    r = torch.ones_like(u)
    c = torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.transpose(1, 2), r.unsqueeze(-1)).squeeze(-1)
        if float((r - r0).abs().mean()) < tol:
            break
    return r.unsqueeze(-1) * K * c.unsqueeze(-2)


class PromptMethod:
    """Mixin for a :class:`~benchmark.method.Method` whose class text features depend only on its
    parameters: ``self._eval_cache`` holds them in eval mode and is cleared on ``train()`` and when
    learned state is loaded (a resumed or reloaded run never sees stale features)."""

    def _init_cache(self) -> None:
        self._eval_cache = EvalCache()

    def cached(self, compute: Callable[[], object]):
        return self._eval_cache.get(self, compute)

    def train(self, mode: bool = True):
        self._eval_cache.clear()
        return super().train(mode)

    def load_learned_state_dict(self, sd) -> None:
        self._eval_cache.clear()
        super().load_learned_state_dict(sd)
