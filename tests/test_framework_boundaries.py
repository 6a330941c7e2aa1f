"""The framework's boundaries, read from its source with ``ast``: no import cycle inside benchmark/,
no dataset or method named in its code, CLIP internals reached only by backbone.py, and the config
schema importable without open_clip."""
import ast
import json
import os
import re
import subprocess
import sys

from conftest import ROOT

from benchmark.registry import DATASETS, METHODS

PKG = ROOT / "benchmark"


def _modules():
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


def import_graph():
    """module -> benchmark modules it imports (at module level or inside functions)."""
    mods = _modules()
    graph = {}
    for name, tree in mods.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import y / from . import x
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and node.module and node.module.split(".")[0] == "benchmark":
                    parts = node.module.split(".")
                    targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
                else:
                    continue
                deps |= {t.split(".")[0] for t in targets if t.split(".")[0] in mods}
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "benchmark" and len(parts) > 1 and parts[1] in mods:
                        deps.add(parts[1])
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_benchmark_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["engine"] >= {"backbone", "config", "loader", "method"}  # the parser sees imports
    assert "tinyclip" in graph["backbone"]  # ... including imports inside functions
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _strings(tree):
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_the_framework_names_no_dataset_and_compares_with_no_method_name():
    datasets, methods = set(DATASETS.names()), set(METHODS.names())
    assert {"synth_cub", "cub", "toy"} <= datasets and {"zsclip", "tip_adapter_f"} <= methods
    hits = []
    for mod, tree in _modules().items():
        for s in _strings(tree):  # any string, docstrings and messages included
            hits += [(mod, n, s[:60]) for n in datasets if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", s)]
        for node in ast.walk(tree):  # no `if method == "coop"` (help texts may show a method's name)
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                hits += [(mod, node.lineno, c) for c in consts if c in datasets | methods]
    assert not hits, hits


def test_only_the_backbone_wrapper_reaches_into_the_clip_model():
    # ``<something>.model.<attribute>``: reaching through the wrapper into open_clip's modules
    hits = []
    for mod, tree in _modules().items():
        if mod == "backbone":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "model":
                hits.append((mod, node.lineno, node.attr))
    assert not hits, hits
    # and no method plugin reaches through the wrapper (``backbone.model``)
    for path in sorted((ROOT / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "model" and "backbone" in ast.unparse(node.value):
                hits.append((path.name, node.lineno))
    assert not hits, hits


def test_the_config_schema_does_not_import_open_clip():
    code = ("import json, sys; import benchmark.config as c; c.RunConfig('m', 'd', 1, 1, None); "
            "print(json.dumps(sorted(m for m in ('open_clip', 'torch', 'benchmark.backbone') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    from benchmark import backbone, config

    assert backbone.BackboneConfig is config.BackboneConfig  # re-exported for compatibility
