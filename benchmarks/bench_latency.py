"""How well a latency table predicts the measured latency of whole derived networks.

For a spec with ``search.latency`` (the quickstart's, with a target, by
default), it takes the table a search would use (measured through the
TFLite interpreter on this machine, or the cache's), then for each of a few
architectures (derived from random alphas, seeds 0..N-1) builds the deployed
network, exports it as a SavedModel with its input normalisation, converts
it to a float32 TFLite file and times it as the table's blocks were timed
(batch 1, median of ``--runs`` invocations, in a fresh process). It prints
the table's sum, the measured latency and the error of each, with the
machine, and writes them to JSON.

    python benchmarks/bench_latency.py
    python benchmarks/bench_latency.py --spec my-search.yaml --architectures 8 --runs 100

Run it alone: other processes on the same cores make the figures worthless.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=os.path.join(HERE, "..", "examples", "quickstart.yaml"))
    parser.add_argument("--target-ms", type=float, default=1.5, help="search.latency.target_ms if the spec has none")
    parser.add_argument("--architectures", type=int, default=6)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--output", default=os.path.join(HERE, "results_latency_table.json"))
    args = parser.parse_args()

    from keras_darts.runtime.startup import import_tensorflow_quietly

    import_tensorflow_quietly()
    import numpy as np

    from keras_darts.compiler import build_network
    from keras_darts.compiler.derive import derived_spec_from_search
    from keras_darts.runtime import deploy, latency
    from keras_darts.runtime.export import export_saved_model
    from keras_darts.spec import load_spec

    spec = load_spec(args.spec)
    if spec.search.latency.target_ms is None:
        spec = load_spec(args.spec, [f"search.latency.target_ms={args.target_ms}"])
    table = latency.latency_table(spec)
    plan = latency.plan_for(spec)
    shape = (len(plan.edges), len(plan.operations))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for seed in range(args.architectures):
            rng = np.random.default_rng(seed)
            alphas = {t: rng.normal(0, 1, shape) for t in ("normal", "reduce")}
            derived = derived_spec_from_search(spec, alphas, retrain=spec.search.latency.network == "deployed")
            network = build_network(derived, seed=seed)
            depth = derived.network.input_shape[-1]
            saved = os.path.join(folder, f"net{seed}")
            export_saved_model(network, saved, [0.3] * depth, [0.3] * depth)  # with its input normalisation
            files[f"seed {seed}"] = deploy.write_tflite(saved, ["tflite"], saved)["tflite"]
            rows.append({"architecture": f"seed {seed}", "table_ms": latency.table_latency(derived, table),
                         "genotype": {t: c.to_document() for t, c in derived.cells.items()}})
        measured = latency.measure(files=files, runs=args.runs)
    for row in rows:
        row["measured_ms"] = measured[row["architecture"]]
        row["error"] = row["table_ms"] / row["measured_ms"] - 1
    print(f"{'architecture':<12} {'table ms':>9} {'measured ms':>12} {'error':>7}")
    for row in rows:
        print(f"{row['architecture']:<12} {row['table_ms']:>9.3f} {row['measured_ms']:>12.3f} {row['error']:>+7.1%}")
    errors = [row["error"] for row in rows]
    print(f"mean error {statistics.mean(errors):+.1%}, mean |error| {statistics.mean(abs(e) for e in errors):.1%}; "
          f"table {len(table['entries'])} blocks ({table['source']})")
    machine = {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "python": platform.python_version(), **(table.get("target") or {})}
    print(f"machine: {json.dumps(machine, sort_keys=True)}")
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump({"spec": spec.name, "runs": args.runs, "rows": rows, "machine": machine}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
