"""Schema validation that reports every error at once, in plain words."""

import difflib

from .. import schemas

from .errors import Problem
from .yaml_io import json_type

# Keys that belong to the other cell kind, named when they turn up so the
# user learns why they are refused: (path, key) -> the kind that has it.
OTHER_KIND_KEYS = {
    **{("$.search_space", key): "recurrent_cell" for key in ("highway", "output", "batch_norm")},
    **{("$.search_space.network", key): "recurrent_cell" for key in (
        "embedding_size", "hidden_size", "dropout_output", "dropout_hidden", "dropout_cell_input",
        "dropout_embedding", "dropout_words", "tie_weights", "init_range")},
    **{("$.data", key): "recurrent_cell" for key in ("bptt", "eval_batch_size", "variable_length",
                                                      "max_vocabulary", "max_train_tokens", "max_eval_tokens")},
    ("$.search_space", "reduction_cells"): "conv_cell",
    **{("$.search_space.network", key): "conv_cell" for key in (
        "init_channels", "layers", "stem_multiplier", "input_shape", "num_classes")},
    **{("$.data", key): "conv_cell" for key in ("name", "download", "train_portion", "max_train_examples",
                                                 "augment")},
}


def schema_problems(kind, document, source):
    """All schema violations of ``document`` against schema ``kind``, sorted by path."""
    errors = sorted(schemas.validator(kind).iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    space = document.get("search_space") if isinstance(document, dict) else None
    space_kind = space.get("kind") if isinstance(space, dict) else None
    problems = []
    for error in errors:
        problems.extend(_describe(error, source, space_kind))
    return sorted(problems, key=lambda p: p.path)


def _child_path(path, key):
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def _describe(error, source, space_kind=None):
    path = error.json_path
    schema = error.schema
    value = error.instance
    validator = error.validator
    if validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        out = []
        for key in sorted(set(value) - set(allowed), key=str):
            key = str(key)
            other = OTHER_KIND_KEYS.get((path, key))
            if other and space_kind in ("conv_cell", "recurrent_cell") and other != space_kind:
                message = f"unknown key '{key}': it is an option of kind '{other}', not '{space_kind}'"
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
    elif validator == "uniqueItems":
        repeated = sorted({repr(v) for i, v in enumerate(value) if v in value[:i]})
        message = f"expected each item once, got {', '.join(repeated)} more than once"
    elif validator == "oneOf":
        message = f"expected {_describe_alternatives(schema['oneOf'])}, got {json_type(value)} {value!r}"
    elif validator == "pattern":
        expected = schema.get("description", "a name of letters, digits, '_', '.' and '-'")
        message = f"expected {expected}, got {value!r}"
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
        elif "minimum" in option:
            words.append(f"an {option.get('type', 'value')} >= {option['minimum']}")
        else:
            words.append(option.get("type", "a value"))
    return " or ".join(words)
