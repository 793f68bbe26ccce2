"""Data sources, checks against the spec, the search split and the pipelines."""

import os

import numpy as np
import pytest

import keras_darts as kd
from keras_darts.runtime.data import ImageData, load_image_data, pipeline, search_split
from keras_darts.spec import AugmentConfig, DataError
from tests.conftest import tiny_spec_document


def spec_for(data, **network):
    document = tiny_spec_document(network={"init_channels": 4, "layers": 3, "input_shape": [8, 8, 1],
                                           "num_classes": 10, **network})
    document["data"] = {**document["data"], **data}
    return kd.load_spec(document)


def test_shipped_fashion_mnist_subset_is_balanced():
    spec = spec_for({"source": "fashion_mnist_subset"}, input_shape=[28, 28, 1])
    data = load_image_data(spec)
    assert data.x_train.shape == (3000, 28, 28, 1) and data.x_test.shape == (1000, 28, 28, 1)
    assert np.bincount(data.y_train).tolist() == [300] * 10
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_digits_and_the_search_split():
    spec = spec_for({"source": "digits", "train_portion": 0.5})
    data = load_image_data(spec)
    assert data.x_train.shape[1:] == (8, 8, 1) and len(data.y_train) + len(data.y_test) == 1797
    weights, alphas = search_split(data, spec)
    assert len(weights) == len(data.y_train) // 2
    assert not set(weights) & set(alphas) and len(weights) + len(alphas) == len(data.y_train)


def test_npz_source_and_its_checks(tmp_path):
    rng = np.random.default_rng(0)
    path = os.path.join(tmp_path, "data.npz")
    np.savez(path, x_train=rng.integers(0, 255, (80, 8, 8), dtype=np.uint8), y_train=rng.integers(0, 10, 80),
             x_test=rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), y_test=rng.integers(0, 10, 20))
    data = load_image_data(spec_for({"source": "npz", "path": path}))
    assert data.x_train.shape == (80, 8, 8, 1) and data.x_train.dtype == np.float32
    np.savez(path, x_train=np.zeros((10, 8, 8)), y_train=np.zeros(10))
    with pytest.raises(DataError, match=r"\$.data.path: .*data.npz lacks the arrays x_test, y_test"):
        load_image_data(spec_for({"source": "npz", "path": path}))
    np.savez(path, x_train=np.zeros((10, 8, 8)), y_train=np.full(10, 12), x_test=np.zeros((4, 8, 8)),
             y_test=np.zeros(4))
    with pytest.raises(DataError) as excinfo:
        load_image_data(spec_for({"source": "npz", "path": path}))
    assert str(excinfo.value) == (
        "<dict>: $.search_space.network.num_classes: 10 classes, but data.npz train labels range over [12, 12]"
    )


def test_too_few_examples_for_the_split():
    spec = spec_for({"source": "digits", "batch_size": 32, "max_train_examples": 40})
    data = load_image_data(spec)
    with pytest.raises(DataError) as excinfo:
        search_split(data, spec)
    assert str(excinfo.value) == (
        "<dict>: $.data.batch_size: 32, but splitting 40 training examples at train_portion=0.5 leaves 20 and 20; "
        "each half needs at least one full batch"
    )


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    spec = spec_for({"source": "fashion_mnist", "path": str(tmp_path)}, input_shape=[28, 28, 1])
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_image_data(spec)


def test_image_folder_source(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    for split, count in (("train", 4), ("test", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 255, (8, 8, 1), dtype=np.uint8)
                (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    data = load_image_data(spec_for({"source": "image_folder", "path": str(tmp_path)}, num_classes=2))
    assert data.x_train.shape == (8, 8, 8, 1) and sorted(set(data.y_train.tolist())) == [0, 1]


def test_tfds_source_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    spec = spec_for({"source": "tfds", "name": "mnist", "download": False}, input_shape=[28, 28, 1])
    with tfds.testing.mock_data(num_examples=12):
        data = load_image_data(spec)
    assert data.x_train.shape == (12, 28, 28, 1) and data.x_test.shape[1:] == (28, 28, 1)


def test_pipeline_normalises_and_cutout_zeroes_a_square():
    x = np.random.default_rng(2).uniform(size=(4, 8, 8, 1)).astype("float32")
    data = ImageData("toy", x, np.arange(4, dtype=np.int32), x, np.arange(4, dtype=np.int32), 4)
    plain = next(iter(pipeline(data, x, data.y_train, 4)))[0].numpy()
    np.testing.assert_allclose(plain, (x - data.mean) / data.std, rtol=1e-6)
    cut = next(iter(pipeline(data, x, data.y_train, 4, augment=AugmentConfig(0, False, 4), seed=0)))[0].numpy()
    zeros = (cut == 0.0).reshape(4, -1).sum(axis=1)
    assert np.all(zeros >= 4) and np.all(zeros <= 16)  # a 4x4 square, clipped at the border


def test_every_epoch_of_a_pipeline_runs_without_tf_data_autotuning():
    # With autotuning on, dropping an epoch's iterator waited for the tuning thread (40-100 s at a search's epoch end).
    x = np.random.default_rng(3).uniform(size=(6, 8, 8, 1)).astype("float32")
    data = ImageData("toy", x, np.arange(6, dtype=np.int32), x, np.arange(6, dtype=np.int32), 6)
    plain = pipeline(data, x, data.y_train, 2)
    augmented = pipeline(data, x, data.y_train, 2, shuffle=True, augment=AugmentConfig(2, True, 0), seed=1)
    for dataset in (plain.epoch(0), augmented.epoch(3, skip=1)):
        assert dataset.options().autotune.enabled is False
    # The order is still the epoch's permutation from the skipped batch on.
    order = np.random.default_rng([1, 3]).permutation(6)
    labels = np.concatenate([y.numpy() for _, y in augmented.epoch(3, skip=1)])
    np.testing.assert_array_equal(labels, order[2:])
