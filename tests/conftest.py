"""Test set-up: offline hub, the test plugin folder and a random micro CLIP config."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
os.environ["OSSL_PLUGIN_PATH"] = str(TESTS / "plugins")
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

MICRO = "test-micro-vit"
open_clip.add_model_config(str(TESTS / "assets" / f"{MICRO}.json"))
# OSSL_TEST_THREADS: threads per test process (2 = this machine's cores; 1 when several run at once)
torch.set_num_threads(int(os.environ.get("OSSL_TEST_THREADS", "2")))


def _micro_checkpoint() -> str:
    """A seeded random micro CLIP saved once, so every process and run shares the same weights."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"ossl-{MICRO}-seed0-{torch.__version__}.pt"
    if not path.exists():
        from benchmark.io import atomic_torch_save

        torch.manual_seed(0)
        model = open_clip.create_model(MICRO, pretrained=None)
        atomic_torch_save(path, model.state_dict())
    return str(path)


MICRO_CKPT = _micro_checkpoint()

# A random RN50-shaped micro ResNet CLIP (stages [3, 4, 6, 3], width 8, 96-px images -> a 3 x 3
# attention-pool grid); its text tower has width 64 and 1 head, so the OpenAI state-dict format
# (heads = width // 64) describes it too.
MICRO_RN = "test-micro-rn50"
open_clip.add_model_config(str(TESTS / "assets" / f"{MICRO_RN}.json"))


def _micro_rn_checkpoint() -> str:
    """Seeded random weights; batch-norm scales, shifts and running statistics are randomised too
    (open_clip zero-initialises each block's last BN scale, which would make every residual
    branch a no-op and hide a skipped block), and the pool's query and key weights are scaled up
    (at open_clip's init its attention is nearly uniform, every grid output close to the pooled one)."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"ossl-{MICRO_RN}-seed0-v2-{torch.__version__}.pt"
    if not path.exists():
        from benchmark.io import atomic_torch_save

        torch.manual_seed(0)
        model = open_clip.create_model(MICRO_RN, pretrained=None)
        with torch.no_grad():
            for m in model.visual.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
            model.visual.attnpool.q_proj.weight.mul_(8.0)
            model.visual.attnpool.k_proj.weight.mul_(8.0)
        atomic_torch_save(path, model.state_dict())
    return str(path)


MICRO_RN_CKPT = _micro_rn_checkpoint()
TOY_EXPERIMENT = {
    "name": "toy",
    "backbone": {"model": MICRO, "pretrained": MICRO_CKPT},
    "config": {"train": {"epochs": 2, "batch_size": 8}, "ssl": {"unlabeled_batch_size": 8}},
}


@pytest.fixture(scope="session")
def micro_backbone():
    from benchmark.backbone import BackboneConfig, CLIPBackbone

    return CLIPBackbone.load(BackboneConfig(model=MICRO, pretrained=MICRO_CKPT))


@pytest.fixture(scope="session")
def micro_rn_backbone():
    from benchmark.backbone import BackboneConfig, CLIPBackbone

    return CLIPBackbone.load(BackboneConfig(model=MICRO_RN, pretrained=MICRO_RN_CKPT))


def toy_cfg(method="linear_probe", shots=2, seed=1, sets=(), dataset="toy"):
    from benchmark.config import resolve
    from benchmark.registry import METHODS

    return resolve(METHODS.get(method), dataset, shots, seed, TOY_EXPERIMENT, list(sets))


@pytest.fixture
def load_script():
    """``load_script("bench_step")``: the module of scripts/bench_step.py, loaded fresh."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
