"""CoOp's full option set in the shared prompt learner: class-specific context (CSC) and the class
token at the end / middle / front, checked against hand-built token sequences and against open_clip's
own ``encode_text`` on the literal prompt the layout stands for."""
import pytest
import torch
import torch.nn.functional as F

from benchmark.errors import ConfigError
from benchmark.method import MethodContext
from benchmark.registry import METHODS

METHODS.get("coop")  # mounts the plugin folder, so its helper module imports below
from ossl_methods._prompts import PromptLearner  # noqa: E402

NAMES = ["Black_footed_Albatross", "thing b", "a rather long multi token class name"]
CLEAN = [n.replace("_", " ") for n in NAMES]
WORDS = ["a", "photo", "of", "a"]  # four single-token words


def _hand_built(bb, name, ctx, position):
    """Embeddings of ``[SOS] <layout of ctx and the name's tokens> . [EOT] pad`` built from token ids,
    with the context vectors written into their slots (slot = -1 in the id sequence)."""
    n = ctx.shape[0]
    full = bb.tokenize([name])[0]
    name_ids = full[1:int(full.argmax())].tolist()
    dot_eot = bb.tokenize(["."])[0][1:3].tolist()
    half = n // 2
    if position == "end":
        body = [-1] * n + name_ids
    elif position == "middle":
        body = [-1] * half + name_ids + [-1] * (n - half)
    else:
        body = name_ids + [-1] * n
    ids = [int(full[0])] + body + dot_eot
    ids = torch.tensor(ids + [0] * (full.shape[0] - len(ids)))
    with torch.no_grad():
        emb = bb.token_embedding(ids.clamp(min=0).unsqueeze(0))[0].clone()
    emb[ids == -1] = ctx
    return emb


def _set_ctx(learner, value):
    with torch.no_grad():
        learner.ctx.copy_(value)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("n_ctx", [4, 3])
def test_layouts_equal_hand_built_token_sequences(micro_backbone, position, n_ctx):
    bb = micro_backbone
    torch.manual_seed(0)
    pl = PromptLearner(bb, NAMES, n_ctx, "", class_token_position=position)
    emb = pl.embeddings().detach()
    for k, name in enumerate(CLEAN):
        torch.testing.assert_close(emb[k], _hand_built(bb, name, pl.ctx.detach(), position), rtol=0, atol=0)
    # the pooled (EOT) position is where it is in the "end" prompt for every layout
    assert torch.equal(pl.tokens.argmax(-1), bb.tokenize([f"{' '.join(['X'] * n_ctx)} {c}." for c in CLEAN]).argmax(-1))


@pytest.mark.parametrize("position,literal", [("end", "{w} {c}."), ("middle", "a photo {c} of a."),
                                              ("front", "{c} a photo of a.")])
def test_word_context_equals_open_clip_on_the_literal_prompt(micro_backbone, position, literal):
    bb = micro_backbone
    pl = PromptLearner(bb, NAMES, 4, "", class_token_position=position)
    with torch.no_grad():
        _set_ctx(pl, bb.token_embedding(bb.tokenize([" ".join(WORDS)]))[0, 1:5])
        got = pl()
        want = bb.model.encode_text(bb.tokenize([literal.format(w=" ".join(WORDS), c=c) for c in CLEAN]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_specific_context_uses_each_class_own_vectors(micro_backbone, position):
    bb = micro_backbone
    torch.manual_seed(0)
    pl = PromptLearner(bb, NAMES, 4, "", csc=True, class_token_position=position)
    assert pl.ctx.shape == (len(NAMES), 4, bb.text_width)  # [code] torch.empty(n_cls, n_ctx, dim)
    assert 0.015 < float(pl.ctx.detach().std()) < 0.025  # N(0, 0.02)
    emb = pl.embeddings().detach()
    for k, name in enumerate(CLEAN):
        torch.testing.assert_close(emb[k], _hand_built(bb, name, pl.ctx[k].detach(), position), rtol=0, atol=0)
    # per-class words: class k's feature is open_clip's on its own literal prompt
    words = [["a", "photo", "of", "a"], ["one", "good", "small", "picture"], ["the", "big", "red", "bird"]]
    with torch.no_grad():
        _set_ctx(pl, torch.stack([bb.token_embedding(bb.tokenize([" ".join(w)]))[0, 1:5] for w in words]))
        got = pl()
    lit = {"end": "{a} {b} {c} {d} {n}.", "middle": "{a} {b} {n} {c} {d}.", "front": "{n} {a} {b} {c} {d}."}[position]
    for k, (w, n) in enumerate(zip(words, CLEAN)):
        with torch.no_grad():
            want = bb.model.encode_text(bb.tokenize([lit.format(a=w[0], b=w[1], c=w[2], d=w[3], n=n)]))[0]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)


def test_coop_csc_trains_one_context_per_class(micro_backbone):
    cls = METHODS.get("coop")
    ctx = MethodContext(NAMES, "a photo of a {}.", "toy", 2, 1)
    m = cls(cls.Config(n_ctx=4, csc=True, class_token_position="middle"), micro_backbone, ctx).train()
    assert {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad} == {
        "prompts.ctx": (3, 4, micro_backbone.text_width)}
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = F.cross_entropy(m.logits(x), y)
    loss.backward()
    g = m.prompts.ctx.grad
    assert g is not None and all(float(g[k].abs().sum()) > 0 for k in range(3))
    # the shared context would have one gradient for all classes: with CSC each class gets its own
    assert not torch.allclose(g[0], g[1])


def test_locoop_has_coop_options(micro_backbone):
    cls = METHODS.get("locoop")
    ctx = MethodContext(NAMES, "a photo of a {}.", "toy", 2, 1)
    m = cls(cls.Config(n_ctx=4, csc=True, class_token_position="front"), micro_backbone, ctx)
    assert m.prompts.ctx.shape[0] == 3 and m.prompts.class_token_position == "front"


def test_bad_options_are_clear_errors(micro_backbone):
    cls = METHODS.get("coop")
    ctx = MethodContext(NAMES, "a photo of a {}.", "toy", 2, 1)
    with pytest.raises(ConfigError, match="ctx_init: '' for CSC"):
        cls(cls.Config(n_ctx=4, ctx_init="a photo of a", csc=True), micro_backbone, ctx)
    with pytest.raises(ConfigError, match="end, middle, front"):
        cls(cls.Config(n_ctx=4, class_token_position="last"), micro_backbone, ctx)
    pl = PromptLearner(micro_backbone, NAMES, 2, "", class_token_position="middle")
    with pytest.raises(ConfigError, match="class_token_position 'end'"):
        pl(deep_prompts=[None, torch.zeros(2, micro_backbone.text_width)])
    with pytest.raises(ConfigError, match="one prompt per class"):
        PromptLearner(micro_backbone, NAMES, 2, "", n_prompts=2, csc=True)
