"""YAML in, frozen dataclasses out.

``load_spec`` reads a search-space spec (following ``extends:`` to base
files), applies dotted overrides, validates against the JSON Schema (every
error at once) and then runs the semantic checks. ``load_derived`` does the
same for a derived spec, or loads a published one by name.
"""

import copy
import dataclasses
import hashlib
import json
import os
from importlib import resources

from .errors import Problem, SpecError
from .model import (
    CellGenotype,
    DerivedLanguageModelConfig,
    DerivedNetworkConfig,
    DerivedSpec,
    Edge,
    RecurrentSpec,
    Spec,
    from_mapping,
)
from .kinds import spec_layout
from .plugins import import_plugins
from .semantic import derived_spec_problems, search_spec_problems
from .validation import schema_problems
from .yaml_io import parse_yaml_text, read_yaml_file, require_mapping

OVERRIDES_SOURCE = "--set"


def deep_merge(base, update):
    """``update`` laid over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_with_extends(path, chain=()):
    """The document at ``path`` laid over the documents it extends.

    Errors name each file as the user's path leads to it (the spec's path as
    given, joined with the ``extends`` values), not as an absolute path.
    """
    path = os.fspath(path)
    seen = [os.path.abspath(p) for p in chain]
    if os.path.abspath(path) in seen:
        cycle = " -> ".join(os.path.basename(p) for p in (*chain, path))
        raise SpecError.single(chain[-1], "$.extends", f"extends forms a cycle: {cycle}")
    document = read_yaml_file(path)
    base_name = document.pop("extends", None)
    if base_name is None:
        return document
    if not isinstance(base_name, str) or not base_name:
        raise SpecError.single(path, "$.extends", f"expected a file path, got {base_name!r}")
    base_path = os.path.join(os.path.dirname(path), base_name)
    if not os.path.isfile(base_path):
        raise SpecError.single(path, "$.extends", f"{base_name}: file not found (looked for {base_path})")
    base = _read_with_extends(base_path, (*chain, path))
    return deep_merge(base, document)


def integral_floats_to_int(value):
    """``2.0`` -> ``2`` throughout: JSON Schema counts 2.0 as an integer, Python code does not."""
    if isinstance(value, dict):
        return {k: integral_floats_to_int(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_floats_to_int(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_overrides(overrides):
    """``["a.b=1", ...]`` or ``{"a.b": 1}`` -> nested mapping; values are YAML scalars."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            key, sep, value = str(text).partition("=")
            if not sep or not key.strip():
                raise SpecError.single(OVERRIDES_SOURCE, str(text), "expected key.path=value")
            items.append((key.strip(), parse_yaml_text(value, f"{OVERRIDES_SOURCE} {key.strip()}")))
    nested = {}
    for key, value in items:
        parts = key.split(".")
        if any(not part for part in parts):
            raise SpecError.single(OVERRIDES_SOURCE, key, "expected a dotted key such as search.epochs")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise SpecError.single(OVERRIDES_SOURCE, key, "conflicts with another override")
        target[parts[-1]] = value
    return nested


def canonical_sha256(document):
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_spec(path_or_dict, overrides=None):
    """Load, validate and freeze a search-space spec.

    ``path_or_dict`` is a YAML file path or an already parsed mapping;
    ``overrides`` a list of ``"key.path=value"`` strings or a mapping of
    dotted keys to values. Raises ``SpecError`` listing every problem.
    """
    if isinstance(path_or_dict, dict):
        source = "<dict>"
        document = copy.deepcopy(path_or_dict)
        if "extends" in document:
            raise SpecError.single(source, "$.extends", "extends is only available for spec files")
    else:
        source = os.fspath(path_or_dict)
        document = _read_with_extends(source)
    document = integral_floats_to_int(deep_merge(document, parse_overrides(overrides)))
    document = _method_defaults(document)
    import_plugins(document.get("plugins"), source)
    problems = schema_problems("search_space", _in_layout(document), source)
    if problems:
        raise SpecError(problems + _semantic_problems_beside(problems, document, source))
    spec = from_mapping(spec_class(document), document)
    spec = dataclasses.replace(spec, source=source, document=document, sha256=canonical_sha256(document))
    problems = search_spec_problems(spec, source)
    if problems:
        raise SpecError(problems)
    return spec


