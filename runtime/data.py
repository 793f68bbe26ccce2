"""Image data for search and retraining: one interface over every source.

``load_image_data(spec)`` returns an ``ImageData`` of in-memory arrays
(float32 images scaled to [0, 1], integer labels), from:

* ``fashion_mnist_subset``: 3,000 + 1,000 Fashion-MNIST images shipped in the package;
* ``fashion_mnist``: the full set from Debian's ``dataset-fashion-mnist``
  (or IDX files in ``data.path``);
* ``digits``: scikit-learn's 8x8 digits (1,797 images);
* ``tfds``: any tensorflow-datasets image classification set by name
  (``cifar10`` ...), downloaded if ``download`` is true, else from ``path``;
* ``npz``: a file with ``x_train``, ``y_train``, ``x_test``, ``y_test``;
* ``image_folder``: ``path/train/<class>/*`` and ``path/test/<class>/*``.

``pipeline`` turns arrays into a shuffled, batched, augmented, prefetched
``tf.data.Dataset`` of normalised ``(image, label)`` pairs.
"""

import dataclasses
import gzip
import logging
import os
from importlib import resources

import numpy as np
import tensorflow as tf

from keras_darts.spec import DataError

from .data_checks import FASHION_MNIST_DIR, FASHION_MNIST_FILES, IMAGE_CHECKS, check_data_source

log = logging.getLogger(__name__)



@dataclasses.dataclass
class ImageData:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: np.ndarray = None
    std: np.ndarray = None

    def __post_init__(self):
        if self.mean is None:
            self.mean = self.x_train.mean(axis=(0, 1, 2)).astype(np.float32)
            self.std = np.maximum(self.x_train.std(axis=(0, 1, 2)), 1e-3).astype(np.float32)

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])


def _as_images(x, scale):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    return x.astype(np.float32) / np.float32(scale)


def _read_idx(path, offset):
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def _fashion_mnist_subset(config):
    resource = resources.files("keras_darts.runtime.builtin_data").joinpath("fashion_mnist_subset.npz")
    with resources.as_file(resource) as path, np.load(path) as arrays:
        return _from_arrays("fashion_mnist_subset", arrays, scale=255.0)


def _fashion_mnist(config):
    folder = config.path or FASHION_MNIST_DIR
    arrays = {key: _read_idx(os.path.join(folder, name), offset) for key, (name, offset) in FASHION_MNIST_FILES.items()}
    arrays["x_train"] = arrays["x_train"].reshape(-1, 28, 28)
    arrays["x_test"] = arrays["x_test"].reshape(-1, 28, 28)
    return _from_arrays("fashion_mnist", arrays, scale=255.0)


def _digits(config):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return _from_arrays("digits", arrays, scale=16.0)


def _tfds(config):
    import tensorflow_datasets as tfds

    try:
        splits = tfds.load(
            config.name,
            split=["train", "test"],
            as_supervised=True,
            data_dir=config.path,
            download=config.download,
        )
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError.single(None, "$.data.name",
                               f"tensorflow-datasets has no dataset named {config.name!r}") from None
    except (AssertionError, FileNotFoundError) as exc:
        raise DataError.single(
            None, "$.data.download", f"tfds: {config.name!r} is not prepared in {config.path or 'the default data_dir'} and "
            f"data.download is false ({exc}). Set data.download: true on a machine with internet access, or "
            "point data.path at a tensorflow-datasets data_dir that holds it."
        ) from None
    except ConnectionError as exc:
        raise DataError.single(None, "$.data.name", f"tfds: downloading {config.name!r} failed: {exc}") from None
    def to_arrays(dataset):
        # In batches rather than batch_size=-1, which tfds' mock data cannot serve.
        parts = list(tfds.as_numpy(dataset.batch(4096)))
        if not parts:
            raise DataError.single(None, "$.data.name", f"tfds: a split of {config.name!r} is empty")
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    (x_train, y_train), (x_test, y_test) = [to_arrays(part) for part in splits]
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return _from_arrays(config.name, arrays, scale=255.0 if x_train.dtype == np.uint8 else 1.0)


