"""Prompt-learning baselines (CoOp, LoCoOp, PLOT, MaPLe): frozen CLIP, what trains, the Sinkhorn
plan, LoCoOp's selection and entropy sign, MaPLe's deep-prompt layout, CoOp's zero-shot identity."""
import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from benchmark.backbone import CLIPBackbone
from benchmark.engine import Engine, run_dir, seed_everything
from benchmark.method import Batch, MethodContext, StepState
from benchmark.protocol import load_or_create
from benchmark.registry import DATASETS, METHODS
from conftest import toy_cfg

CTX = MethodContext(["thing a", "thing b", "long thing name c"], "a photo of a {}.", "toy", 2, 1)

# method -> (extra --set, names of the learned parameters)
CASES = {
    "coop": (["params.n_ctx=4"], {"prompts.ctx"}),
    "locoop": (["params.n_ctx=4", "params.top_k=1"], {"prompts.ctx"}),
    "plot": (["params.local_features=patches", "params.n_ctx=4", "params.n_prompts=2"], {"prompts.ctx"}),
    "plotvalue": (["params.local_features=value", "params.n_ctx=4", "params.n_prompts=2"], {"prompts.ctx"}),
    "plotpp": (["params.local_features=plotpp", "params.n_prompts=2", "params.n_visual_prompts=2",
                "params.ctx_init_list=[a photo of a, one picture of a]"], {"prompts.ctx", "ctx_vision"}),
    "maple": (["params.prompt_depth=3", "train.batch_size=4"],
              {"prompts.ctx", "proj.weight", "proj.bias", "deep_text.0", "deep_text.1",
               "deep_proj.0.weight", "deep_proj.0.bias", "deep_proj.1.weight", "deep_proj.1.bias"}),
}


def _cfg(case, extra=()):
    sets, _ = CASES[case]
    method = "plot" if case.startswith("plot") else case
    return toy_cfg(method, shots=4, sets=["train.epochs=6", "train.lr=0.05", "train.log_every=1",
                                          "train.warmup_epochs=0", *sets, *extra])


