"""``keras-darts compare``: random cells of a space, retraining under one protocol, failures, resume, the table."""

import collections
import itertools
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

import keras_darts as kd
from keras_darts.compiler import random_cell
from keras_darts.compiler.graph import cell_edges
from keras_darts.compiler.recurrent import recurrent_edges
from keras_darts.runtime import compare as comparison
from keras_darts.runtime.cli import compile_and_search_main, main
from keras_darts.runtime.kinds import ConvCellKind, kind_of
from keras_darts.spec import RunDirectoryError, dump_yaml
from tests.conftest import tiny_recurrent_document, tiny_spec_document

DARTS_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
             "dil_conv_3x3", "dil_conv_5x5")


def _draws(edges, k, count, seed=0):
    rng = np.random.default_rng(seed)
    return [random_cell(DARTS_OPS, edges, k, rng) for _ in range(count)]


def test_random_cells_keep_k_distinct_earlier_inputs_and_never_the_zero_op():
    for cell in _draws(cell_edges(4), 2, 200):
        assert cell.concat == (2, 3, 4, 5)
        for n, node in enumerate(cell.nodes):
            inputs = [edge.input for edge in node]
            assert len(set(inputs)) == 2 and all(0 <= i < n + 2 for i in inputs)
            assert all(edge.op in DARTS_OPS and edge.op != "none" for edge in node)
    for cell in _draws(recurrent_edges(5), 1, 100):  # the recurrent cell: one input per node, nodes from 1
        assert cell.concat == (1, 2, 3, 4, 5)
        assert [len(node) for node in cell.nodes] == [1] * 5
        assert all(node[0].input < n + 1 for n, node in enumerate(cell.nodes))


def test_random_cells_draw_every_input_set_and_op_equally_often():
    cells = _draws(cell_edges(4), 2, 4000, seed=11)
    for n in range(4):  # node n + 2 chooses 2 of its n + 2 inputs: every pair equally likely
        pairs = collections.Counter(tuple(edge.input for edge in cell.nodes[n]) for cell in cells)
        assert set(pairs) == set(itertools.combinations(range(n + 2), 2))
        if n:  # node 2 has one pair only
            assert stats.chisquare(list(pairs.values())).pvalue > 1e-3
    ops = collections.Counter(edge.op for cell in cells for node in cell.nodes for edge in node)
    assert set(ops) == set(DARTS_OPS) - {"none"}
    assert stats.chisquare(list(ops.values())).pvalue > 1e-3


def test_random_candidates_are_reproducible_from_their_seed_and_a_longer_list_extends_the_shorter():
    spec = kd.load_spec(tiny_spec_document())
    three = comparison.random_candidates(spec, 3, seed=5)
    five = comparison.random_candidates(spec, 5, seed=5)
    assert [c.derived.cells for c in three] == [c.derived.cells for c in five[:3]]
    assert [c.name for c in five] == ["random_00", "random_01", "random_02", "random_03", "random_04"]
    other = comparison.random_candidates(spec, 3, seed=6)
    assert [c.derived.cells for c in other] != [c.derived.cells for c in three]
    document = three[2].derived.to_document()
    assert document["origin"]["random"] == {"seed": 5, "index": 2}
    assert set(document["cells"]) == {"normal", "reduce"}
    # The retraining network of the spec, and a derived spec that validates on reading.
    assert document["network"]["init_channels"] == spec.retrain.init_channels
    assert kd.load_derived(document).cells == three[2].derived.cells


def test_candidate_names_repeat_with_a_number_and_runs_give_their_derived_spec(tmp_path):
    run = tmp_path / "my-search"
    run.mkdir()
    (run / "spec.yaml").write_text(dump_yaml(tiny_spec_document()))
    (run / "derived.yaml").write_text(dump_yaml(kd.load_derived("DARTS_V1").to_document()))
    candidates = comparison.unique_names(comparison.named_candidates([str(run)], ["DARTS_V2", "DARTS_V2"]))
    assert [c.name for c in candidates] == ["my-search", "DARTS_V2", "DARTS_V2-2"]
    assert candidates[0].derived.cells == kd.load_derived("DARTS_V1").cells
    assert candidates[0].source == str(run)


# -- one comparison on digits, shared by the tests below --------------------------------------------------
shares_the_comparison = pytest.mark.xdist_group("comparison")


def _failing_retrain(calls):
    """ConvCellKind.retrain, counting calls and failing for the derived spec named 'broken'."""
    original = ConvCellKind.retrain

    def retrain(self, spec, derived, data, **kwargs):
        calls.append((derived.name, spec.retrain.seed))
        if derived.name == "broken":
            raise RuntimeError("this candidate breaks")
        return original(self, spec, derived, data, **kwargs)

    return retrain


