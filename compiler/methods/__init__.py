"""Search methods: what a DARTS successor changes, as one object per method.

A method answers, along the option axes of the successors (see ``SearchMethod``):
how alphas become op weights, what extra loss the alpha step adds, whether
each mixed op carries an auxiliary path, which scalars follow a schedule over
epochs, and how the genotype is derived. ``darts`` gives DARTS' answers;
another method overrides only the answers it changes. The supernet and the
runtime ask the method at those points and never ask which method they have.

``search_method(spec)`` builds the spec's method; ``register_method`` adds one
(its name must also be a ``search.method`` the spec schema accepts).
"""

import tensorflow as tf
from keras import ops

from .base import SearchMethod
from .beta_darts import BetaDarts
from .darts_minus import DartsMinus
from .darts_pt import DartsPt, PerturbationSelection
from .drnas import Drnas
from .fair_darts import FairDarts
from .gumbel import Gdas, Snas
from .lambda_darts import LambdaDarts, harmonizing_directions
from .pc_darts import PcDarts, normalized_edge_weights, partial_options
from .sdarts import Sdarts, clip_to_simplex

_METHODS = {}


def register_method(cls):
    """Make ``cls`` (a ``SearchMethod`` subclass) available under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, SearchMethod)):
        raise TypeError(f"A search method must subclass SearchMethod. Received: {cls!r}")
    _METHODS[cls.name] = cls
    return cls


for _cls in (SearchMethod, BetaDarts, DartsMinus, FairDarts, Snas, Gdas, PcDarts, Drnas, Sdarts, LambdaDarts,
             DartsPt):
    register_method(_cls)


class MethodSupernet:
    """What a supernet needs of its search method: the method object and its scheduled scalars.

    It also partitions the supernet's variables: ``arch_variables`` are the
    matrices in ``self.alphas``, ``weight_variables`` every other trainable
    variable, by identity.

    ``use_method(document)`` (in ``__init__``, after the other weights) builds
    the method and one non-trainable scalar weight per schedule, named
    ``schedule__<name>`` and set to its epoch-0 value; a compiled step reads
    them as variables, so ``set_epoch`` changes them without tracing anything
    again, and checkpoints keep them.
    """

    def use_method(self, document):
        import keras

        self.method = method_from_document(document, epochs=None)
        start = self.method.schedule(0)
        self.schedule = {
            name: self.add_weight(shape=(), initializer=keras.initializers.Constant(start[name]), trainable=False,
                                  name=f"schedule__{name}", autocast=False)
            for name in self.method.schedule_names
        }
        self.projection = self.projection_steps = None
        # A stochastic method's draws come from (step, seed): the step sets it (``set_noise``).
        self.noise_seed = (self.add_weight(shape=(2,), dtype="int32", initializer="zeros", trainable=False,
                                           aggregation="only_first_replica", name="noise_seed")
                           if self.method.stochastic else None)

    def set_noise(self, step):
        """Make the stochastic method's draws those of ``step`` (an int tensor; each step its own)."""
        if self.noise_seed is not None:
            base = 0 if getattr(self, "seed", None) is None else self.seed
            self.noise_seed.assign(ops.stack([ops.cast(step, "int32"), ops.convert_to_tensor(base, "int32")]))

    def mix_alphas(self, alpha, stream=0):
        """The method's op weights of ``alpha``; a stochastic method draws from its own ``stream`` (a cell type)."""
        if self.noise_seed is None:
            return self.method.mix(alpha)
        seed = self.noise_seed + ops.convert_to_tensor([0, 1_000_003 * (stream + 1)], "int32")

        def noise(shape):
            return tf.random.stateless_uniform(shape, seed=seed, dtype=alpha.dtype)

        noise.seed = seed  # for draws other than uniform ones (DrNAS' gamma samples)

        return self.method.mix(alpha, noise=noise, schedule=self.schedule)

    def use_selection(self):
        """DARTS-PT's state, after ``self.alphas`` exist (a method without selection has none).

        Per cell type: the rows selection has fixed (``fixed``, 1 or 0 per
        edge) and their op weights (``chosen``: one-hot, or zero for an edge a
        node dropped, which marks the node's inputs as selected); and the
        number of selection steps taken. Non-trainable weights, so checkpoints
        keep them.
        """
        if self.method.selection is None:
            return

        def state(name, shape, dtype="float32"):
            return self.add_weight(shape=shape, dtype=dtype, initializer="zeros", trainable=False,
                                   name=f"projection__{name}", autocast=False)

        self.projection = {t: {"chosen": state(f"{t}__chosen", tuple(alpha.shape)),
                               "fixed": state(f"{t}__fixed", (alpha.shape[0],))}
                           for t, alpha in self.alphas.items()}
        self.projection_steps = state("steps", (), "int32")

    def projected_matrices(self, matrices):
        """``{cell type: op weights}`` with the rows DARTS-PT's selection fixed replaced by their choice."""
        if self.projection is None:
            return matrices
        out = {}
        for t, m in matrices.items():
            state = self.projection[t]
            fixed = ops.cast(ops.expand_dims(state["fixed"], -1), m.dtype)
            out[t] = fixed * ops.cast(state["chosen"], m.dtype) + (1.0 - fixed) * m
        return out

    def set_epoch(self, epoch):
        """Set the method's scheduled scalars to their values for 0-based ``epoch``."""
        for name, value in self.method.schedule(epoch).items():
            self.schedule[name].assign(value)

    @property
    def arch_variables(self):
        """The architecture parameters: ``self.alphas`` (cell type -> matrix), then any ``self.edge_betas``."""
        return list(self.alphas.values()) + list(getattr(self, "edge_betas", {}).values())

    @property
    def weight_variables(self):
        """Trainable weights that are not architecture parameters (partitioned by identity)."""
        arch = {id(v) for v in self.arch_variables}
        return [v for v in self.trainable_variables if id(v) not in arch]


def method_from_document(document, epochs):
    """The method a ``{"name": ..., **options}`` mapping (as ``SearchMethod.to_document`` writes) names."""
    document = dict(document or {"name": SearchMethod.name})
    name = document.pop("name")
    if name not in _METHODS:
        raise ValueError(f"Unknown search method. Received: name={name!r}; known: {', '.join(_METHODS)}")
    selection = document.pop("darts_pt", None)
    partial = document.pop("pc_darts", None) if name != "pc_darts" else None
    method = _METHODS[name](document, epochs)
    if partial is not None:  # another method on PC-DARTS' partial-channel supernet
        method.partial = partial_options(partial)
    if selection is not None:  # another method's supernet, then DARTS-PT's selection
        method.selection = PerturbationSelection(selection)
    return method


def search_method(spec):
    """The search method ``spec.search`` names, with its options and the search's length."""
    from keras_darts.spec import to_plain
    from keras_darts.spec.model import combined_methods

    config = spec.search
    options = to_plain(getattr(config, config.method)) if hasattr(config, config.method) else {}
    for key in combined_methods(spec):  # PC-DARTS' supernet, DARTS-PT's selection, under another method
        options[key] = to_plain(getattr(config, key))
    return method_from_document({"name": config.method, **options}, config.epochs)


__all__ = ["BetaDarts", "DartsMinus", "DartsPt", "Drnas", "FairDarts", "Gdas", "LambdaDarts", "MethodSupernet",
           "PcDarts", "PerturbationSelection", "SearchMethod", "Sdarts", "Snas", "clip_to_simplex",
           "harmonizing_directions", "method_from_document", "normalized_edge_weights", "register_method",
           "search_method"]
