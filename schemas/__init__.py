"""JSON Schemas shipped with keras-darts, one per document kind.

``validator(kind)`` builds one Draft 2020-12 validator per schema, once.
"""

import functools
import json
from importlib import resources

from jsonschema import Draft202012Validator

SCHEMA_FILES = {
    "search_space": "search_space.schema.json",
    "derived": "derived.schema.json",
}


@functools.cache
def load_schema(kind):
    """Return the parsed JSON Schema for a document kind."""
    if kind not in SCHEMA_FILES:
        raise ValueError(f"Unknown schema kind. Expected one of {sorted(SCHEMA_FILES)}. Received: kind={kind!r}")
    text = resources.files(__name__).joinpath(SCHEMA_FILES[kind]).read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def validator(kind):
    """Return the (cached) Draft 2020-12 validator for a document kind."""
    return Draft202012Validator(load_schema(kind))
