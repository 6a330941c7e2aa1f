"""The CFSG-CLIP ablation ladder (configs/experiments/cfsg_ladder.yaml): each rung's resolved config
differs from the rung above in exactly one setting; the first rung is CoOp's set-up, the last is
CFSG-CLIP's defaults."""
from benchmark.config import to_dict
from benchmark.experiment import build_grid, load_experiment


def leaves(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(leaves(v, key))
        else:
            out[key] = v
    return out


def differences(a, b):
    la, lb = leaves(to_dict(a)), leaves(to_dict(b))
    ignore = {"label"}
    return sorted(k for k in set(la) | set(lb) if k not in ignore and la.get(k) != lb.get(k))


def test_each_rung_differs_from_its_neighbour_in_exactly_one_setting():
    exp = load_experiment("cfsg_ladder")
    rungs = [m for m in exp["methods"] if m in exp["variants"]]
    assert len(rungs) >= 5
    grid = build_grid(exp, datasets=["synth_cub"], seeds=[1])
    by_label = {c.label: c for c in grid.runs}
    for upper, lower in zip(rungs, rungs[1:]):
        diff = differences(by_label[upper], by_label[lower])
        assert len(diff) == 1, (upper, lower, diff)
    # the first rung is CoOp's set-up inside cfsg_clip: one head, no SSL, CoOp's prompt init, CoOp's training
    first, coop = by_label[rungs[0]], by_label["coop"]
    assert first.params.ctx_init == coop.params.ctx_init and first.params.n_ctx == coop.params.n_ctx
    assert to_dict(first.train) == to_dict(coop.train)
    # exactly one rung is CFSG-CLIP as the default grid runs it; the rungs below it change only the
    # readings the paper leaves open (the ones the preset did not choose)
    full = build_grid(load_experiment("embedded"), methods=["cfsg_clip"], datasets=["synth_cub"],
                      shots=[20], seeds=[1]).runs[0]
    default = [r for r in rungs if differences(by_label[r], full) == []]
    assert len(default) == 1, default
    readings = {"params.fusion", "params.fine_global", "params.patch_features"}
    for r in rungs[rungs.index(default[0]) + 1:]:
        assert set(differences(by_label[r], full)) <= readings, r


def test_the_first_rung_is_a_one_head_model_without_unlabeled_data(micro_backbone):
    from benchmark.method import MethodContext
    from benchmark.registry import METHODS

    exp = load_experiment("cfsg_ladder")
    cfg = build_grid(exp, methods=["r0_coop_init"], datasets=["synth_cub"], seeds=[1]).runs[0]
    ctx = MethodContext(classnames=["thing a", "thing b"], template="a photo of a {}.", dataset="toy",
                        shots=2, seed=1)
    import dataclasses

    params = dataclasses.replace(cfg.params, depth=1, top_k=1)  # the micro CLIP's tower is small
    m = METHODS.get("cfsg_clip")(params, micro_backbone, ctx)
    assert m.heads == ("coarse_global",) and not m.uses_unlabeled
