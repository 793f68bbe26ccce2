"""``keras-darts compare``: architectures retrained under one budget and one set of seeds, side by side.

Candidates are derived specs: a run's ``derived.yaml``, a published
architecture or a derived spec file, and cells drawn uniformly at random from
a spec's search space (``random_candidates``). Every candidate is retrained
with the spec's ``retrain`` block (its network, epochs and optimiser), once
per seed, into its own folder:

    <out>/compare.json                     protocol, candidates, per-seed results
    <out>/results.csv, results.md          one row per candidate
    <out>/metric_vs_parameters.png|.svg    the test figure against parameters
    <out>/candidates/<name>/derived.yaml   the architecture retrained
    <out>/candidates/<name>/figures.json   its parameters and multiply-adds
    <out>/candidates/<name>/seed_<s>/retrain/   metrics.json, history, model.keras

A seed whose ``metrics.json`` exists is not retrained again, and a retraining
interrupted part-way resumes from its last epoch checkpoint; a candidate
that fails is reported (``seed_<s>/error.txt``) and the others go on.
"""

import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import traceback

import numpy as np

from keras_darts.spec import RunDirectoryError, SpecError, dump_yaml, load_derived

from . import rundir

log = logging.getLogger(__name__)

PROTOCOL = "compare.json"
RANDOM_PREFIX = "random_"


@dataclasses.dataclass
class Candidate:
    name: str
    source: str  # where it came from: a run directory, a published name, a file, "random (seed s, #i)"
    derived: object
    random: bool = False


# -- candidates ----------------------------------------------------------------------------------
def random_candidates(spec, count, seed=0):
    """``count`` architectures drawn uniformly from ``spec``'s space, the i-th from ``(seed, i)``.

    Each is a derived spec (the retraining network of ``spec``) whose cells
    follow DARTS' derivation rule (``compiler.random_cell``); a larger
    ``count`` with the same seed extends the same list.
    """
    from keras_darts.compiler import derived_spec_of, random_cell

    from .kinds import kind_of

    kind = kind_of(spec)
    space = spec.search_space
    edges = kind.alpha_edges(space.nodes)
    width = max(2, len(str(count - 1)))
    candidates = []
    for index in range(count):
        rng = np.random.default_rng((seed, index))
        genotype = {cell_type: random_cell(space.operations, edges, space.k, rng) for cell_type in kind.cell_types}
        origin = {"spec_name": spec.name, "spec_sha256": spec.sha256, "random": {"seed": seed, "index": index}}
        name = f"{RANDOM_PREFIX}{index:0{width}d}"
        derived = dataclasses.replace(derived_spec_of(spec, genotype, retrain=True, origin=origin),
                                      name=f"{spec.name}-{name}")
        candidates.append(Candidate(name, f"random (seed {seed}, #{index})", derived, random=True))
    return candidates


def named_candidates(runs=(), derived=()):
    """Candidates from run directories (their ``derived.yaml``) and derived specs (files or published names)."""
    candidates = []
    for run in runs:
        rundir.require_run(run, "derived.yaml")
        name = os.path.basename(os.path.normpath(run))
        candidates.append(Candidate(name, run, load_derived(os.path.join(run, "derived.yaml"))))
    for item in derived:
        name = os.path.splitext(os.path.basename(item))[0]
        candidates.append(Candidate(name, item, load_derived(item)))
    return candidates


def unique_names(candidates):
    """The candidates, a name that repeats getting ``-2``, ``-3``... (the folders are named after them)."""
    seen = {}
    for candidate in candidates:
        base = candidate.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            candidate.name = f"{base}-{seen[base]}"
    return candidates


# -- running ---------------------------------------------------------------------------------------
def seeds_of(spec, count):
    """The retraining seeds of a comparison: ``retrain.seed``, ``retrain.seed + 1``, ..."""
    return [spec.retrain.seed + i for i in range(count)]


