"""Deriving the discrete cell from architecture parameters (DARTS section 4).

With ``p = softmax(alpha_edge)``: for each intermediate node, rank its
incoming edges by the largest ``p`` over ops other than ``none``; keep the
top ``k`` (ties to the earlier input); on each kept edge choose the op with
the largest ``p`` other than ``none`` (ties to the earlier op). A node
with fewer than ``k`` inputs keeps all of them. The stronger
edge is listed first; the cell output concatenates all intermediate nodes.
"""

from keras_darts.spec import ZERO_OPERATION, CellGenotype, Edge, derived_from_document

from .graph import cell_edges
from .methods import SearchMethod, normalized_edge_weights, search_method
from .methods.darts_pt import projected
from .ranking import DARTS, rank_edges
from .recurrent import CELL_TYPE, derive_recurrent_cell


def derive_cell(alpha, operations, nodes, k, method=DARTS, edge_betas=None, projection=None):
    """The ``CellGenotype`` of one convolutional cell type from its (edges x ops) alpha matrix.

    ``projection`` (``(chosen, fixed)``, DARTS-PT's state of the cell type)
    replaces the rows its selection fixed, and the cell is DARTS' rule on the
    result, as the official code reads its projected weights.

    Under a method that drops edges (a derivation threshold, or ``none``
    ranked like any op), nodes left without inputs are dropped
    (``prune_isolated``); a cell left with no node (early in a search, when
    every weight is still near its start) is derived by DARTS' rule on the
    method's weights, so that every epoch has a cell to show and retrain.
    """
    edges, targets = cell_edges(nodes), range(2, 2 + nodes)
    if projection is not None:
        weights = method.derivation_weights(alpha)
        if edge_betas is not None:
            weights = weights * normalized_edge_weights(edge_betas, edges)[:, None]
        chosen = rank_edges(projected(weights, *projection), operations, edges, targets, k, _GIVEN)
        return CellGenotype(nodes=chosen, concat=tuple(range(2, 2 + nodes)))
    chosen = rank_edges(alpha, operations, edges, targets, k, method, edge_betas)
    if method.derivation_threshold is not None or method.derivation_includes_zero:
        kept = prune_isolated(chosen)
        if kept.nodes:
            return kept
        chosen = rank_edges(alpha, operations, edges, targets, k, _DartsRuleOn(method))
    return CellGenotype(nodes=chosen, concat=tuple(range(2, 2 + nodes)))


class _DartsRuleOn(SearchMethod):
    """``method``'s derivation weights under DARTS' rule: no threshold, 'none' never chosen."""

    def __init__(self, method):
        super().__init__()
        self.weights_of = method

    def derivation_weights(self, alpha):
        return self.weights_of.derivation_weights(alpha)


class _GivenWeights(SearchMethod):
    """DARTS' rule on weights given outright (DARTS-PT's projected weights)."""

    def derivation_weights(self, alpha):
        return alpha


_GIVEN = _GivenWeights()


def prune_isolated(chosen, first=2):
    """Drop the nodes without inputs, and the edges they feed, until none is left; renumber the rest.

    ``chosen`` holds each node's edges (node ``first + n`` at index ``n``);
    inputs below ``first`` always exist. Returns the ``CellGenotype`` of the
    remaining nodes, numbered from ``first`` in their order, all concatenated.
    """
    number = {source: source for source in range(first)}
    nodes = []
    for n, edges in enumerate(chosen):
        kept = tuple(Edge(edge.op, number[edge.input]) for edge in edges if edge.input in number)
        if kept:
            number[first + n] = first + len(nodes)
            nodes.append(kept)
    return CellGenotype(nodes=tuple(nodes), concat=tuple(range(first, first + len(nodes))))


def derive_genotype(alphas, operations, nodes, k, method=DARTS, edge_betas=None, projection=None):
    """``{cell type: CellGenotype}`` from ``{cell type: (edges x ops) array}``, by ``method``'s rule.

    The cell type ``recurrent`` is derived as a recurrent cell, the others as
    convolutional cells; ``edge_betas`` (``{cell type: vector}``, PC-DARTS)
    scale the convolutional cells' edges; ``projection`` (``{cell type:
    (chosen, fixed)}``) is DARTS-PT's selection so far.
    """
    return {
        cell_type: (derive_recurrent_cell(alpha, operations, nodes, k, method) if cell_type == CELL_TYPE else
                    derive_cell(alpha, operations, nodes, k, method, (edge_betas or {}).get(cell_type),
                                (projection or {}).get(cell_type)))
        for cell_type, alpha in alphas.items()
    }


def random_cell(operations, edges, k, rng):
    """A cell drawn uniformly from the discrete cells DARTS' rule can derive from ``edges``.

    ``edges`` lists each alpha row's ``(source, target)``. Each target node
    takes ``min(k, its inputs)`` distinct inputs, every such set equally
    likely, and each kept edge one op other than ``none``, every op equally
    likely; ``rng`` is a ``numpy.random.Generator``. Edges are listed by
    input; the output concatenates (or averages) every intermediate node.
    """
    candidates = [name for name in operations if name != ZERO_OPERATION]
    if not candidates:
        raise ValueError(f"operations must include one other than '{ZERO_OPERATION}'. Received: {list(operations)}")
    targets = sorted({target for _, target in edges})
    nodes = []
    for target in targets:
        sources = [source for source, t in edges if t == target]
        chosen = sorted(rng.choice(sources, size=min(k, len(sources)), replace=False).tolist())
        nodes.append(tuple(Edge(candidates[int(rng.integers(len(candidates)))], source) for source in chosen))
    return CellGenotype(nodes=tuple(nodes), concat=tuple(targets))


def derived_spec_from_search(spec, alphas, retrain=True, origin=None, edge_betas=None, projection=None, **network):
    """The derived spec a search produced, with the network it will be retrained as.

    ``retrain=True`` takes channels, depth, stem and auxiliary head from the
    spec's ``retrain`` block; otherwise the search network's settings.
    ``edge_betas``: PC-DARTS' edge weights of each cell type; ``projection``:
    DARTS-PT's selection of each cell type, ``(chosen, fixed)``.
    """
    space = spec.search_space
    genotype = derive_genotype(alphas, space.operations, space.nodes, space.k, search_method(spec), edge_betas,
                               projection)
    return derived_spec_of(spec, genotype, retrain, origin, **network)


def derived_spec_of(spec, genotype, retrain=True, origin=None, **network):
    """The derived spec of ``genotype`` (``{cell type: CellGenotype}``) in ``spec``'s space and network."""
    space = spec.search_space
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

