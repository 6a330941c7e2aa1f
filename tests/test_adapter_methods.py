"""CLIP-Adapter and CLIP-LoRA: equations against independent computations, zero-shot equivalence at
initialisation, LoRA scaling/initialisation/dropout, merge = unmerge, only the adapters train and CLIP
(and the engine's shared backbone) stays bit-identical, cached-feature evaluation = direct encoding."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.engine import Engine, run_dir
from benchmark.method import MethodContext
from benchmark.registry import METHODS
from conftest import toy_cfg

METHODS.get("clip_lora")  # mounts the plugin folder, so its helper module imports below

CTX = MethodContext(["thing a", "thing b", "long thing name c"], "a photo of a {}, a type of thing.", "toy", 2, 1)


def _images(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _lora(backbone, **params):
    cls = METHODS.get("clip_lora")
    return cls(cls.Config(**params), copy.deepcopy(backbone), CTX)


def _zero_shot(backbone, template):
    ctx = MethodContext(CTX.classnames, template, "toy", 2, 1)
    return METHODS.get("zsclip")(None, backbone, ctx).eval()


def _randomise_B(method, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in method.named_parameters():
            if "lora_B_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# -- CLIP-Adapter -------------------------------------------------------------------------------
def test_adapter_equation_against_hand_computation(micro_backbone):
    cls = METHODS.get("clip_adapter")
    torch.manual_seed(0)
    m = cls(cls.Config(), micro_backbone, CTX).eval()
    d = micro_backbone.embed_dim
    w1, w2 = m.adapter.fc[0].weight, m.adapter.fc[2].weight
    assert w1.shape == (d // 4, d) and w2.shape == (d, d // 4)
    assert m.adapter.fc[0].bias is None and m.adapter.fc[2].bias is None
    f = torch.randn(6, d)
    a = torch.clamp(torch.clamp(f @ w1.detach().T, min=0) @ w2.detach().T, min=0)
    fstar = 0.2 * a + 0.8 * f
    t = micro_backbone.encode_text(micro_backbone.tokenize([CTX.template.format(c) for c in CTX.classnames]))
    want = micro_backbone.logit_scale * (fstar / fstar.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).T
    with torch.no_grad():
        torch.testing.assert_close(m.predict_features(f).logits, want, rtol=1e-5, atol=1e-5)
        # predict(images) is predict_features(CLIP image feature)
        x = _images()
        torch.testing.assert_close(m.predict(x).logits,
                                   m.predict_features(micro_backbone.encode_image(x).pooled).logits)


def test_adapter_with_alpha_zero_is_zero_shot(micro_backbone):
    cls = METHODS.get("clip_adapter")
    zs = _zero_shot(micro_backbone, CTX.template)
    x = _images()
    with torch.no_grad():
        m0 = cls(cls.Config(ratio=0.0), micro_backbone, CTX).eval()
        assert torch.allclose(m0.predict(x).logits, zs.predict(x).logits, rtol=0, atol=1e-6)
        m = cls(cls.Config(), micro_backbone, CTX).eval()  # alpha = 0.2 with a random adapter differs
        assert not torch.allclose(m.predict(x).logits, zs.predict(x).logits, atol=1e-3)


@pytest.mark.parametrize("mode", ["augmented", "cached"])
def test_adapter_trains_only_the_adapter_and_cached_eval_matches_direct(tmp_path, mode):
    eng = Engine(tmp_path)
    cfg = toy_cfg("clip_adapter", shots=4, sets=["train.epochs=4", "train.lr=0.05", "train.warmup_epochs=0",
                                                 f"params.train_features={mode}"])
    bb = eng.backbone(cfg.backbone, torch.device("cpu"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    eng.run(cfg)
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    d = run_dir(tmp_path, cfg)
    learned = torch.load(d / "learned.pt")
    assert sorted(learned) == ["adapter.fc.0.weight", "adapter.fc.2.weight"]
    # the evaluation (served from the feature cache) equals encoding the test images directly
    cls = METHODS.get("clip_adapter")
    torch.manual_seed(123)
    plugin = eng.dataset("toy", cfg)
    m = cls(cfg.params, bb, MethodContext(_id_names(eng, cfg), plugin.template, "toy", 4, 1))
    init = m.adapter.fc[0].weight.detach().clone()
    m.load_learned_state_dict(learned)
    assert not torch.equal(init, m.adapter.fc[0].weight)
    m.eval()
    from benchmark.loader import build_transforms, eval_loader
    from benchmark.protocol import load_or_create

    split = load_or_create(eng.dataset("toy", cfg), 4, 1, tmp_path)
    tf = build_transforms(bb.preprocess_cfg, cfg.data)["test"]
    with torch.no_grad():
        direct = torch.cat([m.predict(b["test"]).logits for b in eval_loader(split.test, split.test_idx, tf, 64)])
    with np.load(d / "predictions.npz") as z:
        np.testing.assert_allclose(z["test_logits"], direct.numpy(), rtol=1e-5, atol=1e-5)


def _id_names(eng, cfg):
    from benchmark.protocol import load_or_create

    return load_or_create(eng.dataset("toy", cfg), cfg.shots, cfg.seed, eng.results_dir).id_classnames


def test_adapter_cached_mode_reads_the_setup_features_by_sample_id(micro_backbone):
    from benchmark.method import Batch, LabeledSet, StepState

    cls = METHODS.get("clip_adapter")
    m = cls(cls.Config(train_features="cached"), micro_backbone, CTX)
    assert m.setup_features and m.labeled_views == () and cls.labeled_views == ("weak",)
    assert not cls.setup_features and not cls(cls.Config(), micro_backbone, CTX).setup_features
    with torch.no_grad():
        fresh = micro_backbone.encode_image(_images(4)).pooled
    m.setup(LabeledSet(ids=["a", "b", "c", "d"], labels=torch.tensor([0, 1, 2, 0]), features=fresh))
    batch = Batch(x={}, y=torch.tensor([2, 0, 1]), ids=["c", "a", "d"])
    assert torch.equal(m._features(batch), fresh[[2, 0, 3]])
    out = m.training_step(batch, StepState(0, 1, 0, 1))
    want = F.cross_entropy(m.predict_features(fresh[[2, 0, 3]]).logits, batch.y)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=0)


# -- CLIP-LoRA: the adapter itself ---------------------------------------------------------------
def _reference_attention(mha, x, deltas, scaling, attn_mask=None):
    """nn.MultiheadAttention's math written out, with explicit LoRA deltas; x: [B, L, E]."""
    E, H = mha.embed_dim, mha.num_heads
    D = E // H
    W, b = mha.in_proj_weight, mha.in_proj_bias
    outs = []
    for j, name in enumerate("qkv"):
        w = W[j * E:(j + 1) * E].clone()
        if name in deltas:
            A, B = deltas[name]
            w = w + scaling * B @ A
        outs.append(x @ w.T + b[j * E:(j + 1) * E])
    q, k, v = [t.reshape(x.shape[0], x.shape[1], H, D).transpose(1, 2) for t in outs]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if attn_mask is not None:
        s = s + attn_mask
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return o @ mha.out_proj.weight.T + mha.out_proj.bias