# Methods whose official code searches first order by default: a spec that names
# one (or PC-DARTS' options beside another) and says nothing of the order searches
# first order (SNAS and GDAS refuse second).
FIRST_ORDER_METHODS = ("snas", "gdas", "pc_darts", "drnas", "sdarts", "lambda_darts", "darts_pt")


def _method_defaults(document):
    search = document.get("search")
    if (isinstance(search, dict) and (search.get("method") in FIRST_ORDER_METHODS or "pc_darts" in search)
            and "order" not in search):
        return {**document, "search": {**search, "order": "first"}}
    return document


def _in_layout(document, parent="search_space"):
    """``document`` with its kind replaced by the built-in kind whose layout it follows (for the schema)."""
    holder = document.get(parent) if parent else document
    if not isinstance(holder, dict):
        return document
    layout = spec_layout(holder.get("kind"))
    if layout is None or layout == holder.get("kind"):
        return document
    if parent is None:
        return {**document, "kind": layout}
    return {**document, parent: {**holder, "kind": layout}}


def spec_class(document):
    """``RecurrentSpec`` for a search space laid out as a recurrent one, else ``Spec``."""
    space = document.get("search_space")
    if isinstance(space, dict) and spec_layout(space.get("kind")) == "recurrent_cell":
        return RecurrentSpec
    return Spec


def _top_level_key(path):
    return path[2:].split(".")[0].split("[")[0] if path.startswith("$.") else path


def _mapping_keys(path):
    """The mapping keys down to the first list index of a ``$.a.b[0]`` path; None for quoted keys."""
    if not path.startswith("$.") or "['" in path or '["' in path:
        return None
    return path[2:].split("[")[0].split(".")


def _inside(path, other):
    return path == other or path.startswith(other + ".") or path.startswith(other + "[")


def _touches(path, removed):
    """Whether ``path`` is one of ``removed``, inside or around one, or a sibling of one."""
    return any(_inside(path, other) or _inside(other, path)
               or (_inside(path, other.rsplit(".", 1)[0]) and path.count(".") == other.count("."))
               for other in removed)


# The fields that shape the cell and the network: with one of them refused, the
# checks of the rest of the search space would be about a space the user did not write.
_SHAPING = ("$.search_space.kind", "$.search_space.operations", "$.search_space.nodes", "$.search_space.k",
            "$.search_space.reduction_cells", "$.search_space.network.layers",
            "$.search_space.network.input_shape", "$.search_space.network.stem")


def _without_broken_fields(schema_errors, document):
    """``document`` without the fields the schema refused (their defaults take their place), and their paths."""
    pruned = copy.deepcopy(document)
    removed = []
    for problem in schema_errors:
        keys = _mapping_keys(problem.path)
        if not keys:
            return None, None
        holder = pruned
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(keys[-1], None)
        removed.append("$." + ".".join(keys))
    pruned.update(version=1, name="spec")
    return pruned, removed


