"""Latency-aware search: the table's keys, the expected latency and its gradient, the losses, the table's sources."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.compiler.derive import derived_spec_from_search
from keras_darts.runtime import latency
from keras_darts.runtime.cli import compile_and_search_main, main
from keras_darts.spec import SpecError, dump_yaml
from tests.conftest import tiny_spec_document

OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3")


def latency_spec(search=None, **latency_options):
    document = tiny_spec_document()
    document["search"]["latency"] = {"target_ms": 2.0, **latency_options}
    document["search"].update(search or {})
    return kd.load_spec(document)


def hand_keys():
    """The tiny network's blocks, written out by hand: (fixed keys, [(cell type, {(source, node): {op: key}})])."""
    def key(name, a, b):
        return f"{name}-input:{a}-output:{b}"

    fixed = [key("stem_cifar", "8x8x1", "8x8x8")]
    # (type, channels, spatial inside, spatial out, s0, s1, reduction_prev)
    cells = [("normal", 4, 8, 8, "8x8x8", "8x8x8", False), ("reduce", 8, 8, 4, "8x8x8", "8x8x8", False),
             ("reduce", 16, 4, 2, "8x8x8", "4x4x16", True)]
    layout = []
    for cell_type, c, inside, out, s0, s1, reduction_prev in cells:
        fixed.append(key("preprocess_reduce" if reduction_prev else "preprocess_conv1x1", s0, f"{inside}x{inside}x{c}"))
        fixed.append(key("preprocess_conv1x1", s1, f"{inside}x{inside}x{c}"))
        edges = {}
        for node in (2, 3):
            for source in range(node):
                reduce_edge = cell_type == "reduce" and source < 2
                seen = inside if source < 2 else out
                edges[(source, node)] = {
                    op: None if op == "none" or (op == "skip_connect" and not reduce_edge)
                    else key(op, f"{seen}x{seen}x{c}", f"{out}x{out}x{c}") for op in OPS}
        layout.append((cell_type, edges))
    fixed.append(key("head", "2x2x32", "10"))
    return fixed, layout


def random_table(seed=0):
    fixed, layout = hand_keys()
    keys = set(fixed) | {k for _, edges in layout for row in edges.values() for k in row.values() if k}
    rng = np.random.default_rng(seed)
    return {k: float(rng.uniform(0.01, 0.5)) for k in sorted(keys)}


def numpy_expected(alphas, table, survival=True, weigh=None):
    """fixed + sum over cells, edges and ops of s_e softmax(alpha)[e, op] LUT[key], with the hand keys."""
    fixed, layout = hand_keys()
    total = sum(table[k] for k in fixed)
    edges = [(i, j) for j in (2, 3) for i in range(j)]
    for cell_type, cell in layout:
        a = alphas[cell_type]
        weights = np.exp(a - a.max(axis=1, keepdims=True)) if weigh is None else weigh(cell_type, a)
        weights /= weights.sum(axis=1, keepdims=True)
        for row, (source, node) in enumerate(edges):
            factor = min(1.0, 2 / node) if survival else 1.0
            total += factor * sum(weights[row, col] * table[cell[(source, node)][op]]
                                  for col, op in enumerate(OPS) if cell[(source, node)][op])
    return total


def test_the_plan_names_every_block_of_the_deployed_network_at_the_shape_it_sees():
    fixed, layout = hand_keys()
    plan = latency.plan_for(latency_spec())
    assert plan.fixed == fixed
    expected = set(fixed) | {k for _, edges in layout for row in edges.values() for k in row.values() if k}
    assert set(plan.blocks) == expected
    assert plan.blocks["skip_connect-input:8x8x8-output:4x4x8"] == {
        "input": [8, 8, 8], "block": "op", "op": "skip_connect", "stride": 2, "channels": 8}


def test_the_search_network_plan_takes_the_search_networks_channels():
    document = tiny_spec_document()
    document["search_space"]["network"]["init_channels"] = 6
    document["search"]["latency"] = {"target_ms": 2.0, "network": "search"}
    plan = latency.plan_for(kd.load_spec(document))
    assert plan.fixed[0] == "stem_cifar-input:8x8x1-output:8x8x12"
    assert plan.fixed[-1] == "head-input:2x2x48-output:10"  # 6 doubled twice, 2 nodes concatenated


def test_expected_latency_matches_an_independent_computation_under_both_edge_rules():
    table = {"entries": random_table()}
    rng = np.random.default_rng(1)
    for edges in ("survival", "all"):
        spec = latency_spec(edges=edges)
        model = kd.build_supernet(spec, seed=0)
        values = {t: rng.normal(0, 1, (5, len(OPS))) for t in ("normal", "reduce")}
        for t, v in values.items():
            model.alphas[t].assign(v)
        got = latency.ExpectedLatency(model, spec, table)([tf.convert_to_tensor(v) for v in model.arch_variables])
        np.testing.assert_allclose(float(got), numpy_expected(values, table["entries"], edges == "survival"),
                                   rtol=1e-5)