def _npz(config):
    try:
        with np.load(config.path) as arrays:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
            if missing:
                raise DataError.single(None, "$.data.path", f"{config.path} lacks the arrays {', '.join(missing)}")
            arrays = {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (ValueError, OSError) as exc:
        raise DataError.single(None, "$.data.path", f"{config.path} is not a readable .npz file ({exc})") from None
    scale = 255.0 if arrays["x_train"].dtype == np.uint8 else 1.0
    return _from_arrays(os.path.basename(config.path), arrays, scale=scale)


def _image_folder(config, image_shape):
    import keras

    arrays = {}
    class_names = None
    for split in ("train", "test"):
        folder = os.path.join(config.path, split)
        dataset = keras.utils.image_dataset_from_directory(
            folder,
            image_size=image_shape[:2],
            color_mode="grayscale" if image_shape[2] == 1 else "rgb",
            batch_size=None,
            shuffle=False,
            class_names=class_names,
        )
        class_names = dataset.class_names
        images, labels = zip(*dataset.as_numpy_iterator()) if len(dataset) else ((), ())
        arrays[f"x_{split}"] = np.stack(images) if images else np.zeros((0, *image_shape), np.float32)
        arrays[f"y_{split}"] = np.asarray(labels)
    return _from_arrays(os.path.basename(os.path.normpath(config.path)), arrays, scale=255.0)


def _from_arrays(name, arrays, scale):
    x_train = _as_images(arrays["x_train"], scale)
    x_test = _as_images(arrays["x_test"], scale)
    y_train = np.asarray(arrays["y_train"]).astype(np.int32).reshape(-1)
    y_test = np.asarray(arrays["y_test"]).astype(np.int32).reshape(-1)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 4:
            raise DataError.single(None, "$.data", f"{name}: x_{split} has shape {x.shape}; expected "
                                   "(examples, height, width[, channels])")
        if len(x) != len(y):
            raise DataError.single(None, "$.data", f"{name}: x_{split} has {len(x)} examples but y_{split} has "
                                   f"{len(y)} labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError.single(None, "$.data", f"{name}: training images are {x_train.shape[1:]} but test images "
                               f"are {x_test.shape[1:]}")
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return ImageData(name, x_train, y_train, x_test, y_test, num_classes)


def load_image_data(spec):
    """Load ``spec.data`` and check it against the spec's network."""
    config = spec.data
    network = spec.search_space.network
    loaders = {
        "fashion_mnist_subset": _fashion_mnist_subset,
        "fashion_mnist": _fashion_mnist,
        "digits": _digits,
        "tfds": _tfds,
        "npz": _npz,
        "image_folder": lambda c: _image_folder(c, network.input_shape),
    }
    check_data_source(spec, IMAGE_CHECKS)
    try:
        data = loaders[config.source](config)
    except DataError as error:
        raise error.with_source(spec.source) from error.__cause__
    expected = tuple(network.input_shape)
    if data.image_shape != expected:
        raise DataError.single(
            spec.source, "$.search_space.network.input_shape", f"{list(expected)}, but {data.name} images are "
            f"{list(data.image_shape)}; set input_shape to {list(data.image_shape)}"
        )
    for split, labels in (("train", data.y_train), ("test", data.y_test)):
        if len(labels) and (labels.min() < 0 or labels.max() >= network.num_classes):
            raise DataError.single(
                spec.source, "$.search_space.network.num_classes", f"{network.num_classes} classes, but {data.name} "
                f"{split} labels range over [{labels.min()}, {labels.max()}]"
            )
    if config.max_train_examples is not None:
        data.x_train = data.x_train[: config.max_train_examples]
        data.y_train = data.y_train[: config.max_train_examples]
    log.info("data %s: %d training, %d test images of %s", data.name, len(data.y_train), len(data.y_test),
             data.image_shape)
    return data


def search_split(data, spec):
    """Indices of the weight half and the alpha half of the training set.

    The training set is permuted once with the search seed, then split at
    ``train_portion``.
    """
    count = len(data.y_train)
    order = np.random.default_rng(spec.search.seed).permutation(count)
    split = int(np.floor(spec.data.train_portion * count))
    batch = spec.data.batch_size
    if min(split, count - split) < batch:
        raise DataError.single(
            spec.source, "$.data.batch_size", f"{batch}, but splitting {count} training examples at "
            f"train_portion={spec.data.train_portion} leaves {split} and {count - split}; "
            "each half needs at least one full batch"
        )
    return order[:split], order[split:]


def _augment_fn(augment, image_shape):
    """Crop, flip and cutout drawn from a per-example seed: the same seed, the same augmentation."""
    height, width, _ = image_shape

    def augment_one(image, seed):
        if augment.random_crop:
            pad = augment.random_crop
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, image_shape, seed=seed)
        if augment.horizontal_flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=seed + tf.constant([0, 1], tf.int64))
        if augment.cutout:
            half = augment.cutout // 2
            centre = tf.random.stateless_uniform((2,), seed + tf.constant([0, 2], tf.int64), 0, 1)
            cy = tf.cast(centre[0] * height, tf.int32)
            cx = tf.cast(centre[1] * width, tf.int32)
            rows = tf.range(height)[:, None]
            cols = tf.range(width)[None, :]
            # The reference's square: rows [cy - L//2, cy + L//2), clipped to the image.
            inside = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
            image = image * tf.cast(~inside, image.dtype)[:, :, None]
        return image

    return augment_one