@pytest.mark.parametrize("case", list(CASES))
def test_only_prompts_train_clip_frozen_and_loss_decreases(tmp_path, case):
    eng = Engine(tmp_path, log=lambda s: None)
    cfg = _cfg(case)
    bb = eng.backbone(cfg.backbone, torch.device("cpu"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    # the initial prompts, built exactly as the engine builds them (same seed, same classes)
    plugin = eng.dataset(cfg.dataset, cfg)
    split = load_or_create(plugin, cfg.shots, cfg.seed, tmp_path)
    ctx = MethodContext(split.id_classnames, plugin.template, cfg.dataset, cfg.shots, cfg.seed)
    seed_everything(cfg.seed)
    init = METHODS.get(cfg.method)(cfg.params, bb, ctx).learned_state_dict()
    eng.run(cfg)
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "CLIP weights changed"
    d = run_dir(tmp_path, cfg)
    learned = torch.load(d / "learned.pt")
    assert set(learned) == CASES[case][1]
    for k, v in learned.items():
        assert not torch.equal(v, init[k]), f"{k} did not train"
    losses = [json.loads(l)["loss"] for l in (d / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_only_the_method_parameters(micro_backbone, case):
    cfg = _cfg(case)
    m = METHODS.get(cfg.method)(cfg.params, micro_backbone, CTX).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    state = StepState(step=10, total_steps=10, epoch=1, steps_per_epoch=5)  # PLOT++: joint stage
    m.training_step(Batch(x={"weak": x}, y=y), state).loss.backward()
    assert all(p.grad is None for p in micro_backbone.parameters())
    own = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert set(own) == CASES[case][1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values())


def test_plotpp_stage_one_trains_only_the_visual_prompts(micro_backbone):
    cfg = _cfg("plotpp")
    m = METHODS.get("plot")(cfg.params, micro_backbone, CTX).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    m.training_step(Batch(x={"weak": x}, y=y), StepState(0, 10, 0, 5)).loss.backward()
    assert m.prompts.ctx.grad is None and m.ctx_vision.grad.abs().sum() > 0


# -- Sinkhorn ------------------------------------------------------------------------------------
def test_sinkhorn_plan_has_the_prescribed_marginals():
    from ossl_methods._prompts import sinkhorn

    C = torch.tensor([[[0.1, 0.9, 0.5], [0.7, 0.2, 0.4], [0.3, 0.8, 0.0], [0.6, 0.6, 0.6]]], dtype=torch.float64)
    u = torch.full((1, 4), 0.25, dtype=torch.float64)
    v = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    T = sinkhorn(torch.exp(-C / 0.1), u, v, max_iter=1000, tol=1e-12)
    torch.testing.assert_close(T.sum(2), u, atol=1e-9, rtol=0)
    torch.testing.assert_close(T.sum(1), v, atol=1e-9, rtol=0)
    # independent check: the entropic OT optimum is the unique plan of the form diag(a) K diag(b)
    # with these marginals; solve it in the log domain from scratch
    f, g = torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for _ in range(2000):
        f = 0.1 * torch.log(u[0]) - 0.1 * torch.logsumexp((g[None] - C[0]) / 0.1, dim=1)
        g = 0.1 * torch.log(v[0]) - 0.1 * torch.logsumexp((f[:, None] - C[0]) / 0.1, dim=0)
    torch.testing.assert_close(T[0], torch.exp((f[:, None] + g[None] - C[0]) / 0.1), atol=1e-9, rtol=0)
    # a tiny eps on a diagonal cost recovers the assignment
    D = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    half = torch.full((1, 2), 0.5, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(torch.exp(-D / 0.01), half, half), torch.diag(half[0])[None], atol=1e-6, rtol=0)


def test_sinkhorn_stops_at_the_tolerance():
    from ossl_methods._prompts import sinkhorn

    torch.manual_seed(0)
    K = torch.exp(-torch.rand(3, 5, 4) / 0.1)
    u, v = torch.full((3, 5), 0.2), torch.full((3, 4), 0.25)
    loose, tight = sinkhorn(K, u, v, tol=1e-2), sinkhorn(K, u, v, tol=1e-9, max_iter=5000)
    one = sinkhorn(K, u, v, max_iter=1)
    assert not torch.allclose(one, tight, atol=1e-6)  # one round is not converged ...
    assert (loose.sum(2) - u).abs().max() > (tight.sum(2) - u).abs().max()  # ... nor is tol 1e-2


# -- LoCoOp --------------------------------------------------------------------------------------
def test_locoop_selects_local_features_whose_top_k_excludes_the_label():
    from ossl_methods.locoop import entropy_of_selected

    # one image, 4 local features, 5 classes, label 0, top-2
    logits = torch.tensor([[[5.0, 1.0, 0.0, 0.0, 0.0],    # label is top-1: kept out
                            [1.0, 5.0, 0.0, 0.0, 0.0],    # label is top-2: kept out
                            [0.0, 5.0, 4.0, 1.0, 1.0],    # label is last: selected
                            [-1.0, 0.0, 0.0, 3.0, 2.0]]])  # label is last: selected
    ent, sel = entropy_of_selected(logits, torch.tensor([0]), top_k=2)
    assert sel.tolist() == [[False, False, True, True]]
    p = logits[0, 2:].softmax(-1).numpy()
    expected = float(np.mean(-(p * np.log(p + 1e-5)).sum(-1)))
    assert math.isclose(float(ent), expected, rel_tol=1e-5)
    # nothing selected -> zero
    ent0, sel0 = entropy_of_selected(logits[:, :2], torch.tensor([0]), top_k=2)
    assert float(ent0) == 0.0 and not sel0.any()


def test_locoop_ood_term_increases_entropy_when_minimised(micro_backbone):
    from ossl_methods.locoop import entropy_of_selected

    torch.manual_seed(0)
    local = (3 * torch.randn(2, 6, 5)).requires_grad_(True)
    y = torch.tensor([0, 1])
    opt = torch.optim.SGD([local], lr=20.0)
    h0, _ = entropy_of_selected(local, y, 1)
    for _ in range(50):  # the method's loss term: + lambda * L_ood with L_ood = -entropy
        ent, _ = entropy_of_selected(local, y, 1)
        loss = 0.25 * (-ent)
        opt.zero_grad(); loss.backward(); opt.step()
    h1, _ = entropy_of_selected(local, y, 1)
    assert float(h1.detach()) > float(h0.detach()) + 0.2
    # and the method wires it with that sign
    cfg = _cfg("locoop")
    m = METHODS.get("locoop")(cfg.params, micro_backbone, CTX).train()
    out = m.training_step(Batch(x={"weak": torch.randn(3, 3, 32, 32)}, y=torch.tensor([0, 1, 2])), None)
    assert out.logs["loss_ood"] <= 0
    assert math.isclose(float(out.loss.detach()), out.logs["loss_id"] + 0.25 * out.logs["loss_ood"], rel_tol=1e-5)


def test_locoop_scores(micro_backbone):
    cfg = _cfg("locoop")
    m = METHODS.get("locoop")(cfg.params, micro_backbone, CTX).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        p = m.predict(x)
        out = micro_backbone.encode_image(x, return_value_local=True)
        t = F.normalize(m.prompts(), dim=-1)
        g = F.normalize(out.pooled, dim=-1) @ t.t()
        loc = F.normalize(out.value_local, dim=-1) @ t.t()
    mcm = g.softmax(-1).max(-1).values
    torch.testing.assert_close(p.scores["mcm"], mcm)
    torch.testing.assert_close(p.scores["gl_mcm"], mcm + loc.softmax(-1).amax((1, 2)))
    torch.testing.assert_close(p.logits, micro_backbone.logit_scale * g)


# -- MaPLe ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory):
    """A random CLIP whose towers differ in width (text 32, vision 48) and depth 4."""
    path = tmp_path_factory.mktemp("cfg") / "test-maple-micro.json"
    path.write_text(json.dumps({
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 4, "width": 48, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4}}))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    model = open_clip.create_model("test-maple-micro", pretrained=None)
    return CLIPBackbone(model, open_clip.get_tokenizer("test-maple-micro"), "test-maple-micro",
                        {"size": 32})


def _block_inputs(transformer):
    seen, hooks = [], []
    for blk in transformer.resblocks:
        hooks.append(blk.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].detach().clone()),
                                                   with_kwargs=True))
        hooks.append(blk.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone())))
    return seen, hooks


