"""TensorFlow's CPU threads: distribute.threads, its auto choice, and what the run gets."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_darts as kd
from keras_darts.runtime import determinism
from keras_darts.spec import SpecError
from tests.conftest import tiny_spec_document


def spec_with(threads=None, deterministic=False):
    document = tiny_spec_document()
    if threads is not None:
        document["distribute"] = {"threads": threads}
    document["search"]["deterministic"] = deterministic
    return kd.load_spec(document)


def without_thread_variables():
    """This process' environment without TensorFlow's thread variables, for a child process."""
    return {k: v for k, v in os.environ.items() if k not in determinism.THREAD_VARIABLES}


@pytest.fixture
def machine(monkeypatch):
    """A machine of ``cores`` CPU cores, with or without a GPU, and no thread variables in the environment."""
    for name in determinism.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def make(cores, gpu=False):
        monkeypatch.setattr(determinism, "cores", lambda: cores)
        devices = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")] if gpu else []
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: devices if kind == "GPU" else [])

    return make


@pytest.mark.parametrize("cores, expected", [(1, (1, 1)), (2, (2, 1)), (4, (4, 1)), (5, (0, 0)), (64, (0, 0))])
def test_auto_runs_one_thread_per_kernel_and_a_kernel_per_core_on_cpu_only_machines_of_up_to_four_cores(
        machine, cores, expected):
    machine(cores)
    assert determinism.auto_kernel_threads() == expected
    assert determinism.kernel_threads(spec_with()) == expected


def test_auto_leaves_tensorflows_threads_with_a_gpu_or_with_the_thread_variables_set(machine, monkeypatch):
    machine(2, gpu=True)
    assert determinism.kernel_threads(spec_with()) == (0, 0)
    machine(2)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "2")
    assert determinism.kernel_threads(spec_with()) == (0, 0)


def test_numbers_in_the_spec_are_taken_as_they_are_and_auto_fills_the_other(machine):
    machine(2)
    assert determinism.kernel_threads(spec_with({"inter_op": 3, "intra_op": 2})) == (3, 2)
    assert determinism.kernel_threads(spec_with({"inter_op": 0, "intra_op": 0})) == (0, 0)
    assert determinism.kernel_threads(spec_with({"intra_op": 2})) == (2, 2)
    assert determinism.kernel_threads(spec_with({"inter_op": 1})) == (1, 1)


def test_a_deterministic_run_runs_one_kernel_at_a_time_with_tensorflows_or_the_specs_intra_op_threads(machine):
    machine(2)
    assert determinism.kernel_threads(spec_with(deterministic=True)) == (1, 0)
    assert determinism.kernel_threads(spec_with({"inter_op": 1, "intra_op": 2}, deterministic=True)) == (1, 2)


def test_a_deterministic_spec_asking_for_concurrent_kernels_is_rejected_naming_the_field():
    with pytest.raises(SpecError) as error:
        spec_with({"inter_op": 2}, deterministic=True)
    assert [str(problem) for problem in error.value.problems] == [
        "<dict>: $.distribute.threads.inter_op: $.search.deterministic runs one kernel at a time, so expected "
        "auto or 1, got 2"]


@pytest.mark.parametrize("value, message", [
    (-1, "expected 'auto' or an integer >= 0, got integer -1"),
    ("many", "expected 'auto' or an integer >= 0, got string 'many'"),
])
def test_a_thread_count_must_be_auto_or_a_whole_number(value, message):
    with pytest.raises(SpecError) as error:
        spec_with({"intra_op": value})
    assert [str(problem) for problem in error.value.problems] == [f"<dict>: $.distribute.threads.intra_op: {message}"]


# In a fresh process: compile-and-search's entry point, with the run itself replaced by a report of the threads
# TensorFlow runs with (its runtime started first, as the run would start it).
RUN_REPORTING_THREADS = """
import json, logging, sys
import tensorflow as tf
import keras_darts as kd
from keras_darts.runtime import workflow

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
def report(*args):
    tf.constant(1.0) + 1.0  # the runtime starts
    print(json.dumps([tf.config.threading.get_inter_op_parallelism_threads(),
                      tf.config.threading.get_intra_op_parallelism_threads()]))