@pytest.fixture(scope="module")
def comparison_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    spec = kd.load_spec(tiny_spec_document())
    broken = kd.load_derived({**kd.load_derived("DARTS_V2").to_document(), "name": "broken"})
    candidates = comparison.unique_names(
        comparison.named_candidates(derived=["DARTS_V2", "DARTS_V2"]) + comparison.random_candidates(spec, 1, seed=0)
        + [comparison.Candidate("broken", "a test", broken)])
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConvCellKind, "retrain", _failing_retrain(calls))
        document = comparison.compare(spec, candidates, [0, 1], str(folder / "out"))
    return spec, candidates, folder / "out", document, calls


@shares_the_comparison
def test_identical_candidates_with_identical_seeds_give_identical_results_and_seeds_differ(comparison_run):
    _, _, _, document, _ = comparison_run
    first, second = document["candidates"]["DARTS_V2"]["seeds"], document["candidates"]["DARTS_V2-2"]["seeds"]
    for seed in ("0", "1"):
        assert first[seed]["accuracy"] == pytest.approx(second[seed]["accuracy"], abs=1e-6)
        assert first[seed]["test_loss"] == pytest.approx(second[seed]["test_loss"], rel=1e-5)
    assert first["0"]["test_loss"] != pytest.approx(first["1"]["test_loss"], rel=1e-3)  # the seed reaches training


@shares_the_comparison
def test_a_failing_candidate_is_reported_and_the_others_finish(comparison_run):
    _, _, out, document, calls = comparison_run
    broken = document["candidates"]["broken"]["seeds"]
    assert broken == {"0": {"error": "RuntimeError: this candidate breaks"},
                      "1": {"error": "RuntimeError: this candidate breaks"}}
    assert "Traceback" in (out / "candidates" / "broken" / "seed_0" / "error.txt").read_text()
    assert len(calls) == 8  # four candidates, two seeds each, in order
    for name in ("DARTS_V2", "DARTS_V2-2", "random_00"):
        assert set(document["candidates"][name]["seeds"]) == {"0", "1"}
        assert (out / "candidates" / name / "seed_1" / "retrain" / "model.keras").exists()
        assert not (out / "candidates" / name / "seed_1" / "retrain" / "checkpoints").exists()


@shares_the_comparison
def test_the_table_holds_each_candidates_mean_and_spread_over_its_seeds_metrics_files(comparison_run):
    _, _, out, document, _ = comparison_run
    kind = kind_of("conv_cell")
    rows = {row["candidate"]: row for row in comparison.summary_rows(kind, document)}
    for name in ("DARTS_V2", "random_00"):
        values = [json.loads((out / "candidates" / name / f"seed_{s}" / "retrain" / "metrics.json").read_text())
                  ["test_accuracy"] for s in (0, 1)]
        assert rows[name]["mean"] == pytest.approx((values[0] + values[1]) / 2)
        assert rows[name]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        figures = json.loads((out / "candidates" / name / "figures.json").read_text())
        assert rows[name]["parameters"] == figures["parameters"] > 0
    assert rows["broken"]["seeds"] == 0 and rows["broken"]["failed_seeds"] == [0, 1]
    # DARTS_V2's published normal cell: two skip connections, no pooling.
    assert (rows["DARTS_V2"]["skip_connections"], rows["DARTS_V2"]["parameter_free"]) == (2, 2)
    markdown = (out / "results.md").read_text().splitlines()
    table = [line for line in markdown if line.startswith("| ") and "candidate" not in line]
    order = [line.split(" | ")[0][2:] for line in table]
    means = [rows[name]["mean"] for name in order[:-1]]
    assert means == sorted(means, reverse=True) and order[-1] == "broken"  # best first, failures last
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("candidate,source,random,accuracy_mean,accuracy_std,seeds")
    assert len(csv_lines) == 5
    assert (out / "metric_vs_parameters.png").exists()


@shares_the_comparison
def test_a_comparison_resumes_retraining_only_what_is_missing(comparison_run):
    spec, candidates, out, document, _ = comparison_run
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ConvCellKind, "retrain", _failing_retrain(calls))
        again = comparison.compare(spec, candidates[:3], [0, 1, 2], str(out))
    # Seeds 0 and 1 are read back; only seed 2 is retrained, and the failed candidate (left out) is kept.
    assert calls == [("DARTS_V2", 2), ("DARTS_V2", 2), ("tiny-random_00", 2)]
    for name in ("DARTS_V2", "random_00"):
        for seed in ("0", "1"):
            assert again["candidates"][name]["seeds"][seed] == document["candidates"][name]["seeds"][seed]
    assert again["candidates"]["broken"]["seeds"]["0"] == {"error": "RuntimeError: this candidate breaks"}


