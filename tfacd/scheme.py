"""`tfacd.QuantizeScheme`: a tfmot quantization scheme, and the calls users make with it.

Used exactly like tfmot's own schemes::

    annotated = tfmot.quantization.keras.quantize_annotate_model(model)
    with tfacd.quantize_scope():
        qat_model = tfmot.quantization.keras.quantize_apply(
            annotated, scheme=tfacd.QuantizeScheme(weight_bits=2, activation_bits=2))

or in one call, `tfacd.quantize_model(model, weight_bits=2, activation_bits=2)`, which also
checks every layer up front (an unsupported layer raises, or stays float with a warning).

The scheme's layout transform places quantizers where TFLite's fused kernels put them:

* Conv/Depthwise/Dense followed by BatchNormalization: no quantizer between them (BN is folded
  into the weights at export); ... followed by ReLU/ReLU6: only the ReLU's output is quantized;
  Add followed by ReLU: likewise.
* The model input gets a per-tensor quantizer (a tfmot `QuantizeLayer`), as in tfmot's
  default scheme.
* `first_last_bits` applies to the first and last weight layers: their weights, the tensors
  they consume (the model input; the pooled features before the classifier) and the last
  layer's output (the logits).
* `exact_average_pooling`: global average pooling gets no quantizer. Its input sits on a
  per-tensor grid of step `s` with `n + 1` levels; the mean of `c` such values sits on the
  grid of step `s / c`, exactly, and spans `n c` of its steps. When `n c <= 255` the export
  holds it on int8 at that step, and every TFLite runtime's MEAN then computes it with no
  rounding at all (`tfacd.export.activations`), where a k-bit pooled output is rounded by
  each runtime's own requantization (XNNPACK in float, the builtin and Micro kernels in
  fixed point, differing on about one pooled value in four, measured).
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layout_transform
from tensorflow_model_optimization.python.core.quantization.keras import quantize_scheme
from tensorflow_model_optimization.python.core.quantization.keras import utils as tfmot_utils
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import model_transformer
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import transforms

from tf_keras.src.saving.serialization_lib import SafeModeScope

from tfacd import kernels, ops
from tfacd._keras import keras
from tfacd.quantizers import (GRANULARITIES, ClipQuantizer, calibrating, check_range,
                              iter_quantizers)
from tfacd.registry import (GLOBAL_AVERAGE_POOLS, ClipQuantizeConfig, ClipQuantizeRegistry,
                            layer_role)

UNSUPPORTED_POLICIES = ("error", "float")
_BATCH_NORMS = ("BatchNormalization", "SyncBatchNormalization")


class QuantizeScheme(quantize_scheme.QuantizeScheme):
    """Low-bit QAT with learnable asymmetric clips, per channel or per layer.

    Args:
      weight_bits: bits of weights (2 to 8).
      activation_bits: bits of activations (2 to 8).
      granularity: "per_channel" (one clip pair per channel, weights and activations) or
        "per_layer" (one pair per tensor).
      activation_granularity: the activations' granularity when it should differ from the
        weights' ("per_channel" or "per_layer"); None: `granularity` for both. Separates the
        two halves of the per-channel method (the model input's quantizer is per tensor
        either way).
      first_last_bits: bits of the first and last weight layers and the tensors around them;
        None to use `weight_bits`/`activation_bits` everywhere.
      sqnr_weight: weight of the SQNR loss, `-sqnr_weight * mean SQNR (dB)` over all
        quantizers; 0 turns it off.
      gradient: clip gradient, "lsq" (LSQ+, default) or "pact".
      init_method: clip initialization from data, "mse" (per-channel error-minimizing search)
        or "minmax".
      activation_init_method: the activations' initialization when it should differ from
        `init_method` ("mse" or "minmax"); None: `init_method` for both.
      integer_zero_point: snap each grid so zero is on it (required for integer export).
      acd_pull: build activation quantizers with the ACD "pull" penalty, driven by
        `tfacd.callbacks.ClipDecay(mode="pull")`.
      quantize_input: add an input quantizer after each model input.
      input_range: `(lower, upper)`: the input quantizer at 8 bits with its clips fixed there
        (`ClipQuantizer(fixed_range=...)`), for inputs that already sit on a known 8-bit grid:
        with `tfacd.data.PIXEL_GRID`'s normalization, `(-2, 127/64)` holds every pixel value
        exactly, and every TFLite runtime reads the same input integers. None: the input's
        clips are calibrated and learned at `first_last_bits` like any activation's.
      symmetric_weights: weight grids symmetric around zero at every width,
        `s = max(|l|, |u|) / (2^(b-1) - 1)` (8-bit weights always are; `tfacd.ops`). At 4 bits
        this is what int4 storage needs (`export_tflite(..., weight_storage="int4")`): 15
        levels in `[-7, 7]` instead of 16 placed by the clips. 2- and 3-bit grids fit int4
        without it.
      unsupported_layers: "error" (raise, naming the layers) or "float" (leave them in float
        with a warning that names them); used by `tfacd.quantize_model`.
      exact_average_pooling: global average pooling unquantized, its mean exact on the
        input's grid divided by the pooled count (module docstring); needs per-tensor
        activations and `(2^bits - 1) * count <= 255` for the pooled input, checked when the
        model is quantized.
    """

    def __init__(self, weight_bits: int = 4, activation_bits: int = 4,
                 granularity: str = "per_channel", first_last_bits: int | None = 8,
                 sqnr_weight: float = 0.0, gradient: str = "lsq", init_method: str = "mse",
                 integer_zero_point: bool = True, acd_pull: bool = False,
                 quantize_input: bool = True, unsupported_layers: str = "error",
                 activation_granularity: str | None = None,
                 activation_init_method: str | None = None,
                 symmetric_weights: bool = False, input_range=None,
                 exact_average_pooling: bool = False):
        self.weight_bits = _checked_bits("weight_bits", weight_bits)
        self.activation_bits = _checked_bits("activation_bits", activation_bits)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        if activation_granularity is not None and activation_granularity not in GRANULARITIES:
            raise ValueError(f"activation_granularity must be one of {GRANULARITIES} or None, "
                             f"got {activation_granularity!r}")
        self.activation_granularity = activation_granularity
        self.first_last_bits = (None if first_last_bits is None
                                else _checked_bits("first_last_bits", first_last_bits))
        try:
            self.sqnr_weight = float(sqnr_weight)
        except (TypeError, ValueError):
            raise ValueError(f"sqnr_weight must be a number >= 0, got {sqnr_weight!r}") from None
        if not self.sqnr_weight >= 0.0:
            raise ValueError(f"sqnr_weight must be >= 0, got {sqnr_weight!r}")
        self.gradient = ops.check_gradient(gradient)
        self.init_method = ops.check_init_method(init_method)
        self.activation_init_method = (None if activation_init_method is None
                                       else ops.check_init_method(activation_init_method))
        self.integer_zero_point = bool(integer_zero_point)
        self.acd_pull = bool(acd_pull)
        self.quantize_input = bool(quantize_input)
        self.symmetric_weights = bool(symmetric_weights)
        self.input_range = check_range("input_range", input_range)
        if unsupported_layers not in UNSUPPORTED_POLICIES:
            raise ValueError(f"unsupported_layers must be one of {UNSUPPORTED_POLICIES}, "
                             f"got {unsupported_layers!r}")
        self.unsupported_layers = unsupported_layers
        self.exact_average_pooling = bool(exact_average_pooling)
        if self.exact_average_pooling and \
                (self.activation_granularity or self.granularity) != "per_layer":
            raise ValueError("exact_average_pooling needs per-tensor activations "
                             "(activation_granularity='per_layer'): the pooled mean is exact "
                             "on one grid per tensor")

    def get_config(self) -> dict:
        return {k: getattr(self, k) for k in (
            "weight_bits", "activation_bits", "granularity", "first_last_bits", "sqnr_weight",
            "gradient", "init_method", "integer_zero_point", "acd_pull", "quantize_input",
            "unsupported_layers", "activation_granularity",
            "activation_init_method", "symmetric_weights", "input_range",
            "exact_average_pooling")}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"QuantizeScheme({args})"

    def get_layout_transformer(self):
        return ClipLayoutTransform(self)

    def get_quantize_registry(self):
        return ClipQuantizeRegistry(self)

    def make_quantizer(self, num_bits: int, kind: str, axis: int = -1,
                       per_channel: bool | None = None, fixed_range=None) -> ClipQuantizer:
        """A `ClipQuantizer` with this scheme's settings."""
        if per_channel is None:
            granularity = (self.activation_granularity or self.granularity
                           if kind == "activation" else self.granularity)
            per_channel = granularity == "per_channel"
        return ClipQuantizer(
            num_bits=num_bits, per_channel=per_channel,
            axis=axis, kind=kind, gradient=self.gradient,
            init_method=(self.activation_init_method or self.init_method
                         if kind == "activation" else self.init_method),
            integer_zero_point=self.integer_zero_point,
            acd_pull=self.acd_pull and kind == "activation",
            symmetric_grid=self.symmetric_weights and kind == "weight",
            fixed_range=fixed_range)


