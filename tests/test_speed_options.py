"""Speed options: cached frozen passes (data.cached_views) against recomputing them."""
import numpy as np
import pytest
import torch

from benchmark.engine import Engine, autocast_for
from benchmark.loader import StepBatches, ViewDataset, ViewFeatureCache, build_transforms
from benchmark.method import Batch, MethodContext, StepState
from benchmark.protocol import load_or_create
from benchmark.registry import METHODS
from conftest import toy_cfg

N_VIEWS = 3


def _setup(tmp_path, method, sets=()):
    cfg = toy_cfg(method, shots=4, sets=[f"data.cached_views={N_VIEWS}", *sets])
    engine = Engine(tmp_path, log=lambda s: None)
    device = torch.device("cpu")
    split = load_or_create(engine.dataset("toy", cfg), cfg.shots, cfg.seed, tmp_path)
    bb = engine.backbone(cfg.backbone, device)
    views = build_transforms(bb.preprocess_cfg, cfg.data)
    ctx = MethodContext(classnames=split.id_classnames, template="a photo of a {}.", dataset="toy",
                        shots=cfg.shots, seed=cfg.seed)
    torch.manual_seed(0)
    m = METHODS.get(method)(cfg.params, bb, ctx)
    m.train()
    return cfg, engine, split, bb, views, m


def _loss_and_grads(m, batch):
    m.zero_grad(set_to_none=True)
    loss = m.training_step(batch, StepState(0, 10, 0, 10)).loss
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


@pytest.mark.parametrize("method", ["coop", "locoop", "clip_adapter"])
def test_cached_views_give_the_logits_and_gradients_of_recomputed_passes(tmp_path, method):
    cfg, engine, split, bb, views, m = _setup(tmp_path, method)
    fields = m.frozen_train_outputs
    assert "pooled" in fields
    serve = engine._view_cache(cfg, split, views, torch.device("cpu"), autocast_for(torch.device("cpu"), "off"),
                               split.labeled_idx, 8, "labeled", tuple(fields))
    assert serve is not None
    for step in (0, 3):
        pairs = StepBatches(split.labeled_idx, 8, cfg.seed, "labeled", 0, 0).batch(step)
        ids = [split.train.ids[i] for i, _ in pairs]
        served = serve(step, ids)
        # recompute: the same views rendered from their seeds, encoded in this batch
        ds = ViewDataset(split.train, {"weak": views["weak"]})
        imgs = torch.stack([ds[(i, ViewFeatureCache.view_seed(split.train.ids[i], s % N_VIEWS))][0]["weak"]
                            for i, s in pairs])
        y = torch.from_numpy(split.train.labels[[i for i, _ in pairs]])
        with torch.no_grad():
            ref = bb.encode_image(imgs, return_value_local="value_local" in fields)
        torch.testing.assert_close(served.pooled, ref.pooled, rtol=1e-5, atol=1e-5)
        if "value_local" in fields:
            torch.testing.assert_close(served.value_local, ref.value_local, rtol=1e-5, atol=1e-5)
        l_cached, g_cached = _loss_and_grads(m, Batch(x={}, y=y, ids=ids, features={"weak": served}))
        l_recomp, g_recomp = _loss_and_grads(m, Batch(x={"weak": imgs}, y=y, ids=ids))
        torch.testing.assert_close(l_cached, l_recomp, rtol=1e-5, atol=1e-6)
        for a, b in zip(g_cached, g_recomp):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # several views per image are in use, and a sample's view changes between epochs
    seeds = [s % N_VIEWS for st in range(6) for _, s in StepBatches(split.labeled_idx, 8, cfg.seed, "labeled", 0, 0).batch(st)]
    assert len(set(seeds)) == N_VIEWS