workflow._run = report
workflow.run_compile_and_search(kd.load_spec(json.loads(sys.argv[1])), "unused")
"""


def test_compile_and_search_gives_tensorflow_the_specs_threads_before_its_runtime_starts():
    environment = without_thread_variables()
    cores = determinism.cores()
    auto = (cores, 1) if cores <= determinism.ONE_THREAD_PER_KERNEL_CORES and not tf.config.list_physical_devices(
        "GPU") else (0, 0)
    for threads, expected, line in [
        ({}, auto, f"threads: {cores} kernels at once, 1 thread each (distribute.threads; {cores} CPU cores)"
         if auto != (0, 0) else None),
        ({"inter_op": 1, "intra_op": 1}, (1, 1), f"threads: 1 kernel at once, 1 thread each (distribute.threads; "
                                                 f"{cores} CPU cores)"),
        ({"inter_op": 3, "intra_op": 2}, (3, 2), f"threads: 3 kernels at once, 2 threads each (distribute.threads; "
                                                 f"{cores} CPU cores)"),
    ]:
        document = tiny_spec_document()
        document["distribute"] = {"threads": threads}
        done = subprocess.run([sys.executable, "-c", RUN_REPORTING_THREADS, json.dumps(document)],
                              capture_output=True, text=True, env=environment)
        assert done.returncode == 0, done.stderr[-2000:]
        *lines, last = done.stdout.strip().splitlines()
        assert tuple(json.loads(last)) == expected
        assert lines == ([line] if line else [])


# In a fresh process with the threads given, the tiny search's gradients at its seeded start on fixed batches:
# the weights' (training batch), the first-order and the second-order (finite differences) architecture
# gradients. To a file.
GRADIENTS = """
import json, sys
from keras_darts.runtime.determinism import set_kernel_threads
set_kernel_threads(int(sys.argv[2]), int(sys.argv[3]))
import keras
import numpy as np
import tensorflow as tf
import keras_darts as kd
from keras_darts.runtime.search_loop import build_search

spec = kd.load_spec(json.loads(sys.argv[1]))
keras.utils.set_random_seed(spec.search.seed)  # as the search seeds its supernet
bilevel = build_search(spec)
bilevel.fix_batch_size(32)
generator = tf.random.Generator.from_seed(0)
train, val = [(generator.normal((32, 8, 8, 1)), generator.uniform((32,), 0, 10, tf.int32)) for _ in range(2)]
weights, alphas = bilevel.current_weights(), bilevel.current_alphas()
second = tf.function(lambda: bilevel.arch_gradient("second", "finite_difference", train, val, tf.constant(0.025))[0])
arrays = {"start": weights,
          "weights_gradient": bilevel.gradients_at(weights, alphas, train)[2],
          "first_gradient": tf.function(lambda: bilevel.first_order_gradient(val)[0])(),
          "second_gradient": second()}
np.savez(sys.argv[4], **{f"{name}/{i:04d}": np.asarray(a) for name, values in arrays.items()
                         for i, a in enumerate(values)})
print(json.dumps([tf.config.threading.get_inter_op_parallelism_threads(),
                  tf.config.threading.get_intra_op_parallelism_threads()]))
"""


def test_one_thread_per_kernel_computes_the_gradients_that_tensorflows_own_threads_compute(tmp_path):
    document = json.dumps(tiny_spec_document())
    environment = without_thread_variables()
    results = {}
    for name, inter, intra in [("one_per_kernel", 2, 1), ("tensorflows", 0, 0)]:
        path = tmp_path / f"{name}.npz"
        done = subprocess.run([sys.executable, "-c", GRADIENTS, document, str(inter), str(intra), str(path)],
                              capture_output=True, text=True, env=environment)
        assert done.returncode == 0, done.stderr[-2000:]
        assert tuple(json.loads(done.stdout.strip().splitlines()[-1])) == (inter, intra)
        with np.load(path) as arrays:
            results[name] = {}
            for key in sorted(arrays.files):
                results[name].setdefault(key.split("/")[0], []).append(arrays[key])
    mine, theirs = results["one_per_kernel"], results["tensorflows"]
    for a, b in zip(mine["start"], theirs["start"], strict=True):  # the same seeded supernet
        np.testing.assert_array_equal(a, b)
    parts = ("weights_gradient", "first_gradient", "second_gradient")
    assert len(theirs["weights_gradient"]) == len(theirs["start"])
    assert min(float(np.abs(g).max()) for part in parts for g in theirs[part]) > 1e-5  # none is zero
    # Kernels split over other threads sum in another order: float32 rounding apart (up to 9e-6 of a tensor's
    # largest entry measured on the development machine), the same values ...
    for part in parts[:2]:
        for a, b in zip(mine[part], theirs[part], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5 * float(np.abs(b).max()), err_msg=part)
    # ... where finite differences divide a difference of two passes by 2 epsilon (0.01 / |v|), the rounding
    # grows to about 1e-3 of the gradient (2.8e-3 of its largest entry measured on the development machine).
    for a, b in zip(mine["second_gradient"], theirs["second_gradient"], strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2 * float(np.abs(b).max()))
