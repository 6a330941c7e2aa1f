"""CoOp: the template-initialised context reproduces zero-shot CLIP; only the context trains."""
import json

import torch

from benchmark.engine import Engine, run_dir
from benchmark.method import MethodContext
from benchmark.registry import METHODS


def test_template_context_reproduces_zero_shot_logits(micro_backbone):
    ctx = MethodContext(["thing a", "thing b", "long thing name c"], "a photo of a {}.", "toy", 2, 1)
    coop = METHODS.get("coop")(METHODS.get("coop").Config(n_ctx=4, ctx_init="a photo of a"), micro_backbone, ctx).eval()
    zs = METHODS.get("zsclip")(None, micro_backbone, ctx).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(coop.predict(images).logits, zs.predict(images).logits, rtol=1e-5, atol=1e-4)
        random_ctx = METHODS.get("coop")(METHODS.get("coop").Config(n_ctx=4), micro_backbone, ctx).eval()
        assert not torch.allclose(random_ctx.predict(images).logits, zs.predict(images).logits)


def test_only_context_trains_and_loss_decreases(tmp_path):
    from conftest import toy_cfg

    eng = Engine(tmp_path)
    cfg = toy_cfg("coop", shots=4, sets=["train.epochs=8", "train.lr=0.05", "train.log_every=1",
                                         "train.warmup_epochs=0", "params.n_ctx=4"])
    bb = eng.backbone(cfg.backbone, torch.device("cpu"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    eng.run(cfg)
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
    d = run_dir(tmp_path, cfg)
    assert list(torch.load(d / "learned.pt")) == ["prompts.ctx"]
    losses = [json.loads(l)["loss"] for l in (d / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
