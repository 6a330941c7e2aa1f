"""CoOp-style learnable text context shared by all classes: ``[SOS] v1..vn CLASS . [EOS]``."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from benchmark.method import prompt_classname


class ContextPrompts(nn.Module):
    """n learnable context vectors shared by all classes, class name at the end.

    ``init``: words whose token embeddings initialise the context (their token count must equal
    ``n_ctx``), or "" for N(0, 0.02) (CoOp's random init). Calling the module returns the
    (unnormalised) text features [K, E] through the frozen text tower."""

    def __init__(self, backbone, classnames: List[str], n_ctx: int, init: str = ""):
        super().__init__()
        self._bb = [backbone]  # a list: not registered as a submodule (the method owns it)
        placeholder = " ".join(["X"] * n_ctx)
        tokens = backbone.tokenize([f"{placeholder} {prompt_classname(name)}." for name in classnames])
        with torch.no_grad():
            emb = backbone.token_embedding(tokens)
            if init:
                init_tok = backbone.tokenize([init])
                n_words = int(init_tok.argmax(-1)) - 1  # tokens between SOS and EOT
                if n_words != n_ctx:
                    raise ValueError(f"context init {init!r} has {n_words} tokens but n_ctx={n_ctx}; "
                                     f"make them equal or use an empty init (random)")
                ctx = backbone.token_embedding(init_tok)[0, 1:1 + n_ctx].clone()
            else:
                ctx = torch.randn(n_ctx, emb.shape[-1]) * 0.02
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)

    def embeddings(self) -> torch.Tensor:
        k = self.prefix.shape[0]
        return torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(k, -1, -1), self.suffix], dim=1)

    def forward(self) -> torch.Tensor:
        return self._bb[0].encode_text_embeddings(self.embeddings(), self.tokens)
