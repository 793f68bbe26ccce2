"""DARTS' derivation rule over any cell's edges: per node, the k strongest incoming edges, each with its best op."""

import numpy as np

from keras_darts.spec import ZERO_OPERATION, Edge

from .methods import SearchMethod, normalized_edge_weights

DARTS = SearchMethod()


def rank_edges(alpha, operations, edges, targets, k, method=DARTS, edge_betas=None):
    """DARTS' rule over ``edges`` (``(source, target)`` per alpha row): per target, its k best edges.

    The rule ranks ``method.derivation_weights(alpha)`` (DARTS: the softmax).
    With a ``method.derivation_threshold``, a chosen edge whose best op
    weighs less is dropped, so a target may keep fewer than k edges, or none.
    With ``method.rank_pairs`` the k strongest (input, op) pairs are kept
    instead, inputs not necessarily distinct. With
    ``method.derivation_includes_zero`` ``none`` ranks like any op, and an
    edge whose best op is ``none`` is dropped. ``edge_betas`` (PC-DARTS) scale
    each edge's weights by the softmax of the betas over its target's edges.
    Returns one tuple of ``Edge`` per target, strongest first.
    """
    alpha = np.asarray(alpha)
    if alpha.shape != (len(edges), len(operations)):
        raise ValueError(
            f"alpha must have shape (edges, ops) = ({len(edges)}, {len(operations)}). Received: shape={alpha.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1. Received: k={k}")
    probabilities = method.derivation_weights(alpha)
    if edge_betas is not None:
        # PC-DARTS: each edge's op weights times its node-normalised edge weight.
        probabilities = probabilities * normalized_edge_weights(edge_betas, edges)[:, None]
    candidates = [o for o, name in enumerate(operations) if name != ZERO_OPERATION]
    ranked_ops = list(range(len(operations))) if method.derivation_includes_zero else candidates
    if not candidates:
        raise ValueError(f"operations must include one other than '{ZERO_OPERATION}'. Received: {list(operations)}")
    chosen_nodes = []
    for target in targets:
        rows = [(row, source) for row, (source, t) in enumerate(edges) if t == target]
        if method.rank_pairs:
            # Every (input, op) pair competes: a node may take two ops from one input (GDAS).
            pairs = sorted(((row, source, o) for row, source in rows for o in candidates),
                           key=lambda pair: -probabilities[pair[0], pair[2]])[:k]
            chosen_nodes.append(tuple(Edge(operations[o], source) for _, source, o in pairs))
            continue
        strength = [max(probabilities[row, o] for o in ranked_ops) for row, _ in rows]
        # A stable sort on -strength keeps the earlier input first among ties;
        # a node with fewer than k inputs keeps them all.
        ranked = sorted(range(len(rows)), key=lambda r: -strength[r])[:k]
        chosen = []
        for r in ranked:
            row, source = rows[r]
            best = ranked_ops[0]
            for o in ranked_ops[1:]:
                if probabilities[row, o] > probabilities[row, best]:
                    best = o
            if operations[best] == ZERO_OPERATION:
                continue  # its best op computes zero: the edge is dropped (DrNAS)
            if method.derivation_threshold is not None and probabilities[row, best] < method.derivation_threshold:
                continue  # under the method's threshold, the edge is dropped
            chosen.append(Edge(operations[best], source))
        chosen_nodes.append(tuple(chosen))
    return tuple(chosen_nodes)