def test_expected_latency_of_drnas_second_stage_weighs_only_the_kept_ops_by_their_dirichlet_mean():
    table = {"entries": random_table()}
    spec = latency_spec(search={"method": "drnas", "order": "first", "drnas": {
        "progressive": True, "stage_partial_channels": [1, 1], "stage_keep_ops": [2]}})
    model = kd.build_supernet(spec, seed=0)
    rng = np.random.default_rng(4)
    for t in ("normal", "reduce"):
        model.alphas[t].assign(rng.normal(0, 1, (5, len(OPS))))
    model.enter_stage(1)
    values = {t: model.alphas[t].numpy().astype(np.float64) for t in ("normal", "reduce")}
    masks = {t: model.kept_masks[t].numpy() for t in values}
    assert all(m.sum(axis=1).tolist() == [2] * 5 for m in masks.values())

    def kept_mean(cell_type, a):  # the Dirichlet's mean over the kept ops: (elu(a) + 1) / its sum, by hand
        return np.where(a > 0, a + 1, np.exp(a)) * masks[cell_type]

    got = latency.ExpectedLatency(model, spec, table)([tf.convert_to_tensor(v) for v in model.arch_variables])
    np.testing.assert_allclose(float(got), numpy_expected(values, table["entries"], weigh=kept_mean), rtol=1e-5)


@pytest.mark.parametrize("loss", ["mul_log", "add_linear"])
def test_the_latency_losses_alpha_gradient_matches_central_differences_of_proxylessnas_objective(float64, loss):
    """J = 0.2 CE (log E / log T)^0.3 or CE + 0.1 (E - T) / T, with CE a stand-in function of alpha."""
    spec = latency_spec(loss=loss, target_ms=1.5)
    model = kd.build_supernet(spec, seed=0)
    table = {"entries": random_table(2)}
    term = latency.LatencyLoss(model, spec, table)
    rng = np.random.default_rng(3)
    values = {t: rng.normal(0, 1, (5, len(OPS))) for t in ("normal", "reduce")}

    def task_loss(a):  # any smooth function of the alphas will do
        return 2.0 + np.sum(np.sin(a["normal"])) * 0.1 + np.sum(a["reduce"] ** 2) * 0.05

    def objective(a):
        e = numpy_expected(a, table["entries"])
        if loss == "mul_log":
            return 0.2 * task_loss(a) * (np.log(e) / np.log(1.5)) ** 0.3
        return task_loss(a) + 0.1 * (e - 1.5) / 1.5

    task_gradient = [0.1 * np.cos(values["normal"]), 0.1 * values["reduce"]]
    alphas = [tf.constant(values["normal"]), tf.constant(values["reduce"])]
    got, expected = term.apply([tf.constant(g) for g in task_gradient], tf.constant(task_loss(values)), alphas)
    np.testing.assert_allclose(float(expected), numpy_expected(values, table["entries"]), rtol=1e-10)
    h = 1e-6
    for index, cell_type in enumerate(("normal", "reduce")):
        numeric = np.zeros_like(values[cell_type])
        for position in np.ndindex(numeric.shape):
            plus = {t: v.copy() for t, v in values.items()}
            minus = {t: v.copy() for t, v in values.items()}
            plus[cell_type][position] += h
            minus[cell_type][position] -= h
            numeric[position] = (objective(plus) - objective(minus)) / (2 * h)
        np.testing.assert_allclose(got[index].numpy(), numeric, rtol=1e-6, atol=1e-9)


def test_the_tables_latency_of_a_derived_network_sums_its_chosen_ops_and_fixed_blocks():
    spec = latency_spec()
    table = {"entries": random_table(4)}
    rng = np.random.default_rng(5)
    alphas = {t: rng.normal(0, 1, (5, len(OPS))) for t in ("normal", "reduce")}
    derived = derived_spec_from_search(spec, alphas)
    fixed, layout = hand_keys()
    by_hand = sum(table["entries"][k] for k in fixed)
    for cell_type, edges in layout:
        for offset, node in enumerate(derived.cells[cell_type].nodes):
            for edge in node:
                chosen = edges[(edge.input, offset + 2)][edge.op]
                by_hand += table["entries"][chosen] if chosen else 0.0
    assert latency.derived_latency(spec, table, derived) == pytest.approx(by_hand, rel=1e-12)
    assert latency.table_latency(derived, table) == pytest.approx(by_hand, rel=1e-12)


def write_table(path, entries, form="plain"):
    document = {k: ({"mean": v} if form == "mean" else v) for k, v in entries.items()}
    path.write_text(dump_yaml(document) if str(path).endswith(".yaml") else json.dumps(document))
    return path


