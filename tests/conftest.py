import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

import pytest  # noqa: E402

from keras_darts.runtime.determinism import auto_kernel_threads, set_kernel_threads  # noqa: E402

# Before any test starts TensorFlow's runtime: the threads compile-and-search runs with on this machine
# (distribute.threads: auto).
set_kernel_threads(*auto_kernel_threads())


def tiny_spec_document(**search_space):
    """A search space small enough to compile and step in seconds (digits, 8x8x1)."""
    space = {
        "kind": "conv_cell",
        "operations": ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"],
        "nodes": 2,
        "k": 2,
        "reduction_cells": "thirds",
        "network": {"init_channels": 4, "layers": 3, "stem_multiplier": 2, "input_shape": [8, 8, 1], "num_classes": 10},
    }
    space.update(search_space)
    return {
        "version": 1,
        "name": "tiny",
        "search_space": space,
        "data": {"source": "digits", "batch_size": 32, "augment": {"random_crop": 0, "horizontal_flip": False}},
        "search": {"epochs": 2, "order": "second", "seed": 3},
        "retrain": {"epochs": 1, "batch_size": 64, "init_channels": 4, "layers": 3, "auxiliary": False,
                    "drop_path_prob": 0.1, "augment": {"random_crop": 0, "horizontal_flip": False, "cutout": 0}},
    }


@pytest.fixture
def float64():
    """Keras in float64 for the test, for gradient checks against finite differences."""
    import keras

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


def tiny_recurrent_document(text_dir, **network):
    """A recurrent search space small enough to search in seconds, on text files in ``text_dir``."""
    lm = {"embedding_size": 8, "hidden_size": 8, "dropout_output": 0.1, "dropout_hidden": 0.1,
          "dropout_cell_input": 0.1, "dropout_embedding": 0.1}
    lm.update(network)
    return {
        "version": 1,
        "name": "tiny-rnn",
        "search_space": {"kind": "recurrent_cell", "nodes": 3, "network": lm},
        "data": {"source": "text_files", "path": str(text_dir), "batch_size": 16, "eval_batch_size": 2, "bptt": 6},
        "search": {"epochs": 1, "seed": 5},
        # The reference's learning rate of 20 can diverge on a model this small.
        "retrain": {"epochs": 1, "batch_size": 4, "embedding_size": 8, "hidden_size": 8, "dropout_words": 0.0,
                    "learning_rate": 2.0},
    }


def write_cyclic_corpus(folder, vocabulary=12, lines=(400, 100, 30), seed=0):
    """Three splits of lines in which each word is followed by the next one modulo ``vocabulary``."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "valid", "test"), lines):
        text = []
        for _ in range(count):
            start = rng.randrange(vocabulary)
            text.append(" ".join(f"w{(start + k) % vocabulary}" for k in range(rng.randint(3, 8))))
        (folder / f"{split}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def cyclic_corpus(tmp_path):
    return write_cyclic_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session", autouse=True)
def temporary_files_in_the_basetemp(tmp_path_factory):
    """What the suite and its subprocesses write to the temporary directory goes under pytest's basetemp.

    So does the latency tables' cache.

    TensorFlow's AutoGraph sources, tensorflow-datasets' scratch folders and
    the like; with ``tmp_path_retention_policy = "failed"`` pytest removes it
    all when every test passed.
    """
    import tempfile

    folder = str(tmp_path_factory.mktemp("tmp"))
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    os.environ["KERAS_DARTS_CACHE"] = os.path.join(folder, "cache")  # latency tables: never the user's cache
    yield folder
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]


@pytest.fixture
def isolated_registries():
    """Ops, kinds and the plugin modules a test registers or imports are forgotten after it."""
    import keras_darts.compiler  # noqa: F401 - gives the built-in ops their factories before the snapshot
    from keras_darts.runtime import kinds
    from keras_darts.spec import kinds as spec_kinds
    from keras_darts.spec import operations

    registries = (operations._CONV_OPERATIONS, spec_kinds._LAYOUTS, kinds._KINDS)
    saved = [dict(registry) for registry in registries]
    modules = set(sys.modules)
    yield
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)
    for name in ("plugin_ops", "tests.toy_kind"):
        if name not in modules:
            sys.modules.pop(name, None)
