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

from .base import SearchMethod
from .beta_darts import BetaDarts
from .darts_minus import DartsMinus
from .fair_darts import FairDarts

_METHODS = {}


def register_method(cls):
    """Make ``cls`` (a ``SearchMethod`` subclass) available under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, SearchMethod)):
        raise TypeError(f"A search method must subclass SearchMethod. Received: {cls!r}")
    _METHODS[cls.name] = cls
    return cls


for _cls in (SearchMethod, BetaDarts, DartsMinus, FairDarts):
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
                                  name=f"schedule__{name}")
            for name in self.method.schedule_names
        }

    def set_epoch(self, epoch):
        """Set the method's scheduled scalars to their values for 0-based ``epoch``."""
        for name, value in self.method.schedule(epoch).items():
            self.schedule[name].assign(value)

    @property
    def arch_variables(self):
        """The architecture parameters: the values of ``self.alphas`` (cell type -> matrix), in its order."""
        return list(self.alphas.values())

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
    return _METHODS[name](document, epochs)


def search_method(spec):
    """The search method ``spec.search`` names, with its options and the search's length."""
    from keras_darts.spec import to_plain

    config = spec.search
    options = to_plain(getattr(config, config.method)) if hasattr(config, config.method) else {}
    return method_from_document({"name": config.method, **options}, config.epochs)


__all__ = ["BetaDarts", "DartsMinus", "FairDarts", "MethodSupernet", "SearchMethod", "method_from_document",
           "register_method", "search_method"]