def test_cached_views_are_shared_across_methods_and_seeds_and_persist(tmp_path, monkeypatch):
    """Two runs (CoOp seed 1, then CLIP-Adapter seed 2) of one engine encode each (image, view) once;
    a fresh engine reads them from disk; the option is part of the config hash (another stream)."""
    calls = []
    real = ViewDataset.__getitem__

    def counting(self, item):  # renders of a train (weak) view alone: the view cache's, not the eval view's
        if list(self.views) == ["v"] and "RandomResizedCrop" in repr(self.views["v"]):
            calls.append(item)
        return real(self, item)

    monkeypatch.setattr(ViewDataset, "__getitem__", counting)
    from benchmark.config import config_hash

    engine = Engine(tmp_path, log=lambda s: None)
    sets = [f"data.cached_views={N_VIEWS}", "train.epochs=2"]
    a = toy_cfg("coop", shots=4, seed=1, sets=sets)
    engine.run(a)
    first = len(calls)
    assert first == 4 * 3 * N_VIEWS  # 4 shots x 3 known classes of the toy split, each view once
    b = toy_cfg("clip_adapter", shots=4, seed=2, sets=sets + ["clip_adapter.params.train_features=augmented"])
    engine.run(b)
    split2 = load_or_create(engine.dataset("toy", b), 4, 2, tmp_path)
    split1 = load_or_create(engine.dataset("toy", a), 4, 1, tmp_path)
    new_ids = set(split2.labeled_idx.tolist()) - set(split1.labeled_idx.tolist())
    assert len(calls) - first == len(new_ids) * N_VIEWS < 12 * N_VIEWS  # only what seed 1 did not encode
    files = list((tmp_path / "cache" / "views").glob("toy-views3-*.pt"))
    assert len(files) == 1
    fresh = Engine(tmp_path, log=lambda s: None)
    calls.clear()
    fresh.run(toy_cfg("coop", shots=4, seed=2, sets=sets))
    assert len(calls) == 0  # everything came from disk
    assert config_hash(a) != config_hash(toy_cfg("coop", shots=4, seed=1, sets=["train.epochs=2"]))


def test_cached_views_do_not_apply_to_prompted_image_towers():
    """MaPLe, PLOT++ and CLIP-LoRA feed learned prompts or adapters into the image tower: nothing
    to cache; CLIP-Adapter's cached mode trains on engine-served test-view features instead."""
    for name in ("maple", "plot", "clip_lora", "cfsg_clip", "zsclip"):
        assert not METHODS.get(name).frozen_train_outputs
    for name in ("coop", "locoop", "clip_adapter"):
        assert METHODS.get(name).frozen_train_outputs


def test_cached_views_off_loads_and_encodes_images(tmp_path):
    cfg, engine, split, bb, views, m = _setup(tmp_path, "coop", sets=["data.cached_views=0"])
    assert engine._view_cache(cfg, split, views, torch.device("cpu"), autocast_for(torch.device("cpu"), "off"),
                              split.labeled_idx, 8, "labeled", ("pooled",)) is None
    with pytest.raises(Exception, match="cached_views"):
        cfg.data.cached_views = -1
        engine._view_cache(cfg, split, views, torch.device("cpu"), autocast_for(torch.device("cpu"), "off"),
                           split.labeled_idx, 8, "labeled", ("pooled",))
    # without served features a step encodes its images (the frozen_image fallback)
    imgs = torch.randn(2, 3, 32, 32)
    out = m.frozen_image(Batch(x={"weak": imgs}, y=torch.zeros(2, dtype=torch.long)))
    assert torch.equal(out.pooled, bb.encode_image(imgs).pooled)