@shares_the_comparison
def test_a_comparison_folder_refuses_another_spec_and_another_architecture_under_a_name(comparison_run):
    spec, candidates, out, _, _ = comparison_run
    other = kd.load_spec(tiny_spec_document(), overrides=["retrain.epochs=2"])
    with pytest.raises(RunDirectoryError) as error:
        comparison.compare(other, candidates[:1], [0], str(out))
    assert str(error.value) == (f"{out}: compare.json: holds a comparison under another spec or other settings "
                                f"(<dict> as it was then); its results would not compare with these; choose "
                                f"another --out or pass --overwrite")
    impostor = comparison.Candidate("DARTS_V2", "DARTS_V1", kd.load_derived("DARTS_V1"))
    with pytest.raises(RunDirectoryError, match="candidates/DARTS_V2/derived.yaml: holds another architecture "
                                                "than DARTS_V1"):
        comparison.compare(spec, [impostor], [0], str(out))


def test_the_plot_gives_every_named_candidate_its_own_look_and_none_the_random_cells_grey(monkeypatch):
    from matplotlib.colors import to_rgb

    from keras_darts.runtime import figures

    drawn = []
    monkeypatch.setattr(figures, "save", lambda figure, base: drawn.append(figure) or [])
    rows = [{"candidate": f"random_{i}", "random": True, "seeds": 3, "parameters": 100 + i, "mean": 0.5,
             "std": 0.1} for i in range(3)]
    rows += [{"candidate": f"method_{i}", "random": False, "seeds": 3, "parameters": 200 + i, "mean": 0.6,
              "std": float("nan") if i == 0 else 0.1} for i in range(12)]  # more than tab10 has colours
    comparison.plot(ConvCellKind(), rows, "unused")
    (axes,) = drawn[0].axes
    looks = {}
    for container in axes.containers:
        line = container.lines[0]
        looks.setdefault(tuple(np.round(to_rgb(line.get_color()), 3)), []).append(line.get_marker())
    grey = tuple(np.round(to_rgb("0.6"), 3))
    assert looks.pop(grey) == ["o"] * 3  # the random cells, and only they, in grey
    named = [(colour, marker) for colour, markers in looks.items() for marker in markers]
    assert len(named) == 12 and len(set(named)) == 12
    assert all(max(c) - min(c) > 0.05 for c, _ in named)  # no named candidate in any grey, tab10's own included
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["random cells"] + [
        f"method_{i}" for i in range(12)]


def test_the_plot_sets_candidates_of_one_size_side_by_side_under_their_names(monkeypatch):
    from keras_darts.runtime import figures

    drawn = []
    monkeypatch.setattr(figures, "save", lambda figure, base: drawn.append(figure) or [])
    names = ["random_00", "searched", "random_01", "DARTS_V2_RNN"]
    rows = [{"candidate": name, "random": name.startswith("random"), "seeds": 3, "parameters": 1617680,
             "mean": 500.0 + 10 * i, "std": 5.0} for i, name in enumerate(names)]
    comparison.plot(kind_of("recurrent_cell"), rows, "unused")
    (axes,) = drawn[0].axes
    # One position per candidate, in the rows' order, each at its own mean; against parameters
    # they would all stand on one vertical line.
    points = [(float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0])) for c in axes.containers]
    assert points == [(0.0, 500.0), (1.0, 510.0), (2.0, 520.0), (3.0, 530.0)]
    assert [t.get_text() for t in axes.get_xticklabels()] == names
    assert axes.get_xlabel() == "candidate (each with 1,617,680 parameters)"
    assert axes.get_ylabel() == "test perplexity"
    # Candidates of several sizes keep the parameter axis.
    rows[0]["parameters"] = 1000
    comparison.plot(kind_of("recurrent_cell"), rows, "unused")
    assert float(drawn[1].axes[0].containers[0].lines[0].get_xdata()[0]) == 1000.0
    assert drawn[1].axes[0].get_xlabel() == "parameters"


