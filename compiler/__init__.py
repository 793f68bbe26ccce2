"""Spec -> networkx DAG per cell -> Keras layers and models.

Keras and ``keras.ops`` only: no gradient tapes and no files here.
"""

from keras_darts.spec import OpDefinition

from .cells import DerivedCell, MixedOp, SearchCell
from .derive import derive_cell, derive_genotype, derived_spec_from_search, derived_spec_of, random_cell
from .graph import build_cell_graph, build_derived_graph, cell_edges
from .network import (
    AuxiliaryHead,
    DerivedNetwork,
    build_network,
    count_parameters,
    derived_network_of,
    with_input_normalization,
)
from .recurrent import (
    DerivedLanguageModel,
    RecurrentCell,
    RecurrentSupernet,
    build_language_model,
    build_recurrent_supernet,
    derive_recurrent_cell,
)
from .ops import build_op, op_definition, register_op, unregister_op
from .supernet import CELL_TYPES, Supernet, build_supernet