def test_lora_attention_scaling_init_and_dropout():
    from ossl_methods._lora import LoRAAttention

    torch.manual_seed(0)
    E = 16
    mha = nn.MultiheadAttention(E, 2, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    lora = LoRAAttention(mha, ["q", "k", "v"], rank=4, alpha=2.0, dropout=0.5)
    assert lora.scaling == pytest.approx(2.0 / math.sqrt(4))  # alpha / sqrt(r), not alpha / r
    bound = 1 / math.sqrt(E)  # kaiming_uniform(a=sqrt(5)) on [r, E]: U(-1/sqrt(E), 1/sqrt(E))
    for m in "qkv":
        A, B = getattr(lora, f"lora_A_{m}"), getattr(lora, f"lora_B_{m}")
        assert A.shape == (4, E) and B.shape == (E, 4)
        assert torch.all(B == 0) and A.abs().max() <= bound and A.abs().max() > 0.5 * bound
        assert float(A.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.35)
    assert not hasattr(lora, "lora_A_o")
    g = torch.Generator().manual_seed(3)
    deltas = {}
    with torch.no_grad():
        for m in "qkv":
            getattr(lora, f"lora_B_{m}").copy_(torch.randn(E, 4, generator=g))
            deltas[m] = (getattr(lora, f"lora_A_{m}").clone(), getattr(lora, f"lora_B_{m}").clone())
    x = torch.randn(3, 5, E, generator=g)
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)  # open_clip's causal text mask
    want = _reference_attention(mha, x, deltas, lora.scaling, mask)
    with torch.no_grad():
        lora.train(False)  # merged
        assert lora.merged
        torch.testing.assert_close(lora(x, x, x, attn_mask=mask)[0], want, rtol=1e-5, atol=1e-5)
        lora.train(True)  # unmerged, dropout active: random
        assert not lora.merged
        y1, y2 = lora(x, x, x, attn_mask=mask)[0], lora(x, x, x, attn_mask=mask)[0]
        assert not torch.allclose(y1, y2)
        lora.dropout_p = 0.0  # unmerged without dropout = the same function
        torch.testing.assert_close(lora(x, x, x, attn_mask=mask)[0], want, rtol=1e-5, atol=1e-5)
        lora.dropout_p = 0.5
        lora.train(False)  # eval: no dropout, deterministic
        assert torch.equal(lora(x, x, x, attn_mask=mask)[0], lora(x, x, x, attn_mask=mask)[0])
    # with B = 0 the wrapper is the original attention
    plain = LoRAAttention(mha, ["q", "k", "v", "o"], rank=2, alpha=1.0, dropout=0.0).train(False)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, x, x, need_weights=False, attn_mask=mask)[0],
                                   mha(x, x, x, need_weights=False, attn_mask=mask)[0], rtol=1e-5, atol=1e-5)


