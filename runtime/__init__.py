"""Everything that runs: the bilevel search, retraining, export and the CLI.

The only layer that touches ``tf.GradientTape``, ``tf.function`` and files.
Its API is loaded on first use, so the CLI can report a bad spec without
starting TensorFlow.
"""

import importlib

_API = {
    "Bilevel": "bilevel",
    "ImageData": "data",
    "load_image_data": "data",
    "pipeline": "data",
    "export_saved_model": "export",
    "export_language_model": "export",
    "LanguageModeling": "objectives",
    "ImageClassification": "objectives",
    "retrain_language_model": "language_retraining",
    "LanguageSearchTask": "language_search",
    "SearchDriver": "search_loop",
    "make_plots": "plots",
    "TextData": "text_data",
    "load_text_data": "text_data",
    "verify_saved_model": "export",
    "CoupledAdam": "optimizers",
    "CoupledSGD": "optimizers",
    "cosine_learning_rate": "optimizers",
    "retrain": "retraining",
    "build_search": "search_loop",
    "search": "workflow",
    "kind_of": "kinds",
    "register_kind": "kinds",
    "CellKind": "kinds",
    "export_run": "workflow",
    "run_compile_and_search": "workflow",
}


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
