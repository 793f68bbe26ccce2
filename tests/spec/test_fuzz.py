"""Property-based fuzzing of the spec loader: a spec or a SpecError, never anything else."""

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_darts.spec import Spec, SpecError, load_spec
from tests.conftest import tiny_spec_document

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)


def paths(document, prefix=()):
    """Every key path of a nested mapping."""
    for key, value in document.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from paths(value, prefix + (key,))


VALID = tiny_spec_document()
VALID_PATHS = sorted(paths(VALID))


def outcome(document):
    try:
        spec = load_spec(document)
        # Whatever validates must be usable: integer settings are Python ints.
        space = spec.search_space
        assert all(isinstance(v, int) for v in (space.k, space.nodes, *space.network.input_shape))
        return spec
    except SpecError as error:
        assert error.problems and all(p.path and p.message for p in error.problems)
        return error


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_PATHS), values)
def test_one_value_replaced_anywhere(path, value):
    document = copy.deepcopy(VALID)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert isinstance(outcome(document), (Spec, SpecError))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_arbitrary_mappings(document):
    assert isinstance(outcome(document), (Spec, SpecError))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_a_file(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    path.write_bytes(raw)
    assert isinstance(outcome(str(path)), (Spec, SpecError))