def test_maple_prompts_replace_layers_below_depth_and_propagate_after(wide_backbone):
    bb, J, n = wide_backbone, 3, 2
    cfg = METHODS.get("maple").Config(n_ctx=n, ctx_init="a photo of a", prompt_depth=J)
    m = METHODS.get("maple")(cfg, bb, CTX).eval()
    assert m.proj.weight.shape == (bb.vision_width, bb.text_width)  # coupling W_t -> W_v
    assert len(m.deep_proj) == len(m.deep_text) == J - 1
    assert all(f.weight.shape == (48, 32) for f in m.deep_proj)
    assert all(p.shape == (n, 32) for p in m.deep_text)
    torch.testing.assert_close(m.deep_proj[0].weight, m.deep_proj[1].weight)  # clones, as official
    for tower, run in (("text", lambda: m.prompts(deep_prompts=m.text_deep_prompts())),
                       ("vision", lambda: bb.encode_image(torch.randn(2, 3, 32, 32), *m.visual_prompts()))):
        tr = bb.model.transformer if tower == "text" else bb.model.visual.transformer
        seen, hooks = _block_inputs(tr)
        with torch.no_grad():
            run()
            shallow, deep = m.visual_prompts()
        for h in hooks:
            h.remove()
        ins, outs = seen[0::2], seen[1::2]
        pos = slice(1, 1 + n) if tower == "text" else slice(-n, None)
        for j in range(1, len(ins)):
            if j < J:  # layers 1..J-1 (0-based) take the layer's own prompts in place of the outputs
                want = m.deep_text[j - 1] if tower == "text" else deep[j]
                torch.testing.assert_close(ins[j][:, pos], want.detach().expand_as(ins[j][:, pos]))
                assert not torch.allclose(ins[j][:, pos], outs[j - 1][:, pos])
                # every other token is the previous block's output
                keep = torch.ones(ins[j].shape[1], dtype=torch.bool)
                keep[pos] = False
                torch.testing.assert_close(ins[j][:, keep], outs[j - 1][:, keep])
            else:  # after depth J the prompt tokens propagate unchanged
                torch.testing.assert_close(ins[j], outs[j - 1])


def test_maple_initialisation_cuts_the_init_string(micro_backbone):
    m = METHODS.get("maple")(METHODS.get("maple").Config(prompt_depth=2), micro_backbone, CTX)
    tok = micro_backbone.tokenize(["a photo of a"])
    emb = micro_backbone.token_embedding(tok)[0]
    torch.testing.assert_close(m.prompts.ctx, emb[1:3])  # "a photo" learns ...
    want = micro_backbone.tokenize(["a photo of a thing a."])
    assert torch.equal(m.prompts.tokens[0], want[0])  # ... "of a" stays in the prompt


# -- CoOp ----------------------------------------------------------------------------------------
def test_coop_template_context_reproduces_zero_shot_logits(micro_backbone):
    Coop = METHODS.get("coop")
    coop = Coop(Coop.Config(n_ctx=4, ctx_init="a photo of a"), micro_backbone, CTX).eval()
    zs = METHODS.get("zsclip")(None, micro_backbone, CTX).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(coop.predict(images).logits, zs.predict(images).logits, rtol=1e-5, atol=1e-4)
        rand = Coop(Coop.Config(n_ctx=4), micro_backbone, CTX).eval()
        assert not torch.allclose(rand.predict(images).logits, zs.predict(images).logits, atol=1e-3)


def test_eval_cache_is_invalidated_by_training(micro_backbone):
    Coop = METHODS.get("coop")
    coop = Coop(Coop.Config(n_ctx=4), micro_backbone, CTX).eval()
    x = torch.randn(2, 3, 32, 32)

    def fresh():
        f = F.normalize(micro_backbone.encode_image(x).pooled, dim=-1)
        return micro_backbone.logit_scale * f @ F.normalize(coop.prompts(), dim=-1).t()

    with torch.no_grad():
        a = coop.predict(x).logits
        coop.prompts.ctx.mul_(-30.0)
        assert torch.equal(coop.predict(x).logits, a)  # cached in eval mode ...
        assert not torch.allclose(fresh(), a, atol=1e-5)
        coop.train().eval()  # ... recomputed after training
        torch.testing.assert_close(coop.predict(x).logits, fresh())


def test_ctx_init_word_count_must_match(micro_backbone):
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match="n_ctx"):
        METHODS.get("coop")(METHODS.get("coop").Config(n_ctx=16, ctx_init="a photo of a"), micro_backbone, CTX)
