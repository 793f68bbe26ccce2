"""Recurrent search-space specs and derived recurrent specs: defaults, and every problem with its message."""

import pytest

from keras_darts.spec import RecurrentSpec, SpecError, load_derived, load_spec


def recurrent(**space):
    return {"version": 1, "name": "rnn", "search_space": {"kind": "recurrent_cell", **space}}


def messages(document, **kwargs):
    with pytest.raises(SpecError) as excinfo:
        load_spec(document, **kwargs)
    return [str(p) for p in excinfo.value.problems]


def test_defaults_are_the_reference_recurrent_search():
    spec = load_spec(recurrent())
    assert isinstance(spec, RecurrentSpec)
    space = spec.search_space
    assert space.operations == ("none", "tanh", "relu", "sigmoid", "identity")
    assert (space.nodes, space.k, space.highway, space.output, space.batch_norm) == (8, 1, True, "mean", True)
    assert (space.network.embedding_size, space.network.hidden_size) == (300, 300)
    assert (spec.data.batch_size, spec.data.bptt, spec.data.source) == (256, 35, "ptb")
    sgd = spec.search.weights_optimizer
    assert (sgd.learning_rate, sgd.momentum, sgd.weight_decay, sgd.grad_clip) == (20.0, 0.0, 5e-7, 0.25)
    adam = spec.search.arch_optimizer
    assert (adam.learning_rate, adam.beta_1, adam.weight_decay) == (3e-3, 0.9, 1e-3)
    assert (spec.retrain.hidden_size, spec.retrain.weight_decay, spec.retrain.nonmono) == (850, 8e-7, 5)


def test_semantic_problems_of_a_recurrent_spec():
    document = recurrent(operations=["none", "tanhh", "relu", "relu"], k=4, nodes=3,
                         network={"embedding_size": 10, "hidden_size": 12})
    document["data"] = {"source": "text_files"}
    assert messages(document) == [
        "<dict>: $.search_space.operations[1]: unknown operation 'tanhh'; known operations: none, tanh, relu, "
        "sigmoid, identity (did you mean 'tanh'?)",
        "<dict>: $.search_space.operations[3]: operation 'relu' is listed twice",
        "<dict>: $.search_space.k: k=4 exceeds the 3 predecessors of the last node; expected k <= 3",
        "<dict>: $.search_space.network: tied weights need embedding_size == hidden_size, got 10 and 12",
        "<dict>: $.data.path: data source 'text_files' needs a path",
    ]


def test_keys_of_the_other_kind_are_named_as_such():
    document = recurrent(reduction_cells="thirds", network={"init_channels": 16})
    document["data"] = {"augment": {}, "bptt": 0}
    assert messages(document) == [
        "<dict>: $.data.augment: unknown key 'augment': it is an option of kind 'conv_cell', not 'recurrent_cell'",
        "<dict>: $.data.bptt: expected a value >= 2, got 0",
        "<dict>: $.search_space.network.init_channels: unknown key 'init_channels': it is an option of kind "
        "'conv_cell', not 'recurrent_cell'",
        "<dict>: $.search_space.reduction_cells: unknown key 'reduction_cells': it is an option of kind "
        "'conv_cell', not 'recurrent_cell'",
    ]
    conv = {"version": 1, "name": "c", "search_space": {"kind": "conv_cell", "highway": True}, "data": {"bptt": 35}}
    assert messages(conv) == [
        "<dict>: $.data.bptt: unknown key 'bptt': it is an option of kind 'recurrent_cell', not 'conv_cell'",
        "<dict>: $.search_space.highway: unknown key 'highway': it is an option of kind 'recurrent_cell', "
        "not 'conv_cell'",
    ]
    assert messages({"version": 1, "name": "x", "search_space": {"kind": "lstm"}}) == [
        "<dict>: $.search_space.kind: expected one of 'conv_cell', 'recurrent_cell'; got 'lstm'"
    ]


def test_retrain_sizes_are_checked_for_a_tied_decoder():
    document = recurrent()
    document["retrain"] = {"embedding_size": 400, "hidden_size": 850}
    assert messages(document) == [
        "<dict>: $.retrain: tied weights need embedding_size == hidden_size, got 400 and 850 (retrain)"
    ]


def test_derived_recurrent_problems(tmp_path):
    document = load_derived("DARTS_V2_RNN").to_document()
    document["cells"]["recurrent"]["nodes"][2] = [{"op": "none", "input": 1}]
    document["cells"]["recurrent"]["nodes"][3] = [{"op": "sep_conv_3x3", "input": 9}]
    document["cells"]["recurrent"]["concat"] = [1, 1, 12]
    with pytest.raises(SpecError) as excinfo:
        load_derived(document)
    assert [str(p) for p in excinfo.value.problems] == [
        "<dict>: $.cells.recurrent.nodes[2][0].op: 'none' cannot be a derived operation",
        "<dict>: $.cells.recurrent.nodes[3][0].op: operation 'sep_conv_3x3' is not in this spec's operations "
        "(none, tanh, relu, sigmoid, identity)",
        "<dict>: $.cells.recurrent.nodes[3][0].input: node 4 can only take inputs 0..3, got 9",
        "<dict>: $.cells.recurrent.concat[1]: node 1 is averaged twice",
        "<dict>: $.cells.recurrent.concat[2]: expected a node in 0..8, got 12",
    ]
    conv_cells = load_derived("DARTS_V2").to_document()["cells"]
    document = load_derived("DARTS_V2_RNN").to_document()
    document["cells"] = conv_cells
    with pytest.raises(SpecError) as excinfo:
        load_derived(document)
    assert [str(p) for p in excinfo.value.problems] == [
        "<dict>: $.cells.normal: unknown key 'normal'; expected one of: recurrent",
        "<dict>: $.cells.recurrent: missing required key",
        "<dict>: $.cells.reduce: unknown key 'reduce'; expected one of: recurrent",
    ]