class ImagePipeline:
    """Normalised, shuffled, augmented batches of one set of images, epoch by epoch.

    Epoch ``e``'s order is a permutation drawn from ``(seed, e)`` and every
    example's augmentation from ``(seed, e, position)``, so an epoch can be
    replayed exactly and entered after ``skip`` batches (resuming a search).
    Cutout applies after normalisation (the cut square is zero, as in the reference).

    Each epoch's dataset runs without tf.data's autotuning: its parallelism
    and prefetch buffer stay at their starting values (a parallel call per
    core; a buffer that grows as batches are waited for). The data is in
    memory and each example a gather and a few elementwise ops, so there is
    nothing to tune, and the tuning thread cost a search whole minutes: an
    epoch's iterator is dropped when the epoch ends, and dropping it waited
    for that thread's next wake-up, which comes further apart the longer the
    iterator lives (up to 60 s). In the quickstart's search (epochs of some
    40 s), the end of an epoch waited 40, 72 and 100 s in three of five
    epochs measured, and two earlier runs had second epochs of 82 s
    against third ones of 41 and 46 s.
    """

    def __init__(self, data, x, y, batch_size, shuffle=False, augment=None, seed=None, drop_remainder=False):
        self.images = tf.constant(((x - data.mean) / data.std).astype(np.float32))
        self.labels = tf.constant(np.asarray(y), tf.int32)
        self.count = len(y)
        self.image_shape = data.image_shape
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None and (
            augment.random_crop or augment.horizontal_flip or augment.cutout) else None
        self.seed = 0 if seed is None else int(seed)
        self.drop_remainder = drop_remainder

    def batches_per_epoch(self):
        if self.drop_remainder:
            return self.count // self.batch_size
        return -(-self.count // self.batch_size)

    def epoch(self, epoch=0, skip=0):
        """The batches of epoch ``epoch``, from batch ``skip`` on."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        else:
            order = np.arange(self.count)
        positions = np.arange(self.count, dtype=np.int64)
        dataset = tf.data.Dataset.from_tensor_slices((order.astype(np.int64), positions))
        if skip:
            dataset = dataset.skip(skip * self.batch_size)
        images, labels = self.images, self.labels
        augment = _augment_fn(self.augment, self.image_shape) if self.augment else None
        base = tf.constant([self.seed, epoch * self.count], tf.int64)

        def load(index, position):
            image = tf.gather(images, index)
            if augment is not None:
                image = augment(image, base + tf.stack([tf.constant(0, tf.int64), position]))
            return image, tf.gather(labels, index)

        dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.batch(self.batch_size, drop_remainder=self.drop_remainder).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.autotune.enabled = False  # see the class's docstring
        return dataset.with_options(options)

    def __iter__(self):
        return iter(self.epoch(0))


def pipeline(data, x, y, batch_size, shuffle=False, augment=None, seed=None, drop_remainder=False):
    """An ``ImagePipeline`` of normalised ``(image, label)`` batches; iterate it or ask for an ``epoch``."""
    return ImagePipeline(data, x, y, batch_size, shuffle, augment, seed, drop_remainder)