def test_lora_positions_and_towers(micro_backbone):
    from ossl_methods._lora import LoRAAttention, layer_indices

    assert layer_indices("all", 12) == list(range(12))
    assert layer_indices("up", 12) == [8, 9, 10, 11] and layer_indices("bottom", 12) == [0, 1, 2, 3]
    assert layer_indices("half-up", 12) == list(range(6, 12)) and layer_indices("0,-1", 12) == [0, 11]
    with pytest.raises(ValueError):
        layer_indices("12", 12)
    m = _lora(micro_backbone, encoder="vision", position="-1", matrices=["q", "v"])
    wrapped = [(t, i) for t, i, a in m.backbone.attention_modules("both") if isinstance(a, LoRAAttention)]
    assert wrapped == [("vision", micro_backbone.vision_layers - 1)]
    names = sorted(n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad)
    assert names == ["lora_A_q", "lora_A_v", "lora_B_q", "lora_B_v"]
    full = _lora(micro_backbone)
    assert len(full.lora_layers) == micro_backbone.vision_layers + micro_backbone.text_layers
    # the backbone the method was given is a copy: the shared one keeps plain attention
    assert all(isinstance(a, nn.MultiheadAttention) for _, _, a in micro_backbone.attention_modules())


# -- CLIP-LoRA: the method -----------------------------------------------------------------------
def test_lora_with_zero_B_is_zero_shot_with_its_template(micro_backbone):
    m = _lora(micro_backbone)
    zs = _zero_shot(micro_backbone, "a photo of a {}.")  # CLIP-LoRA's template, not the dataset's
    x = _images()
    with torch.no_grad():
        want = zs.predict(x).logits
        torch.testing.assert_close(m.eval().predict(x).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.train().logits(x), want, rtol=0, atol=1e-5)  # dropout x 0-delta
        assert not torch.allclose(_zero_shot(micro_backbone, CTX.template).predict(x).logits, want, atol=1e-3)


def test_lora_merged_and_unmerged_logits_agree(micro_backbone):
    m = _lora(micro_backbone, dropout=0.0)
    _randomise_B(m)
    x = _images()
    with torch.no_grad():
        unmerged = m.train().logits(x)
        merged = m.eval().predict(x).logits
        assert all(layer.merged for layer in m.lora_layers)
        zs = _zero_shot(micro_backbone, "a photo of a {}.").predict(x).logits
    assert not torch.allclose(merged, zs, atol=1e-2)  # the adapters do change the model
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_lora_training_changes_only_lora_and_clip_stays_bit_identical(micro_backbone):
    m = _lora(micro_backbone)
    original = {k: v.clone() for k, v in micro_backbone.state_dict().items()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
    m.train()
    from benchmark.method import Batch, StepState

    for step in range(3):
        out = m.training_step(Batch(x={"weak": _images(6, seed=step)}, y=torch.tensor([0, 1, 2, 0, 1, 2])),
                              StepState(step, 3, 0, 3))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        m.eval()  # merge ...
        m.train()  # ... and unmerge between steps
    after = dict(m.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert any("lora_B_" in n for n in changed) and any("text" not in n and "visual" in n for n in changed)
    # CLIP's weights inside the method's copy are bit-identical to the original (after unmerge) ...
    state = m.backbone.state_dict()
    for k, v in original.items():
        key = k.replace(".attn.", ".attn.base.") if ".attn." in k else k
        assert torch.equal(state[key], v), k
    m.eval()  # ... and also while merged (the merge lives in separate tensors)
    state = m.backbone.state_dict()
    assert all(torch.equal(state[k.replace(".attn.", ".attn.base.") if ".attn." in k else k], v)
               for k, v in original.items())
    # and the backbone the method was copied from was never touched
    assert all(torch.equal(original[k], v) for k, v in micro_backbone.state_dict().items())


def test_lora_engine_run_keeps_the_shared_backbone_and_saves_only_lora(tmp_path):
    eng = Engine(tmp_path)
    cfg = toy_cfg("clip_lora", shots=2, sets=["train.iterations_per_shot=2", "train.lr=0.01"])
    assert (cfg.train.optimizer, cfg.train.schedule_unit, cfg.train.lr_min) == ("adamw", "iteration", 1e-6)
    bb = eng.backbone(cfg.backbone, torch.device("cpu"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    r = eng.run(cfg)
    assert r["cost"]["steps"] == 4  # iterations_per_shot x shots
    assert set(bb.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    assert all(isinstance(a, nn.MultiheadAttention) for _, _, a in bb.attention_modules())
    learned = torch.load(run_dir(tmp_path, cfg) / "learned.pt")
    n_layers = bb.vision_layers + bb.text_layers
    assert len(learned) == n_layers * 6 and all(k.rsplit(".", 1)[-1].startswith("lora_") for k in learned)
    assert any(v.abs().sum() > 0 for k, v in learned.items() if "lora_B_" in k)
