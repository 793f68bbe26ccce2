"""Checks a JSON Schema cannot express: names, graph sizes, positions, shapes."""

import difflib

from .errors import Problem
from .kinds import spec_layout
from .model import COMBINED_OPTION_KEYS, METHOD_OPTION_KEYS, combined_methods, reduction_positions, written_search
from .operations import ZERO_OPERATION, known_conv_operations, known_recurrent_operations

# The two cell inputs every intermediate node may draw from, at the least.
CELL_INPUTS = 2


def operation_problems(operations, source, path, known=None):
    problems = []
    known = known_conv_operations() if known is None else known
    seen = set()
    for index, name in enumerate(operations):
        where = f"{path}[{index}]"
        if name in seen:
            problems.append(Problem(source, where, f"operation '{name}' is listed twice"))
        seen.add(name)
        if name not in known:
            message = f"unknown operation '{name}'; known operations: {', '.join(known)}"
            close = difflib.get_close_matches(name, known, n=1)
            if close:
                message += f" (did you mean '{close[0]}'?)"
            problems.append(Problem(source, where, message))
    if operations and all(name == ZERO_OPERATION for name in operations):
        problems.append(
            Problem(source, path, f"expected at least one operation other than '{ZERO_OPERATION}', got only '{ZERO_OPERATION}'")
        )
    return problems


def k_problems(k, nodes, source, path):
    """k edges are kept per node, or all of a node's inputs where it has fewer.

    The last intermediate node has the most predecessors (``nodes + 1``);
    a k above that could not be met by any node.
    """
    if k < 1:
        return [Problem(source, path, f"expected k >= 1, got {k}")]
    most = CELL_INPUTS + nodes - 1
    if k > most:
        return [
            Problem(
                source,
                path,
                f"k={k} exceeds the {most} predecessors of the last intermediate node; expected k <= {most}",
            )
        ]
    return []


def layers_problems(layers, source, path):
    if layers < 1:
        return [Problem(source, path, f"expected at least 1 cell, got {layers}")]
    return []


def reduction_problems(reduction_cells, layers, source, path):
    if reduction_cells == "thirds" or layers < 1:
        return []
    problems = []
    seen = set()
    for index, position in enumerate(reduction_cells):
        where = f"{path}[{index}]"
        if not 0 <= position < layers:
            problems.append(Problem(source, where, f"expected a cell position in [0, {layers}), got {position}"))
        if position in seen:
            problems.append(Problem(source, where, f"reduction position {position} is listed twice"))
        seen.add(position)
    return problems