def compare(spec, candidates, seeds, out_dir, overwrite=False, progress=False, data=None, done=None, figures=None):
    """Retrain every candidate once per seed under ``spec.retrain``; return the comparison's document.

    The document (also ``out_dir/compare.json``) holds the protocol, each
    candidate's per-seed test figures and failures, and its summary.
    ``done`` (``{(name, seed): run directory}``) names retrainings made
    elsewhere under the same settings, read instead of run; ``figures``
    (``{name: {"parameters": n, "multiply_adds": m}}``) sizes known already.
    """
    from .kinds import kind_of

    kind = kind_of(spec)
    done = done or {}
    for candidate in candidates:
        kind.check_retrainable(spec, candidate.derived)  # all of them, before anything runs
    _prepare(out_dir, spec, candidates, overwrite)
    document = _read_document(out_dir, spec, seeds)
    rundir.write_json(os.path.join(out_dir, PROTOCOL), _plain(document))  # first: the folder is a comparison's
    for name, sizes in (figures or {}).items():
        path = os.path.join(out_dir, "candidates", name, "figures.json")
        if not os.path.exists(path):
            rundir.write_json(path, sizes)
    for candidate in candidates:
        folder = os.path.join(out_dir, "candidates", candidate.name)
        rundir.write_yaml(os.path.join(folder, "derived.yaml"), candidate.derived.to_document())
        entry = document["candidates"].setdefault(candidate.name, {"source": candidate.source,
                                                                   "random": candidate.random, "seeds": {}})
        entry["collapse"] = kind.collapse(candidate.derived)
    _write_outputs(out_dir, kind, document)
    total = len(candidates) * len(seeds)
    count = 0
    for candidate in candidates:
        entry = document["candidates"][candidate.name]
        for seed in seeds:
            count += 1
            run_dir = done.get((candidate.name, seed)) or os.path.join(out_dir, "candidates", candidate.name,
                                                                        f"seed_{seed}")
            finished = _finished(run_dir, kind)
            if finished is not None:
                entry["seeds"][str(seed)] = finished
                continue
            log.info("compare [%d/%d]: %s, seed %d", count, total, candidate.name, seed)
            if data is None:
                data = kind.load_data(spec)
            entry["seeds"][str(seed)] = _retrain_one(spec, kind, candidate, seed, data, run_dir, progress)
            _write_outputs(out_dir, kind, document)
    _write_outputs(out_dir, kind, document, figures=True)
    return document


SEARCHED = "searched"


def compare_with_random(spec, run_dir, derived, retrained=None, data=None, progress=False):
    """A search's last step (``retrain.compare_random``): its cell against random cells of its space.

    The searched cell's retraining in ``run_dir/retrain`` is its first seed;
    ``retrain.compare_seeds`` more than one retrains it again with the next
    seeds. Random cells are drawn from ``retrain.seed``. Writes
    ``run_dir/compare``; returns the document.
    """
    from .kinds import kind_of

    config = spec.retrain
    figures = {}
    report = os.path.join(run_dir, "export", "report.json")
    if retrained is not None and retrained.model is not None:
        figures[SEARCHED] = {"parameters": int(retrained.parameters),
                             "multiply_adds": int(kind_of(spec).multiply_adds(retrained.model))}
    elif os.path.exists(report):
        network = rundir.read_json(report)["network"]
        figures[SEARCHED] = {"parameters": network["parameters"], "multiply_adds": network["multiply_adds"]}
    elif retrained is not None:  # resumed without the model or an export: the size the retraining recorded
        figures[SEARCHED] = {"parameters": int(retrained.parameters), "multiply_adds": None}
    candidates = [Candidate(SEARCHED, run_dir, derived)] + random_candidates(spec, config.compare_random,
                                                                              config.seed)
    return compare(spec, candidates, seeds_of(spec, config.compare_seeds), os.path.join(run_dir, "compare"),
                   progress=progress, data=data, done={(SEARCHED, config.seed): run_dir}, figures=figures)


