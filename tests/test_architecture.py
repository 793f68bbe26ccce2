"""The package's shape: imports point one way (runtime -> compiler -> spec -> schemas) and form no cycle.

Every import counts, including those inside functions, which would otherwise
hide a cycle until the function runs.
"""

import ast
import os

import networkx as nx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("schemas", "spec", "compiler", "runtime")  # each may import only those before it


def module_name(path):
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["keras_darts", *parts])


def is_module(name):
    base = os.path.join(ROOT, *name.split(".")[1:])
    return os.path.isfile(base + ".py") or os.path.isdir(base)


def import_graph():
    graph = nx.DiGraph()
    for layer in LAYERS:
        for folder, _, files in os.walk(os.path.join(ROOT, layer)):
            for file in (f for f in files if f.endswith(".py")):
                path = os.path.join(folder, file)
                module = module_name(path)
                package = module if file == "__init__.py" else module.rsplit(".", 1)[0]
                graph.add_node(module)
                with open(path, encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom):
                        if node.level:
                            base = package.split(".")[: len(package.split(".")) - node.level + 1]
                            target = ".".join(base + ([node.module] if node.module else []))
                        else:
                            target = node.module or ""
                        if target.startswith("keras_darts."):
                            for alias in node.names:
                                name = f"{target}.{alias.name}"
                                graph.add_edge(module, name if is_module(name) else target)
                    elif isinstance(node, ast.Import):
                        for alias in node.names:
                            if alias.name.startswith("keras_darts."):
                                graph.add_edge(module, alias.name)
    return graph


def layer_of(module):
    return module.split(".")[1]


def test_no_two_modules_import_each_other_even_through_others():
    assert list(nx.simple_cycles(import_graph())) == []


def test_imports_point_from_runtime_to_compiler_to_spec_to_schemas():
    wrong = [(a, b) for a, b in import_graph().edges
             if layer_of(b) in LAYERS and LAYERS.index(layer_of(b)) > LAYERS.index(layer_of(a))]
    assert wrong == []


def test_the_suites_temporary_files_go_where_pytest_removes_them(tmp_path_factory):
    # TMPDIR (for subprocesses) and this process' temporary directory lie under
    # pytest's basetemp, which pytest removes when every test passed.
    import os
    import tempfile
    import tomllib
    from pathlib import Path

    basetemp = tmp_path_factory.getbasetemp()
    assert Path(os.environ["TMPDIR"]).is_relative_to(basetemp)
    assert Path(tempfile.gettempdir()).is_relative_to(basetemp)
    with open(Path(__file__).parent.parent / "pyproject.toml", "rb") as handle:
        options = tomllib.load(handle)["tool"]["pytest"]["ini_options"]
    assert options["tmp_path_retention_policy"] == "failed"