def feature_map_problems(input_shape, layers, positions, stem, auxiliary, source, path):
    """Follow feature-map sizes through the network; report sizes it cannot take.

    A factorized reduce (skip_connect at stride 2, and the preprocessing after a
    reduction cell) halves a map with two offset 1x1 stride-2 convolutions,
    which only agree on an even size. The auxiliary head needs room for its
    pooling and 2x2 convolution.
    """
    size = tuple(input_shape[:2])
    problems = []

    def halve(s):
        return tuple((d + 1) // 2 for d in s)

    def shape_text(s):
        return f"{s[0]}x{s[1]}"

    if stem == "imagenet":
        s0 = halve(halve(size))
        s1 = halve(s0)
        reduction_prev = True
    else:
        s0 = s1 = size
        reduction_prev = False
    aux_position = max(positions) if positions else None
    for position in range(layers):
        if reduction_prev and any(d % 2 for d in s0):
            problems.append(
                Problem(
                    source,
                    path,
                    f"input_shape {list(input_shape)} gives {shape_text(s0)} feature maps into the factorized reduce "
                    f"before cell {position}; expected an even size",
                )
            )
            return problems
        reduction = position in positions
        if reduction:
            if any(d % 2 for d in s1):
                problems.append(
                    Problem(
                        source,
                        path,
                        f"input_shape {list(input_shape)} gives {shape_text(s1)} feature maps into the reduction cell "
                        f"at position {position}; expected an even size",
                    )
                )
                return problems
            out = halve(s1)
        else:
            out = s1
        if auxiliary and position == aux_position:
            least = 7 if stem == "imagenet" else 8
            if min(out) < least:
                problems.append(
                    Problem(
                        source,
                        path,
                        f"the auxiliary head needs feature maps of at least {least}x{least} after cell {position}; "
                        f"input_shape {list(input_shape)} gives {shape_text(out)}",
                    )
                )
        s0, s1, reduction_prev = s1, out, reduction
    return problems


# The successors whose official code searches convolutional cells only (darts_minus has its own message).
CONVOLUTIONAL_ONLY_METHODS = ("fair_darts", "snas", "gdas", "pc_darts", "drnas", "sdarts", "lambda_darts",
                              "darts_pt")
# Methods DARTS-PT's selection cannot follow, and why.
NOT_BEFORE_DARTS_PT = {
    "gdas": "computes only the sampled op of each edge, so masking one op of an edge's mixture is not defined",
    "lambda_darts": "gives every cell its own op weights in the weight step, which the selection does not fix",
}
# Methods that cannot search on PC-DARTS' partial-channel supernet (``search.pc_darts``), and why.
NOT_ON_PC_DARTS = {
    "fair_darts": "keeps an op whose own sigmoid weight reaches its threshold, and the edge weights (a softmax "
                  "over each node's inputs) would scale every weight below it",
    "gdas": "computes only the sampled op of each edge already and ranks (op, input) pairs, with no edge weights",
    "lambda_darts": "gives every cell its own op weights in the weight step, which carry no edge weights",
}


def method_problems(spec, source):
    """A search method's options: under its own key, consistent, and for a cell kind it is defined on."""
    config = spec.search
    method = config.method
    problems = []
    written = written_search(spec)
    convolutional = spec_layout(spec.search_space.kind) == "conv_cell"
    for key in METHOD_OPTION_KEYS:
        if key in written and key != method and key not in COMBINED_OPTION_KEYS:
            problems.append(Problem(source, f"$.search.{key}",
                                    f"options for method '{key}', but $.search.method is '{method}'; "
                                    f"set search.method: {key} or drop search.{key}"))
    combined = combined_methods(spec)
    partial = method == "pc_darts" or "pc_darts" in combined
    if "pc_darts" in combined and method in NOT_ON_PC_DARTS:
        problems.append(Problem(source, "$.search.pc_darts",
                                f"PC-DARTS' partial channels cannot carry $.search.method {method}, which "
                                f"{NOT_ON_PC_DARTS[method]}; drop search.pc_darts or choose another method"))
        partial = False
    if partial and method != "pc_darts" and not convolutional:
        problems.append(Problem(source, "$.search.pc_darts",
                                f"PC-DARTS' partial channels are defined for convolutional cells; "
                                f"$.search_space.kind is '{spec.search_space.kind}'"))
    if "darts_pt" in combined:
        if not convolutional:
            problems.append(Problem(source, "$.search.darts_pt",
                                    f"DARTS-PT's selection is defined for convolutional cells; "
                                    f"$.search_space.kind is '{spec.search_space.kind}'"))
        elif method in NOT_BEFORE_DARTS_PT:
            problems.append(Problem(source, "$.search.darts_pt",
                                    f"DARTS-PT's selection cannot follow $.search.method {method}, which "
                                    f"{NOT_BEFORE_DARTS_PT[method]}; drop search.darts_pt or choose another method"))
    if method in CONVOLUTIONAL_ONLY_METHODS and not convolutional:
        problems.append(Problem(source, "$.search.method",
                                f"{method} is defined for convolutional cells; $.search_space.kind is "
                                f"'{spec.search_space.kind}' (beta_darts and darts work on every kind)"))
    if method == "fair_darts" and convolutional and ZERO_OPERATION in spec.search_space.operations:
        problems.append(Problem(source, "$.search_space.operations",
                                f"$.search.method is fair_darts, whose op set has no '{ZERO_OPERATION}' (each op "
                                f"is weighed by its own sigmoid, so '{ZERO_OPERATION}' only adds a zero term); "
                                f"drop '{ZERO_OPERATION}' from the operations"))
    if method in ("snas", "gdas") and written.get("order") == "second":
        how = ("updates weights and alphas with one training loss" if method == "snas"
               else "alternates first-order steps, each on its own sample")
        problems.append(Problem(source, "$.search.order",
                                f"$.search.method {method} {how}, as its official code does; expected "
                                f"order: first, got second"))
    if partial and convolutional:
        k = config.pc_darts.partial_channels
        channels = spec.search_space.network.init_channels
        if channels % k:
            problems.append(Problem(source, "$.search.pc_darts.partial_channels",
                                    f"{k} does not divide $.search_space.network.init_channels {channels}: the "
                                    f"ops of an edge take the first C/{k} of its C channels; expected a divisor "
                                    f"of {channels}"))
    if method == "drnas" and convolutional:
        problems.extend(progressive_problems(spec, source, combined))
    if method == "gdas" and config.gdas.tau_min > config.gdas.tau_max:
        problems.append(Problem(source, "$.search.gdas.tau_min",
                                f"expected tau_min <= tau_max (the temperature anneals down), got "
                                f"{config.gdas.tau_min} > {config.gdas.tau_max}"))
    if method in ("sdarts", "lambda_darts") and getattr(config, "reuse_virtual_gradient", False):
        problems.append(Problem(source, "$.search.reuse_virtual_gradient",
                                f"reuses the virtual step's gradient for the weight step, but $.search.method "
                                f"{method} takes a weight step of its own; drop one of them"))
    if method == "darts_minus":
        if spec_layout(spec.search_space.kind) != "conv_cell":
            problems.append(Problem(source, "$.search.method",
                                    f"darts_minus adds an auxiliary skip path to the mixed ops of convolutional "
                                    f"cells; $.search_space.kind is '{spec.search_space.kind}', which has none "
                                    f"(beta_darts and darts work on every kind)"))
        options = config.darts_minus
        max_epoch = config.epochs if options.max_epoch is None else options.max_epoch
        if max_epoch <= options.start_epoch:
            problems.append(Problem(source, "$.search.darts_minus.start_epoch",
                                    f"expected start_epoch < max_epoch (the decay divides by their difference), "
                                    f"got start_epoch {options.start_epoch} and max_epoch {max_epoch}"))
    return problems


STAGE_KEYS = ("stage_partial_channels", "stage_keep_ops", "stage_warmup_epochs", "stage_epochs")


def progressive_problems(spec, source, combined):
    """DrNAS' progressive search: its stage options only with it, consistent, on a supernet that can take them."""
    options = spec.search.drnas
    written = written_search(spec).get("drnas") or {}
    if not options.progressive:
        return [Problem(source, f"$.search.drnas.{key}",
                        f"applies to DrNAS' progressive search, but $.search.drnas.progressive is false; set "
                        f"progressive: true or drop {key}")
                for key in STAGE_KEYS if key in written]
    problems = []
    for key in combined:
        what = ("PC-DARTS' partial channels and edge weights" if key == "pc_darts"
                else "DARTS-PT's selection, which measures every op of an edge")
        problems.append(Problem(source, f"$.search.{key}",
                                f"$.search.drnas.progressive sets its own partial channels and prunes ops between "
                                f"stages, which {what} cannot follow; drop search.{key} or progressive"))
    stages = len(options.stage_partial_channels)
    operations = len(spec.search_space.operations)
    keeps = options.stage_keep_ops
    if len(keeps) != stages - 1:
        problems.append(Problem(source, "$.search.drnas.stage_keep_ops",
                                f"expected {stages - 1} entries (the ops each edge keeps entering each stage after "
                                f"the first of $.search.drnas.stage_partial_channels' {stages}), got {len(keeps)}"))
    for i, keep in enumerate(keeps):
        limit = operations if i == 0 else keeps[i - 1]
        if keep > limit:
            problems.append(Problem(source, f"$.search.drnas.stage_keep_ops[{i}]",
                                    f"expected at most {limit} (the ops an edge has before this pruning), got "
                                    f"{keep}"))
    channels = spec.search_space.network.init_channels
    for i, k in enumerate(options.stage_partial_channels):
        if channels % k:
            problems.append(Problem(source, f"$.search.drnas.stage_partial_channels[{i}]",
                                    f"{k} does not divide $.search_space.network.init_channels {channels}: the "
                                    f"ops of an edge take the first C/{k} of its C channels; expected a divisor "
                                    f"of {channels}"))
    epochs = spec.search.epochs
    if options.stage_epochs is None:
        if epochs < stages:
            problems.append(Problem(source, "$.search.epochs",
                                    f"DrNAS' progressive search splits the epochs over its {stages} stages; "
                                    f"expected at least {stages}, got {epochs}"))
    elif len(options.stage_epochs) != stages or sum(options.stage_epochs) != epochs:
        problems.append(Problem(source, "$.search.drnas.stage_epochs",
                                f"expected {stages} entries (one per stage of $.search.drnas.stage_partial_channels) "
                                f"summing to $.search.epochs {epochs}, got {list(options.stage_epochs)}"))
    return problems


def latency_problems(spec, source):
    """A latency-aware search's settings: a target its loss can use, one table for every worker."""
    latency = spec.search.latency
    if latency.target_ms is None:
        return []
    problems = []
    if latency.loss == "mul_log" and latency.target_ms <= 1:
        problems.append(Problem(source, "$.search.latency.target_ms",
                                f"loss mul_log divides by log(target_ms), which needs target_ms > 1; got "
                                f"{latency.target_ms} (use loss: add_linear for a target of 1 ms or less)"))
    if spec.distribute.strategy == "multi_worker" and not latency.table:
        problems.append(Problem(source, "$.search.latency.table",
                                "a multi-worker search needs one latency table for every worker; measure it "
                                "with keras-darts latency-table and name the file here"))
    if latency.network == "deployed" and not spec.retrain.enabled:
        problems.append(Problem(source, "$.search.latency.network",
                                "the deployed network is the retraining's, but $.retrain.enabled is false; set "
                                "network: search"))
    return problems


def compare_problems(spec, source):
    """A comparison with random cells runs after the retraining: it needs one."""
    if spec.retrain.compare_random and not spec.retrain.enabled:
        return [Problem(source, "$.retrain.compare_random", "the comparison with random cells follows the "
                        "retraining, but $.retrain.enabled is false; enable it or run keras-darts compare")]
    return []


def threads_problems(spec, source):
    """A deterministic run runs one kernel at a time: it cannot also ask for several."""
    inter_op = spec.distribute.threads.inter_op
    if spec.search.deterministic and inter_op not in ("auto", 1):
        return [Problem(source, "$.distribute.threads.inter_op",
                        f"$.search.deterministic runs one kernel at a time, so expected auto or 1, got {inter_op}")]
    return []


def search_spec_problems(spec, source):
    if spec_layout(spec.search_space.kind) == "recurrent_cell":
        return (recurrent_spec_problems(spec, source) + method_problems(spec, source) + compare_problems(spec, source)
                + threads_problems(spec, source))
    space = spec.search_space
    network = space.network
    problems = []
    problems += operation_problems(space.operations, source, "$.search_space.operations")
    problems += k_problems(space.k, space.nodes, source, "$.search_space.k")
    problems += layers_problems(network.layers, source, "$.search_space.network.layers")
    problems += reduction_problems(space.reduction_cells, network.layers, source, "$.search_space.reduction_cells")
    if not problems:
        problems += feature_map_problems(
            network.input_shape, network.layers, space.reduction_positions, "cifar", False, source,
            "$.search_space.network.input_shape",
        )
    if spec.retrain.enabled:
        problems += layers_problems(spec.retrain.layers, source, "$.retrain.layers")
        if spec.retrain.layers >= 1:
            retrain_reductions = reduction_problems(
                space.reduction_cells, spec.retrain.layers, source, "$.search_space.reduction_cells"
            )
            problems += [
                Problem(p.source, p.path, p.message + f" (retrain.layers={spec.retrain.layers})")
                for p in retrain_reductions
            ]
            if not problems:
                problems += [
                    Problem(p.source, "$.retrain", p.message)
                    for p in feature_map_problems(
                        network.input_shape, spec.retrain.layers,
                        reduction_positions(space.reduction_cells, spec.retrain.layers),
                        spec.retrain.stem, spec.retrain.auxiliary, source, "$.retrain",
                    )
                ]
    if spec.search.reuse_virtual_gradient and spec.search.order != "second":
        problems.append(Problem(source, "$.search.reuse_virtual_gradient",
                                "only a second-order search takes a virtual step whose gradient the weight step "
                                "could reuse; set search.order: second or drop this key"))
    problems += method_problems(spec, source)
    problems += latency_problems(spec, source)
    problems += compare_problems(spec, source)
    problems += threads_problems(spec, source)
    data = spec.data
    if data.source == "tfds" and not data.name:
        problems.append(Problem(source, "$.data.name", "a tfds source needs the dataset name"))
    if data.source in ("npz", "image_folder") and not data.path:
        problems.append(Problem(source, "$.data.path", f"data source '{data.source}' needs a path"))
    return problems


def derived_cell_problems(cell, base, first, operations, known, joined, source):
    """Problems of one derived cell whose intermediate nodes are numbered from ``first``.

    ``known`` (or ``None``) lists the op names that exist; ``joined`` says what
    the output does with the nodes (``concatenated``, ``averaged``).
    """
    problems = []
    for n, node in enumerate(cell.nodes):
        node_id = n + first
        for e, edge in enumerate(node):
            where = f"{base}.nodes[{n}][{e}]"
            if edge.op == ZERO_OPERATION:
                problems.append(Problem(source, f"{where}.op", f"'{ZERO_OPERATION}' cannot be a derived operation"))
            elif edge.op not in operations:
                problems.append(
                    Problem(
                        source,
                        f"{where}.op",
                        f"operation '{edge.op}' is not in this spec's operations ({', '.join(operations)})",
                    )
                )
            elif known is not None and edge.op not in known:
                problems.append(Problem(source, f"{where}.op", f"unknown operation '{edge.op}'"))
            if edge.input >= node_id:
                problems.append(
                    Problem(source, f"{where}.input", f"node {node_id} can only take inputs 0..{node_id - 1}, got {edge.input}")
                )
    last = len(cell.nodes) + first - 1
    seen = set()
    for c, index in enumerate(cell.concat):
        if index > last:
            problems.append(Problem(source, f"{base}.concat[{c}]", f"expected a node in 0..{last}, got {index}"))
        if index in seen:
            problems.append(Problem(source, f"{base}.concat[{c}]", f"node {index} is {joined} twice"))
        seen.add(index)
    return problems


def derived_spec_problems(derived, source):
    if spec_layout(derived.kind) == "recurrent_cell":
        return derived_recurrent_problems(derived, source)
    problems = operation_problems(derived.operations, source, "$.operations")
    for cell_type, cell in derived.cells.items():
        problems += derived_cell_problems(cell, f"$.cells.{cell_type}", CELL_INPUTS, derived.operations,
                                          known_conv_operations(), "concatenated", source)
    network = derived.network
    problems += layers_problems(network.layers, source, "$.network.layers")
    problems += reduction_problems(network.reduction_cells, network.layers, source, "$.network.reduction_cells")
    if not problems:
        problems += feature_map_problems(
            network.input_shape, network.layers, network.reduction_positions, network.stem, network.auxiliary,
            source, "$.network",
        )
    return problems


def tie_problems(embedding_size, hidden_size, tie_weights, source, path):
    """A tied decoder reuses the embedding matrix, so the cell's output must have its width."""
    if tie_weights and embedding_size != hidden_size:
        return [
            Problem(
                source,
                path,
                f"tied weights need embedding_size == hidden_size, got {embedding_size} and {hidden_size}",
            )
        ]
    return []


def recurrent_spec_problems(spec, source):
    space = spec.search_space
    network = space.network
    problems = operation_problems(space.operations, source, "$.search_space.operations", known_recurrent_operations())
    if space.k < 1:
        problems.append(Problem(source, "$.search_space.k", f"expected k >= 1, got {space.k}"))
    elif space.k > space.nodes:
        problems.append(
            Problem(
                source,
                "$.search_space.k",
                f"k={space.k} exceeds the {space.nodes} predecessors of the last node; expected k <= {space.nodes}",
            )
        )
    problems += tie_problems(
        network.embedding_size, network.hidden_size, network.tie_weights, source, "$.search_space.network"
    )
    if spec.retrain.enabled:
        problems += [
            Problem(p.source, p.path, p.message + " (retrain)")
            for p in tie_problems(
                spec.retrain.embedding_size, spec.retrain.hidden_size, network.tie_weights, source, "$.retrain"
            )
        ]
    if spec.data.source == "text_files" and not spec.data.path:
        problems.append(Problem(source, "$.data.path", "data source 'text_files' needs a path"))
    if "tflite_int8" in spec.export.formats:
        # TensorFlow 2.21's converter crashes (segmentation fault) calibrating the cell's loop over time.
        problems.append(Problem(source, "$.export.formats",
                                "tflite_int8 (full-integer quantisation) is not available for recurrent cells: "
                                "TensorFlow 2.21's converter cannot calibrate the loop over time; "
                                "expected saved_model, tflite or tflite_dynamic"))
    if "onnx" in spec.export.formats:
        problems.append(Problem(source, "$.export.formats",
                                "onnx is available for convolutional cells only; "
                                "expected saved_model, tflite or tflite_dynamic"))
    return problems


def derived_recurrent_problems(derived, source):
    problems = operation_problems(derived.operations, source, "$.operations", known_recurrent_operations())
    problems += derived_cell_problems(derived.cells["recurrent"], "$.cells.recurrent", 1, derived.operations, None,
                                      "averaged", source)
    network = derived.network
    problems += tie_problems(network.embedding_size, network.hidden_size, network.tie_weights, source, "$.network")
    return problems