def _checked_bits(name, value):
    try:
        return ops.check_bits(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


# ------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------

class _InputQuantize(transforms.Transform):
    """InputLayer => InputLayer -> QuantizeLayer(ClipQuantizer), like tfmot's own transform."""

    def __init__(self, quantizer: ClipQuantizer):
        self._quantizer = quantizer

    def pattern(self):
        return transforms.LayerPattern("InputLayer")

    def replacement(self, match_layer):
        layer = quantize_layer.QuantizeLayer(ClipQuantizer.from_config(
            self._quantizer.get_config()))
        config = tfmot_utils.serialize_layer(layer, use_legacy_format=True)
        config["name"] = layer.name
        return transforms.LayerNode(config, input_layers=[match_layer])

    def custom_objects(self):
        return {"QuantizeLayer": quantize_layer.QuantizeLayer, "ClipQuantizer": ClipQuantizer}


def _consumers(layer):
    return [node.outbound_layer for node in layer._outbound_nodes]  # pylint: disable=protected-access


def _producers(layer):
    nodes = layer._inbound_nodes  # pylint: disable=protected-access
    return tf.nest.flatten(nodes[0].inbound_layers) if nodes else []


def _is_relu(layer) -> bool:
    if type(layer).__name__ == "ReLU":
        return True
    if type(layer).__name__ == "Activation":
        name = keras.activations.serialize(layer.activation)
        name = name if isinstance(name, str) else name.get("config", {}).get("name", "")
        return name in ("relu", "relu6")
    return False


def _is_linear(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


class ClipLayoutTransform(quantize_layout_transform.QuantizeLayoutTransform):
    """Places tfacd's quantizers the way TFLite fuses ops (see the module docstring)."""

    def __init__(self, scheme: QuantizeScheme):
        self._scheme = scheme

    def apply(self, model, layer_quantize_map):
        scheme = self._scheme
        registry = scheme.get_quantize_registry()
        annotated = [layer for layer in model.layers if layer.name in layer_quantize_map
                     and layer_role(layer) is not None and type(layer).__name__ != "InputLayer"]
        weight_layers = [layer for layer in annotated if layer_role(layer) == "weight"]
        # first_last_bits: the first and last weight layers' weights; the tensors they
        # consume; the last one's output (the logits).
        edge_weights, edge_outputs = set(), set()
        if scheme.first_last_bits is not None and weight_layers:
            for edge in (weight_layers[0], weight_layers[-1]):
                edge_weights.add(edge.name)
                edge_outputs.update(p.name for p in self._quantized_producers(
                    edge, layer_quantize_map))
            edge_outputs.add(weight_layers[-1].name)

        created = []
        for layer in annotated:
            entry = layer_quantize_map[layer.name]
            if entry.get("quantize_config") is not None:       # the user's own config wins
                continue
            quantize_output = (layer_role(layer) != "passthrough"
                               and not self._output_fused(layer, layer_quantize_map))
            if scheme.exact_average_pooling and type(layer).__name__ in GLOBAL_AVERAGE_POOLS:
                self._check_exact_pool(layer, layer_quantize_map, edge_outputs)
                quantize_output = False
            config = registry.make_config(
                layer, quantize_output,
                weight_bits=scheme.first_last_bits if layer.name in edge_weights else None,
                output_bits=scheme.first_last_bits if layer.name in edge_outputs else None)
            entry["quantize_config"] = config
            created.extend(config.quantizers())

        input_quantizer = None
        if scheme.quantize_input and scheme.input_range is not None:
            # Fixed and lossless on its grid: nothing for the SQNR loss to tune.
            input_quantizer = scheme.make_quantizer(8, "activation", per_channel=False,
                                                    fixed_range=scheme.input_range)
        elif scheme.quantize_input:
            input_bits = scheme.first_last_bits or scheme.activation_bits
            input_quantizer = scheme.make_quantizer(input_bits, "activation", per_channel=False)
            created.append(input_quantizer)
        if scheme.sqnr_weight > 0 and created:
            for quantizer in created:
                quantizer.sqnr_loss_weight = scheme.sqnr_weight / len(created)

        if input_quantizer is not None:
            model, layer_quantize_map = model_transformer.ModelTransformer(
                model, [_InputQuantize(input_quantizer)], set(layer_quantize_map.keys()),
                layer_quantize_map).transform()
        return model, layer_quantize_map

    @staticmethod
    def _output_fused(layer, layer_quantize_map) -> bool:
        """True when TFLite fuses `layer`'s output into its only consumer (no quantizer)."""
        consumers = _consumers(layer)
        if len(consumers) != 1 or consumers[0].name not in layer_quantize_map:
            return False
        consumer = consumers[0]
        kind = type(layer).__name__
        if layer_role(layer) == "weight" and _is_linear(layer) and \
                type(consumer).__name__ in _BATCH_NORMS:
            return True
        if (layer_role(layer) == "weight" and _is_linear(layer)) or kind in _BATCH_NORMS \
                or kind == "Add":
            return _is_relu(consumer)
        return False

    def _check_exact_pool(self, layer, layer_quantize_map, edge_outputs):
        """Raises ValueError unless the exact mean of `layer`'s input fits int8."""
        spatial = layer.input_shape[1:-1]
        if any(size is None for size in spatial):
            raise ValueError(f"exact_average_pooling: {layer.name} pools an input of unknown "
                             f"size {tuple(layer.input_shape)}; the exact grid needs the count")
        count = int(np.prod(spatial))
        for producer in self._quantized_producers(layer, layer_quantize_map):
            bits = (self._scheme.first_last_bits if producer.name in edge_outputs
                    and self._scheme.first_last_bits else self._scheme.activation_bits)
            span = ops.num_levels(bits) * count
            if span > 255:
                raise ValueError(
                    f"exact_average_pooling: {layer.name} averages {count} values of "
                    f"{producer.name}'s {bits}-bit grid; their exact mean spans {span} steps "
                    "of the finer grid, more than int8's 255 (fewer activation bits, a "
                    "smaller pooled map, or exact_average_pooling=False)")

    @staticmethod
    def _quantized_producers(layer, layer_quantize_map):
        """The layers whose quantized outputs `layer` consumes, looking through pass-throughs."""
        found, stack = [], list(_producers(layer))
        while stack:
            producer = stack.pop()
            if type(producer).__name__ == "InputLayer":
                continue           # the input quantizer takes first_last_bits itself
            if producer.name in layer_quantize_map and layer_role(producer) == "passthrough":
                stack.extend(_producers(producer))
            else:
                found.append(producer)
        return found


# ------------------------------------------------------------------------------------------
# User-facing calls
# ------------------------------------------------------------------------------------------

def quantize_scope(*args):
    """tfmot's `quantize_scope` with tfacd's classes in it, for loading quantized models.

    Also registers tfacd's C++ quantizer ops (`tfacd.kernels`): a SavedModel traced with
    them names them in its graph, and a process that has not loaded them cannot read it."""
    kernels.library()
    objects = {"ClipQuantizer": ClipQuantizer, "ClipQuantizeConfig": ClipQuantizeConfig,
               "tfacd>ClipQuantizer": ClipQuantizer,
               "tfacd>ClipQuantizeConfig": ClipQuantizeConfig}
    for extra in args:
        objects.update(extra)
    return tfmot.quantization.keras.quantize_scope(objects)


def quantize_model(model, scheme: QuantizeScheme | None = None, **scheme_kwargs):
    """Returns a QAT copy of a tf_keras Sequential/Functional `model` under tfacd's scheme.

    Args:
      model: a built tf_keras model (not Keras 3: tfmot cannot quantize those).
      scheme: a `QuantizeScheme`; or pass its arguments as keywords instead.

    Raises:
      ValueError: a layer type tfacd does not support (the message names every such layer)
        when the scheme's `unsupported_layers="error"`; a Keras 3 or unbuilt model.
    """
    if scheme is None:
        scheme = QuantizeScheme(**scheme_kwargs)
    elif scheme_kwargs:
        raise ValueError("pass either a scheme or scheme arguments, not both")
    if not isinstance(model, keras.Model):
        raise ValueError(f"tfacd quantizes tf_keras (Keras 2) models; got {type(model)!r}. "
                         "Build the model with `import tf_keras as keras` (tfmot rejects "
                         "Keras 3 models).")
    if not model.built:
        raise ValueError("the model must be built before quantization (call it once, or "
                         "build it with an input shape)")

    unsupported = [layer for layer in model.layers if layer_role(layer) is None]
    if unsupported and scheme.unsupported_layers == "error":
        names = ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in unsupported)
        raise ValueError(f"tfacd cannot quantize these layers: {names}. Use "
                         "unsupported_layers='float' to leave them in float, or annotate "
                         "them with your own QuantizeConfig.")
    for layer in unsupported:
        warnings.warn(f"tfacd: layer {layer.name} ({type(layer).__name__}) is not supported "
                      "and stays in float", stacklevel=2)
    skip = {layer.name for layer in unsupported}

    def annotate(layer):
        if layer.name in skip or type(layer).__name__ == "InputLayer":
            return layer
        return tfmot.quantization.keras.quantize_annotate_layer(layer)

    annotated = keras.models.clone_model(model, clone_function=annotate)
    # quantize_apply clones the model through layer configs. Keras' safe mode refuses to
    # rebuild Lambda layers from config; this model is already in memory, in this process, so
    # rebuilding its Lambdas runs nothing the caller has not already run.
    with quantize_scope(), SafeModeScope(safe_mode=False):
        quantized = tfmot.quantization.keras.quantize_apply(annotated, scheme=scheme)
    initialize_weight_clips(quantized)
    return quantized


def initialize_weight_clips(model):
    """Sets every weight quantizer's clips from its current kernel (with its `init_method`)."""
    for layer in model.layers:
        for weight, quantizer, variables in getattr(layer, "_weight_vars", []):
            if isinstance(quantizer, ClipQuantizer):
                quantizer.initialize(weight, variables)


def _first_batches(data, num_batches: int):
    if isinstance(data, tf.data.Dataset):
        batches = []
        for element in data.take(num_batches):
            batches.append(element[0] if isinstance(element, (tuple, list)) else element)
        if not batches:
            raise ValueError("calibration data is empty")
        return tf.concat(batches, axis=0)
    return tf.convert_to_tensor(data)


def calibrate(model, data, num_batches: int = 1):
    """Re-initializes every clip from data: weights from their kernels, activations from `data`.

    Runs one eager inference pass (BatchNorm in inference mode) on `data` (an array, or the
    first `num_batches` batches of a `tf.data.Dataset` of `x` or `(x, y)`), during which
    every quantizer sets its clips with its `init_method`.
    """
    for _, _, _, variables in iter_quantizers(model):
        variables["initialized"].assign(0.0)
    with calibrating():
        model(_first_batches(data, num_batches), training=False)
    uninitialized = [f"{layer.name}/{tensor}" for layer, tensor, _, variables
                     in iter_quantizers(model) if variables["initialized"].numpy() < 0.5]
    if uninitialized:
        raise RuntimeError(f"calibration did not reach these quantizers: {uninitialized}")
    return model
