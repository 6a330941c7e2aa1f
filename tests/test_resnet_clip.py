"""ResNet CLIP backbones (a random RN50-shaped micro model) and the official PLOT on them: features
against open_clip's own forward and a hand-written attention pool, the transport plan's marginals,
and every registered method's successful step or clear refusal."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.backbone import BackboneConfig, CLIPBackbone
from benchmark.errors import BenchmarkError
from benchmark.method import Batch, LabeledSet, MethodContext, StepState, UnlabeledPool
from benchmark.registry import METHODS
from conftest import MICRO_RN, MICRO_RN_CKPT, toy_cfg

RN_SETS = [f"backbone.model={MICRO_RN}", f"backbone.pretrained={MICRO_RN_CKPT}"]
CTX = MethodContext(["thing a", "thing b", "long_thing name c"], "a photo of a {}.", "toy", 2, 1)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def _manual_attnpool(pool, fmap):
    """Every output of CLIP's attention pool, written out head by head (no torch MHA)."""
    B, C, H, W = fmap.shape
    x = fmap.flatten(2).transpose(1, 2)  # [B, HW, C]
    x = torch.cat([x.mean(1, keepdim=True), x], 1) + pool.positional_embedding
    h = pool.num_heads
    d = C // h

    def heads(t):
        return t.reshape(B, -1, h, d).transpose(1, 2)

    q = heads(x @ pool.q_proj.weight.t() + pool.q_proj.bias) / math.sqrt(d)
    k = heads(x @ pool.k_proj.weight.t() + pool.k_proj.bias)
    v = heads(x @ pool.v_proj.weight.t() + pool.v_proj.bias)
    o = ((q @ k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
    return o @ pool.c_proj.weight.t() + pool.c_proj.bias  # [B, 1 + HW, E]


def _layer4(bb, images):
    """The trunk's last feature map through open_clip's own forward_intermediates."""
    return bb.model.visual.forward_intermediates(images, indices=[4], intermediates_only=True)[
        "image_intermediates"][0]


# -- backbone -----------------------------------------------------------------------------------
def test_resnet_backbone_shapes(micro_rn_backbone):
    bb = micro_rn_backbone
    assert bb.image_tower == "resnet"
    assert bb.num_patches == 9  # 96 px // 32 = a 3 x 3 attention-pool grid
    assert bb.embed_dim == 32 and bb.preprocess_cfg["size"] == 96


def test_resnet_pooled_and_text_equal_open_clip(micro_rn_backbone, images):
    bb = micro_rn_backbone
    tokens = bb.tokenize(["a photo of a red finch.", "x x x a long thing name, a type of bird."])
    bb.short_text = False  # the text tower in full: open_clip's forward, bit for bit
    try:
        with torch.no_grad():
            assert torch.equal(bb.encode_image(images).pooled, bb.model.encode_image(images))
            assert torch.equal(bb.encode_text(tokens), bb.model.encode_text(tokens))
            ours = bb.encode_text_embeddings(bb.token_embedding(tokens), tokens)
    finally:
        bb.short_text = True
    assert torch.equal(ours, bb.model.encode_text(tokens))
    with torch.no_grad():  # shortened (the default): equal up to float rounding
        torch.testing.assert_close(bb.encode_text(tokens), bb.model.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_resnet_local_features_are_the_attention_pool_grid(micro_rn_backbone, images):
    bb = micro_rn_backbone
    with torch.no_grad():
        out = bb.encode_image(images, return_patches=True, return_value_local=True)
        fmap = _layer4(bb, images)
        ref = _manual_attnpool(bb.model.visual.attnpool, fmap)
        pooled = bb.model.encode_image(images)
    assert out.patches.shape == (3, 9, bb.embed_dim)
    # the hand-written pool reproduces open_clip's pooled output, and its grid outputs are ours
    torch.testing.assert_close(ref[:, 0], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.patches, ref[:, 1:], rtol=1e-5, atol=1e-5)
    # each grid output differs from the pooled one (queries differ)
    assert (out.patches - out.pooled[:, None]).abs().amax() > 1e-3
    # LoCoOp's ResNet local features: c_proj(v_proj(grid)), no positional embedding
    pool = bb.model.visual.attnpool
    grid = fmap.permute(0, 2, 3, 1).reshape(3, 9, -1)
    ref_v = (grid @ pool.v_proj.weight.t() + pool.v_proj.bias) @ pool.c_proj.weight.t() + pool.c_proj.bias
    torch.testing.assert_close(out.value_local, ref_v, rtol=1e-5, atol=1e-5)


def test_resnet_refuses_what_needs_a_vit(micro_rn_backbone, images):
    bb = micro_rn_backbone
    with pytest.raises(BenchmarkError, match="needs a ViT image tower.*ResNet CLIP"):
        bb.encode_image(images, prompts=torch.zeros(2, 8))
    for what in ("vision_width", "vision_layers"):
        with pytest.raises(BenchmarkError, match="ViT image tower"):
            getattr(bb, what)
    for tower in ("vision", "both"):
        with pytest.raises(BenchmarkError, match="attention modules of the image tower"):
            bb.attention_modules(tower)
    assert [t for t, _, _ in bb.attention_modules("text")] == ["text"] * 3


def test_resnet_compile_switch_covers_the_stages(micro_rn_backbone):
    bb = copy.deepcopy(micro_rn_backbone)
    v = bb.model.visual
    bb.set_compiled(True)
    assert all(s._compiled_call_impl is not None for s in (v.layer1, v.layer2, v.layer3, v.layer4))
    bb.set_compiled(False)
    assert all(s._compiled_call_impl is None for s in (v.layer1, v.layer4))


def test_resnet_openai_tag_resolves_to_the_weights_lookup():
    """RN50 + openai is a supported pair: offline, the loader stops at the missing weights (not at
    an unsupported-architecture error)."""
    with pytest.raises(BenchmarkError, match="not on this machine"):
        CLIPBackbone.load(BackboneConfig(model="RN50", pretrained="openai", cache_dir="/nonexistent"))


# -- every method: a successful step or a clear error --------------------------------------------
# case -> (method, extra --set, None = runs, or a regex of the refusal)
CASES = {
    "zsclip": ("zsclip", [], None),
    "linear_probe": ("linear_probe", [], None),
    "clip_adapter": ("clip_adapter", [], None),
    "coop": ("coop", ["params.n_ctx=4"], None),
    "locoop": ("locoop", ["params.n_ctx=4", "params.top_k=1"], None),
    "plot_official": ("plot", ["params.local_features=attnpool", "params.n_ctx=4"], None),
    "plot_patches": ("plot", ["params.local_features=patches", "params.n_ctx=4"], None),
    "plot_value": ("plot", ["params.local_features=value", "params.n_ctx=4"], None),
    "plotpp": ("plot", ["params.local_features=plotpp"], r"PLOT\+\+.*local_features=attnpool.*needs a ViT"),
    "clip_lora_text": ("clip_lora", ["params.encoder=text"], None),
    "clip_lora": ("clip_lora", [], r"encoder=both.*official CLIP-LoRA.*encoder=text.*needs a ViT"),
    "clip_lora_vision": ("clip_lora", ["params.encoder=vision"], r"encoder=vision.*needs a ViT"),
    "maple": ("maple", [], r"MaPLe's deep visual prompts.*needs a ViT"),
    "cfsg_clip": ("cfsg_clip", [], r"CFSG-CLIP.*patch tokens.*needs a ViT"),
    "tip_adapter": ("tip_adapter", [], None),
    "tip_adapter_f": ("tip_adapter_f", [], None),
}


RUNS = [c for c, (_, _, refusal) in CASES.items() if refusal is None]


def test_every_registered_method_has_a_resnet_case():
    """A new method plugin must say here whether it runs on a ResNet CLIP or refuses it."""
    assert set(METHODS.names()) <= {m for m, _, _ in CASES.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_method_on_resnet_steps_or_refuses_clearly(micro_rn_backbone, images, case):
    method, sets, refusal = CASES[case]
    cfg = toy_cfg(method, shots=4, sets=RN_SETS + sets)
    cls = METHODS.get(method)
    bb = copy.deepcopy(micro_rn_backbone) if cls.modifies_backbone else micro_rn_backbone
    if refusal is not None:
        with pytest.raises(BenchmarkError, match=refusal):
            cls(cfg.params, bb, CTX)
        return
    torch.manual_seed(0)
    m = cls(cfg.params, bb, CTX)
    y, ids = torch.tensor([0, 1, 2]), ["a", "b", "c"]
    with torch.no_grad():  # what the engine serves to setup (Tip-Adapter builds its cache there)
        feats = bb.encode_image(images).pooled
    m.setup(LabeledSet(ids, y, feats, lambda rounds: feats.expand(rounds, *feats.shape)), UnlabeledPool(ids, feats))
    if m.trains:
        m.train()
        batch = Batch(x={v: images for v in cls.labeled_views}, y=y, ids=ids,
                      u={v: images for v in cls.unlabeled_views} if cls.uses_unlabeled else None,
                      u_ids=ids if cls.uses_unlabeled else None)
        out = m.training_step(batch, StepState(step=0, total_steps=10, epoch=0, steps_per_epoch=5))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        own = [p for p in m.parameters() if p.requires_grad]
        assert own and any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)  # LoRA: B = 0, so A gets none yet
        assert all(p.grad is None for p in micro_rn_backbone.parameters())
    m.eval()
    with torch.no_grad():
        pred = m.predict(images)
    assert pred.logits.shape == (3, 3) and torch.isfinite(pred.logits).all()


def test_official_plot_refuses_a_vit(micro_backbone):
    cfg = toy_cfg("plot", sets=["params.local_features=attnpool"])
    with pytest.raises(BenchmarkError, match="attnpool is the official PLOT.*ResNet CLIP.*plotpp"):
        METHODS.get("plot")(cfg.params, micro_backbone, CTX)


# -- official PLOT ---------------------------------------------------------------------------
def test_official_plot_transport_plan_and_logits(micro_rn_backbone, images):
    cfg = toy_cfg("plot", sets=RN_SETS + ["params.local_features=attnpool", "params.tol=1e-9",
                                          "params.max_iter=2000"])
    p = cfg.params
    assert (p.n_prompts, p.n_ctx, p.ctx_init, p.eps) == (4, 16, "", 0.1)  # the official defaults
    torch.manual_seed(0)
    m = METHODS.get("plot")(cfg.params, micro_rn_backbone, CTX).eval()
    with torch.no_grad():
        loc, _ = m.local_features(images)
        text = m.prompt_features()
        plan, sim = m.transport_plan(loc, text)
        logits = m.predict(images).logits
    B, K, M, N = 3, 3, 9, 4
    assert loc.shape == (B, M, 32) and text.shape == (N, K, 32) and plan.shape == (B * K, M, N)
    # the local features are the attention-pool grid
    ref = _manual_attnpool(micro_rn_backbone.model.visual.attnpool, _layer4(micro_rn_backbone, images))
    torch.testing.assert_close(loc, ref[:, 1:], rtol=1e-5, atol=1e-5)
    # uniform marginals: rows 1/M (the M grid features), columns 1/N (the N prompts)
    torch.testing.assert_close(plan.sum(2), torch.full((B * K, M), 1 / M), rtol=0, atol=1e-6)
    torch.testing.assert_close(plan.sum(1), torch.full((B * K, N), 1 / N), rtol=0, atol=1e-6)
    # the plan is the entropic one: T = diag(a) exp(-(1 - cos) / eps) diag(b), so
    # log T - (cos / eps) has rank one in (m, n); check through the double difference
    g = plan.double().log() - sim.double() / p.eps
    dd = g[:, 1:, 1:] - g[:, 1:, :1] - g[:, :1, 1:] + g[:, :1, :1]
    assert dd.abs().max() < 1e-4
    # logits: logit scale x <T, cos> from independently normalised features
    cos = torch.einsum("bmd,nkd->bkmn", F.normalize(ref[:, 1:], dim=-1), F.normalize(text, dim=-1))
    ref_logits = micro_rn_backbone.logit_scale * (plan.reshape(B, K, M, N) * cos).sum((2, 3))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-4)


def test_official_plot_runs_through_run_all(tmp_path):
    """`run_all.py --methods plot --set plot.params.local_features=attnpool` on a ResNet CLIP."""
    import yaml

    from benchmark.cli import main
    from conftest import TOY_EXPERIMENT

    exp = tmp_path / "toy.yaml"
    exp.write_text(yaml.safe_dump({**TOY_EXPERIMENT, "methods": ["plot"], "datasets": ["toy"],
                                   "shots": [2], "seeds": [1]}))
    out = tmp_path / "res"
    assert main(["--experiment", str(exp), "--results-dir", str(out), "--methods", "plot", "--no-figures",
                 "--set", "plot.params.local_features=attnpool", "--set", "plot.params.n_ctx=4",
                 "--set", f"backbone.model={MICRO_RN}", "--set", f"backbone.pretrained={MICRO_RN_CKPT}",
                 "--set", "train.epochs=2"]) == 0
    r = json.loads(next((out / "runs").rglob("result.json")).read_text())
    assert r["config"]["params"]["local_features"] == "attnpool"
    assert r["config"]["backbone"]["model"] == MICRO_RN
    assert 0.0 <= r["metrics"]["acc"] <= 100.0


def test_plot_rn50_preset_resolves_to_the_official_recipe():
    from benchmark.experiment import build_grid, load_experiment

    grid = build_grid(load_experiment("plot_rn50"), datasets=["stanford_cars", "cub"], data_root="/x")
    by = {(c.dataset, c.shots): c for c in grid.runs if c.seed == 1}
    c = by[("cub", 20)]
    assert (c.backbone.model, c.backbone.pretrained) == ("RN50-quickgelu", "openai")
    assert (c.params.local_features, c.params.n_prompts, c.params.n_ctx, c.params.ctx_init) == ("attnpool", 4, 16, "")
    assert (c.train.batch_size, c.train.epochs, c.train.lr, c.train.warmup_epochs) == (128, 200, 0.002, 1)
    assert by[("stanford_cars", 5)].train.batch_size == 32


@pytest.mark.parametrize("case", RUNS)
def test_engine_runs_the_method_on_resnet(tmp_path, case):
    """The engine's whole path (setup with served features, training, cached or direct evaluation)."""
    from benchmark.engine import Engine, run_dir

    method, sets, _ = CASES[case]
    cfg = toy_cfg(method, shots=2, sets=RN_SETS + sets + ["train.epochs=1", "train.iterations_per_shot=null",
                                                            "train.iterations=2"])
    Engine(tmp_path, log=lambda s: None).run(cfg)
    r = json.loads((run_dir(tmp_path, cfg) / "result.json").read_text())
    assert r["config"]["backbone"]["model"] == MICRO_RN and 0.0 <= r["metrics"]["acc"] <= 100.0
