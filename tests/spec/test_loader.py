"""Loading, layering and validating search-space specs: every error with its file and JSON path."""

import os
import textwrap

import pytest

from keras_darts.spec import SpecError, load_spec

GOOD = """\
version: 1
name: demo
search_space:
  kind: conv_cell
  operations: [none, max_pool_3x3, skip_connect, sep_conv_3x3]
  nodes: 3
  k: 1
  reduction_cells: [1, 3]
  network: {init_channels: 8, layers: 5, input_shape: [32, 32, 3], num_classes: 10}
retrain: {enabled: false}
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def messages(excinfo):
    return [str(p) for p in excinfo.value.problems]


def test_good_spec_loads_with_reference_defaults(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.search_space.operations == ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
    assert spec.search_space.reduction_positions == (1, 3)
    # Unstated values are the reference's: weights SGD 0.025 -> 0.001, alpha Adam 3e-4 (0.5, 0.999).
    assert spec.search.weights_optimizer.learning_rate == 0.025
    assert spec.search.weights_optimizer.learning_rate_min == 0.001
    assert (spec.search.arch_optimizer.beta_1, spec.search.arch_optimizer.beta_2) == (0.5, 0.999)
    assert spec.search.arch_optimizer.weight_decay == 1e-3
    assert spec.retrain.enabled is False


def test_spec_objects_are_immutable(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    with pytest.raises(AttributeError):
        spec.search_space.k = 3


def test_thirds_puts_reductions_where_darts_does():
    spec = load_spec({"version": 1, "name": "x", "search_space": {"kind": "conv_cell", "network": {"layers": 20}}})
    assert spec.search_space.reduction_positions == (6, 13)


def test_extends_and_overrides_layer_in_order(tmp_path):
    write(tmp_path, GOOD, "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: child\nsearch: {epochs: 7}\n", "child.yaml")
    spec = load_spec(child, overrides=["search.epochs=9", "search_space.k=2", "data.source=digits"])
    assert spec.name == "child"
    assert spec.search.epochs == 9
    assert spec.search_space.k == 2
    assert spec.search_space.nodes == 3  # from the base
    assert spec.data.source == "digits"


def test_overrides_change_the_hash(tmp_path):
    path = write(tmp_path, GOOD)
    assert load_spec(path).sha256 != load_spec(path, overrides=["search.seed=5"]).sha256
    assert load_spec(path).sha256 == load_spec(path).sha256


def test_extends_errors_name_files_as_the_users_path_leads_to_them(tmp_path, monkeypatch):
    # Given a relative path, every file in an extends chain is named relative too.
    (tmp_path / "specs").mkdir()
    write(tmp_path / "specs", "extends: middle.yaml\nversion: 1\nname: top\n", "top.yaml")
    write(tmp_path / "specs", "extends: gone.yaml\n", "middle.yaml")
    write(tmp_path / "specs", "extends: top.yaml\n", "loop.yaml")
    write(tmp_path / "specs", "search_space: {kind: [\n", "broken.yaml")
    write(tmp_path / "specs", "extends: broken.yaml\n", "child.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as excinfo:
        load_spec("specs/top.yaml")
    assert messages(excinfo) == ["specs/middle.yaml: $.extends: gone.yaml: file not found "
                                 "(looked for specs/gone.yaml)"]
    write(tmp_path / "specs", "extends: loop.yaml\n", "middle.yaml")
    with pytest.raises(SpecError) as excinfo:
        load_spec("specs/top.yaml")
    assert messages(excinfo) == ["specs/loop.yaml: $.extends: extends forms a cycle: "
                                 "top.yaml -> middle.yaml -> loop.yaml -> top.yaml"]
    with pytest.raises(SpecError) as excinfo:
        load_spec("specs/child.yaml")
    assert messages(excinfo)[0].startswith("specs/broken.yaml: line 2, column 1: invalid YAML")


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    b = write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(SpecError) as excinfo:
        load_spec(b)
    assert messages(excinfo) == [f"{tmp_path}/a.yaml: $.extends: extends forms a cycle: b.yaml -> a.yaml -> b.yaml"]


def test_every_schema_error_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        """\
        version: 2
        name: has space
        search_space:
          kind: conv_cell
          nodes: many
          reduction_cells: half
          highway: true
          network: {init_channels: 0}
        search: {epoch: 3, order: third}
        """,
    )
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    assert messages(excinfo) == [
        f"{path}: $.name: expected a name of letters, digits, '_', '.' and '-', got 'has space'",
        f"{path}: $.search.epoch: unknown key 'epoch'; expected one of: arch_optimizer, beta_darts, "
        "checkpoint_every_steps, darts_minus, darts_pt, deterministic, diagnostics, divergence_lr_factor, drnas, early_stopping, "
        "epochs, fair_darts, gdas, graph_optimizer, hvp_epsilon, lambda_darts, latency, max_rollbacks, method, on_divergence, order, pc_darts, "
        "precision, recompute_cells, "
        "reuse_virtual_gradient, sdarts, second_order_mode, seed, snas, steps_per_epoch, tensorboard, "
        "weights_optimizer "
        "(did you mean 'epochs'?)",
        f"{path}: $.search.order: expected one of 'first', 'second'; got 'third'",
        f"{path}: $.search_space.highway: unknown key 'highway': it is an option of kind 'recurrent_cell', "
        "not 'conv_cell'",
        f"{path}: $.search_space.network.init_channels: expected a value >= 1, got 0",
        f"{path}: $.search_space.nodes: expected integer, got string 'many'",
        f"{path}: $.search_space.reduction_cells: expected 'thirds' or a list of integers, got string 'half'",
        f"{path}: $.version: expected 1, got 2",
    ]


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"operations": ["none", "sep_conv3x3"]},
            ["$.search_space.operations[1]: unknown operation 'sep_conv3x3'; known operations: none, max_pool_3x3, "
             "avg_pool_3x3, skip_connect, sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5 "
             "(did you mean 'sep_conv_3x3'?)"],
        ),
        (
            {"operations": ["none", "none"]},
            ["$.search_space.operations[1]: operation 'none' is listed twice",
             "$.search_space.operations: expected at least one operation other than 'none', got only 'none'"],
        ),
        ({"k": 0}, ["$.search_space.k: expected k >= 1, got 0"]),
        ({"k": 5, "nodes": 3}, ["$.search_space.k: k=5 exceeds the 4 predecessors of the last intermediate node; "
                                "expected k <= 4"]),
        (
            {"reduction_cells": [1, 5, 1]},
            ["$.search_space.reduction_cells[1]: expected a cell position in [0, 5), got 5",
             "$.search_space.reduction_cells[2]: reduction position 1 is listed twice"],
        ),
        ({"network": {"layers": 0}}, ["$.search_space.network.layers: expected at least 1 cell, got 0"]),
        (
            {"network": {"layers": 8, "input_shape": [28, 28, 1]}, "reduction_cells": [1, 2, 3]},
            ["$.search_space.network.input_shape: input_shape [28, 28, 1] gives 7x7 feature maps into the "
             "reduction cell at position 3; expected an even size"],
        ),
    ],
)
def test_semantic_errors(change, expected):
    document = {
        "version": 1,
        "name": "x",
        "search_space": {"kind": "conv_cell", "network": {"layers": 5}, **change},
        "retrain": {"enabled": False},
    }
    with pytest.raises(SpecError) as excinfo:
        load_spec(document)
    assert messages(excinfo) == [f"<dict>: {e}" for e in expected]


def test_retrain_network_is_checked_too():
    document = {
        "version": 1,
        "name": "x",
        "search_space": {"kind": "conv_cell", "network": {"input_shape": [28, 28, 1]}},
        "retrain": {"auxiliary": True, "layers": 8},
    }
    with pytest.raises(SpecError) as excinfo:
        load_spec(document)
    assert messages(excinfo) == [
        "<dict>: $.retrain: the auxiliary head needs feature maps of at least 8x8 after cell 5; "
        "input_shape [28, 28, 1] gives 7x7"
    ]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "$: empty document; expected a mapping of spec keys"),
        (b"- 1\n- 2\n", "$: expected a mapping at the top level, got list"),
        (b"version: 1\nname: [unclosed\n", "line 3, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        (b"version: 1\nversion: 1\n", "line 2, column 1: invalid YAML: duplicate key 'version' (first at line 1)"),
        (b"name: caf\xe9\n", "$: not UTF-8 text (byte 0xe9 at offset 9)"),
        (
            b"a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            b"e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
            "$: document expands to more than 200000 values (aliases nested too deeply)",
        ),
        (b"!!python/object:os.system {}\n", "line 1, column 1: invalid YAML: could not determine a constructor "
                                             "for the tag 'tag:yaml.org,2002:python/object:os.system'"),
    ],
)
def test_unreadable_documents(tmp_path, content, expected):
    path = write(tmp_path, content)
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    assert messages(excinfo) == [f"{path}: {expected}"]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SpecError) as excinfo:
        load_spec(str(tmp_path / "nope.yaml"))
    assert messages(excinfo) == [f"{tmp_path}/nope.yaml: $: file not found"]
    with pytest.raises(SpecError) as excinfo:
        load_spec(str(tmp_path))
    assert messages(excinfo) == [f"{tmp_path}: $: expected a YAML file, got a directory"]


def test_bad_override_syntax(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(SpecError) as excinfo:
        load_spec(path, overrides=["search.epochs"])
    assert messages(excinfo) == ["--set: search.epochs: expected key.path=value"]
    with pytest.raises(SpecError) as excinfo:
        load_spec(path, overrides=["search.epochs=ten"])
    assert messages(excinfo) == [f"{path}: $.search.epochs: expected integer, got string 'ten'"]


def test_missing_required_keys():
    with pytest.raises(SpecError) as excinfo:
        load_spec({"version": 1, "search_space": {}})
    assert messages(excinfo) == ["<dict>: $.name: missing required key", "<dict>: $.search_space.kind: missing required key"]


def test_example_specs_validate():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert names
    for name in names:
        load_spec(os.path.join(root, name))


def test_integral_floats_become_integers():
    spec = load_spec({"version": 1.0, "name": "x", "retrain": {"enabled": False},
                      "search_space": {"kind": "conv_cell", "k": 2.0, "network": {"input_shape": [28.0, 28, 1],
                                                                                  "layers": 5}}})
    assert spec.search_space.k == 2 and isinstance(spec.search_space.k, int)
    assert spec.search_space.network.input_shape == (28, 28, 1)
    assert all(isinstance(d, int) for d in spec.search_space.network.input_shape)


def test_semantic_problems_are_reported_beside_schema_errors(tmp_path):
    path = write(
        tmp_path,
        """\
        version: 1
        name: typo
        search_space:
          kind: conv_cell
          operations: [none, sep_conv_3x3, dil_conv3x3]
          reduction_cells: [2, 8]
          network: {layers: 8}
        search: {epochs: 10, oder: second}
        retrain: {layers: zero}
        """,
    )
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    assert messages(excinfo) == [
        f"{path}: $.retrain.layers: expected integer, got string 'zero'",
        f"{path}: $.search.oder: unknown key 'oder'; expected one of: arch_optimizer, beta_darts, "
        "checkpoint_every_steps, darts_minus, darts_pt, deterministic, diagnostics, divergence_lr_factor, drnas, early_stopping, "
        "epochs, fair_darts, gdas, graph_optimizer, hvp_epsilon, lambda_darts, latency, max_rollbacks, method, on_divergence, order, pc_darts, "
        "precision, recompute_cells, "
        "reuse_virtual_gradient, sdarts, second_order_mode, seed, snas, steps_per_epoch, tensorboard, "
        "weights_optimizer "
        "(did you mean 'order'?)",
        f"{path}: $.search_space.operations[2]: unknown operation 'dil_conv3x3'; known operations: none, "
        "max_pool_3x3, avg_pool_3x3, skip_connect, sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5 "
        "(did you mean 'dil_conv_3x3'?)",
        f"{path}: $.search_space.reduction_cells[1]: expected a cell position in [0, 8), got 8",
    ]


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E-3", 1e-3), ("3e-4", 3e-4), ("1e8", 1e8), (".5", 0.5),
                                         ("5.", 5.0), ("2.5e+1", 25.0), ("1_000.5", 1000.5)])
def test_every_float_a_user_writes_is_a_number_in_files_and_overrides(tmp_path, text, value):
    path = write(tmp_path, f"""\
        version: 1
        name: floats
        search_space: {{kind: conv_cell}}
        search: {{arch_optimizer: {{learning_rate: {text}}}}}
        """)
    assert load_spec(path).search.arch_optimizer.learning_rate == value
    spec = load_spec(path, overrides=[f"search.weights_optimizer.weight_decay={text}"])
    assert spec.search.weights_optimizer.weight_decay == value
    # Names that only look numeric stay strings, and integers stay integers.
    assert load_spec(path, overrides=["search.epochs=7"]).search.epochs == 7
    assert load_spec(path, overrides=["name=e5"]).name == "e5"


def test_problems_in_one_section_do_not_hide_semantic_problems_in_the_same_section(tmp_path):
    # num_classes (a schema error) sits in search_space beside k (a semantic one);
    # batch_size (a schema error) is in another section. All three at once.
    path = write(
        tmp_path,
        """\
        version: 1
        name: three
        search_space:
          kind: conv_cell
          nodes: 4
          k: 9
          network: {num_classes: 1}
        data: {batch_size: 0}
        """,
    )
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    assert messages(excinfo) == [
        f"{path}: $.data.batch_size: expected a value >= 1, got 0",
        f"{path}: $.search_space.network.num_classes: expected a value >= 2, got 1",
        f"{path}: $.search_space.k: k=9 exceeds the 5 predecessors of the last intermediate node; expected k <= 5",
    ]


@pytest.mark.parametrize("space, refused", [
    ("{kind: conv_cell, nodes: 0, k: 9}", "$.search_space.nodes: expected a value >= 1, got 0"),
    ("{kind: conv_cell, reduction_cells: [7], network: {layers: 0}}",
     "$.search_space.network.layers: expected at least 1 cell, got 0"),
])
def test_checks_against_a_refused_field_that_shapes_the_space_wait_for_it(tmp_path, space, refused):
    # With nodes or layers refused, checking k or reduction_cells against their
    # defaults would describe a space the user did not write: only the schema error.
    path = write(tmp_path, f"version: 1\nname: two\nsearch_space: {space}\n")
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    assert messages(excinfo) == [f"{path}: {refused}"]
