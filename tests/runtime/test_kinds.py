"""Search-space kinds: the registry, and a third kind from outside the package run end to end."""

import ast
import os

import pytest
import yaml

import keras_darts as kd
from keras_darts.runtime.cli import compile_and_search_main, main
from keras_darts.runtime.kinds import kind_of
from tests.conftest import tiny_spec_document

RUNTIME = os.path.join(os.path.dirname(kd.runtime.__file__))


def toy_document():
    document = tiny_spec_document(kind="mlp_cell", operations=["none", "skip_connect", "dense_relu", "dense_tanh"],
                                  network={"init_channels": 8, "layers": 3, "input_shape": [8, 8, 1],
                                           "num_classes": 10})
    document["plugins"] = ["tests.toy_kind"]
    document["search"].update(epochs=2, order="first", steps_per_epoch=5, diagnostics={"hessian_eigenvalue": False})
    document["retrain"].update(epochs=2, init_channels=16)
    return document


def test_a_kind_registered_by_a_plugin_runs_compile_and_search_to_a_saved_model(tmp_path, capsys, isolated_registries):
    spec = tmp_path / "mlp.yaml"
    spec.write_text(yaml.safe_dump(toy_document()))
    assert main(["validate", str(spec)]) == 0
    assert "dense cells: 2 nodes, k: 2, width 8" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert compile_and_search_main([str(spec), "--run-dir", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    derived = kd.load_derived(str(run_dir / "derived.yaml"))
    assert derived.kind == "mlp_cell" and set(derived.cells) == {"normal", "reduce"}
    assert {e.op for c in derived.cells.values() for n in c.nodes for e in n} <= {"skip_connect", "dense_relu",
                                                                                   "dense_tanh"}
    # The kind's own network was retrained (dense layers, 16 wide), and the kind's collapse statistic recorded.
    history = yaml.safe_load((run_dir / "search" / "history.json").read_text())
    normal = [e.op for n in derived.cells["normal"].nodes for e in n]
    assert history[-1]["parameter_free"] == normal.count("skip_connect")
    metrics = yaml.safe_load((run_dir / "retrain" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3  # well above chance (0.1) after two epochs on digits
    assert os.path.exists(run_dir / "export" / "saved_model" / "saved_model.pb")
    assert "saved model:" in out
    assert (run_dir / "plots" / "cell_normal.png").exists()
    # keras-darts show asks the kind too
    assert main(["show", str(run_dir / "derived.yaml")]) == 0
    shown = capsys.readouterr().out
    assert "output: mean of [2, 3]" in shown


def test_an_unregistered_kind_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(kd.SpecError) as excinfo:
        kind_of("transformer_cell")
    assert str(excinfo.value) == ("<kind>: $.search_space.kind: no kind 'transformer_cell' is registered; known "
                                  "kinds: " + ", ".join(_registered()))


def _registered():
    from keras_darts.runtime import kinds

    return list(kinds._KINDS)


def test_the_built_in_kinds_answer_what_the_runtime_asks():
    conv, recurrent = kind_of("conv_cell"), kind_of("recurrent_cell")
    assert conv.alpha_edges(2) == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    assert recurrent.alpha_edges(3) == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    derived = kd.load_derived("DARTS_V2")
    # DARTS_V2's normal cell: 2 skip connections, 0 pools
    assert conv.collapse(derived) == {"skip_connections": 2, "parameter_free": 2}


def test_no_module_of_the_runtime_outside_the_kinds_names_a_kind_or_branches_on_one():
    for folder, _, files in os.walk(RUNTIME):
        if os.path.basename(folder) == "kinds":
            continue
        for name in (f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant):
                    assert node.value not in ("conv_cell", "recurrent_cell"), f"{name} names a kind"
                if isinstance(node, ast.Compare):
                    sides = [node.left, *node.comparators]
                    assert not any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides), (
                        f"{name} branches on a kind")
