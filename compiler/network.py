"""The derived (evaluation) network built from a derived spec.

Same stem, channel schedule and reduction positions as the search network,
with derived cells; an optional auxiliary head on the output of the last
reduction cell (DARTS' second one) and drop-path inside the cells.
``call`` returns logits, and ``(logits, auxiliary_logits)`` when training
with the auxiliary head. It takes images normalised with the training
statistics; ``with_input_normalization`` wraps it into the model a run saves,
which takes images as the data gives them.
"""

import keras
import numpy as np
from keras import ops

from keras_darts.spec import check_derived, derived_from_document, derived_with_network

from .cells import DerivedCell
from .graph import cell_schedule
from .ops import PACKAGE, batch_norm


def _conv_bn(filters, kernel, stride, name, padding=0, synchronized=False):
    layers = []
    if padding:
        layers.append(keras.layers.ZeroPadding2D(padding, name=f"{name}__pad"))
    layers.append(keras.layers.Conv2D(filters, kernel, strides=stride, use_bias=False, name=f"{name}__conv"))
    layers.append(batch_norm(True, f"{name}__bn", synchronized))
    return layers


def stem_layers(stem, channels, stem_multiplier, synchronized=False):
    """``(stem0, stem1, reduction_prev)``: the layers before the first cell (``stem1`` is ``None`` on CIFAR).

    CIFAR: conv3x3 + BN to ``stem_multiplier * channels``, both cell inputs;
    ImageNet: two stride-2 conv-BNs (ReLU between) for the first input, a
    further ReLU and stride-2 conv-BN for the second.
    """
    if stem == "cifar":
        return _conv_bn(stem_multiplier * channels, 3, 1, "stem", 1, synchronized), None, False
    stem0 = [
        *_conv_bn(channels // 2, 3, 2, "stem0_a", 1, synchronized),
        keras.layers.ReLU(name="stem0__relu"),
        *_conv_bn(channels, 3, 2, "stem0_b", 1, synchronized),
    ]
    stem1 = [keras.layers.ReLU(name="stem1__relu"), *_conv_bn(channels, 3, 2, "stem1", 1, synchronized)]
    return stem0, stem1, True


@keras.saving.register_keras_serializable(package=PACKAGE)
class AuxiliaryHead(keras.layers.Layer):
    """ReLU, 5x5 average pool (stride 3 CIFAR / 2 ImageNet), conv1x1 128 + BN + ReLU,
    conv2x2 768 (+ BN on CIFAR) + ReLU, global average pool, linear."""

    def __init__(self, num_classes, style="cifar", synchronized=False, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.style = style
        self.synchronized = synchronized
        self.pool = keras.layers.AveragePooling2D(5, strides=3 if style == "cifar" else 2, name=f"{self.name}__pool")
        self.conv1 = keras.layers.Conv2D(128, 1, use_bias=False, name=f"{self.name}__conv1")
        self.bn1 = batch_norm(True, f"{self.name}__bn1", synchronized)
        self.conv2 = keras.layers.Conv2D(768, 2, use_bias=False, name=f"{self.name}__conv2")
        self.bn2 = batch_norm(True, f"{self.name}__bn2", synchronized) if style == "cifar" else None
        self.global_pool = keras.layers.GlobalAveragePooling2D(name=f"{self.name}__global_pool")
        self.classifier = keras.layers.Dense(num_classes, name=f"{self.name}__classifier")

    def build(self, input_shape):
        self.built = True

    def call(self, x, training=None):
        x = self.pool(ops.relu(x))
        x = ops.relu(self.bn1(self.conv1(x), training=training))
        x = self.conv2(x)
        if self.bn2 is not None:
            x = self.bn2(x, training=training)
        return self.classifier(self.global_pool(ops.relu(x)))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "style": self.style,
                "synchronized": self.synchronized}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DerivedNetwork(keras.Model):
    """The derived cells stacked as the spec's network says.

    ``synchronized=True`` builds its Keras BNs (stems, auxiliary head) to
    compute batch statistics across replicas, for training under a
    tf.distribute strategy; the cells' own BNs do so in a replica context
    anyway.
    """

    def __init__(self, derived, seed=None, synchronized=False, **kwargs):
        kwargs.setdefault("name", "derived_network")
        super().__init__(**kwargs)
        if isinstance(derived, dict):
            derived = derived_from_document(derived)
        self.derived = derived
        self.seed = seed
        self.synchronized = bool(synchronized)
        network = derived.network
        self.positions = network.reduction_positions
        self.auxiliary = network.auxiliary
        self.aux_position = max(self.positions) if (self.auxiliary and self.positions) else None
        channels = network.init_channels
        self.stem0, self.stem1, reduction_prev = stem_layers(network.stem, channels, network.stem_multiplier,
                                                             synchronized)
        self.cells = [
            DerivedCell(
                derived.cells["reduce" if reduction else "normal"], cell_channels, reduction, cell_reduction_prev,
                seed=None if seed is None else seed + position, name=f"cell_{position:02d}",
            )
            for position, cell_channels, reduction, cell_reduction_prev in cell_schedule(
                network.layers, self.positions, channels, reduction_prev
            )
        ]
        self.auxiliary_head = (
            AuxiliaryHead(network.num_classes, network.stem, synchronized, name="auxiliary_head")
            if self.aux_position is not None else None
        )
        self.global_pool = keras.layers.GlobalAveragePooling2D(name="global_pool")
        self.classifier = keras.layers.Dense(network.num_classes, name="classifier")
        self.drop_path_rate = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="drop_path_rate"
        )

    def build(self, input_shape):
        # Sublayers create their weights on first use: run one forward pass on
        # zeros so that every weight exists (Keras builds before loading weights).
        self.call(ops.zeros((1, *tuple(input_shape)[1:])), training=False)
        self.built = True

    @staticmethod
    def _run(layers, x, training):
        for layer in layers:
            x = layer(x, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
        return x

    def call(self, inputs, training=None):
        s0 = self._run(self.stem0, inputs, training)
        s1 = s0 if self.stem1 is None else self._run(self.stem1, s0, training)
        rate = self.drop_path_rate if training else None
        aux_logits = None
        for position, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_path_rate=rate, training=training)
            if position == self.aux_position and (training or not self.auxiliary_head.built):
                # Outside training the head only runs once, so that it is built (and saved).
                head_logits = self.auxiliary_head(s1, training=training)
                aux_logits = head_logits if training else None
        logits = self.classifier(self.global_pool(s1))
        if aux_logits is not None:
            return logits, aux_logits
        return logits

    def get_config(self):
        return {"name": self.name, "derived": self.derived.to_document(), "seed": self.seed,
                "synchronized": self.synchronized}


