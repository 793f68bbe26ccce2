"""Derived specs: schema, semantic checks and the published genotypes."""

import pytest

from keras_darts.spec import SpecError, builtin_derived_names, derived_from_document, derived_with_network, load_derived


def test_published_genotypes_load_by_name():
    assert builtin_derived_names() == ["DARTS_V1", "DARTS_V1_RNN", "DARTS_V2", "DARTS_V2_RNN"]
    v2 = load_derived("DARTS_V2")
    normal = [[(e.op, e.input) for e in node] for node in v2.cells["normal"].nodes]
    assert normal == [
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)],
        [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)],
        [("sep_conv_3x3", 1), ("skip_connect", 0)],
        [("skip_connect", 0), ("dil_conv_3x3", 2)],
    ]
    reduce = [[(e.op, e.input) for e in node] for node in load_derived("DARTS_V1").cells["reduce"].nodes]
    assert reduce[3] == [("skip_connect", 2), ("avg_pool_3x3", 0)]


def test_round_trip_through_a_document():
    v1 = load_derived("DARTS_V1")
    again = derived_from_document(v1.to_document())
    assert again.cells == v1.cells and again.network == v1.network


def test_unknown_name_lists_the_published_ones():
    with pytest.raises(SpecError) as excinfo:
        load_derived("DARTS_V3")
    assert str(excinfo.value) == "DARTS_V3: $: no such file or published architecture; published ones: DARTS_V1, DARTS_V1_RNN, DARTS_V2, DARTS_V2_RNN"


def test_derived_semantic_errors():
    document = load_derived("DARTS_V2").to_document()
    document["operations"] = ["none", "max_pool_3x3", "skip_connect"]  # a different op set
    document["cells"]["normal"]["nodes"][0][1] = {"op": "none", "input": 1}
    document["cells"]["normal"]["nodes"][1][0] = {"op": "skip_connect", "input": 3}
    document["cells"]["reduce"]["concat"] = [2, 3, 9]
    with pytest.raises(SpecError) as excinfo:
        derived_from_document(document, source="d.yaml")
    assert [str(p) for p in excinfo.value.problems] == [
        "d.yaml: $.cells.normal.nodes[0][0].op: operation 'sep_conv_3x3' is not in this spec's operations "
        "(none, max_pool_3x3, skip_connect)",
        "d.yaml: $.cells.normal.nodes[0][1].op: 'none' cannot be a derived operation",
        "d.yaml: $.cells.normal.nodes[1][0].input: node 3 can only take inputs 0..2, got 3",
        "d.yaml: $.cells.normal.nodes[1][1].op: operation 'sep_conv_3x3' is not in this spec's operations "
        "(none, max_pool_3x3, skip_connect)",
        "d.yaml: $.cells.normal.nodes[2][0].op: operation 'sep_conv_3x3' is not in this spec's operations "
        "(none, max_pool_3x3, skip_connect)",
        "d.yaml: $.cells.normal.nodes[3][1].op: operation 'dil_conv_3x3' is not in this spec's operations "
        "(none, max_pool_3x3, skip_connect)",
        "d.yaml: $.cells.reduce.concat[2]: expected a node in 0..5, got 9",
    ]


def test_schema_errors_in_derived_spec():
    with pytest.raises(SpecError) as excinfo:
        derived_from_document({"version": 1, "kind": "conv_cell", "name": "x", "operations": ["none"],
                               "cells": {"normal": {"nodes": [[{"op": "skip_connect"}]]}}, "network": {}},
                              source="d.yaml")
    assert [str(p) for p in excinfo.value.problems] == [
        "d.yaml: $.cells.normal.nodes[0][0].input: missing required key",
        "d.yaml: $.cells.reduce: missing required key",
        "d.yaml: $.network.init_channels: missing required key",
        "d.yaml: $.network.input_shape: missing required key",
        "d.yaml: $.network.layers: missing required key",
        "d.yaml: $.network.num_classes: missing required key",
    ]


def test_network_overrides_are_checked():
    with pytest.raises(SpecError) as excinfo:
        derived_with_network(load_derived("DARTS_V2"), input_shape=[28, 28, 1])
    assert str(excinfo.value) == (
        "DARTS_V2: $.network: the auxiliary head needs feature maps of at least 8x8 after cell 13; "
        "input_shape [28, 28, 1] gives 7x7"
    )
    assert derived_with_network(load_derived("DARTS_V2"), input_shape=[28, 28, 1], auxiliary=False).network.auxiliary is False
