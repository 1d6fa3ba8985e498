"""Which layers tfacd quantizes, and how: the QuantizeConfig and the registry.

As in tfmot's default 8-bit scheme, a registry maps layer types to `QuantizeConfig`s. tfacd has
one config class: it quantizes some of a layer's weights (each with its own `ClipQuantizer`) and,
optionally, its output. Activations are always quantized as *outputs*, never through tfmot's
activation quantizers: those are built without a shape, and per-channel clips need one.

Layer roles:

* weight layers (`WEIGHT_ATTRIBUTES`): kernels quantized per output channel (Conv2D, Dense) or
  per input channel (DepthwiseConv2D: one clip pair per input channel, not per depth multiplier
  as tfmot's own config does); the output quantized unless the layout transform fuses it into a
  following BatchNormalization or ReLU.
* output layers (`OUTPUT_LAYERS`): the output is quantized (ReLU, Add, BatchNormalization,
  average pooling, ...).
* pass-through layers (`PASSTHROUGH_LAYERS`): their outputs are values of their inputs (max
  pooling, zero padding, reshapes, dropout), so they stay on the input's grid and need no
  quantizer.

Anything else is unsupported: `tfacd.quantize_model` raises, or leaves it in float with a
warning that names it (`unsupported_layers="float"`).
"""

from __future__ import annotations

from tensorflow_model_optimization.python.core.quantization.keras import quantize_config
from tensorflow_model_optimization.python.core.quantization.keras import quantize_registry

from tfacd._keras import keras
from tfacd.quantizers import ClipQuantizer

#: Weight layers: class name -> [(attribute, channel axis of that weight)].
WEIGHT_ATTRIBUTES = {
    "Conv1D": [("kernel", -1)],
    "Conv2D": [("kernel", -1)],
    "DepthwiseConv2D": [("depthwise_kernel", 2)],
    "SeparableConv2D": [("depthwise_kernel", 2), ("pointwise_kernel", -1)],
    "Dense": [("kernel", -1)],
}

#: Layers whose output gets an activation quantizer.
OUTPUT_LAYERS = frozenset({
    "BatchNormalization", "SyncBatchNormalization", "ReLU", "Activation", "LeakyReLU", "PReLU",
    "ELU", "Softmax", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum",
    "Concatenate", "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "Rescaling", "Normalization", "UpSampling2D",
})

#: Global average poolings: `QuantizeScheme(exact_average_pooling=True)` leaves them
#: unquantized and the export holds their exact mean on int8.
GLOBAL_AVERAGE_POOLS = ("GlobalAveragePooling1D", "GlobalAveragePooling2D")

#: Layers whose outputs are values of their inputs: no quantizer needed.
PASSTHROUGH_LAYERS = frozenset({
    "InputLayer", "ZeroPadding1D", "ZeroPadding2D", "MaxPooling1D", "MaxPooling2D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "Flatten", "Reshape", "Dropout",
    "SpatialDropout2D", "Cropping2D", "Permute",
})


def layer_role(layer) -> str | None:
    """'weight', 'output', 'passthrough' or None (unsupported) for a Keras layer."""
    name = type(layer).__name__
    if name in WEIGHT_ATTRIBUTES:
        return "weight"
    if name in OUTPUT_LAYERS:
        return "output"
    if name in PASSTHROUGH_LAYERS:
        return "passthrough"
    return None


@keras.utils.register_keras_serializable(package="tfacd")
class ClipQuantizeConfig(quantize_config.QuantizeConfig):
    """Quantizes the named weights of a layer and, optionally, its output.

    Args:
      weight_attributes: the layer attributes holding the weights to quantize ("kernel").
      weight_quantizers: one `ClipQuantizer` per attribute.
      output_quantizer: a `ClipQuantizer` for the layer's output, or None.
    """

    def __init__(self, weight_attributes=(), weight_quantizers=(), output_quantizer=None):
        if len(weight_attributes) != len(weight_quantizers):
            raise ValueError("one weight quantizer per weight attribute is needed, got "
                             f"{len(weight_quantizers)} for {list(weight_attributes)}")
        self.weight_attributes = list(weight_attributes)
        self.weight_quantizers = [_as_quantizer(q) for q in weight_quantizers]
        self.output_quantizer = _as_quantizer(output_quantizer)

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, attribute), quantizer) for attribute, quantizer
                in zip(self.weight_attributes, self.weight_quantizers)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != len(self.weight_attributes):
            raise ValueError(f"{layer.name}: expected {len(self.weight_attributes)} quantized "
                             f"weights, got {len(quantize_weights)}")
        for attribute, weight in zip(self.weight_attributes, quantize_weights):
            setattr(layer, attribute, weight)

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def quantizers(self):
        """Every quantizer of this config, weights first."""
        return self.weight_quantizers + ([self.output_quantizer] if self.output_quantizer
                                         else [])

    def get_config(self):
        return {
            "weight_attributes": list(self.weight_attributes),
            "weight_quantizers": [keras.utils.serialize_keras_object(q)
                                  for q in self.weight_quantizers],
            "output_quantizer": (keras.utils.serialize_keras_object(self.output_quantizer)
                                 if self.output_quantizer is not None else None),
        }

    def __eq__(self, other):
        return isinstance(other, ClipQuantizeConfig) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


def _as_quantizer(value):
    if value is None or isinstance(value, ClipQuantizer):
        return value
    return keras.utils.deserialize_keras_object(
        value, custom_objects={"ClipQuantizer": ClipQuantizer})


class ClipQuantizeRegistry(quantize_registry.QuantizeRegistry):
    """Maps layer types to `ClipQuantizeConfig`s for a `tfacd.QuantizeScheme`.

    `get_quantize_config` gives a layer's stand-alone config (weights and output quantized).
    Inside a model, the scheme's layout transform refines it: it drops output quantizers that
    a following BatchNormalization or ReLU makes redundant and applies `first_last_bits`.
    """

    def __init__(self, scheme):
        self._scheme = scheme

    def supports(self, layer):
        return layer_role(layer) is not None

    def get_quantize_config(self, layer):
        return self.make_config(layer, quantize_output=True)

    def make_config(self, layer, quantize_output: bool, weight_bits: int | None = None,
                    output_bits: int | None = None) -> ClipQuantizeConfig:
        """The config for `layer` with the scheme's settings and the given bit widths."""
        role = layer_role(layer)
        if role is None:
            raise ValueError(f"layer {layer.name!r} of type {type(layer).__name__} is not "
                             "supported by tfacd")
        scheme = self._scheme
        attributes, quantizers = [], []
        if role == "weight":
            for attribute, axis in WEIGHT_ATTRIBUTES[type(layer).__name__]:
                attributes.append(attribute)
                quantizers.append(scheme.make_quantizer(
                    weight_bits or scheme.weight_bits, kind="weight", axis=axis))
        output = None
        if quantize_output and role != "passthrough":
            output = scheme.make_quantizer(output_bits or scheme.activation_bits,
                                           kind="activation", axis=-1)
        return ClipQuantizeConfig(attributes, quantizers, output)