def _retrain_one(spec, kind, candidate, seed, data, run_dir, progress):
    """Retrain one candidate with one seed; its figures, or the failure (the others go on)."""
    seeded = dataclasses.replace(spec, retrain=dataclasses.replace(spec.retrain, seed=seed))
    error_file = os.path.join(run_dir, "error.txt")
    try:
        result = kind.retrain(seeded, candidate.derived, data, run_dir=run_dir, progress=progress)
        figures_file = os.path.join(os.path.dirname(run_dir), "figures.json")
        if not os.path.exists(figures_file):
            rundir.write_json(figures_file, {"parameters": int(result.parameters),
                                             "multiply_adds": int(kind.multiply_adds(result.model))})
    except Exception as exc:  # noqa: BLE001 - one candidate's failure must not stop the others
        message = f"{type(exc).__name__}: {exc}"
        log.error("compare: %s, seed %d failed: %s (the others go on; %s holds the traceback)", candidate.name,
                  seed, message, error_file)
        rundir.atomic_write_text(error_file, traceback.format_exc())
        return {"error": message}
    if os.path.exists(error_file):
        os.unlink(error_file)
    shutil.rmtree(os.path.join(run_dir, "retrain", "checkpoints"), ignore_errors=True)  # resume only needs them
    return _finished(run_dir, kind)


def _finished(run_dir, kind):
    path = os.path.join(run_dir, "retrain", "metrics.json")
    if not os.path.exists(path):
        return None
    metrics = rundir.read_json(path)
    return {kind.metric: metrics[f"test_{kind.metric}"], "test_loss": metrics["test_loss"],
            "parameters": metrics["parameters"]}


def _prepare(out_dir, spec, candidates, overwrite):
    """Refuse a folder that holds another comparison (or other architectures under these names)."""
    path = os.path.join(out_dir, PROTOCOL)
    if not os.path.exists(path):
        if os.path.isdir(out_dir) and os.listdir(out_dir):  # not even --overwrite empties a folder of other things
            raise RunDirectoryError.single(out_dir, PROTOCOL, "missing, and the folder is not empty: not a "
                                           "comparison's folder; choose another --out")
        return
    if overwrite:
        shutil.rmtree(out_dir)
        return
    earlier = rundir.read_json(path)
    if earlier["protocol"]["spec_sha256"] != spec.sha256:
        raise RunDirectoryError.single(out_dir, PROTOCOL, f"holds a comparison under another spec or other "
                                       f"settings ({earlier['protocol']['spec']} as it was then); its results would not compare with "
                                       f"these; choose another --out or pass --overwrite")
    for candidate in candidates:
        derived = os.path.join(out_dir, "candidates", candidate.name, "derived.yaml")
        if os.path.exists(derived):
            with open(derived, encoding="utf-8") as handle:
                if handle.read() != dump_yaml(candidate.derived.to_document()):
                    raise RunDirectoryError.single(out_dir, f"candidates/{candidate.name}/derived.yaml",
                                                   f"holds another architecture than {candidate.source}; "
                                                   f"choose another --out or pass --overwrite")


def _read_document(out_dir, spec, seeds):
    path = os.path.join(out_dir, PROTOCOL)
    document = rundir.read_json(path) if os.path.exists(path) else {"candidates": {}}
    document["protocol"] = {"spec": spec.source, "spec_sha256": spec.sha256, "seeds": list(seeds),
                            "retrain": spec.document.get("retrain", {}) if spec.document else {},
                            "data": spec.document.get("data", {}) if spec.document else {}}
    return document


