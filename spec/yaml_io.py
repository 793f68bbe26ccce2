"""Reading YAML documents safely, with errors that name the file and place."""

import os
import re

import yaml

from .errors import SpecError

# Expanded size above which a document is refused (alias bombs).
MAX_DOCUMENT_NODES = 200_000


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", mark
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# YAML 1.1 (PyYAML's) needs a dot in a float, so 1e-3 would be the string '1e-3';
# YAML 1.2 and every user read it as a number, as here.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def expanded_size(value, _memo=None):
    """Number of values in ``value`` with shared (aliased) parts counted each time."""
    memo = {} if _memo is None else _memo
    key = id(value)
    if key in memo:
        return memo[key]
    if isinstance(value, dict):
        size = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in value.items())
    elif isinstance(value, list):
        size = 1 + sum(expanded_size(v, memo) for v in value)
    else:
        size = 1
    memo[key] = size
    return size


def parse_yaml_text(text, source):
    """Parse one YAML document from ``text``; raise ``SpecError`` naming ``source``."""
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "$"
        problem = exc.problem or str(exc)
        raise SpecError.single(source, where, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError.single(source, "$", f"invalid YAML: {exc}") from None
    if expanded_size(document) > MAX_DOCUMENT_NODES:
        raise SpecError.single(
            source, "$", f"document expands to more than {MAX_DOCUMENT_NODES} values (aliases nested too deeply)"
        )
    return document


def read_yaml_file(path):
    """Read and parse a YAML file that must hold a mapping."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise SpecError.single(source, "$", "file not found") from None
    except IsADirectoryError:
        raise SpecError.single(source, "$", "expected a YAML file, got a directory") from None
    except OSError as exc:
        raise SpecError.single(source, "$", f"cannot read file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError.single(
            source, "$", f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    document = parse_yaml_text(text, source)
    return require_mapping(document, source)


def require_mapping(document, source):
    if document is None:
        raise SpecError.single(source, "$", "empty document; expected a mapping of spec keys")
    if not isinstance(document, dict):
        raise SpecError.single(source, "$", f"expected a mapping at the top level, got {json_type(document)}")
    return document


def json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def dump_yaml(document):
    """YAML text for a plain document, keys in insertion order."""
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)
