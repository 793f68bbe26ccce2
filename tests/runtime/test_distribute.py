"""tf.distribute: two logical CPUs (mirrored) and two worker processes on localhost (multi_worker)
compute the same search as one device on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import keras_darts as kd
from keras_darts.runtime.distribution import check_batch
from keras_darts.runtime.search_loop import search
from keras_darts.spec import SpecError, dump_yaml
from tests.conftest import tiny_spec_document

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def document(order):
    doc = tiny_spec_document()
    doc["search"].update({"epochs": 1, "steps_per_epoch": 3, "order": order, "deterministic": True,
                          "diagnostics": {"hessian_eigenvalue": False}})
    doc["retrain"]["enabled"] = False
    return doc


MIRRORED_CHILD = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
import keras_darts as kd
from keras_darts.runtime.search_loop import search
from keras_darts.runtime.distribution import make_strategy
out = {}
strategy = None
for order, doc in json.loads(sys.argv[1]).items():
    doc["distribute"] = {"strategy": "mirrored", "devices": ["/cpu:0", "/cpu:1"]}
    spec = kd.load_spec(doc)
    # One strategy per process: its collective instances are numbered process-wide.
    strategy = strategy or make_strategy(spec.distribute)
    result = search(spec, strategy=strategy)
    out[order] = {"alphas": {t: a.tolist() for t, a in result.alphas.items()},
                  "derived": result.derived.to_document()["cells"],
                  "train_loss": result.history[-1]["train_loss"]}
print(json.dumps(out))
"""


def child_env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}


def test_mirrored_on_two_logical_cpus_equals_one_device():
    documents = {order: document(order) for order in ("first", "second")}
    done = subprocess.run([sys.executable, "-c", MIRRORED_CHILD, json.dumps(documents)], capture_output=True,
                          text=True, env=child_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    mirrored = json.loads(done.stdout.strip().splitlines()[-1])
    for order, doc in documents.items():
        single = search(kd.load_spec(doc))
        for cell_type, alpha in single.alphas.items():
            np.testing.assert_allclose(np.array(mirrored[order]["alphas"][cell_type]), alpha, rtol=0, atol=1e-5)
        # The alphas moved (Adam steps of 3e-4), so the comparison above could fail.
        assert np.abs(single.alphas["normal"]).max() > 5e-4
        assert mirrored[order]["derived"] == single.derived.to_document()["cells"]
        assert mirrored[order]["train_loss"] == pytest.approx(single.history[-1]["train_loss"], rel=1e-5)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_multi_worker_on_localhost_equals_one_device(tmp_path):
    doc = document("second")
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(dump_yaml(doc))
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    code = "from keras_darts.runtime.cli import compile_and_search_main; raise SystemExit(compile_and_search_main())"
    processes = []
    for index in range(2):
        env = {**child_env(), "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                                       "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(
            [sys.executable, "-c", code, str(spec_path), "--run-dir", str(tmp_path / f"run{index}"), "--search-only",
             "--distribute", "multi_worker", "--no-progress"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=600) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, results):
        assert p.returncode == 0, err[-3000:]
    assert not (tmp_path / "run1").exists()  # only the chief writes
    single = search(kd.load_spec(doc))
    with np.load(tmp_path / "run0" / "search" / "alphas.npz") as alphas:
        for cell_type, alpha in single.alphas.items():
            np.testing.assert_allclose(alphas[cell_type], alpha, rtol=0, atol=1e-5)
    derived = kd.load_derived(str(tmp_path / "run0" / "derived.yaml"))
    assert derived.cells == single.derived.cells


def test_global_batch_must_split_over_the_replicas():
    class ThreeReplicas:
        num_replicas_in_sync = 3

    spec = kd.load_spec(document("first"))
    with pytest.raises(SpecError) as excinfo:
        check_batch(spec, ThreeReplicas())
    assert str(excinfo.value) == (
        "<dict>: $.data.batch_size: 32 does not split evenly over 3 replicas; use a multiple of 3"
    )
    check_batch(spec, None)
