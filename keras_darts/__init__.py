"""keras-darts: Differentiable Architecture Search as a declarative compiler.

The public API::

    spec = load_spec("search.yaml", overrides=["search.epochs=10"])
    supernet = build_supernet(spec)
    genotype = derive_genotype({"normal": a_n, "reduce": a_r}, operations, nodes=4, k=2)
    model = build_network(load_derived("DARTS_V2"), init_channels=16, layers=8)

and, for running things, ``keras_darts.runtime`` (``search``, ``retrain``,
``export_saved_model``).
"""

__version__ = "0.1.0"

from keras_darts.spec import (  # noqa: E402
    DataError,
    DivergenceError,
    ExportVerificationError,
    KerasDartsError,
    RunDirectoryError,
    DerivedSpec,
    Spec,
    SpecError,
    builtin_derived_names,
    load_derived,
    load_spec,
)


def __getattr__(name):
    # The compiler imports Keras (and so TensorFlow); load it on first use so
    # that validating a spec stays fast.
    import importlib

    if name in ("build_supernet", "build_network", "derive_genotype", "register_op", "unregister_op",
                "count_parameters", "derived_spec_from_search"):
        return getattr(importlib.import_module("keras_darts.compiler"), name)
    raise AttributeError(f"module 'keras_darts' has no attribute {name!r}")


__all__ = [
    "DataError",
    "DivergenceError",
    "ExportVerificationError",
    "KerasDartsError",
    "RunDirectoryError",
    "DerivedSpec",
    "Spec",
    "SpecError",
    "build_network",
    "build_supernet",
    "builtin_derived_names",
    "count_parameters",
    "derive_genotype",
    "derived_spec_from_search",
    "load_derived",
    "load_spec",
    "register_op",
    "unregister_op",
]
