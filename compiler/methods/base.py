"""``SearchMethod``: the questions a DARTS successor answers differently, with DARTS' answers."""

import numpy as np
from keras import ops


def softmax(matrix):
    """Row softmax of an (edges x ops) array, in float64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    shifted = np.exp(matrix - matrix.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(matrix):
    """Elementwise logistic function of an array, in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(matrix, dtype=np.float64)))


class SearchMethod:
    """DARTS (Liu et al., ICLR 2019), and the base every other method overrides.

    ======================================  =====================================
    question (axis of the successors)       DARTS' answer
    ======================================  =====================================
    A. op weights from alphas (``mix``)     softmax over each edge's ops, no noise
       (``stochastic``: ``mix`` draws         (``stochastic = False``); every op
       noise; ``sampled_op``: an edge runs    of an edge runs
       only the op its weights select)
    B. extra alpha loss (``alpha_loss``)    none
    D. auxiliary path per mixed op          none (``auxiliary_operation = None``)
    F. scalars scheduled over epochs        none (``schedule_names = ()``)
    G. derivation (``derivation_weights``,  DARTS' rule on the softmax, every
       ``derivation_threshold``,            chosen edge kept (no threshold), k
       ``rank_pairs``)                      distinct inputs per node
    H. one loss for weights and alphas      no: bilevel (``single_level = False``)
       (``single_level``)
    E. partial channels, edge weights       all channels, no edge weights
       (``partial_channels``,
       ``edge_normalization``)
    E+F. stages (``stages``, ``stage``,     one stage: one supernet throughout
       ``stage_partial_channels``,
       ``kept_ops``)
    F. frozen architecture (``arch_frozen``) never
    C. perturbed weight step                 no (``perturbs_weight_step = False``,
       (``perturbs_weight_step``,             ``harmonizes_cells = False``)
       ``harmonizes_cells``)
    ======================================  =====================================

    A method object is built from its options (the spec's ``search.<method>``
    block, as a mapping) and the search's epoch count. Schedules are read
    per epoch (``schedule(epoch)``, 0-based) and held by the supernet in
    non-trainable scalars, so a compiled step reads the current value, a
    checkpoint keeps it, and nothing is traced again when it changes.
    """

    name = "darts"
    schedule_names = ()
    auxiliary_operation = None
    # With a threshold, a chosen edge whose best op weighs less is dropped (FairDARTS).
    derivation_threshold = None
    # Rank (input, op) pairs rather than inputs: a node may take two ops from one input (GDAS).
    rank_pairs = False
    # Rank with 'none' like any op; an edge whose best is 'none' is dropped (DrNAS' official derivation).
    derivation_includes_zero = False
    # ``mix`` draws noise (its ``noise`` argument), fresh for every step.
    stochastic = False
    # Each edge computes only the op its (one-hot valued) weights select, forward and backward.
    sampled_op = False
    # Weights and alphas both descend the training loss in one step (SNAS).
    single_level = False
    # The weight step runs on perturbed op probabilities (SDARTS; ``Bilevel.perturbed_probabilities``).
    perturbs_weight_step = False
    # The weight step adds the cells' gradient-alignment regulariser (Lambda-DARTS; ``Bilevel.harmonizing_gradients``).
    harmonizes_cells = False
    # PC-DARTS' partial channels, edge weights and warm-up, ``{"partial_channels": K, "warmup_epochs": n}``,
    # or None (all channels, no edge weights, no warm-up); another method takes them with ``search.pc_darts``.
    partial = None
    # DARTS-PT's perturbation-based selection after the search (``darts_pt.PerturbationSelection``), or None.
    selection = None
    # A search in stages (DrNAS' progressive search): K of each stage's partial channels, or None (one stage).
    stage_partial_channels = None
    stages = 1

    @property
    def partial_channels(self):
        """An edge's ops see the first C/K channels of its input; K (1: all of them)."""
        return 1 if self.partial is None else self.partial["partial_channels"]

    @property
    def edge_normalization(self):
        """Whether a weight per edge, softmaxed over each node's inputs, scales the edge (PC-DARTS)."""
        return self.partial is not None

    def stage(self, epoch):
        """The 0-based stage of 0-based ``epoch`` (epochs after the last stage stay in it)."""
        return 0

    def kept_ops(self, stage):
        """How many ops each edge keeps entering 0-based ``stage`` (``stage`` >= 1)."""
        raise ValueError(f"{self.name} searches in one stage. Received: stage={stage}")

    def arch_frozen(self, epoch):
        """Whether the architecture step is left out during 0-based ``epoch`` (PC-DARTS' warm-up)."""
        return self.partial is not None and epoch < self.partial["warmup_epochs"]

    def __init__(self, options=None, epochs=None):
        self.options = dict(options or {})
        self.epochs = epochs

    @staticmethod
    def anneal_epochs(configured, epochs):
        """A schedule's length: ``configured`` if given, else the search's ``epochs`` (1 when neither is known)."""
        chosen = configured if configured is not None else epochs
        return int(chosen if chosen is not None else 1)

    def to_document(self):
        """``{"name": ..., **options}``: what a derived spec records and ``method_from_document`` reads.

        Another method with PC-DARTS' partial channels adds ``pc_darts: {...}``;
        one followed by DARTS-PT's selection adds ``darts_pt: {...}``.
        """
        document = {"name": self.name, **self.options}
        if self.partial is not None and self.name != "pc_darts":
            document["pc_darts"] = dict(self.partial)
        if self.selection is not None and self.name != "darts_pt":
            document["darts_pt"] = dict(self.selection.options)
        return document

    # -- A: op weights --------------------------------------------------------
    def mix(self, alpha, noise=None, schedule=None):
        """The op weights of each edge from its alphas (a tensor, rows are edges).

        ``noise(shape)`` draws uniform [0, 1) samples, fresh for each step and
        reproducible from the search's seed, and ``schedule`` maps
        ``schedule_names`` to their current values; a ``stochastic`` method
        uses them. Without noise, a stochastic method gives the weights its
        noise is centred on (for display).
        """
        return ops.softmax(alpha, axis=-1)

    # -- B: extra alpha loss --------------------------------------------------
    def alpha_loss(self, alphas, schedule):
        """A scalar added to the loss the alpha step minimises, or ``None``.

        ``alphas`` is the list of architecture tensors, ``schedule`` maps
        ``schedule_names`` to their current scalar values.
        """
        return None

    # -- F: schedules ---------------------------------------------------------
    def schedule(self, epoch):
        """``{name: value}`` for each of ``schedule_names`` during 0-based ``epoch``."""
        return {}

    # -- G: derivation --------------------------------------------------------
    def derivation_weights(self, alpha):
        """The (edges x ops) numpy weights DARTS' derivation rule ranks."""
        return softmax(alpha)
