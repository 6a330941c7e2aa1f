"""CFSG-CLIP: equation-level checks on hand-made inputs and on the micro CLIP."""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmark.engine import Engine, run_dir
from benchmark.method import Batch, MethodContext, StepState
from benchmark.registry import METHODS
from benchmark.ssl import fixmatch_loss
from conftest import toy_cfg

CFSG = METHODS.get("cfsg_clip")
SMALL = ["params.top_k=4", "params.depth=2", "ssl.unlabeled_batch_size=8"]


def make(micro_backbone, **params):
    cfg = CFSG.Config(**{"top_k": 4, "depth": 2, **params})
    ctx = MethodContext(classnames=["thing a", "thing b", "thing c"], template="a photo of a {}.",
                        dataset="toy", shots=2, seed=1)
    torch.manual_seed(0)
    return CFSG(cfg, micro_backbone, ctx)


def test_semantic_filter_hand_made_tokens():
    # 2-d joint space; text of class 0 points along x, class 1 along y
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    patches = torch.tensor([[[3.0, 0.1], [0.0, 2.0], [1.0, 1.0], [2.0, -0.2]]])  # [1, 4, 2]
    cls = torch.tensor([[1.0, 1.0]])
    z, idx, w = CFSG.semantic_filter(cls, patches, text, torch.tensor([0]), k=2)
    # similarity to class 0 (cosine): p0 ~0.9994, p3 ~0.995, p2 0.707, p1 0 -> keep p0 and p3
    assert sorted(idx[0].tolist()) == [0, 3]
    c0 = F.cosine_similarity(patches[0, 0], cls[0], dim=0)
    c3 = F.cosine_similarity(patches[0, 3], cls[0], dim=0)
    e0, e3 = math.exp(c0), math.exp(c3)
    w_by_patch = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert w_by_patch[0] == pytest.approx(e0 / (e0 + e3)) and w_by_patch[3] == pytest.approx(e3 / (e0 + e3))
    expected = w_by_patch[0] * patches[0, 0] + w_by_patch[3] * patches[0, 3]
    torch.testing.assert_close(z[0], expected)
    # guided by class 1, the patches pointing along y are kept instead
    _, idx1, _ = CFSG.semantic_filter(cls, patches, text, torch.tensor([1]), k=2)
    assert sorted(idx1[0].tolist()) == [1, 2]


def test_injected_token_is_reinserted_in_layers_1_to_D_and_is_the_only_new_token(micro_backbone):
    m = make(micro_backbone, depth=2).eval()
    blocks = micro_backbone.model.visual.transformer.resblocks
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args, j=j: seen.append((j, args[0].detach().clone())))
             for j, b in enumerate(blocks)]
    images = torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            heads = m.forward_heads(images)
            t_c, _ = m.text_features()
            coarse = micro_backbone.encode_image(images, return_patches=True)
            z_c, _, _ = m.semantic_filter(coarse.pooled, coarse.patches, t_c,
                                          heads["coarse_global"].argmax(-1), 4)
            tok = m.inject(z_c)
    finally:
        for h in hooks:
            h.remove()
    n_layers = len(blocks)
    coarse_pass, fine_pass = seen[:n_layers], seen[n_layers:2 * n_layers]
    P = micro_backbone.num_patches
    assert all(x.shape[1] == P + 1 for _, x in coarse_pass)  # the coarse pass has no extra token
    assert all(x.shape[1] == P + 2 for _, x in fine_pass)  # the fine pass: exactly one more token
    for j, x in fine_pass:
        if 1 <= j < 2:  # block inputs 1..D-1 (layers 2..D): the raw projected token again
            torch.testing.assert_close(x[:, -1], tok)
        elif j >= 2:  # after D the token propagates: no longer the re-inserted value
            assert not torch.allclose(x[:, -1], tok)


