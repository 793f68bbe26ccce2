import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


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
def tiny_document():
    return tiny_spec_document()


@pytest.fixture
def fixtures_dir():
    return FIXTURES
