"""Registry errors are loud: duplicates, failing plugins, unknown names."""
import pytest

from benchmark.errors import DuplicateNameError, PluginImportError, UnknownNameError
from benchmark.registry import Registry


def test_duplicate_name_is_an_error():
    reg = Registry("method", "methods", "ossl_test_dup")
    reg._discovered = True

    @reg.register("a")
    class A:
        pass

    reg.register("a")(A)  # the same object again is harmless
    with pytest.raises(DuplicateNameError, match="registered twice"):
        @reg.register("a")
        class B:
            pass


def test_failing_plugin_is_loud_not_skipped(tmp_path, monkeypatch):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "broken.py").write_text("import not_a_real_module_xyz\n")
    reg = Registry("method", "methods", "ossl_test_broken", roots=[tmp_path])
    with pytest.raises(PluginImportError, match="broken.py failed to import"):
        reg.names()


def test_external_plugin_folder_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "_helper.py").write_text("VALUE = 3\n")
    (tmp_path / "methods" / "mine.py").write_text(
        "from ._helper import VALUE\n"
        "from benchmark.registry import METHODS\n"
        "REG = None\n")
    reg = Registry("method", "methods", "ossl_test_ext", roots=[tmp_path])
    reg.discover()
    import sys
    assert sys.modules["ossl_test_ext.mine"].VALUE == 3  # relative helper import works
    assert "ossl_test_ext._helper" in sys.modules


def test_unknown_name_suggests():
    reg = Registry("dataset", "datasets", "ossl_test_unknown")
    reg._discovered = True
    reg.register("synth_cub")(type("X", (), {}))
    with pytest.raises(UnknownNameError, match="Did you mean 'synth_cub'"):
        reg.get("synth_cb")


def test_datasets_folder_does_not_shadow_huggingface_datasets(tmp_path):
    """A regular package named ``datasets`` (Hugging Face's) must win over our plugin folder even
    with the suite's root first on sys.path: the folder has no __init__.py on purpose."""
    import subprocess
    import sys
    from benchmark import ROOT
    assert not (ROOT / "datasets" / "__init__.py").exists()
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("IS_HF = True\n")
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]); "
            "import datasets; print(datasets.IS_HF)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "site")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "True", out.stderr