def test_against_random_counts_beaten_cells_and_tests_the_difference_with_welch():
    kind = kind_of("conv_cell")
    rows = [{"candidate": "searched", "random": False, "seeds": 3, "mean": 0.9, "values": [0.89, 0.9, 0.91]},
            *({"candidate": f"r{i}", "random": True, "seeds": 3, "mean": m, "values": [m]}
              for i, m in enumerate([0.8, 0.82, 0.85, 0.95]))]
    (item,) = comparison.against_random(kind, rows)
    assert (item["beats"], item["of"]) == (3, 4)
    a, b = np.array([0.89, 0.9, 0.91]), np.array([0.8, 0.82, 0.85, 0.95])
    se = math.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 4)
    t = (a.mean() - b.mean()) / se
    df = se ** 4 / ((a.var(ddof=1) / 3) ** 2 / 2 + (b.var(ddof=1) / 4) ** 2 / 3)  # Welch-Satterthwaite
    assert item["p"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert item["beyond_spread"] is (item["p"] < 0.05)
    perplexity = kind_of("recurrent_cell")  # lower is better
    (item,) = comparison.against_random(perplexity, rows)
    assert item["beats"] == 1 and not item["better"]


def test_recurrent_cells_compare_by_perplexity(tmp_path, cyclic_corpus):
    spec = kd.load_spec(tiny_recurrent_document(cyclic_corpus))
    candidates = comparison.random_candidates(spec, 2, seed=1)
    assert all(set(c.derived.cells) == {"recurrent"} for c in candidates)
    document = comparison.compare(spec, candidates, [3], str(tmp_path / "out"))
    kind = kind_of(spec)
    rows = comparison.summary_rows(kind, document)
    for row in rows:
        metrics = json.loads((tmp_path / "out" / "candidates" / row["candidate"] / "seed_3" / "retrain" /
                              "metrics.json").read_text())
        assert row["mean"] == pytest.approx(metrics["test_perplexity"])
        assert row["multiply_adds"] > 0
    lines = comparison.table_lines(kind, rows)
    assert lines[0].split()[:4] == ["candidate", "source", "test", "perplexity"]
    best = min(rows, key=lambda r: r["mean"])["candidate"]
    assert lines[1].startswith(best)  # lowest perplexity first


def test_the_command_refuses_bad_counts_and_an_empty_comparison(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(dump_yaml(tiny_spec_document()))
    assert main(["compare", str(spec), "--seeds", "0", "--random", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {spec}: --seeds: must be at least 1"
    assert main(["compare", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: {spec}: candidates: nothing to compare: name runs (--run), derived specs or published "
        f"architectures (--derived), or random cells (--random N)")
    assert not os.path.exists(tmp_path / "out")


def test_a_search_ends_comparing_its_cell_with_random_cells_reusing_its_own_retraining(tmp_path, capsys):
    document = tiny_spec_document()
    document["search"]["epochs"] = 1
    document["retrain"].update(compare_random=2, compare_seeds=2)
    document["export"] = {"enabled": False}
    spec = tmp_path / "tiny.yaml"
    spec.write_text(dump_yaml(document))
    run = tmp_path / "run"
    assert compile_and_search_main([str(spec), "--run-dir", str(run), "--no-progress"]) == 0
    result = json.loads((run / "compare" / "compare.json").read_text())
    searched = result["candidates"]["searched"]["seeds"]
    own = json.loads((run / "retrain" / "metrics.json").read_text())
    # Seed 0 is the run's own retraining, read and not repeated; seed 1 retrained in the comparison.
    assert searched["0"]["accuracy"] == own["test_accuracy"]
    assert not (run / "compare" / "candidates" / "searched" / "seed_0").exists()
    assert (run / "compare" / "candidates" / "searched" / "seed_1" / "retrain" / "metrics.json").exists()
    assert sorted(result["candidates"]) == ["random_00", "random_01", "searched"]
    assert all(set(entry["seeds"]) == {"0", "1"} for entry in result["candidates"].values())
    # The random cells are the ones keras-darts compare draws from retrain.seed.
    drawn = comparison.random_candidates(kd.load_spec(str(spec)), 2, seed=0)
    for candidate in drawn:
        assert kd.load_derived(str(run / "compare" / "candidates" / candidate.name / "derived.yaml")).cells == \
            candidate.derived.cells
    (item,) = result["summary"]["against_random"]
    printed = capsys.readouterr().out
    assert f"searched: {'better' if item['better'] else 'worse'} than the random cells' mean" in printed
    assert f"better than {item['beats']} of 2 random cells by mean" in printed


def test_random_cells_after_a_search_need_its_retraining(tmp_path):
    document = tiny_spec_document()
    document["retrain"].update(enabled=False, compare_random=2)
    with pytest.raises(kd.SpecError) as error:
        kd.load_spec(document)
    assert str(error.value) == ("<dict>: $.retrain.compare_random: the comparison with random cells follows the "
                                "retraining, but $.retrain.enabled is false; enable it or run keras-darts compare")
