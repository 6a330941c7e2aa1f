"""Config precedence, strictness and hashing."""
import pytest
import yaml

from benchmark import config as C
from benchmark.errors import ConfigError, UnknownNameError
from benchmark.registry import METHODS
from conftest import TOY_EXPERIMENT, toy_cfg


@pytest.fixture()
def method_yaml(monkeypatch):
    """Give linear_probe a method YAML with by_shots/by_dataset sections."""
    tree = {"params": {"init": "random"}, "train": {"lr": 0.5, "epochs": 7, "batch_size": 16},
            "by_shots": {4: {"train": {"epochs": 9}}},
            "by_dataset": {"toy": {"train": {"batch_size": 4}}}}
    monkeypatch.setattr(C, "method_yaml", lambda name: yaml.safe_load(yaml.safe_dump(tree)))
    return tree


def test_precedence_defaults_yaml_experiment_cli(method_yaml):
    lp = METHODS.get("linear_probe")
    cfg = C.resolve(lp, "toy", 2, 1)
    assert cfg.train.lr == 0.5 and cfg.params.init == "random"  # method YAML over defaults
    assert cfg.train.momentum == C.TrainConfig().momentum  # untouched default
    assert cfg.train.batch_size == 4  # by_dataset over the YAML body
    assert cfg.train.epochs == 7 and C.resolve(lp, "toy", 4, 1).train.epochs == 9  # by_shots
    exp = {"config": {"train": {"epochs": 3, "lr": 0.1}},
           "methods_config": {"linear_probe": {"train": {"lr": 0.2}}}}
    cfg = C.resolve(lp, "toy", 4, 1, exp)
    assert cfg.train.epochs == 3  # experiment over by_shots
    assert cfg.train.lr == 0.2  # per-method experiment config over the global one
    cfg = C.resolve(lp, "toy", 4, 1, exp, ["train.lr=1e-3", "linear_probe.params.init=text",
                                            "zsclip.eval.known_score=mcm"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.params.init == "text"  # CLI always wins
    assert cfg.eval.known_score == C.EvalConfig().known_score  # scoped to another method: ignored


def test_unknown_keys_name_the_nearest_valid_key():
    lp = METHODS.get("linear_probe")
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        C.resolve(lp, "toy", 2, 1, None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="did you mean 'params.init'"):
        C.resolve(lp, "toy", 2, 1, {"config": {"params": {"inti": "text"}}})
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        C.resolve(lp, "toy", 2, 1, {"config": {"trian": {"lr": 1}}})
    with pytest.raises(ConfigError, match="expected an integer"):
        C.resolve(lp, "toy", 2, 1, None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        C.resolve(lp, "toy", 2, 1, None, ["train.epochs"])


def test_unknown_method_and_experiment_list_known_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'zsclip'"):
        METHODS.get("zsclp")
    from benchmark.experiment import load_experiment
    with pytest.raises(UnknownNameError, match="unknown experiment"):
        load_experiment("no-such-experiment")


def test_experiment_keys_are_strict(tmp_path):
    from benchmark.experiment import load_experiment
    p = tmp_path / "e.yaml"
    p.write_text("methods: [zsclip]\ndatasets: [toy]\nshot: [1]\n")
    with pytest.raises(ConfigError, match="did you mean 'shots'"):
        load_experiment(str(p))


def test_hash_ignores_non_result_fields_and_training_of_training_free_methods():
    a = toy_cfg()
    b = toy_cfg(sets=["data.num_workers=3", "train.checkpoint_every=5", "eval.batch_size=7"])
    assert C.config_hash(a) == C.config_hash(b)
    assert C.config_hash(a) != C.config_hash(toy_cfg(sets=["train.lr=0.1"]))
    assert C.cell_hash(a) == C.cell_hash(toy_cfg(seed=2)) and C.config_hash(a) != C.config_hash(toy_cfg(seed=2))
    z = toy_cfg("zsclip")
    assert C.config_hash(z) == C.config_hash(toy_cfg("zsclip", sets=["train.lr=0.1"]))


def test_set_keeps_words_that_yaml_would_read_as_booleans():
    assert C.parse_set("train.amp=off") == ("train.amp", "off")
    assert C.parse_set("ssl.enabled=true") == ("ssl.enabled", True)
    cfg = toy_cfg(sets=["train.amp=off", "ssl.enabled=yes"])
    assert cfg.train.amp == "off" and cfg.ssl.enabled is True


def test_short_text_is_hashed_only_where_it_changes_random_draws():
    """train.short_text changes features by float rounding only (not hashed), except for methods
    whose training draws random numbers in the text tower (CLIP-LoRA's dropout)."""
    for m in ("coop", "maple", "zsclip"):
        assert C.config_hash(toy_cfg(m)) == C.config_hash(toy_cfg(m, sets=["train.short_text=false"]))
    assert C.config_hash(toy_cfg("clip_lora")) != C.config_hash(toy_cfg("clip_lora", sets=["train.short_text=false"]))