def test_only_prompts_and_projection_train_and_clip_stays_identical(tmp_path):
    eng = Engine(tmp_path)
    cfg = toy_cfg("cfsg_clip", shots=4, sets=SMALL + ["train.epochs=2", "train.lr=0.01"])
    bb = eng.backbone(cfg.backbone, torch.device("cpu"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    eng.run(cfg)
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    learned = torch.load(run_dir(tmp_path, cfg) / "learned.pt")
    assert sorted(learned) == ["coarse_prompts.ctx", "fine_prompts.ctx", "inject.bias", "inject.weight"]
    # and they did change from their initialisation
    m = CFSG(cfg.params, bb, MethodContext(["thing a", "thing b", "thing c"], "a photo of a {}.", "toy", 4, 1))
    assert not torch.equal(m.coarse_prompts.ctx, learned["coarse_prompts.ctx"])
    assert (run_dir(tmp_path, cfg) / "patches.npz").exists()


def test_gradients_reach_only_the_method_parameters(micro_backbone):
    m = make(micro_backbone).train()
    batch = Batch(x={"weak": torch.randn(4, 3, 32, 32)}, y=torch.tensor([0, 1, 2, 0]),
                  u={"weak": torch.randn(4, 3, 32, 32), "strong": torch.randn(4, 3, 32, 32)})
    out = m.training_step(batch, StepState(0, 1, 0, 1))
    out.loss.backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {"coarse_prompts.ctx", "fine_prompts.ctx", "inject.weight", "inject.bias"}
    assert all(p.grad is None for p in micro_backbone.parameters())


def test_mask_removes_pseudo_labels_below_threshold():
    weak = torch.log(torch.tensor([[0.97, 0.02, 0.01], [0.5, 0.4, 0.1], [0.01, 0.96, 0.03]]))
    strong = torch.tensor([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    loss, mask = fixmatch_loss(weak, strong, 0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    ce = F.cross_entropy(strong, torch.tensor([0, 0, 1]), reduction="none")
    assert loss.item() == pytest.approx(((ce[0] + ce[2]) / 3).item())


def test_no_ssl_no_fine_branch_is_a_two_head_coarse_model(micro_backbone):
    m = make(micro_backbone, lambda_c=0.0, lambda_f=0.0, fine_branch=False).train()
    assert not m.uses_unlabeled and m.heads == ("coarse_global", "coarse_local")
    assert not hasattr(m, "inject") and not hasattr(m, "fine_prompts")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    out = m.training_step(Batch(x={"weak": x}, y=y, u=None), StepState(0, 1, 0, 1))
    # independent computation of the two coarse heads
    t = F.normalize(m.coarse_prompts(), dim=-1)
    enc = micro_backbone.encode_image(x, return_patches=True)
    scale = micro_backbone.model.logit_scale.exp()  # tau defaults to 1 / the backbone's scale
    g = F.normalize(enc.pooled, dim=-1) @ t.t() * scale
    s = torch.einsum("bpe,be->bp", F.normalize(enc.patches, dim=-1), t[y])
    idx = s.topk(4, dim=1).indices
    kept = torch.stack([enc.patches[b, idx[b]] for b in range(4)])
    w = torch.stack([F.cosine_similarity(kept[b], enc.pooled[b:b + 1], dim=-1) for b in range(4)]).softmax(1)
    local = (w.unsqueeze(-1) * kept).sum(1)
    l = F.normalize(local, dim=-1) @ t.t() * scale
    expected = F.cross_entropy(g, y) + F.cross_entropy(l, y)
    torch.testing.assert_close(out.loss, expected)


def test_ablation_without_ssl_never_reads_unlabeled_images(tmp_path):
    sets = SMALL + ["train.epochs=1", "params.lambda_c=0", "params.lambda_f=0"]
    a = Engine(tmp_path / "a").run(toy_cfg("cfsg_clip", shots=2, sets=sets))
    b = Engine(tmp_path / "b").run(toy_cfg("cfsg_clip", shots=2, sets=sets + ["ssl.threshold=0.1"]))
    assert a["metrics"] == b["metrics"]


def test_fusion_and_readings_are_switches(micro_backbone):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m = make(micro_backbone).eval()
        heads = m.forward_heads(images)
        pred = m.predict(images)
        mean = torch.stack([heads[h].softmax(-1) for h in m.heads]).mean(0)
        torch.testing.assert_close(pred.logits.exp(), mean)
        assert set(heads) >= {"coarse_global", "coarse_local", "fine_global", "fine_local"}
        cls_reading = make(micro_backbone, fine_global="cls").eval().forward_heads(images)
        assert not torch.allclose(cls_reading["fine_global"], heads["fine_global"])
    with pytest.raises(ValueError, match="fine_global"):
        make(micro_backbone, fine_global="both")


def _with_logit_scale(backbone, scale: float):
    """A private copy of ``backbone`` whose open_clip logit_scale parameter is log(scale)."""
    import copy

    other = copy.deepcopy(backbone)
    with torch.no_grad():
        other.model.logit_scale.fill_(math.log(scale))
    return other


def test_tau_follows_the_backbone_logit_scale(micro_backbone):
    openai_like = _with_logit_scale(micro_backbone, 100.0)  # OpenAI's weights: logit_scale = log(100)
    tiny_like = _with_logit_scale(micro_backbone, 17.4)
    m_openai, m_tiny = make(openai_like), make(tiny_like)
    # 1 / exp(log 100) = 0.01 up to the float32 rounding of exp (100.0000076)
    assert m_openai.tau == pytest.approx(0.01, rel=1e-6)
    assert m_tiny.tau == pytest.approx(1 / 17.4, rel=1e-6)
    assert m_openai.tau != m_tiny.tau
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for bb, m in ((openai_like, m_openai), (tiny_like, m_tiny)):
            m.eval()
            cos = F.normalize(bb.encode_image(images).pooled, dim=-1) @ F.normalize(m.coarse_prompts(), dim=-1).t()
            # the heads' logits are the backbone's own scale times the cosine, as in every other method
            torch.testing.assert_close(m.forward_heads(images)["coarse_global"], cos * bb.model.logit_scale.exp())
        # on OpenAI-like weights the derived tau and the literal 0.01 give the same heads
        explicit = make(openai_like, tau=0.01).eval()
        torch.testing.assert_close(explicit.forward_heads(images)["coarse_global"],
                                   m_openai.forward_heads(images)["coarse_global"], rtol=1e-5, atol=1e-5)
        # an explicit tau overrides the backbone's scale
        fixed = make(tiny_like, tau=0.01).eval()
        assert fixed.tau == 0.01
        cos = F.normalize(tiny_like.encode_image(images).pooled, dim=-1) @ F.normalize(fixed.coarse_prompts(), dim=-1).t()
        torch.testing.assert_close(fixed.forward_heads(images)["coarse_global"], cos / 0.01)
    with pytest.raises(ValueError, match="tau"):
        make(micro_backbone, tau=0.0)


def test_tau_null_in_yaml_and_on_the_command_line():
    assert toy_cfg("cfsg_clip").params.tau is None  # configs/methods/cfsg_clip.yaml: tau: null
    assert toy_cfg("cfsg_clip", sets=["params.tau=0.02"]).params.tau == 0.02
    assert toy_cfg("cfsg_clip", sets=["params.tau=0.02", "params.tau=null"]).params.tau is None


def test_tau_is_0_01_on_openai_format_weights(tmp_path):
    """An OpenAI-format checkpoint (fp16 weights, logit_scale kept in fp32 at log(100) as OpenAI's
    convert_weights leaves it, the input_resolution / context_length / vocab_size entries) loaded
    through the backbone's OpenAI path gives CFSG-CLIP tau = 0.01 (float32 rounding of exp aside)."""
    import open_clip

    from benchmark.backbone import BackboneConfig, CLIPBackbone
    from test_openai_checkpoint import EXTRA, TINY

    torch.manual_seed(0)
    sd = open_clip.create_model(TINY, pretrained=None).state_dict()
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    sd.update({k: torch.tensor(v) for k, v in EXTRA.items()})
    torch.save(sd, tmp_path / "ViT-tiny.pt")
    bb = CLIPBackbone.load(BackboneConfig(model=TINY, pretrained=str(tmp_path / "ViT-tiny.pt")))
    m = make(bb, depth=1, top_k=1)
    assert m.tau == pytest.approx(0.01, rel=1e-6)
    sd["logit_scale"] = torch.tensor(math.log(50.0))  # another scale in the same format: another tau
    torch.save(sd, tmp_path / "other.pt")
    other = make(CLIPBackbone.load(BackboneConfig(model=TINY, pretrained=str(tmp_path / "other.pt"))), depth=1, top_k=1)
    assert other.tau == pytest.approx(0.02, rel=1e-6)


def test_value_path_patch_features_are_the_last_blocks_value_path_by_hand(micro_backbone):
    """patch_features=value: the filtering module ranks and pools the last block's value path
    (W_v ln_1(x) + b_v, out_proj, residual, MLP; no query-key attention), through ln_post and proj,
    computed here from the block weights."""
    images = torch.randn(2, 3, 32, 32)
    v = micro_backbone.model.visual
    with torch.no_grad():
        m = make(micro_backbone, patch_features="value", fine_branch=False).eval()
        t_c, _ = m.text_features()
        x = v._embeds(images)
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        last, W = blocks[-1], x.shape[-1]
        val = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * W:], last.attn.in_proj_bias[2 * W:])
        y = x + F.linear(val, last.attn.out_proj.weight, last.attn.out_proj.bias)
        y = y + last.mlp(last.ln_2(y))
        value_patches = v.ln_post(y[:, 1:]) @ v.proj
        final_patches = v.ln_post(blk_all(blocks, v._embeds(images))[:, 1:]) @ v.proj
        pooled = micro_backbone.model.encode_image(images)
        guide = (F.normalize(pooled, dim=-1) @ t_c.t()).argmax(-1)
        heads = m.forward_heads(images)
        for patches, same in ((value_patches, True), (final_patches, False)):
            z, _, _ = CFSG.semantic_filter(pooled, patches, t_c, guide, 4)
            ref = micro_backbone.logit_scale * F.normalize(z, dim=-1) @ t_c.t()
            assert torch.allclose(heads["coarse_local"], ref, atol=1e-5) == same
        # the fine pass reads the value path too (its own patches, changed by the injected token)
        both = make(micro_backbone, patch_features="value").eval()
        sel = both.forward_heads(images, keep_selection=True)
        final = make(micro_backbone).eval().forward_heads(images, keep_selection=True)
        assert not torch.allclose(sel["fine_local"], final["fine_local"])
    with pytest.raises(ValueError, match="patch_features"):
        make(micro_backbone, patch_features="middle")


def blk_all(blocks, x):
    for blk in blocks:
        x = blk(x)
    return x


def test_fusion_mean_global_and_one_head_are_the_hand_computed_means(micro_backbone):
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        m = make(micro_backbone, fusion="mean_global").eval()
        heads = m.forward_heads(images)
        p = {h: torch.exp(heads[h]) / torch.exp(heads[h]).sum(-1, keepdim=True) for h in heads}
        torch.testing.assert_close(m.predict(images).logits.exp(), (p["coarse_global"] + p["fine_global"]) / 2)
        one = make(micro_backbone, fusion="fine_local").eval()
        torch.testing.assert_close(one.predict(images).logits.exp(), p["fine_local"])
        four = make(micro_backbone).eval()
        torch.testing.assert_close(four.predict(images).logits.exp(), sum(p.values()) / 4)
        # without the fine branch, the global heads are the coarse global head alone
        coarse = make(micro_backbone, fusion="mean_global", fine_branch=False).eval()
        torch.testing.assert_close(coarse.predict(images).logits.exp(), p["coarse_global"])
    with pytest.raises(ValueError, match="fusion"):
        make(micro_backbone, fusion="mean_logits")


@pytest.mark.parametrize("params", [{}, {"fine_branch": False}, {"filtering": False},
                                    {"lambda_c": 0.0, "lambda_f": 0.0}, {"mask_source": "coarse_global"}])
def test_batched_passes_equal_one_pass_per_view(micro_backbone, params):
    """batch_passes (three image-tower passes per step instead of six) gives the per-view path's
    loss, logs and gradients up to float rounding; the mask threshold is low enough that the
    unlabeled terms are not all masked out."""
    torch.manual_seed(3)
    batch = Batch(x={"weak": torch.randn(4, 3, 32, 32)}, y=torch.tensor([0, 1, 2, 0]),
                  u={"weak": torch.randn(5, 3, 32, 32), "strong": torch.randn(5, 3, 32, 32)})
    results = []
    for batched in (False, True):
        m = make(micro_backbone, batch_passes=batched, threshold=0.0, **params).train()
        out = m.training_step(batch, StepState(0, 1, 0, 1))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert ga and ga.keys() == gb.keys()
    torch.testing.assert_close(b.loss, a.loss)
    assert a.logs.keys() == b.logs.keys()
    for k in a.logs:
        assert b.logs[k] == pytest.approx(a.logs[k], rel=1e-5, abs=1e-6), k
    if params.get("lambda_c", 1.0) > 0:
        assert any(k.startswith("u_") and a.logs[k] > 0 for k in a.logs)  # the SSL terms are on
    for n in ga:
        # float rounding of the batched sums, relative to the gradient's scale
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-5 * float(ga[n].abs().max()))
