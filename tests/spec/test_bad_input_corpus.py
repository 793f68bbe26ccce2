"""A corpus of malformed inputs: each gets one clear message naming the file and the field, exit code 2,
no traceback, and an existing run directory stays as it was."""

import os

import pytest

from keras_darts.runtime.cli import compile_and_search_main, main

GOOD = """version: 1
name: ok
search_space:
  kind: conv_cell
  operations: [none, skip_connect, sep_conv_3x3]
  nodes: 2
  network: {init_channels: 4, layers: 3, input_shape: [8, 8, 1], num_classes: 10}
data: {source: digits, batch_size: 16}
retrain: {enabled: false}
"""

RECURRENT = """version: 1
name: rnn
search_space:
  kind: recurrent_cell
  nodes: 3
  network: {embedding_size: 8, hidden_size: 8}
data: {source: text_files, path: corpus, batch_size: 4}
"""

# (name, file content (text or bytes), expected field in the message, expected words)
CORPUS = [
    ("yaml syntax", "version: 1\nname: [unclosed\n", "line 3, column 1", "invalid YAML"),
    ("tab indentation", "version: 1\n\tname: x\n", "line 2, column 1", "invalid YAML"),
    ("duplicate key", "version: 1\nversion: 1\nname: x\nsearch_space: {kind: conv_cell}\n", "line 2", "duplicate key"),
    ("empty file", "", "$", "empty document"),
    ("only a comment", "# nothing here\n", "$", "empty document"),
    ("a list at the top", "- 1\n- 2\n", "$", "expected a mapping at the top level, got list"),
    ("a scalar at the top", "42\n", "$", "expected a mapping at the top level, got integer"),
    ("non-UTF-8 bytes", b"version: 1\nname: \xff\xfe\n", "$", "not UTF-8 text"),
    ("alias bomb", "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "$", "aliases nested too deeply"),
    ("missing version", GOOD.replace("version: 1\n", ""), "$.version", "missing required key"),
    ("missing search_space", "version: 1\nname: x\n", "$.search_space", "missing required key"),
    ("missing kind", GOOD.replace("  kind: conv_cell\n", ""), "$.search_space.kind", "missing required key"),
    ("unknown kind", GOOD.replace("kind: conv_cell", "kind: transformer"), "$.search_space.kind",
     "expected one of 'conv_cell', 'recurrent_cell'"),
    ("wrong version", GOOD.replace("version: 1", "version: 2"), "$.version", "expected 1, got 2"),
    ("name with a slash", GOOD.replace("name: ok", "name: a/b"), "$.name", "expected a name of letters"),
    ("string for an integer", GOOD.replace("nodes: 2", "nodes: two"), "$.search_space.nodes",
     "expected integer, got string 'two'"),
    ("boolean for a list", GOOD.replace("operations: [none, skip_connect, sep_conv_3x3]", "operations: true"),
     "$.search_space.operations", "expected list, got boolean"),
    ("unknown top-level key", GOOD + "serach: {epochs: 2}\n", "$.serach", "did you mean 'search'?"),
    ("unknown nested key", GOOD.replace("batch_size: 16", "batch_size: 16, shufle: true"), "$.data.shufle",
     "unknown key 'shufle'"),
    ("unknown op", GOOD.replace("sep_conv_3x3]", "sep_conv_3x4]"), "$.search_space.operations[2]",
     "did you mean 'sep_conv_3x3'?"),
    ("op listed twice", GOOD.replace("[none, skip_connect, sep_conv_3x3]", "[none, skip_connect, skip_connect]"),
     "$.search_space.operations[2]", "listed twice"),
    ("only none", GOOD.replace("[none, skip_connect, sep_conv_3x3]", "[none]"), "$.search_space.operations",
     "at least one operation other than 'none'"),
    ("k too large", GOOD.replace("nodes: 2", "nodes: 2\n  k: 9"), "$.search_space.k", "exceeds the 3 predecessors"),
    ("k zero", GOOD.replace("nodes: 2", "nodes: 2\n  k: 0"), "$.search_space.k", "expected k >= 1"),
    ("reduction out of range", GOOD.replace("nodes: 2", "nodes: 2\n  reduction_cells: [1, 7]"),
     "$.search_space.reduction_cells[1]", "expected a cell position in [0, 3)"),
    ("reduction twice", GOOD.replace("nodes: 2", "nodes: 2\n  reduction_cells: [1, 1]"),
     "$.search_space.reduction_cells[1]", "listed twice"),
    ("zero layers", GOOD.replace("layers: 3", "layers: 0"), "$.search_space.network.layers",
     "expected at least 1 cell"),
    ("absurd channel count", GOOD.replace("init_channels: 4", "init_channels: 100000"),
     "$.search_space.network.init_channels", "expected a value <= 4096"),
    ("odd feature maps", GOOD.replace("[8, 8, 1]", "[7, 7, 1]"), "$.search_space.network.input_shape",
     "expected an even size"),
    ("negative batch", GOOD.replace("batch_size: 16", "batch_size: -3"), "$.data.batch_size",
     "expected a value >= 1, got -3"),
    ("unknown data source", GOOD.replace("source: digits", "source: imagenet21k"), "$.data.source",
     "expected one of"),
    ("npz without path", GOOD.replace("source: digits", "source: npz"), "$.data.path", "needs a path"),
    ("train portion of one", GOOD.replace("batch_size: 16", "batch_size: 16, train_portion: 1.0"),
     "$.data.train_portion", "expected a value < 1"),
    ("recurrent key in a conv spec", GOOD.replace("nodes: 2", "nodes: 2\n  highway: true"),
     "$.search_space.highway", "an option of kind 'recurrent_cell', not 'conv_cell'"),
    ("conv key in a recurrent spec", RECURRENT.replace("nodes: 3", "nodes: 3\n  reduction_cells: thirds"),
     "$.search_space.reduction_cells", "an option of kind 'conv_cell', not 'recurrent_cell'"),
    ("untied sizes", RECURRENT.replace("hidden_size: 8", "hidden_size: 9"), "$.search_space.network",
     "tied weights need embedding_size == hidden_size"),
    ("bptt of one", RECURRENT.replace("batch_size: 4", "batch_size: 4, bptt: 1"), "$.data.bptt",
     "expected a value >= 2, got 1"),
    ("reuse without a virtual step", GOOD + "search: {order: first, reuse_virtual_gradient: true}\n",
     "$.search.reuse_virtual_gradient", "only a second-order search takes a virtual step"),
    ("recompute as a string", GOOD + "search: {recompute_cells: 'yes'}\n", "$.search.recompute_cells",
     "expected boolean, got string 'yes'"),
    ("extends a missing file", "extends: nowhere.yaml\n" + GOOD, "$.extends", "nowhere.yaml: file not found"),
    ("unknown search method", GOOD + "search: {method: pc-darts}\n", "$.search.method",
     "expected one of 'darts', 'beta_darts', 'darts_minus', 'fair_darts', 'snas', 'gdas', 'pc_darts', 'drnas', "
     "'sdarts', 'lambda_darts', 'darts_pt'; got 'pc-darts'"),
    ("unknown graph-optimiser setting", GOOD + "search: {graph_optimizer: fast}\n", "$.search.graph_optimizer",
     "expected one of 'auto', 'on', 'off'; got 'fast'"),
    ("unknown batch-norm setting", GOOD + "distribute: {strategy: mirrored, batch_norm: sync}\n",
     "$.distribute.batch_norm", "expected one of 'global', 'replica'; got 'sync'"),
    ("unknown export format", GOOD + "export: {formats: [saved_model, onnx2]}\n", "$.export.formats[1]",
     "expected one of 'saved_model', 'tflite', 'tflite_dynamic', 'tflite_int8', 'onnx'; got 'onnx2'"),
    ("export format listed twice", GOOD + "export: {formats: [tflite, saved_model, tflite]}\n", "$.export.formats",
     "expected each item once, got 'tflite' more than once"),
    ("no export format", GOOD + "export: {formats: []}\n", "$.export.formats", "expected a list of >= 1 items, got 0"),
    ("full-integer recurrent cell", RECURRENT + "export: {formats: [saved_model, tflite_int8]}\n",
     "$.export.formats", "tflite_int8 (full-integer quantisation) is not available for recurrent cells"),
    ("onnx for a recurrent cell", RECURRENT + "export: {formats: [onnx]}\n", "$.export.formats",
     "onnx is available for convolutional cells only"),
    ("options of another method", GOOD + "search: {method: beta_darts, darts_minus: {beta_0: 0.5}}\n",
     "$.search.darts_minus", "options for method 'darts_minus', but $.search.method is 'beta_darts'"),
    ("method options without the method", GOOD + "search: {beta_darts: {lambda_max: 10}}\n",
     "$.search.beta_darts", "options for method 'beta_darts', but $.search.method is 'darts'"),
    ("darts_minus on a recurrent cell", RECURRENT + "search: {method: darts_minus}\n", "$.search.method",
     "darts_minus adds an auxiliary skip path to the mixed ops of convolutional cells"),
    ("darts_minus decay over no epochs", GOOD + "search: {method: darts_minus, darts_minus: {start_epoch: 50}}\n",
     "$.search.darts_minus.start_epoch", "expected start_epoch < max_epoch"),
    ("a plugin that is not there", "plugins: [no_such_plugin_module]\n" + GOOD, "$.plugins[0]",
     "cannot import plugin module 'no_such_plugin_module': ModuleNotFoundError"),
    ("a plugin that is not a module name", "plugins: [my-ops.py]\n" + GOOD, "$.plugins[0]",
     "expected a Python module name, dotted, without '.py', got 'my-ops.py'"),
    ("DARTS-PT after GDAS", GOOD + "search: {method: gdas, darts_pt: {tune_epochs: 2}}\n", "$.search.darts_pt",
     "DARTS-PT's selection cannot follow $.search.method gdas, which computes only the sampled op of each edge"),
    ("DARTS-PT after Lambda-DARTS", GOOD + "search: {method: lambda_darts, darts_pt: {}}\n", "$.search.darts_pt",
     "DARTS-PT's selection cannot follow $.search.method lambda_darts"),
    ("DARTS-PT on a recurrent cell", RECURRENT + "search: {method: beta_darts, darts_pt: {}}\n", "$.search.darts_pt",
     "DARTS-PT's selection is defined for convolutional cells; $.search_space.kind is 'recurrent_cell'"),
    ("unknown DARTS-PT criterion", GOOD + "search: {method: darts_pt, darts_pt: {criterion: acc}}\n",
     "$.search.darts_pt.criterion", "expected one of 'accuracy', 'loss'; got 'acc'"),
    ("DARTS-PT measuring no examples", GOOD + "search: {method: darts_pt, darts_pt: {measure_examples: 0}}\n",
     "$.search.darts_pt.measure_examples", "expected null or a positive integer, got integer 0"),
    ("DrNAS stage options without the progressive search",
     GOOD + "search: {method: drnas, drnas: {stage_keep_ops: [2]}}\n", "$.search.drnas.stage_keep_ops",
     "applies to DrNAS' progressive search, but $.search.drnas.progressive is false; set progressive: true or "
     "drop stage_keep_ops"),
    ("DrNAS' progressive search under PC-DARTS' partial channels",
     GOOD + "search: {method: drnas, pc_darts: {partial_channels: 2}, drnas: {progressive: true, "
            "stage_partial_channels: [2, 1], stage_keep_ops: [2]}}\n", "$.search.pc_darts",
     "$.search.drnas.progressive sets its own partial channels and prunes ops between stages, which PC-DARTS' "
     "partial channels and edge weights cannot follow; drop search.pc_darts or progressive"),
    ("DrNAS keeping more ops than it has", GOOD + "search: {method: drnas, drnas: {progressive: true, "
     "stage_partial_channels: [2, 1], stage_keep_ops: [4]}}\n", "$.search.drnas.stage_keep_ops[0]",
     "expected at most 3 (the ops an edge has before this pruning), got 4"),
    ("DrNAS keep counts for the wrong number of stages", GOOD + "search: {method: drnas, drnas: {progressive: true, "
     "stage_partial_channels: [2, 1], stage_keep_ops: [2, 1]}}\n", "$.search.drnas.stage_keep_ops",
     "expected 1 entries (the ops each edge keeps entering each stage after the first of "
     "$.search.drnas.stage_partial_channels' 2), got 2"),
    ("DrNAS' default partial channels on 4 channels", GOOD + "search: {method: drnas, drnas: {progressive: true, "
     "stage_keep_ops: [2]}}\n", "$.search.drnas.stage_partial_channels[0]",
     "6 does not divide $.search_space.network.init_channels 4: the ops of an edge take the first C/6 of its C "
     "channels; expected a divisor of 4"),
    ("DrNAS stage epochs not summing to the search's", GOOD + "search: {method: drnas, epochs: 4, drnas: "
     "{progressive: true, stage_partial_channels: [2, 1], stage_keep_ops: [2], stage_epochs: [1, 2]}}\n",
     "$.search.drnas.stage_epochs",
     "expected 2 entries (one per stage of $.search.drnas.stage_partial_channels) summing to $.search.epochs 4, "
     "got [1, 2]"),
    ("DrNAS with one stage", GOOD + "search: {method: drnas, drnas: {progressive: true, "
     "stage_partial_channels: [2]}}\n", "$.search.drnas.stage_partial_channels", "expected"),
    ("partial channels under GDAS", GOOD + "search: {method: gdas, pc_darts: {partial_channels: 2}}\n",
     "$.search.pc_darts", "PC-DARTS' partial channels cannot carry $.search.method gdas, which computes only the "
     "sampled op of each edge already"),
    ("partial channels on a recurrent cell", RECURRENT + "search: {method: beta_darts, pc_darts: {}}\n",
     "$.search.pc_darts", "PC-DARTS' partial channels are defined for convolutional cells; $.search_space.kind is "
     "'recurrent_cell'"),
    ("unknown Lambda-DARTS correlation", GOOD + "search: {method: lambda_darts, lambda_darts: {correlation: sign}}\n",
     "$.search.lambda_darts.correlation", "expected one of 'corr', 'signcorr'; got 'sign'"),
    ("unknown option of a method", GOOD + "search: {method: beta_darts, beta_darts: {lambda: 10}}\n",
     "$.search.beta_darts.lambda", "unknown key 'lambda'; expected one of: lambda_max, ramp_epochs"),
]


@pytest.fixture
def existing_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "search").mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(GOOD)
    (run_dir / "search" / "history.json").write_text("[]")
    return run_dir


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 30
    assert len({name for name, *_ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name, content, field, words", CORPUS, ids=[case[0] for case in CORPUS])
def test_malformed_spec_gets_one_clear_message(name, content, field, words, tmp_path, existing_run, capsys):
    spec = tmp_path / "spec.yaml"
    if isinstance(content, bytes):
        spec.write_bytes(content)
    else:
        spec.write_text(content, encoding="utf-8")
    before = snapshot(existing_run)
    code = compile_and_search_main([str(spec), "--run-dir", str(existing_run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith(f"error: {spec}: {field}"), first
    assert words in err, err
    assert snapshot(existing_run) == before


def test_missing_spec_file_and_a_directory(tmp_path, existing_run, capsys):
    before = snapshot(existing_run)
    assert compile_and_search_main([str(tmp_path / "absent.yaml"), "--run-dir", str(existing_run)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent.yaml'}: $: file not found\n"
    assert compile_and_search_main([str(tmp_path), "--run-dir", str(existing_run)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: $: expected a YAML file, got a directory\n"
    assert snapshot(existing_run) == before


def test_a_derived_spec_for_another_op_set_is_refused(tmp_path, capsys):
    derived = tmp_path / "derived.yaml"
    derived.write_text(
        "version: 1\nkind: conv_cell\nname: odd\noperations: [none, skip_connect]\n"
        "cells:\n  normal: {nodes: [[{op: sep_conv_3x3, input: 0}, {op: skip_connect, input: 1}]]}\n"
        "  reduce: {nodes: [[{op: skip_connect, input: 0}, {op: skip_connect, input: 1}]]}\n"
        "network: {init_channels: 4, layers: 3, input_shape: [8, 8, 1], num_classes: 10}\n"
    )
    assert main(["show", str(derived)]) == 2
    assert capsys.readouterr().err == (
        f"error: {derived}: $.cells.normal.nodes[0][0].op: operation 'sep_conv_3x3' is not in this spec's "
        "operations (none, skip_connect)\n"
    )
    assert os.path.exists(derived)