@pytest.mark.parametrize("method", ["cfsg_clip", "coop"])
def test_no_grad_pass_of_a_step_reuses_its_text_features(micro_backbone, method, monkeypatch):
    """A step's no-grad pass (CFSG-CLIP's weak view, the generic SSL loop's weak view) reuses the
    class text features the step computed: fewer text-tower runs, the same loss and gradients bit
    for bit as recomputing them; an optimiser step (new parameter versions) recomputes."""
    import importlib

    from benchmark.ssl import fixmatch_loss

    # CFSG-CLIP's per-view path (batch_passes off) runs the weak view's no-grad pass on its own;
    # with batch_passes the step computes the text features once and passes them on
    sets = ["cfsg_clip.params.depth=2", "cfsg_clip.params.top_k=4", "cfsg_clip.params.batch_passes=false"]
    cfg = toy_cfg(method, sets=sets)
    ctx = MethodContext(classnames=["red thing", "blue thing with a long name", "cat"], template="a photo of a {}.",
                        dataset="toy", shots=2, seed=1)
    g = torch.Generator().manual_seed(0)
    x = {v: torch.randn(4, 3, 32, 32, generator=g) for v in ("weak", "strong")}
    batch = Batch(x=dict(x), y=torch.tensor([0, 1, 2, 1]), u=dict(x), ids=list("abcd"), u_ids=list("efgh"))
    runs = []
    blk = micro_backbone.model.transformer.resblocks[0]
    hook = blk.register_forward_pre_hook(lambda mod, args: runs.append(1))

    def step(m):
        runs.clear()
        loss = m.training_step(batch, StepState(0, 10, 0, 10)).loss
        if method == "coop":  # the engine's generic SSL terms
            with torch.no_grad():
                lw = m.predict(batch.u["weak"]).logits
            loss = loss + fixmatch_loss(lw, m.predict(batch.u["strong"]).logits, 0.0)[0]
        params = [p for p in m.parameters() if p.requires_grad]
        return loss.detach(), torch.autograd.grad(loss, params), len(runs)

    try:
        torch.manual_seed(0)
        m = METHODS.get(method)(cfg.params, micro_backbone, ctx)
        m.train()
        loss, grads, n_reused = step(m)
        prompts = importlib.import_module(type(m).__module__.rsplit(".", 1)[0] + "._prompts")
        fresh = iter(range(10 ** 6))
        monkeypatch.setattr(prompts, "param_versions", lambda module: next(fresh))  # never equal: recompute
        monkeypatch.setattr(importlib.import_module(type(m).__module__), "param_versions",
                            lambda module: next(fresh), raising=False)
        loss2, grads2, n_recomputed = step(m)
    finally:
        hook.remove()
    per_pass = 2 if method == "cfsg_clip" else 1  # CFSG-CLIP: coarse and fine prompt sets
    assert n_recomputed - n_reused == per_pass
    assert torch.equal(loss, loss2)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)
    # after an optimiser step the features are recomputed (new parameter versions)
    monkeypatch.undo()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    runs.clear()
    m.zero_grad()
    l3 = m.training_step(batch, StepState(0, 10, 0, 10)).loss
    l3.backward()
    opt.step()
    with torch.no_grad():
        t_after = m.text_features()[0] if method == "cfsg_clip" else m.class_text()
    with torch.no_grad():
        m.train()  # clears every memo
        t_ref = m.text_features()[0] if method == "cfsg_clip" else m.class_text()
    assert torch.equal(t_after, t_ref)


# -- train.sdpa_blocks: the residual blocks through F.scaled_dot_product_attention -------------------
def test_sdpa_blocks_equal_the_blocks_own_forward_within_rounding(micro_backbone):
    """Image tower with shallow and deep prompts and patches, text tower with its causal mask and
    deep prompts: outputs and the gradients reaching the prompts agree with open_clip's blocks
    (nn.MultiheadAttention) within fp32 rounding, in grad and no-grad passes; with the option off the
    outputs are open_clip's bit for bit."""
    import benchmark.backbone as B

    bb = micro_backbone
    g = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 32, 32, generator=g)
    p = torch.randn(2, bb.vision_width, generator=g).requires_grad_(True)
    deep_v = [None] + [torch.randn(2, bb.vision_width, generator=g).requires_grad_(True)
                       for _ in range(bb.vision_layers - 1)]
    tokens = bb.tokenize(["x x red finch.", "x x bird with a very long name indeed."])
    emb = bb.token_embedding(tokens).detach().requires_grad_(True)
    deep_t = [None] + [torch.randn(2, bb.text_width, generator=g).requires_grad_(True)
                       for _ in range(bb.text_layers - 1)]
    calls = []
    real = B._sdpa_block

    def counting(*a):
        calls.append(1)
        return real(*a)

    def run(on):
        bb.sdpa_blocks = on
        try:
            img = bb.encode_image(images, prompts=p, deep_prompts=deep_v, return_patches=True, return_prompts=True)
            txt = bb.encode_text_embeddings(emb, tokens, deep_prompts=deep_t)
            loss = img.pooled.square().sum() + img.patches.mean() + img.prompts.sum() + txt.square().sum()
            grads = torch.autograd.grad(loss, [p, emb] + deep_v[1:] + deep_t[1:])
            with torch.no_grad():
                frozen = bb.encode_image(images).pooled
        finally:
            bb.sdpa_blocks = False
        return [img.pooled, img.patches, img.prompts, txt, frozen], grads

    B._sdpa_block = counting
    try:
        off, g_off = run(False)
        assert not calls
        on, g_on = run(True)
        assert len(calls) == 2 * bb.vision_layers + bb.text_layers  # two image passes, one text
    finally:
        B._sdpa_block = real
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_on, g_off):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # off: open_clip's own forward, bit for bit
        assert torch.equal(bb.encode_image(images).pooled, bb.model.encode_image(images))


