"""The shipped JSON Schemas: valid Draft 2020-12, closed to unknown keys, one validator each."""

import pytest
from jsonschema import Draft202012Validator

from keras_darts import schemas


@pytest.mark.parametrize("kind", sorted(schemas.SCHEMA_FILES))
def test_schema_is_valid_draft_2020_12_with_an_id(kind):
    schema = schemas.load_schema(kind)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(schemas.SCHEMA_FILES[kind])
    assert schemas.validator(kind) is schemas.validator(kind)


@pytest.mark.parametrize("kind", sorted(schemas.SCHEMA_FILES))
def test_every_object_refuses_unknown_keys(kind):
    def objects(node):
        if isinstance(node, dict):
            if node.get("type") == "object":
                yield node
            for value in node.values():
                yield from objects(value)
        elif isinstance(node, list):
            for value in node:
                yield from objects(value)

    schema = schemas.load_schema(kind)
    # The root's per-kind sections are placeholders that ``then`` (recurrent)
    # and ``else`` (convolutional) replace with closed schemas.
    placeholders = set(schema["then"]["properties"]) & set(schema["else"]["properties"])
    assert placeholders == set(schema["then"]["properties"]) == set(schema["else"]["properties"])
    rest = {k: v for k, v in schema.items() if k != "properties"}
    found = list(objects(rest)) + list(objects({k: v for k, v in schema["properties"].items() if k not in placeholders}))
    assert found and all(o.get("additionalProperties") is False for o in found)


def test_unknown_schema_kind():
    with pytest.raises(ValueError, match=r"Unknown schema kind. Expected one of \['derived', 'search_space'\]"):
        schemas.load_schema("run_state")