# -- the summary ------------------------------------------------------------------------------------
def summary_rows(kind, document):
    """One row per candidate: the test figure's mean, standard deviation (over seeds), and its size.

    Only the seeds of the latest call count; a candidate of an earlier call
    keeps its row, with the seeds it has of those.
    """
    rows = []
    seeds = {str(seed) for seed in document["protocol"]["seeds"]}  # those of the latest call, for every candidate
    for name, entry in document["candidates"].items():
        results = {seed: result for seed, result in entry["seeds"].items() if seed in seeds}
        values = [result[kind.metric] for result in results.values() if "error" not in result]
        failed = sorted(int(seed) for seed, result in results.items() if "error" in result)
        sizes = entry.get("figures") or {}
        rows.append({
            "candidate": name, "source": entry["source"], "random": entry["random"],
            "mean": float(np.mean(values)) if values else math.nan,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
            "seeds": len(values), "failed_seeds": failed, "values": values,
            "parameters": sizes.get("parameters"), "multiply_adds": sizes.get("multiply_adds"),
            **entry.get("collapse", {}),
        })
    return rows


def against_random(kind, rows):
    """Each searched or published candidate against the random cells: rank by mean and Welch's t-test.

    The test compares the candidate's per-seed figures with the random cells'
    means (one per cell: the population a random draw comes from); ``beyond
    spread`` means p < 0.05. Returns one dict per non-random candidate.
    """
    from scipy import stats

    randoms = [row for row in rows if row["random"] and row["seeds"]]
    means = [row["mean"] for row in randoms]
    lines = []
    if not means:
        return lines
    better = (lambda a, b: a > b) if kind.higher_is_better else (lambda a, b: a < b)
    for row in rows:
        if row["random"] or not row["seeds"]:
            continue
        beaten = sum(better(row["mean"], mean) for mean in means)
        p = math.nan
        if row["seeds"] > 1 and len(means) > 1:
            p = float(stats.ttest_ind(row["values"], means, equal_var=False).pvalue)
        lines.append({"candidate": row["candidate"], "beats": beaten, "of": len(means), "p": p,
                      "random_mean": float(np.mean(means)),
                      "random_std": float(np.std(means, ddof=1)) if len(means) > 1 else math.nan,
                      "better": better(row["mean"], float(np.mean(means))), "beyond_spread": p < 0.05})
    return lines


def table_lines(kind, rows, markdown=False):
    """The table as text: Markdown's pipes, or aligned columns for the terminal."""
    header = ["candidate", "source", f"test {kind.metric}", "seeds", "parameters", "multiply-adds",
              "skip, param-free"]
    body = []
    for row in sorted(rows, key=lambda r: _sort_key(kind, r)):
        figure = "-" if not row["seeds"] else kind.metric_format.format(row["mean"])
        if row["seeds"] > 1:
            figure += " ± " + kind.metric_format.format(row["std"])
        seeds = str(row["seeds"]) + (f" ({len(row['failed_seeds'])} failed)" if row["failed_seeds"] else "")
        body.append([row["candidate"], row["source"], figure, seeds,
                     "-" if row["parameters"] is None else f"{row['parameters']:,}",
                     "-" if row["multiply_adds"] is None else f"{row['multiply_adds']:,}",
                     f"{row.get('skip_connections', '-')}, {row.get('parameter_free', '-')}"])
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                *("| " + " | ".join(cells) + " |" for cells in body)]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in [header, *body]]


def comparison_lines(kind, rows):
    """Sentences on each non-random candidate against the random cells."""
    lines = []
    for item in against_random(kind, rows):
        verdict = "better" if item["better"] else "worse"
        spread = ("a difference beyond the seed-to-seed spread" if item["beyond_spread"] else
                  "within the seed-to-seed spread" if not math.isnan(item["p"]) else "too few seeds to test")
        lines.append(f"{item['candidate']}: {verdict} than the random cells' mean "
                     f"({kind.metric_format.format(item['random_mean'])}); better than {item['beats']} of "
                     f"{item['of']} random cells by mean; Welch's t-test p = {item['p']:.3f}, {spread}")
    return lines


def _sort_key(kind, row):
    if not row["seeds"]:
        return (1, 0.0)
    return (0, -row["mean"] if kind.higher_is_better else row["mean"])


