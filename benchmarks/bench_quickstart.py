"""The quickstart's wall time, this checkout against another, run alternately on one machine.

Issue 18's target compares the quickstart's wall time, from the command to the
exported SavedModel (installation excluded), with the code of 2026-12-02. This
machine's speed drifts by up to a third within an hour, so the two are timed
in the same hour, alternately (ABBA: this, other, other, this, ...), each a
fresh ``compile-and-search`` process of its own checkout's virtual
environment, in a run directory removed before each run. This checkout writes
the SavedModel only (``--set export.formats=[saved_model]``), as the code of
2026-12-02 did; the other runs its quickstart as it is.

Prints each run's seconds and test accuracy, and the ratio of the means and
of the medians; writes the runs to ``--output``:

    git worktree add /tmp/old 7fbc798 && (cd /tmp/old && python3 -m venv .venv && .venv/bin/pip install -e .)
    python benchmarks/bench_quickstart.py --other /tmp/old --pairs 2

Nothing else may run meanwhile (see ``benchmarks/README.md``).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def command(checkout, run_dir, saved_model_only):
    line = [os.path.join(checkout, ".venv", "bin", "compile-and-search"), "examples/quickstart.yaml",
            "--run-dir", run_dir]
    return line + (["--set", "export.formats=[saved_model]"] if saved_model_only else [])


def timed(checkout, saved_model_only, scratch):
    run_dir = os.path.join(scratch, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    finished = subprocess.run(command(checkout, run_dir, saved_model_only), cwd=checkout,
                              capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = (finished.stdout + finished.stderr).replace("\r", "\n")
    if finished.returncode != 0:
        raise SystemExit(f"{checkout}: exit {finished.returncode}\n{log[-2000:]}")
    accuracy = re.findall(r"test accuracy (\d\.\d+)", log)
    return {"seconds": round(seconds, 1), "test_accuracy": float(accuracy[-1]) if accuracy else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="the other checkout, with its own .venv")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "results_quickstart.json"))
    args = parser.parse_args()

    order = []
    for pair in range(args.pairs):  # ABBA: each side goes first as often as the other
        order += ["this", "other"] if pair % 2 == 0 else ["other", "this"]
    runs = {"this": [], "other": []}
    with tempfile.TemporaryDirectory() as scratch:
        for side in order:
            checkout = ROOT if side == "this" else os.path.abspath(args.other)
            result = timed(checkout, side == "this", scratch)
            result["at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            runs[side].append(result)
            print(f"{side:5s} {result['seconds']:7.1f} s  test accuracy {result['test_accuracy']}", flush=True)
    this = [r["seconds"] for r in runs["this"]]
    other = [r["seconds"] for r in runs["other"]]
    ratios = {"means": statistics.mean(this) / statistics.mean(other),
              "medians": statistics.median(this) / statistics.median(other)}
    print(f"this over other: {ratios['means']:.3f} (means), {ratios['medians']:.3f} (medians)")
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.abspath(args.other),
                              capture_output=True, text=True).stdout.strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # set only now, so the timed processes start as a user's
    from bench_search import machine  # after the runs: it imports TensorFlow into this process

    with open(args.output, "w") as handle:
        json.dump({"machine": machine(), "other": revision, "order": order, "runs": runs, "ratios": ratios},
                  handle, indent=2)
        handle.write("\n")


if __name__ == "__main__":
    main()