def test_pooled_only_passes_compute_the_last_blocks_cls_query_alone(micro_backbone):
    """With sdpa_blocks on, an image pass whose caller reads only the pooled feature runs the last
    block for the CLS query alone (n_query=1; keys and values from every token, prompts included):
    pooled features, LoCoOp's value-path local features and the gradients reaching shallow and
    deep prompts equal the full last block's (a pass that returns patches, the same blocks
    otherwise) within fp32 rounding; passes that return patches or prompts run every query."""
    import benchmark.backbone as B

    bb = micro_backbone
    g = torch.Generator().manual_seed(7)
    images = torch.randn(3, 3, 32, 32, generator=g)
    p = torch.randn(2, bb.vision_width, generator=g).requires_grad_(True)
    deep = [None] + [torch.randn(2, bb.vision_width, generator=g).requires_grad_(True)
                     for _ in range(bb.vision_layers - 1)]
    queries = []
    real = B._sdpa_block

    def recording(blk, x, mask, n_query=None):
        queries.append(n_query)
        return real(blk, x, mask, n_query)

    def run(**kw):
        out = bb.encode_image(images, prompts=p, deep_prompts=deep, return_value_local=True, **kw)
        loss = out.pooled.square().sum() + out.value_local.mean()
        return [out.pooled, out.value_local], torch.autograd.grad(loss, [p] + deep[1:])

    B._sdpa_block = recording
    bb.sdpa_blocks = True
    try:
        cls_out, cls_grads = run()
        assert queries == [None] * (bb.vision_layers - 1) + [1]
        queries.clear()
        full_out, full_grads = run(return_patches=True)
        assert queries == [None] * bb.vision_layers
        queries.clear()
        with torch.no_grad():
            frozen = bb.encode_image(images).pooled
            assert queries[-1] == 1
            full_frozen = bb.encode_image(images, return_prompts=False, return_patches=True).pooled
    finally:
        B._sdpa_block = real
        bb.sdpa_blocks = False
    for a, b in zip(cls_out + [frozen], full_out + [full_frozen]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(cls_grads, full_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    blk = bb.model.visual.transformer.resblocks[-1]
    with pytest.raises(ValueError, match="attn_mask=None"):
        B._sdpa_block(blk, torch.zeros(1, 4, bb.vision_width), torch.zeros(4, 4), 1)


def test_sdpa_blocks_leave_lora_and_hooked_blocks_to_their_own_forward(micro_backbone):
    """Only open_clip's plain blocks take the sdpa path: a LoRA-wrapped attention (its own forward
    with the adapters) and a block with hooks (tools that watch the blocks) run as they are."""
    import copy
    import importlib

    import benchmark.backbone as B

    METHODS.get("clip_lora")  # loads the plugins (and their helpers)
    lora = importlib.import_module("ossl_methods._lora")
    bb = copy.deepcopy(micro_backbone)
    blocks = bb.model.visual.transformer.resblocks
    assert all(B._plain_block(b) for b in blocks)
    lora.apply_lora(bb, "vision", "0", ["q", "v"], 2, 1.0, 0.0)
    assert not B._plain_block(blocks[0]) and B._plain_block(blocks[1])
    h = blocks[1].register_forward_pre_hook(lambda mod, args: None)
    assert not B._plain_block(blocks[1])
    h.remove()
    assert B._plain_block(blocks[1])


# -- eval.memo_mb: evaluation images kept in memory ---------------------------------------------
def test_eval_memo_serves_the_loaders_tensors_and_off_uses_the_loader(tmp_path, monkeypatch):
    """The memo's batches are the loader's bit for bit; a second run on the same dataset loads no
    evaluation image again; with the budget exhausted it still serves every image; eval.memo_mb=0
    goes through the loader; predictions of a run with every speed option off equal those of the
    suite's blocks and loaders (the sdpa path never called)."""
    import benchmark.backbone as B
    from benchmark.loader import EvalImageMemo, eval_loader

    depth = ["maple.params.prompt_depth=2"]
    cfg = toy_cfg("maple", shots=2, sets=depth)
    engine = Engine(tmp_path, log=lambda s: None)
    split = load_or_create(engine.dataset("toy", cfg), cfg.shots, cfg.seed, tmp_path)
    views = build_transforms(engine.backbone(cfg.backbone, torch.device("cpu")).preprocess_cfg, cfg.data)
    idx = split.test_idx[:11]
    ref = [b["test"] for b in eval_loader(split.test, idx, views["test"], 4)]
    for budget in (100, 0.05):  # 0.05 MB: room for a few images only
        memo = EvalImageMemo(budget)
        for _ in range(2):
            got = list(memo.batches("k", split.test, idx, views["test"], 4))
            assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
        assert memo.used <= budget * 2 ** 20
    calls = []
    real = ViewDataset.__getitem__
    monkeypatch.setattr(ViewDataset, "__getitem__", lambda self, item: calls.append(item) or real(self, item))
    engine.run(cfg)
    first = len(calls)
    engine.run(toy_cfg("maple", shots=2, seed=2, sets=depth))
    n_train = len(calls) - first  # the second run's training images only (the test images are memoised)
    assert 0 < n_train and first > n_train
    # every option off: the loader and the blocks' own forward (sdpa never runs)
    monkeypatch.setattr(B, "_sdpa_block", lambda *a: (_ for _ in ()).throw(AssertionError("sdpa path used")))
    off = Engine(tmp_path / "off", log=lambda s: None)
    res = off.run(toy_cfg("maple", shots=2, sets=depth + ["train.sdpa_blocks=false", "eval.memo_mb=0",
                                                  "train.short_text=false"]))
    assert off.eval_memo is None and res["metrics"]


# -- data.batch_normalize: ToTensor + Normalize once per batch ----------------------------------
def test_batch_normalize_gives_the_per_image_tensors_bit_for_bit(tmp_path):
    """Weak, strong (RandAugment) and test views of a loader batch, normalised in the collation,
    equal the per-image transforms' outputs bit for bit (same seeds, same crops)."""
    from benchmark.loader import stream_loader

    cfg = toy_cfg("coop", shots=4)
    engine = Engine(tmp_path, log=lambda s: None)
    split = load_or_create(engine.dataset("toy", cfg), cfg.shots, cfg.seed, tmp_path)
    views = build_transforms(engine.backbone(cfg.backbone, torch.device("cpu")).preprocess_cfg, cfg.data)
    got = {}
    for bn in (False, True):
        loader = stream_loader(split.train, split.labeled_idx, views, 5, 1, "labeled", 0, 3, 0, False, bn)
        got[bn] = [b.views for b in loader]
    for a, b in zip(got[False], got[True]):
        assert set(a) == {"weak", "strong", "test"}
        for k in a:
            assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k])
    ds = ViewDataset(split.train, {"weak": views["weak"]}, batch_normalize=True)
    item = ds[(int(split.labeled_idx[0]), 7)][0]["weak"]
    assert item.pixels.dtype == torch.uint8  # normalised later, in the collation
