"""Build the class-balanced Fashion-MNIST subset shipped in runtime/builtin_data.

Reads the IDX files of Debian's ``dataset-fashion-mnist`` package and keeps
``--train-per-class`` training and ``--test-per-class`` test images per class,
chosen with a fixed seed. Run: python tools/make_fashion_mnist_subset.py
"""

import argparse
import gzip
import os

import numpy as np

SOURCE = "/usr/share/datasets/fashion-mnist"


def read_idx(path, offset):
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8, offset=offset)


def balanced(labels, per_class, rng):
    keep = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(keep))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default=SOURCE)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--output", default=os.path.join("runtime", "builtin_data", "fashion_mnist_subset.npz"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(os.path.join(args.source, f"{prefix}-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28)
        labels = read_idx(os.path.join(args.source, f"{prefix}-labels-idx1-ubyte.gz"), 8)
        index = balanced(labels, per_class, rng)
        arrays[f"x_{split}"] = images[index]
        arrays[f"y_{split}"] = labels[index]
    np.savez_compressed(args.output, **arrays)
    print({k: v.shape for k, v in arrays.items()}, os.path.getsize(args.output), "bytes")


if __name__ == "__main__":
    main()
