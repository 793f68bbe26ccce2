"""A trial: what one recurrent search pass costs, and whether two independent passes share the cores.

At the RNN configuration of ``bench_search.py`` (64 units, batch 16, 35
steps, 1,000 words), it times, alternately in one process, the median of
``--rounds`` calls of each:

- ``full``: one pass with weight and alpha gradients (as the virtual step's);
- ``alpha``: one pass with alpha gradients only (as each perturbed pass);
- ``two at once``: two alpha-only passes at different weights, neither
  waiting for the other;
- ``two in turn``: the same, the second waiting for the first.

    python benchmarks/trial_recurrent_passes.py

``--small-step concurrent`` (or ``sequential``) instead times a SMALL
second-order step (``bench_search.py``'s ``measure``) with the two perturbed
passes forced to run at once (or one after the other), in this process:

    python benchmarks/trial_recurrent_passes.py --small-step concurrent
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_search  # noqa: E402


def timed(call):
    started = time.perf_counter()
    for tensor in call():
        tensor.numpy()
    return time.perf_counter() - started


def recurrent_passes(rounds):
    import numpy as np
    import tensorflow as tf

    config = bench_search.CONFIGS["RNN"]
    size = config["hidden"]
    bilevel = bench_search.recurrent_search(config)
    tokens = tf.constant(np.random.default_rng(0).integers(0, config["vocabulary"],
                                                           (config["batch"], config["bptt"] + 1)), tf.int32)
    batch = (tokens[:, :-1], tokens[:, 1:], tf.zeros((config["batch"], size)), tf.constant([1, 0], tf.int32))
    weights, alphas = bilevel.current_weights(), bilevel.current_alphas()
    alpha_pass = bilevel.alpha_gradients_at

    def two(in_turn):
        @tf.function(autograph=False)
        def run():
            first = alpha_pass([w * 1.001 for w in weights], alphas, batch)[2]
            with tf.control_dependencies(first if in_turn else []):
                second_weights = [w * 0.999 for w in weights]
            return first + alpha_pass(second_weights, alphas, batch)[2]

        return run

    calls = {
        "full": tf.function(lambda: bilevel.gradients_at(weights, alphas, batch)[2:4], autograph=False),
        "alpha": tf.function(lambda: alpha_pass(weights, alphas, batch)[2], autograph=False),
        "two at once": two(False),
        "two in turn": two(True),
    }
    flat = {name: (lambda call=call: tf.nest.flatten(call())) for name, call in calls.items()}
    for call in flat.values():  # trace, build, and a warm call
        timed(call)
        timed(call)
    seconds = {name: [] for name in flat}
    for _ in range(rounds):
        for name, call in flat.items():
            seconds[name].append(timed(call))
    for name, values in seconds.items():
        print(f"{name:12s} {statistics.median(values):.4f} s (median of {rounds})")


def small_step(setting):
    from keras_darts.runtime.bilevel import Bilevel

    Bilevel.perturbed_passes_concurrent = property(lambda self: setting == "concurrent")
    row = bench_search.measure("SMALL", "second_order_fd", 1, 6)
    print(f"SMALL second order, perturbed passes {setting}: {row['median_seconds']:.3f} s/iter, first call "
          f"{row['first_call_seconds']:.1f} s, peak {row['peak_rss_gib']:.2f} GiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--small-step", choices=["concurrent", "sequential"])
    args = parser.parse_args()
    if args.small_step:
        small_step(args.small_step)
    else:
        recurrent_passes(args.rounds)


if __name__ == "__main__":
    main()
