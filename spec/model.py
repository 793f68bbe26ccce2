"""Typed, immutable views of a validated spec.

Defaults here are the reference DARTS settings (CIFAR-10 search and
evaluation); a YAML spec only states what differs.
"""

import dataclasses
import typing

from .operations import DARTS_CONV_OPERATIONS, DARTS_RECURRENT_OPERATIONS

frozen = dataclasses.dataclass(frozen=True)


@frozen
class NetworkConfig:
    init_channels: int = 16
    layers: int = 8
    stem_multiplier: int = 3
    input_shape: tuple = (32, 32, 3)
    num_classes: int = 10


def reduction_positions(reduction_cells, layers):
    """Cell positions of the reduction cells: ``thirds`` means DARTS' own."""
    if reduction_cells == "thirds":
        return tuple(sorted({layers // 3, 2 * layers // 3}))
    return tuple(reduction_cells)


@frozen
class ConvSearchSpace:
    kind: str = "conv_cell"
    operations: tuple = DARTS_CONV_OPERATIONS
    nodes: int = 4
    k: int = 2
    reduction_cells: typing.Any = "thirds"
    network: NetworkConfig = NetworkConfig()

    @property
    def reduction_positions(self):
        return reduction_positions(self.reduction_cells, self.network.layers)


@frozen
class AugmentConfig:
    random_crop: int = 4
    horizontal_flip: bool = True
    cutout: int = 0


@frozen
class DataConfig:
    source: str = "tfds"
    name: str = "cifar10"
    path: typing.Optional[str] = None
    download: bool = True
    train_portion: float = 0.5
    batch_size: int = 64
    max_train_examples: typing.Optional[int] = None
    augment: AugmentConfig = AugmentConfig()


@frozen
class SGDConfig:
    """SGD with PyTorch momentum semantics and coupled (L2) weight decay."""

    learning_rate: float = 0.025
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: typing.Optional[float] = 5.0


@frozen
class AdamConfig:
    """Adam with PyTorch epsilon semantics and coupled (L2) weight decay."""

    learning_rate: float = 3e-4
    beta_1: float = 0.5
    beta_2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 1e-3


@frozen
class DiagnosticsConfig:
    """Collapse diagnostics each epoch: the dominant eigenvalue of the alpha Hessian of the validation loss."""

    hessian_eigenvalue: bool = True
    hessian_iterations: int = 5  # Hessian-vector products (Lanczos steps)
    hessian_radius: float = 1e-3


@frozen
class EarlyStoppingConfig:
    """Optional rules that end a search early; ``None`` switches a rule off."""

    max_skip_connections: typing.Optional[int] = None
    eigenvalue_ratio: typing.Optional[float] = None
    eigenvalue_reference_epochs: int = 2


@frozen
class BetaDartsConfig:
    """beta-DARTS (Ye et al., CVPR 2022): ``lambda(e) * mean over alpha rows of logsumexp(row)`` added to the alpha loss.

    ``lambda(e) = lambda_max * min(e, ramp_epochs) / ramp_epochs`` for the
    0-based epoch ``e``; the official code hard-codes ``50 * e / 100``.
    """

    lambda_max: float = 50.0
    ramp_epochs: int = 100


@frozen
class DartsMinusConfig:
    """DARTS- (Chu et al., ICLR 2021): an auxiliary skip path on every mixed op, scaled by a decaying beta.

    ``beta(e)`` follows the official ``DecayScheduler`` for the 0-based epoch
    ``e``; ``max_epoch`` and ``stop_epoch`` (T_max, T_stop) default to the
    search's epochs, as the official script sets both to its 50.
    """

    beta_0: float = 1.0
    decay: str = "linear"
    start_epoch: int = 0
    max_epoch: typing.Optional[int] = None
    stop_epoch: typing.Optional[int] = None
    auxiliary_operation: str = "skip"


@frozen
class FairDartsConfig:
    """FairDARTS (Chu et al., ECCV 2020): sigmoid op weights, the zero-one loss, threshold derivation.

    The alpha step minimises ``L_val - zero_one_weight * mean((sigmoid(alpha) - 0.5)^2)``
    over both cell types' alphas (the official ``--aux_loss_weight 10``);
    derivation keeps, of each node's k strongest edges, those whose best op
    weight reaches ``threshold`` (``--op_threshold 0.85``).
    """

    zero_one_weight: float = 10.0
    threshold: float = 0.85


@frozen
class SnasConfig:
    """SNAS (Xie et al., ICLR 2019): soft Gumbel-softmax op weights, one training loss for weights and alphas.

    Op weights ``softmax((alpha + g) / t)`` with fresh Gumbel noise ``g`` each
    pass; ``t(e) = (1 - e / anneal_epochs) (temperature_start - temperature_min)
    + temperature_min`` for the 0-based epoch (official: 150 hard-coded, 1 and 0.03).
    """

    temperature_start: float = 1.0
    temperature_min: float = 0.03
    anneal_epochs: int = 150


@frozen
class GdasConfig:
    """GDAS (Dong and Yang, CVPR 2019): one op per edge, sampled by the hard straight-through Gumbel-softmax.

    ``tau(e) = tau_max - (tau_max - tau_min) e / (E - 1)`` for the 0-based epoch
    ``e`` (the official scripts' 10 and 0.1); ``E`` is ``anneal_epochs``, by
    default the search's epochs, as the official code uses its total.
    """

    tau_max: float = 10.0
    tau_min: float = 0.1
    anneal_epochs: typing.Optional[int] = None


@frozen
class PcDartsConfig:
    """PC-DARTS (Xu et al., ICLR 2020): partial channels, edge normalisation, alpha warm-up.

    The first ``C / partial_channels`` channels of an edge's input go through
    its ops, the rest bypass them, then a channel shuffle; a weight per edge,
    softmaxed over each node's inputs, scales its output; alphas and edge
    weights are not updated during the first ``warmup_epochs`` epochs
    (official: K = 4, 15 epochs).
    """

    partial_channels: int = 4
    warmup_epochs: int = 15


@frozen
class DrnasConfig:
    """DrNAS (Chen et al., ICLR 2021): op weights sampled from ``Dirichlet(elu(alpha) + 1)``, reparameterised.

    ``regularization: l2`` (the official default) is the architecture
    optimiser's weight decay (official ``reg_scale`` 1e-3, the default
    ``arch_optimizer.weight_decay``); ``kl`` adds ``kl_scale * sum over edges
    of KL(Dir(elu(alpha) + 1) || Dir(1))`` to the alpha loss (the official code
    then sets the weight decay to 0). The official derivation keeps ``none``
    in the ranking (``exclude_none: false``): an edge whose best op is
    ``none`` is dropped, and a node left without inputs with it.

    ``progressive: true`` is the official DARTS-space search: stages of
    ``stage_epochs`` (default: the search's epochs split evenly, the
    remainder to the last), each with the ops on the first
    ``C / stage_partial_channels[s]`` channels (PC-DARTS' partial channels
    and shuffle, no edge weights) and the alphas frozen for its first
    ``stage_warmup_epochs`` epochs; entering stage ``s + 1``, each edge keeps
    its ``stage_keep_ops[s]`` ops of largest alpha and the ops are widened by
    copying randomly chosen channels (official: K 6 then 4, 4 ops kept, 10
    epochs, two stages of 25).
    """

    regularization: str = "l2"
    kl_scale: float = 1e-3
    exclude_none: bool = False
    progressive: bool = False
    stage_partial_channels: typing.Tuple[int, ...] = (6, 4)
    stage_keep_ops: typing.Tuple[int, ...] = (4,)
    stage_warmup_epochs: int = 10
    stage_epochs: typing.Optional[typing.Tuple[int, ...]] = None


@frozen
class SdartsConfig:
    """SDARTS (Chen and Hsieh, ICML 2020): the weight step on perturbed op probabilities.

    ``perturbation: rs`` adds uniform noise in [-epsilon, epsilon] to
    ``softmax(alpha)``; ``adv`` runs ``pgd_steps`` steps of L-infinity PGD on
    the training loss; either is then clipped to [0, 1] and renormalised per
    edge. ``epsilon(e) = epsilon_start + (epsilon_max - epsilon_start) e / E``
    over E = ``anneal_epochs``, by default the search's epochs (official: 0.03
    and ``--epsilon_alpha 0.3``, 7 steps).
    """

    perturbation: str = "rs"
    epsilon_start: float = 0.03
    epsilon_max: float = 0.3
    pgd_steps: int = 7
    anneal_epochs: typing.Optional[int] = None


@frozen
class LambdaDartsConfig:
    """Lambda-DARTS (Movahedi et al., ICLR 2023): the gradient-alignment regulariser on the weights.

    ``lambda(e) = lambda_max * e / (E - 1)`` over ``anneal_epochs`` E (by
    default the search's epochs); ``epsilon_0`` sets the finite-difference
    radius ``epsilon_0 / ||u||``; ``correlation`` picks the direction ``u``,
    ``corr`` or ``signcorr`` (official: 0.125, 1e-4 and ``--corr_regularization``).
    """

    lambda_max: float = 0.125
    epsilon_0: float = 1e-4
    correlation: str = "corr"
    anneal_epochs: typing.Optional[int] = None


@frozen
class LatencyConfig:
    """Latency-aware search: ProxylessNAS' losses (Cai, Zhu and Han, ICLR 2019) on an expected latency.

    Off unless ``target_ms`` is given. The expected latency is that of the
    derived ``network`` (``deployed``: the retraining's size, as exported;
    ``search``: the search network's), from a lookup table of every op at
    the shape it sees there: measured on this machine through the TFLite
    interpreter (median of ``runs`` timed runs, cached per machine), or read
    from ``table``, a file measured elsewhere. ``loss: mul_log`` makes the
    architecture step minimise ``mul_alpha * CE * (log E / log T) ** mul_beta``,
    ``add_linear`` ``CE + add_lambda * (E - T) / T`` (ProxylessNAS' defaults:
    0.2, 0.3 and 0.1). ``edges: survival`` weights an edge's term by the share
    of a node's inputs derivation keeps (k over its inputs), ``all`` by 1.
    """

    target_ms: typing.Optional[float] = None
    loss: str = "mul_log"
    mul_alpha: float = 0.2
    mul_beta: float = 0.3
    add_lambda: float = 0.1
    network: str = "deployed"
    edges: str = "survival"
    table: typing.Optional[str] = None
    runs: int = 50


@frozen
class DartsPtConfig:
    """DARTS-PT (Wang et al., ICLR 2021): perturbation-based selection on the trained supernet.

    After the search's epochs, edges are taken in random order; on each, every
    op is masked in turn and the supernet's validation ``criterion`` measured,
    and the op whose removal hurts it most is kept; then each node with more
    than k inputs keeps the k whose removal hurts most. The supernet is tuned
    for ``tune_epochs`` between two selections, its weights' learning rate
    restarted at ``learning_rate_factor`` times the search's (official:
    ``--proj_intv 5``, ``acc``, ``learning_rate / 10``). Each measurement
    covers the whole validation split, as the official code's; with
    ``measure_examples`` only its first that many examples (a budget for
    machines where 268 passes over the split take too long).
    """

    tune_epochs: int = 5
    criterion: str = "accuracy"
    learning_rate_factor: float = 0.1
    measure_examples: typing.Optional[int] = None


# Each search method with options keeps them under its own key of ``search``.
METHODS = ("darts", "beta_darts", "darts_minus", "fair_darts", "snas", "gdas", "pc_darts", "drnas", "sdarts",
           "lambda_darts", "darts_pt")
METHOD_OPTION_KEYS = ("beta_darts", "darts_minus", "fair_darts", "snas", "gdas", "pc_darts", "drnas", "sdarts",
                      "lambda_darts", "darts_pt")
# Options that compose with another method: PC-DARTS' partial-channel supernet under another method's
# mixing and losses, DARTS-PT's selection after another method's supernet training.
COMBINED_OPTION_KEYS = ("pc_darts", "darts_pt")


def written_search(spec):
    """The ``search`` block as the spec's document writes it (defaults not filled in)."""
    return (spec.document or {}).get("search") or {}


def combined_methods(spec):
    """Of ``COMBINED_OPTION_KEYS``, those the spec writes beside another ``search.method``, in that order."""
    written = written_search(spec)
    return [key for key in COMBINED_OPTION_KEYS if key in written and key != spec.search.method]


@frozen
class RunControl:
    """What every search shares: the method, determinism, checkpoints, divergence handling, monitoring."""

    method: str = "darts"
    beta_darts: BetaDartsConfig = BetaDartsConfig()
    darts_minus: DartsMinusConfig = DartsMinusConfig()
    fair_darts: FairDartsConfig = FairDartsConfig()
    snas: SnasConfig = SnasConfig()
    gdas: GdasConfig = GdasConfig()
    pc_darts: PcDartsConfig = PcDartsConfig()
    drnas: DrnasConfig = DrnasConfig()
    sdarts: SdartsConfig = SdartsConfig()
    lambda_darts: LambdaDartsConfig = LambdaDartsConfig()
    darts_pt: DartsPtConfig = DartsPtConfig()
    deterministic: bool = False
    # TensorFlow's graph optimiser (Grappler) for the step functions: see runtime/graph_build.py.
    graph_optimizer: str = "auto"
    # The layers' Keras dtype policy (runtime/precision.py); weights, alphas and optimisers stay float32.
    precision: str = "float32"
    checkpoint_every_steps: typing.Optional[int] = 200
    on_divergence: str = "stop"
    divergence_lr_factor: float = 0.5
    max_rollbacks: int = 3
    tensorboard: bool = True
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()


@frozen
class SearchConfig(RunControl):
    epochs: int = 50
    order: str = "second"
    second_order_mode: str = "finite_difference"
    hvp_epsilon: float = 0.01
    recompute_cells: bool = False
    reuse_virtual_gradient: bool = False
    seed: int = 2
    steps_per_epoch: typing.Optional[int] = None
    weights_optimizer: SGDConfig = SGDConfig()
    arch_optimizer: AdamConfig = AdamConfig()
    latency: LatencyConfig = LatencyConfig()


@frozen
class RetrainConfig:
    enabled: bool = True
    epochs: int = 600
    batch_size: int = 96
    init_channels: int = 36
    layers: int = 20
    stem: str = "cifar"
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    seed: int = 0
    compare_random: int = 0
    compare_seeds: int = 1
    precision: str = "float32"
    weights_optimizer: SGDConfig = SGDConfig(learning_rate_min=0.0)
    augment: AugmentConfig = AugmentConfig(cutout=16)


@frozen
class ThreadsConfig:
    """The CPU threads TensorFlow runs kernels on (``tf.config.threading``), set before its runtime starts.

    ``inter_op``: how many kernels run at once; ``intra_op``: how many
    threads one kernel splits its work over; ``0``: TensorFlow's own choice
    (every core, or ``TF_NUM_INTEROP_THREADS`` / ``TF_NUM_INTRAOP_THREADS``).
    ``auto``: on a machine with no GPU and at most 4 cores, one thread per
    kernel and as many kernels at once as there are cores (a supernet's many
    small, independent kernels keep the cores busy without splitting each
    one); otherwise, or when those variables are set, TensorFlow's choice.
    ``search.deterministic`` runs one kernel at a time (``inter_op`` 1,
    ``intra_op`` ``auto`` then TensorFlow's choice).
    """

    inter_op: typing.Union[str, int] = "auto"
    intra_op: typing.Union[str, int] = "auto"


@frozen
class DistributeConfig:
    """Data-parallel search and retraining on tf.distribute.

    ``mirrored``: all GPUs of this machine, or ``devices``; ``multi_worker``:
    MultiWorkerMirroredStrategy across the machines ``TF_CONFIG`` describes;
    ``tpu``: TPUStrategy on the TPU the environment provides.
    ``batch_norm`` (search): ``global`` normalises over the global batch (as
    one device would: statistics all-reduced in every batch norm);
    ``replica`` normalises each replica's slice on its own, with no
    collective. Retraining always normalises over the global batch.
    ``threads``: the CPU threads of this process (``ThreadsConfig``).
    """

    strategy: str = "none"
    devices: typing.Optional[tuple] = None
    batch_norm: str = "global"
    threads: ThreadsConfig = ThreadsConfig()


EXPORT_FORMATS = ("saved_model", "tflite", "tflite_dynamic", "tflite_int8", "onnx")


@frozen
class ExportConfig:
    """What ``export`` writes, each file verified in a fresh process.

    ``formats``: ``saved_model`` (TensorFlow Serving, TF.js, Python);
    ``tflite`` (float32), ``tflite_dynamic`` (int8 weights, float
    activations) and ``tflite_int8`` (integers throughout, calibrated on
    ``calibration_samples`` training examples) for TensorFlow Lite / LiteRT;
    ``onnx`` (float32, with the ``onnx`` extra) for ONNX Runtime.
    ``latency_runs``: timed runs of one example per format, of which the
    median is reported.
    """

    enabled: bool = True
    formats: tuple = ("saved_model",)
    calibration_samples: int = 200
    latency_runs: int = 50


@frozen
class Spec:
    """A validated search-space spec.

    ``document`` is the merged mapping after ``extends`` and overrides (plain
    JSON types), ``sha256`` its canonical hash, ``source`` the file it came from.
    """

    version: int
    name: str
    search_space: ConvSearchSpace
    plugins: tuple = ()
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    retrain: RetrainConfig = RetrainConfig()
    export: ExportConfig = ExportConfig()
    distribute: DistributeConfig = DistributeConfig()
    source: str = "<dict>"
    document: typing.Any = dataclasses.field(default=None, compare=False, repr=False)
    sha256: str = ""

    def derived_network(self, retrain=True):
        """The ``network`` of a derived spec for this spec's data and cell layout.

        ``retrain=True`` takes channels, depth, stem, auxiliary head and
        drop-path from the ``retrain`` block, otherwise the search network's.
        """
        space = self.search_space
        network = space.network
        settings = {
            "init_channels": network.init_channels,
            "layers": network.layers,
            "stem_multiplier": network.stem_multiplier,
            "reduction_cells": space.reduction_cells if space.reduction_cells == "thirds" else list(space.reduction_cells),
            "input_shape": list(network.input_shape),
            "num_classes": network.num_classes,
            "stem": "cifar",
            "auxiliary": False,
            "drop_path_prob": 0.0,
        }
        if retrain:
            settings.update(
                init_channels=self.retrain.init_channels,
                layers=self.retrain.layers,
                stem=self.retrain.stem,
                auxiliary=self.retrain.auxiliary,
                drop_path_prob=self.retrain.drop_path_prob,
            )
        return settings


# -- recurrent cells (the Penn Treebank setting) -------------------------------


@frozen
class LanguageModelConfig:
    """The language model around a recurrent cell; defaults are the reference search's.

    Dropouts, in the reference's terms: ``dropout_output`` (dropout), locked on
    the cell outputs; ``dropout_hidden`` (dropouth), on the hidden state inside
    the cell; ``dropout_cell_input`` (dropoutx), on the cell's input; and
    ``dropout_embedding`` (dropouti), locked on the embedded tokens;
    ``dropout_words`` (dropoute) drops whole rows of the embedding matrix.
    """

    embedding_size: int = 300
    hidden_size: int = 300
    dropout_output: float = 0.75
    dropout_hidden: float = 0.25
    dropout_cell_input: float = 0.75
    dropout_embedding: float = 0.2
    dropout_words: float = 0.0
    tie_weights: bool = True
    init_range: float = 0.04


@frozen
class RecurrentSearchSpace:
    kind: str = "recurrent_cell"
    operations: tuple = DARTS_RECURRENT_OPERATIONS
    nodes: int = 8
    k: int = 1
    highway: bool = True
    output: str = "mean"
    batch_norm: bool = True
    network: LanguageModelConfig = LanguageModelConfig()


@frozen
class TextDataConfig:
    """Token streams for language modelling (``bptt`` steps of ``batch_size`` streams)."""

    source: str = "ptb"
    path: typing.Optional[str] = None
    batch_size: int = 256
    eval_batch_size: int = 10
    bptt: int = 35
    variable_length: bool = True
    max_vocabulary: typing.Optional[int] = None
    max_train_tokens: typing.Optional[int] = None
    max_eval_tokens: typing.Optional[int] = None


@frozen
class RecurrentSearchConfig(RunControl):
    """The reference recurrent search: plain SGD (lr 20, clip 0.25), Adam (0.9, 0.999) on alpha."""

    epochs: int = 50
    order: str = "second"
    second_order_mode: str = "finite_difference"
    hvp_epsilon: float = 0.01
    seed: int = 3
    steps_per_epoch: typing.Optional[int] = None
    activation_regularization: float = 0.0
    temporal_activation_regularization: float = 1e-3
    weights_optimizer: SGDConfig = SGDConfig(
        learning_rate=20.0, learning_rate_min=20.0, momentum=0.0, weight_decay=5e-7, grad_clip=0.25
    )
    arch_optimizer: AdamConfig = AdamConfig(learning_rate=3e-3, beta_1=0.9, weight_decay=1e-3)


@frozen
class RecurrentRetrainConfig:
    """The reference evaluation: 850 units, SGD lr 20 switching to averaged SGD when validation stalls."""

    enabled: bool = True
    epochs: int = 8000
    batch_size: int = 64
    embedding_size: int = 850
    hidden_size: int = 850
    dropout_output: float = 0.75
    dropout_hidden: float = 0.25
    dropout_cell_input: float = 0.75
    dropout_embedding: float = 0.2
    dropout_words: float = 0.1
    seed: int = 1267
    compare_random: int = 0
    compare_seeds: int = 1
    precision: str = "float32"
    learning_rate: float = 20.0
    weight_decay: float = 8e-7
    grad_clip: typing.Optional[float] = 0.25
    activation_regularization: float = 0.0
    temporal_activation_regularization: float = 1e-3
    averaging: bool = True
    nonmono: int = 5


@frozen
class RecurrentSpec:
    """A validated recurrent search-space spec (``search_space.kind: recurrent_cell``)."""

    version: int
    name: str
    search_space: RecurrentSearchSpace
    plugins: tuple = ()
    data: TextDataConfig = TextDataConfig()
    search: RecurrentSearchConfig = RecurrentSearchConfig()
    retrain: RecurrentRetrainConfig = RecurrentRetrainConfig()
    export: ExportConfig = ExportConfig()
    distribute: DistributeConfig = DistributeConfig()
    source: str = "<dict>"
    document: typing.Any = dataclasses.field(default=None, compare=False, repr=False)
    sha256: str = ""

    def derived_network(self, retrain=True):
        """The ``network`` of a derived spec: the language model, sized for retraining or as searched."""
        space = self.search_space
        settings = {**to_plain(space.network), "highway": space.highway, "output": space.output}
        if retrain:
            for key in LANGUAGE_MODEL_RETRAIN_KEYS:
                settings[key] = getattr(self.retrain, key)
        return settings


# The language-model settings a retrain block restates for the evaluation model.
LANGUAGE_MODEL_RETRAIN_KEYS = (
    "embedding_size", "hidden_size", "dropout_output", "dropout_hidden", "dropout_cell_input",
    "dropout_embedding", "dropout_words",
)


@frozen
class DerivedLanguageModelConfig:
    """The language model a derived recurrent cell is used in (vocabulary from the data)."""

    embedding_size: int
    hidden_size: int
    dropout_output: float = 0.75
    dropout_hidden: float = 0.25
    dropout_cell_input: float = 0.75
    dropout_embedding: float = 0.2
    dropout_words: float = 0.1
    tie_weights: bool = True
    init_range: float = 0.04
    highway: bool = True
    output: str = "mean"
    vocabulary_size: typing.Optional[int] = None


@frozen
class Edge:
    op: str
    input: int


@frozen
class CellGenotype:
    """The discrete cell: ``nodes[n]`` lists the edges into intermediate node ``n``.

    A convolutional cell numbers its two inputs 0 and 1 and its intermediate
    nodes from 2; a recurrent cell numbers its fixed node 0 and its searched
    nodes from 1.
    """

    nodes: tuple
    concat: tuple

    def to_document(self):
        return {
            "nodes": [[{"op": e.op, "input": e.input} for e in node] for node in self.nodes],
            "concat": list(self.concat),
        }


@frozen
class DerivedNetworkConfig:
    init_channels: int
    layers: int
    input_shape: tuple
    num_classes: int
    stem_multiplier: int = 3
    reduction_cells: typing.Any = "thirds"
    stem: str = "cifar"
    auxiliary: bool = False
    drop_path_prob: float = 0.0

    @property
    def reduction_positions(self):
        return reduction_positions(self.reduction_cells, self.layers)


@frozen
class DerivedSpec:
    """A discrete architecture: the result of a search, as data."""

    version: int
    kind: str
    name: str
    operations: tuple
    cells: typing.Any  # mapping cell type -> CellGenotype
    network: DerivedNetworkConfig
    origin: typing.Any = dataclasses.field(default=None, compare=False, repr=False)
    plugins: tuple = ()
    source: str = "<dict>"

    def to_document(self):
        doc = {"version": self.version, "kind": self.kind, "name": self.name}
        if self.plugins:
            doc["plugins"] = list(self.plugins)
        doc.update({
            "operations": list(self.operations),
            "cells": {t: c.to_document() for t, c in self.cells.items()},
            "network": to_plain(self.network),
        })
        if self.origin:
            doc["origin"] = to_plain(self.origin)
        return doc


def to_plain(value):
    """Dataclasses, tuples and mappings -> plain JSON-compatible values."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, typing.Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def from_mapping(cls, mapping):
    """Build dataclass ``cls`` from a validated mapping, recursing into fields.

    Missing keys take the dataclass defaults; lists become tuples.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in mapping:
            continue
        value = mapping[field.name]
        field_type = hints[field.name]
        if dataclasses.is_dataclass(field_type):
            default = field.default if field.default is not dataclasses.MISSING else None
            base = to_plain(default) if default is not None else {}
            value = from_mapping(field_type, {**base, **value})
        elif isinstance(value, list):
            value = _freeze(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value