def _semantic_problems_beside(schema_errors, document, source):
    """Semantic problems of the fields the schema accepted, so one run reports both kinds.

    The refused fields are left out and take their defaults; semantic
    problems of a refused field, its siblings or what holds it are not
    reported. Where that leaves no spec (a required field refused) or a
    field that shapes the cell or network was refused, whole sections are
    left out instead (``retrain`` as if disabled); without a valid
    ``search_space`` there is nothing to check.
    """
    pruned, removed = _without_broken_fields(schema_errors, document)
    if pruned is not None and not any(_inside(path, shaping) for path in removed for shaping in _SHAPING):
        try:
            spec = dataclasses.replace(from_mapping(spec_class(pruned), pruned), document=pruned)
        except (TypeError, ValueError, KeyError, AttributeError):
            spec = None
        if spec is not None:
            known = {(p.path, p.message) for p in schema_errors}
            return [p for p in search_spec_problems(spec, source)
                    if not _touches(p.path, removed) and (p.path, p.message) not in known]
    broken = {_top_level_key(p.path) for p in schema_errors}
    if "search_space" in broken or not isinstance(document.get("search_space"), dict):
        return []
    kept = {k: v for k, v in document.items() if k not in broken}
    kept.update(version=1, name="spec")
    if "retrain" in broken:
        kept["retrain"] = {"enabled": False}
    try:
        spec = dataclasses.replace(from_mapping(spec_class(kept), kept), document=kept)
    except (TypeError, ValueError):
        return []
    return [p for p in search_spec_problems(spec, source) if _top_level_key(p.path) not in broken]


def builtin_derived_names():
    """Names of the published derived specs that ship with keras-darts."""
    folder = resources.files(__package__).joinpath("genotypes")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def derived_from_document(document, source="<dict>"):
    """Validate a derived-spec mapping and freeze it into a ``DerivedSpec``."""
    document = integral_floats_to_int(require_mapping(document, source))
    import_plugins(document.get("plugins"), source)
    problems = schema_problems("derived", _in_layout(document, parent=None), source)
    if problems:
        raise SpecError(problems)
    recurrent = spec_layout(document["kind"]) == "recurrent_cell"
    first_node = 1 if recurrent else 2
    cells = {}
    for cell_type, cell in document["cells"].items():
        nodes = tuple(tuple(Edge(e["op"], e["input"]) for e in node) for node in cell["nodes"])
        concat = tuple(cell.get("concat", range(first_node, first_node + len(nodes))))
        cells[cell_type] = CellGenotype(nodes=nodes, concat=concat)
    network_class = DerivedLanguageModelConfig if recurrent else DerivedNetworkConfig
    network = from_mapping(network_class, document["network"])
    derived = DerivedSpec(
        version=document["version"],
        kind=document["kind"],
        name=document["name"],
        operations=tuple(document["operations"]),
        cells=cells,
        network=network,
        origin=document.get("origin"),
        plugins=tuple(document.get("plugins", ())),
        source=source,
    )
    check_derived(derived)
    return derived


def check_derived(derived):
    """Raise ``SpecError`` if the derived spec cannot be built as it stands."""
    problems = derived_spec_problems(derived, derived.source)
    if problems:
        raise SpecError(problems)
    return derived


def load_derived(path_or_name):
    """Load a derived spec from a YAML file, a mapping, or a published name (``"DARTS_V2"``)."""
    if isinstance(path_or_name, dict):
        return derived_from_document(path_or_name)
    text = os.fspath(path_or_name)
    if text in builtin_derived_names() and not os.path.exists(text):
        resource = resources.files(__package__).joinpath("genotypes", f"{text}.yaml")
        with resources.as_file(resource) as path:
            return derived_from_document(read_yaml_file(path), source=text)
    if not os.path.exists(text) and os.sep not in text and not text.endswith((".yaml", ".yml")):
        raise SpecError.single(
            text, "$", f"no such file or published architecture; published ones: {', '.join(builtin_derived_names())}"
        )
    return derived_from_document(read_yaml_file(text), source=text)


def derived_with_network(derived, **overrides):
    """A copy of ``derived`` whose network settings are replaced, then checked."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(type(derived.network))}
    if unknown:
        raise SpecError(
            [Problem(derived.source, f"$.network.{name}", "unknown network setting") for name in sorted(unknown)]
        )
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    network = dataclasses.replace(derived.network, **values)
    return check_derived(dataclasses.replace(derived, network=network))
