"""Rebuild a quality measurement's working folder from the files committed beside this script, so that
`searches.sh OUT METHOD` (or `ptb.sh OUT`) adds a search without repeating the searches and
retrainings already measured.

    python benchmarks/quality/restore.py OUT [--part fashion_mnist | ptb]

writes, from `benchmarks/quality/PART/` (default `fashion_mnist`):

- `OUT/searches/<name>/derived.yaml` for every committed `<name>.derived.yaml` (`searches.sh` skips
  a search whose derived spec exists), beside the protocol's spec as `spec.yaml`, which marks the
  folder as a run directory for `keras-darts compare --run`;
- `OUT/compare/compare.json`, and for every candidate and seed in it the
  `candidates/<name>/seed_<s>/retrain/metrics.json` and `figures.json` that `keras-darts compare`
  reads to know that a retraining is done (it retrains only the seeds without them).

The restored searches keep only their derived specs: `collapse.py` needs their histories, so run it
on the new searches alone. Nothing is overwritten: OUT must not hold a comparison yet.
"""

import argparse
import json
import os
import shutil
import sys

from keras_darts.runtime.rundir import MARKER, atomic_write_text, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def restore(out, part="fashion_mnist"):
    committed = os.path.join(HERE, part)
    compare_dir = os.path.join(out, "compare")
    if os.path.exists(os.path.join(compare_dir, "compare.json")):
        sys.exit(f"error: {compare_dir}: holds a comparison already; restore into an empty OUT")
    with open(os.path.join(HERE, f"{part}.yaml"), encoding="utf-8") as spec:
        marker = ("# Restored by benchmarks/quality/restore.py: the protocol's spec, not the search's own\n"
                  "# settings (searches.sh lists them; derived.yaml's origin records the method).\n" + spec.read())
    for name in sorted(os.listdir(committed)):
        if name.endswith(".derived.yaml"):
            run = os.path.join(out, "searches", name[: -len(".derived.yaml")])
            os.makedirs(run, exist_ok=True)
            shutil.copyfile(os.path.join(committed, name), os.path.join(run, "derived.yaml"))
            atomic_write_text(os.path.join(run, MARKER), marker)  # marks a run directory
    with open(os.path.join(committed, "compare.json"), encoding="utf-8") as handle:
        document = json.load(handle)
    seeds = 0
    for name, entry in document["candidates"].items():
        folder = os.path.join(compare_dir, "candidates", name)
        if entry.get("figures"):
            write_json(os.path.join(folder, "figures.json"), entry["figures"])
        for seed, result in entry["seeds"].items():
            if "error" in result:  # a failed retraining is retried
                continue
            # What compare read from the retraining's metrics.json: test_<metric>, test_loss, parameters.
            metrics = {"test_loss": result["test_loss"], "parameters": result["parameters"]}
            metrics.update({f"test_{key}": value for key, value in result.items() if key not in metrics})
            write_json(os.path.join(folder, f"seed_{seed}", "retrain", "metrics.json"), metrics)
            seeds += 1
    write_json(os.path.join(compare_dir, "compare.json"), document)
    print(f"restored {len(document['candidates'])} candidates, {seeds} retrainings, into {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the measurement's working folder (searches.sh OUT or ptb.sh OUT)")
    parser.add_argument("--part", choices=("fashion_mnist", "ptb"), default="fashion_mnist",
                        help="the committed part to restore (default: fashion_mnist)")
    arguments = parser.parse_args()
    restore(arguments.out, arguments.part)


if __name__ == "__main__":
    main()
