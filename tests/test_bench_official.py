"""scripts/bench_official.py reads the official code from the user's clones; without them it must say
what it looked for and how to get it (the benchmark itself runs outside the test suite)."""

import pytest




def test_without_a_root_it_names_the_clones_it_needs(monkeypatch, load_script):
    monkeypatch.delenv("OSSL_OFFICIAL_ROOT", raising=False)
    with pytest.raises(SystemExit) as e:
        load_script("bench_official").main(["--methods", "coop"])
    assert "--official-root" in str(e.value) and "https://github.com/KaiyangZhou/CoOp" in str(e.value)


def test_an_incomplete_root_lists_the_missing_files_and_clone_commands(tmp_path, load_script):
    (tmp_path / "CoOp" / "trainers").mkdir(parents=True)
    (tmp_path / "CoOp" / "trainers" / "coop.py").write_text("")
    with pytest.raises(SystemExit) as e:
        load_script("bench_official").main(["--official-root", str(tmp_path), "--methods", "coop,clip_adapter"])
    msg = str(e.value)
    assert str(tmp_path / "CoOp" / "clip" / "clip.py") in msg  # CoOp's clip package is missing
    assert str(tmp_path / "CLIP-Adapter" / "clip_adapter.py") in msg
    assert "git clone https://github.com/gaopengcuhk/CLIP-Adapter" in msg
    assert str(tmp_path / "CoOp" / "trainers" / "coop.py") not in msg  # present: not listed


def test_unknown_method_names_the_known_ones(tmp_path, load_script):
    with pytest.raises(SystemExit) as e:
        load_script("bench_official").main(["--official-root", str(tmp_path), "--methods", "plot"])
    assert "plot" in str(e.value) and "coop" in str(e.value) and "clip_lora" in str(e.value)