def _write_outputs(out_dir, kind, document, figures=False):
    """compare.json, results.csv and results.md (and, at the end, the plot) from the document."""
    for name, entry in document["candidates"].items():
        path = os.path.join(out_dir, "candidates", name, "figures.json")
        if os.path.exists(path):
            entry["figures"] = rundir.read_json(path)
    rows = summary_rows(kind, document)
    document["summary"] = {"rows": [{k: v for k, v in row.items() if k != "values"} for row in rows],
                           "against_random": against_random(kind, rows)}
    rundir.write_json(os.path.join(out_dir, PROTOCOL), _plain(document))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["candidate", "source", "random", f"{kind.metric}_mean", f"{kind.metric}_std", "seeds",
                     "failed_seeds", "parameters", "multiply_adds", "skip_connections", "parameter_free", "values"])
    for row in rows:
        writer.writerow([row["candidate"], row["source"], row["random"], row["mean"], row["std"], row["seeds"],
                         " ".join(map(str, row["failed_seeds"])), row["parameters"] or "",
                         row["multiply_adds"] or "", row.get("skip_connections", ""), row.get("parameter_free", ""),
                         " ".join(f"{v:.6g}" for v in row["values"])])
    rundir.atomic_write_text(os.path.join(out_dir, "results.csv"), buffer.getvalue())
    protocol = document["protocol"]
    markdown = [f"Retrained with the `retrain` block of {protocol['spec']}, seeds {protocol['seeds']}; "
                f"mean ± standard deviation over seeds. Skip, param-free: the derived {kind.collapse_cell} cell's "
                f"{kind.skip_operation} edges and parameter-free ops ({', '.join(kind.parameter_free)}).", "",
                *table_lines(kind, rows, markdown=True)]
    sentences = comparison_lines(kind, rows)
    if sentences:
        markdown += ["", *(f"- {line}" for line in sentences)]
    rundir.atomic_write_text(os.path.join(out_dir, "results.md"), "\n".join(markdown) + "\n")
    if figures:
        plot(kind, rows, os.path.join(out_dir, "metric_vs_parameters"))


def _plain(value):
    """NaN as null, for strict JSON readers."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def plot(kind, rows, base):
    """The test figure (mean, with the seeds' standard deviation) against parameters; random cells in grey.

    When every candidate has the same number of parameters (recurrent cells: their weights do not
    depend on the ops), the candidates stand side by side instead, in the order of ``rows``.
    """
    from .figures import save, subplots

    shown = [row for row in rows if row["seeds"] and row["parameters"]]
    if not shown:
        return []
    import matplotlib

    one_size = len({row["parameters"] for row in shown}) == 1

    # Named candidates take tab10's colours without its grey (the random cells' colour); past nine
    # they repeat with another marker, so no two share a look.
    palette = [colour for i, colour in enumerate(matplotlib.colormaps["tab10"].colors) if i != 7]
    figure, axes = subplots(figsize=(6.4, 4.4))
    named = 0
    for position, row in enumerate(shown):
        if row["random"]:
            colour, marker = "0.6", "o"
        else:
            colour, marker = palette[named % len(palette)], "os^D"[named // len(palette) % 4]
            named += 1
        axes.errorbar(position if one_size else row["parameters"], row["mean"],
                      yerr=0.0 if math.isnan(row["std"]) else row["std"], fmt=marker, color=colour, capsize=3,
                      label=None if row["random"] else row["candidate"])
    if any(row["random"] for row in shown):
        axes.plot([], [], "o", color="0.6", label="random cells")
    if one_size:
        axes.set_xticks(range(len(shown)), [row["candidate"] for row in shown], rotation=45, ha="right", fontsize=7)
        axes.set_xlabel(f"candidate (each with {shown[0]['parameters']:,} parameters)")
    else:
        axes.set_xlabel("parameters")
    axes.set_ylabel(f"test {kind.metric}")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return save(figure, base)


def check_candidates(spec, candidates):
    """``SpecError`` for an empty comparison."""
    if not candidates:
        raise SpecError.single(spec.source, "candidates", "nothing to compare: name runs (--run), derived specs "
                               "or published architectures (--derived), or random cells (--random N)")
