"""The collapse table of the quality measurement: the derived normal cell's skip connections and
parameter-free ops after every search epoch, one row per search, from each run's own history.

    python benchmarks/quality/collapse.py OUT/searches > OUT/collapse.md

Each search's ``search/history.json`` records, per epoch, the cell derived from the alphas at that
epoch's end (``skip_connections``, ``parameter_free``) and the validation accuracy of the supernet
(its perplexity for a recurrent search, whose counts are of the recurrent cell's identity ops).
"""

import argparse
import json
import os

ORDER = ("darts_2nd", "darts_1st", "pc_darts", "gdas", "snas", "fair_darts", "drnas", "sdarts", "beta_darts",
         "darts_minus", "lambda_darts", "darts_pt")


def searches(folder):
    """``(name, history)`` of every finished search (one with its derived spec) under ``folder``, in order."""
    names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n, "derived.yaml"))]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    for name in names:
        with open(os.path.join(folder, name, "search", "history.json"), encoding="utf-8") as f:
            yield name, json.load(f)


def table(folder):
    rows = list(searches(folder))
    epochs = max((len(history) for _, history in rows), default=0)
    recurrent = any("val_perplexity" in r for _, history in rows for r in history)
    shown_metric, shown = ("perplexity", "{:.1f}") if recurrent else ("accuracy", "{:.4f}")
    metric = f"val_{shown_metric}"
    lines = ["| search | " + " | ".join(f"epoch {e + 1}" for e in range(epochs))
             + f" | supernet val. {shown_metric} |",
             "|---|" + "---|" * (epochs + 1)]
    for name, history in rows:
        cells = [f"{r['skip_connections']}, {r['parameter_free']}" for r in history]
        cells += ["-"] * (epochs - len(cells))
        value = history[-1].get(metric) if history else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if value is None else shown.format(value)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder holding one run directory per search")
    print(table(parser.parse_args().folder))


if __name__ == "__main__":
    main()