def test_a_users_table_is_read_in_either_form_relative_to_the_spec_and_kept_in_the_run(tmp_path):
    entries = random_table(6)
    write_table(tmp_path / "phone.json", entries, form="mean")
    document = tiny_spec_document()
    document["search"]["latency"] = {"target_ms": 2.0, "table": "phone.json"}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(dump_yaml(document))
    spec = kd.load_spec(str(spec_path))
    table = latency.latency_table(spec, str(tmp_path / "run"))
    assert table["entries"] == entries
    assert table["source"] == str(tmp_path / "phone.json")
    kept = json.loads((tmp_path / "run" / "search" / "latency_table.json").read_text())
    assert kept["entries"] == entries
    (tmp_path / "phone.json").unlink()  # a resumed search reads the run's copy
    assert latency.latency_table(spec, str(tmp_path / "run"))["entries"] == entries


def test_a_table_lacking_blocks_or_holding_a_non_number_is_refused_naming_the_file(tmp_path):
    entries = random_table(7)
    document = tiny_spec_document()
    document["search"]["latency"] = {"target_ms": 2.0, "table": str(tmp_path / "t.yaml")}
    spec = kd.load_spec(document)
    missing = dict(entries)
    del missing["head-input:2x2x32-output:10"]
    write_table(tmp_path / "t.yaml", missing)
    with pytest.raises(SpecError) as caught:
        latency.latency_table(spec)
    assert str(caught.value) == (f"{tmp_path / 't.yaml'}: $: the table lacks 1 block(s) this spec's network runs: "
                                 "head-input:2x2x32-output:10 (keras-darts latency-table writes every key)")
    write_table(tmp_path / "t.yaml", {**entries, "head-input:2x2x32-output:10": "fast"})
    with pytest.raises(SpecError) as caught:
        latency.latency_table(spec)
    assert str(caught.value) == (f"{tmp_path / 't.yaml'}: $.head-input:2x2x32-output:10: expected milliseconds (a "
                                 "number >= 0, or {mean: ms}); got 'fast'")


def test_latency_settings_its_losses_cannot_use_are_refused_with_the_field():
    document = tiny_spec_document()
    document["search"]["latency"] = {"target_ms": 0.8}
    with pytest.raises(SpecError) as caught:
        kd.load_spec(document)
    assert str(caught.value) == ("<dict>: $.search.latency.target_ms: loss mul_log divides by log(target_ms), which "
                                 "needs target_ms > 1; got 0.8 (use loss: add_linear for a target of 1 ms or less)")
    document["search"]["latency"] = {"target_ms": 0.8, "loss": "add_linear", "network": "deployed"}
    document["retrain"]["enabled"] = False
    with pytest.raises(SpecError, match=r"\$\.search\.latency\.network: the deployed network is the retraining's"):
        kd.load_spec(document)
    document["search"]["latency"] = {"loss": "add_linear"}
    with pytest.raises(SpecError, match=r"target_ms"):
        kd.load_spec(document)


def test_measuring_times_every_block_in_a_fresh_process_and_a_second_spec_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_DARTS_CACHE", str(tmp_path / "cache"))
    document = tiny_spec_document(operations=["none", "skip_connect", "max_pool_3x3"])
    document["search"]["latency"] = {"target_ms": 2.0, "runs": 5}
    spec = kd.load_spec(document)
    table = latency.latency_table(spec)
    plan = latency.plan_for(spec)
    assert set(table["entries"]) == set(plan.blocks)
    assert all(np.isfinite(v) and v > 0 for v in table["entries"].values())
    cached = os.listdir(tmp_path / "cache" / "latency")
    assert len(cached) == 1 and cached[0].startswith("tflite_cpu-")

    def refuse(blocks, runs):
        raise AssertionError(f"measured again: {sorted(blocks)}")

    monkeypatch.setattr(latency, "measure", refuse)
    assert latency.latency_table(spec)["entries"] == table["entries"]
    output = tmp_path / "table.yaml"  # the command writes the cached entries as a table file
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(dump_yaml(document))
    assert main(["latency-table", str(spec_path), "--output", str(output)]) == 0
    assert kd.spec.read_yaml_file(str(output)) == table["entries"]


def test_a_latency_aware_search_records_both_latencies_and_exports_the_tables_figure(tmp_path):
    entries = random_table(8)
    document = tiny_spec_document()
    document["search"].update(epochs=1, steps_per_epoch=2, order="first",
                              latency={"target_ms": 1.5, "table": str(write_table(tmp_path / "t.json", entries))})
    document["export"] = {"formats": ["saved_model"]}
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(dump_yaml(document))
    run_dir = tmp_path / "out"
    assert compile_and_search_main([str(spec_path), "--run-dir", str(run_dir), "--no-progress"]) == 0
    history = json.loads((run_dir / "search" / "history.json").read_text())
    derived = kd.load_derived(str(run_dir / "derived.yaml"))
    by_table = latency.table_latency(derived, {"entries": entries})
    assert history[-1]["table_latency_ms"] == pytest.approx(by_table, rel=1e-12)
    # The epoch's mean expected latency lies between the table's cheapest and dearest architectures.
    assert sum(entries[k] for k in hand_keys()[0]) < history[-1]["expected_latency_ms"] < sum(entries.values())
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert report["network"]["latency_table_ms"] == pytest.approx(by_table, rel=1e-12)
