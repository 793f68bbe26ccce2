"""Schema validation that reports every error at once, in plain words."""

import difflib

from .. import schemas

from .errors import Problem
from .yaml_io import json_type

# Keys that belong to the recurrent cell kind, named when they turn up in a
# conv_cell search space so the user learns why they are refused.
RECURRENT_ONLY_KEYS = frozenset(
    {"highway", "output", "batch_norm", "embedding_size", "hidden_size", "bptt",
     "dropout", "dropout_hidden", "dropout_input", "dropout_embedding", "tie_weights"}
)


def schema_problems(kind, document, source):
    """All schema violations of ``document`` against schema ``kind``, sorted by path."""
    errors = sorted(schemas.validator(kind).iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    problems = []
    for error in errors:
        problems.extend(_describe(error, source))
    return sorted(problems, key=lambda p: p.path)


def _child_path(path, key):
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def _describe(error, source):
    path = error.json_path
    schema = error.schema
    value = error.instance
    validator = error.validator
    if validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        out = []
        for key in sorted(set(value) - set(allowed), key=str):
            key = str(key)
            if path == "$.search_space" and key in RECURRENT_ONLY_KEYS:
                message = f"unknown key '{key}': it is an option of kind 'recurrent_cell', not 'conv_cell'"
            else:
                message = f"unknown key '{key}'; expected one of: {', '.join(allowed)}"
                close = difflib.get_close_matches(key, allowed, n=1)
                if close:
                    message += f" (did you mean '{close[0]}'?)"
            out.append(Problem(source, _child_path(path, key), message))
        return out
    if validator == "required":
        missing = error.message.split("'")[1]
        return [Problem(source, _child_path(path, missing), "missing required key")]
    if validator == "type":
        expected = schema["type"]
        expected = {"object": "mapping", "array": "list"}.get(expected, expected)
        message = f"expected {expected}, got {json_type(value)} {value!r}"
    elif validator == "enum":
        message = f"expected one of {', '.join(repr(v) for v in schema['enum'])}; got {value!r}"
    elif validator == "const":
        message = f"expected {schema['const']!r}, got {value!r}"
    elif validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        symbol = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[validator]
        message = f"expected a value {symbol} {schema[validator]}, got {value!r}"
    elif validator in ("minItems", "maxItems"):
        symbol = ">=" if validator == "minItems" else "<="
        message = f"expected a list of {symbol} {schema[validator]} items, got {len(value)}"
    elif validator == "oneOf":
        message = f"expected {_describe_alternatives(schema['oneOf'])}, got {json_type(value)} {value!r}"
    elif validator == "pattern":
        message = f"expected a name of letters, digits, '_', '.' and '-', got {value!r}"
    elif validator in ("minLength", "maxLength"):
        message = f"expected a string of length {'>=' if validator == 'minLength' else '<='} {schema[validator]}, got {value!r}"
    else:
        message = error.message
    return [Problem(source, path, message)]


def _describe_alternatives(options):
    words = []
    for option in options:
        if "const" in option:
            words.append(repr(option["const"]))
        elif option.get("type") == "null":
            words.append("null")
        elif option.get("type") == "array":
            words.append(f"a list of {option.get('items', {}).get('type', 'value')}s")
        elif "$ref" in option:
            words.append("a positive integer" if option["$ref"].endswith("positive_int") else "a positive number")
        else:
            words.append(option.get("type", "a value"))
    return " or ".join(words)
