"""Deriving the discrete cell from architecture parameters (DARTS section 4).

With ``p = softmax(alpha_edge)``: for each intermediate node, rank its
incoming edges by the largest ``p`` over ops other than ``none``; keep the
top ``k`` (ties to the earlier input); on each kept edge choose the op with
the largest ``p`` other than ``none`` (ties to the earlier op). A node
with fewer than ``k`` inputs keeps all of them. The stronger
edge is listed first; the cell output concatenates all intermediate nodes.
"""

import numpy as np

from keras_darts.spec import ZERO_OPERATION, CellGenotype, Edge, derived_from_document

from .graph import cell_edges
from .methods import SearchMethod, search_method
from .methods.base import softmax

DARTS = SearchMethod()


def rank_edges(alpha, operations, edges, targets, k, method=DARTS):
    """DARTS' rule over ``edges`` (``(source, target)`` per alpha row): per target, its k best edges.

    The rule ranks ``method.derivation_weights(alpha)`` (DARTS: the softmax).
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
    candidates = [o for o, name in enumerate(operations) if name != ZERO_OPERATION]
    if not candidates:
        raise ValueError(f"operations must include one other than '{ZERO_OPERATION}'. Received: {list(operations)}")
    chosen_nodes = []
    for target in targets:
        rows = [(row, source) for row, (source, t) in enumerate(edges) if t == target]
        strength = [max(probabilities[row, o] for o in candidates) for row, _ in rows]
        # A stable sort on -strength keeps the earlier input first among ties;
        # a node with fewer than k inputs keeps them all.
        ranked = sorted(range(len(rows)), key=lambda r: -strength[r])[:k]
        chosen = []
        for r in ranked:
            row, source = rows[r]
            best = candidates[0]
            for o in candidates[1:]:
                if probabilities[row, o] > probabilities[row, best]:
                    best = o
            chosen.append(Edge(operations[best], source))
        chosen_nodes.append(tuple(chosen))
    return tuple(chosen_nodes)


def derive_cell(alpha, operations, nodes, k, method=DARTS):
    """The ``CellGenotype`` of one convolutional cell type from its (edges x ops) alpha matrix."""
    chosen = rank_edges(alpha, operations, cell_edges(nodes), range(2, 2 + nodes), k, method)
    return CellGenotype(nodes=chosen, concat=tuple(range(2, 2 + nodes)))


def derive_genotype(alphas, operations, nodes, k, method=DARTS):
    """``{cell type: CellGenotype}`` from ``{cell type: (edges x ops) array}``, by ``method``'s rule.

    The cell type ``recurrent`` is derived as a recurrent cell, the others as
    convolutional cells.
    """
    from .recurrent import CELL_TYPE, derive_recurrent_cell

    return {
        cell_type: (derive_recurrent_cell if cell_type == CELL_TYPE else derive_cell)(
            alpha, operations, nodes, k, method)
        for cell_type, alpha in alphas.items()
    }


def derived_spec_from_search(spec, alphas, retrain=True, origin=None, **network):
    """The derived spec a search produced, with the network it will be retrained as.

    ``retrain=True`` takes channels, depth, stem and auxiliary head from the
    spec's ``retrain`` block; otherwise the search network's settings.
    """
    space = spec.search_space
    genotype = derive_genotype(alphas, space.operations, space.nodes, space.k, search_method(spec))
    document = {
        "version": 1,
        "kind": space.kind,
        "name": spec.name,
        **({"plugins": list(spec.plugins)} if spec.plugins else {}),
        "operations": list(space.operations),
        "cells": {t: c.to_document() for t, c in genotype.items()},
        "network": {**spec.derived_network(retrain), **network},
    }
    if origin:
        document["origin"] = origin
    return derived_from_document(document, source=f"<derived from {spec.source}>")

