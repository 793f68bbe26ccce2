"""Search-space specs and derived specs: YAML in, validated frozen objects out.

No TensorFlow and no networkx here; every other layer may import this one.
"""

from .errors import (
    DataError,
    DivergenceError,
    ExportVerificationError,
    KerasDartsError,
    Problem,
    RunDirectoryError,
    SpecError,
)
from .loader import (
    builtin_derived_names,
    canonical_sha256,
    check_derived,
    derived_from_document,
    derived_with_network,
    load_derived,
    load_spec,
    parse_overrides,
)
from .model import (
    AdamConfig,
    AugmentConfig,
    CellGenotype,
    ConvSearchSpace,
    DataConfig,
    DerivedLanguageModelConfig,
    DerivedNetworkConfig,
    DerivedSpec,
    EXPORT_FORMATS,
    Edge,
    ExportConfig,
    LanguageModelConfig,
    NetworkConfig,
    RecurrentRetrainConfig,
    RecurrentSearchConfig,
    RecurrentSearchSpace,
    RecurrentSpec,
    RetrainConfig,
    SearchConfig,
    SGDConfig,
    Spec,
    TextDataConfig,
    reduction_positions,
    to_plain,
)
from .operations import (
    DARTS_CONV_OPERATIONS,
    DARTS_RECURRENT_OPERATIONS,
    ZERO_OPERATION,
    OpDefinition,
    conv_operation,
    known_conv_operations,
    known_recurrent_operations,
    register_conv_operation,
    unregister_conv_operation,
)
from .yaml_io import dump_yaml, read_yaml_file