def build_network(derived, seed=None, synchronized=False, **overrides):
    """Build the derived network from a ``DerivedSpec`` (or a document).

    ``synchronized`` makes its Keras BNs synchronise across replicas (see
    ``DerivedNetwork``). ``overrides`` replace network settings: ``init_channels``, ``layers``,
    ``num_classes``, ``input_shape``, ``auxiliary``, ``stem``,
    ``reduction_cells``, ``stem_multiplier``, ``drop_path_prob``.
    """
    if isinstance(derived, dict):
        derived = derived_from_document(derived)
    derived = derived_with_network(derived, **overrides) if overrides else check_derived(derived)
    model = DerivedNetwork(derived, seed=seed, synchronized=synchronized)
    model.build((None, *derived.network.input_shape))
    return model


def count_parameters(model, exclude_auxiliary=True):
    """Trainable parameters, optionally without the auxiliary head (the paper's count)."""
    excluded = set()
    head = getattr(model, "auxiliary_head", None)
    if exclude_auxiliary and head is not None:
        excluded = {id(v) for v in head.trainable_variables}
    return sum(int(ops.size(v)) for v in model.trainable_variables if id(v) not in excluded)


def with_input_normalization(network, mean, std):
    """The model a run saves: ``network`` behind a ``Normalization`` layer with the training statistics.

    It takes images as the data loader gives them (float32, scaled to [0, 1])
    and returns the network's logits; ``derived_network_of`` gives the network back.
    """
    inputs = keras.Input(tuple(network.derived.network.input_shape), name="images")
    normalised = keras.layers.Normalization(mean=np.asarray(mean, np.float32),
                                            variance=np.square(np.asarray(std, np.float32)),
                                            name="normalize")(inputs)
    return keras.Model(inputs, network(normalised, training=False), name="classifier")


def derived_network_of(model):
    """The network of a saved model: the model itself, or the one behind its normalisation.

    A network is a model that carries its derived spec as ``derived`` (``DerivedNetwork``
    and the networks of plugin kinds).
    """
    if hasattr(model, "derived"):
        return model
    inner = [layer for layer in getattr(model, "layers", ()) if hasattr(layer, "derived")]
    if len(inner) != 1:
        raise TypeError(f"{model.name} holds {len(inner)} derived networks, expected one")
    return inner[0]
