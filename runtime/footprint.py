"""What a search holds: weights, alphas and the bytes of one forward pass, read off the built search.

``static_estimate`` gives the counts that need no timing; a search logs them
when it starts and ``keras-darts estimate`` prints them beside its
measurements.
"""

import numpy as np

SKIPPED_OPS = {"Const", "ReadVariableOp", "Placeholder", "VarHandleOp", "Identity", "NoOp", "Shape", "Reshape"}


def graph_float_bytes(graph):
    """Bytes of the statically shaped floating-point tensors produced by a graph's computing ops."""
    total = 0
    for op in graph.get_operations():
        if op.type in SKIPPED_OPS:
            continue
        for tensor in op.outputs:
            if tensor.dtype.is_floating and tensor.shape.is_fully_defined():
                total += tensor.shape.num_elements() * tensor.dtype.size
    return total


def static_estimate(spec, bilevel, kind):
    """Counts that need no timing: weights, alphas and the activation bytes ``kind`` reads off the supernet."""
    return {
        "weights": int(sum(np.prod(v.shape) for v in bilevel.weight_vars)),
        "alphas": int(sum(np.prod(v.shape) for v in bilevel.arch_vars)),
        "activation_bytes": int(kind.activation_bytes(spec, bilevel)),
        "recompute_cells": bool(getattr(bilevel.model, "recompute_cells", False)),
    }


def format_bytes(count):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"
