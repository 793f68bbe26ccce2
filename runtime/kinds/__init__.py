"""Search-space kinds: one ``CellKind`` object per ``search_space.kind``, in one registry.

The runtime asks ``kind_of(spec)`` (or ``kind_of(name)``) and never branches on
a kind's name. ``register_kind`` adds a kind (from a plugin module a spec names,
for instance); a kind whose ``spec_layout`` is another kind's has its specs and
derived specs validated as that kind's are.
"""

from keras_darts.spec import SpecError
from keras_darts.spec.kinds import register_spec_kind

from .base import CellKind
from .conv import ConvCellKind
from .recurrent import RecurrentCellKind

_KINDS = {}


def register_kind(kind):
    """Make ``kind`` (a ``CellKind`` instance) the one for ``search_space.kind: kind.name``; returns it."""
    if not isinstance(kind, CellKind) or not kind.name or not kind.spec_layout:
        raise TypeError(f"A kind must be a CellKind instance with a name and a spec_layout. Received: {kind!r}")
    if kind.name != kind.spec_layout:
        register_spec_kind(kind.name, kind.spec_layout)
    _KINDS[kind.name] = kind
    return kind


for _kind in (ConvCellKind(), RecurrentCellKind()):
    register_kind(_kind)


def kind_of(spec_or_name):
    """The registered kind of a spec, a derived spec or a kind name."""
    if isinstance(spec_or_name, str):
        name = spec_or_name
    elif hasattr(spec_or_name, "search_space"):
        name = spec_or_name.search_space.kind
    else:
        name = spec_or_name.kind
    try:
        return _KINDS[name]
    except KeyError:
        source = getattr(spec_or_name, "source", "<kind>")
        raise SpecError.single(source, "$.search_space.kind",
                               f"no kind '{name}' is registered; known kinds: {', '.join(_KINDS)}") from None


__all__ = ["CellKind", "ConvCellKind", "RecurrentCellKind", "kind_of", "register_kind"]
