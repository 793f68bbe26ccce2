"""The spec layouts of search-space kinds.

The built-in kinds, ``conv_cell`` and ``recurrent_cell``, each have their own
schema and typed spec. A kind registered later (``keras_darts.runtime.kinds.
register_kind``) declares the built-in layout its specs follow; validation
checks its specs and derived specs as that layout's, and keeps the kind's own
name in the typed result.
"""

BUILTIN_KINDS = ("conv_cell", "recurrent_cell")

_LAYOUTS = {kind: kind for kind in BUILTIN_KINDS}


def register_spec_kind(name, layout):
    """Accept ``search_space.kind: name`` in specs laid out as the built-in kind ``layout``."""
    if layout not in BUILTIN_KINDS:
        raise ValueError(f"A kind's spec layout must be one of {BUILTIN_KINDS}. Received: layout={layout!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"A kind needs a non-empty name. Received: name={name!r}")
    _LAYOUTS[name] = layout


def spec_layout(kind):
    """The built-in layout of ``kind`` (itself for a built-in kind), or ``None`` for an unknown kind."""
    return _LAYOUTS.get(kind) if isinstance(kind, str) else None


def known_kinds():
    return tuple(_LAYOUTS)
