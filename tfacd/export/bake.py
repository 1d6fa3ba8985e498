"""`bake`: the QAT model rewritten into an inference graph the TFLite converter accepts.

Walks the model's layers in order and emits each one: weight layers with their BatchNorm
folded and their weights on int8 (`tfacd.export.weights`), activations by the policy
(`tfacd.export.activations`), other layers as they are. Guarantee: with per-tensor
activations (or per-channel ones under the `float` policy) the baked function computes the
Keras model's inference pass, up to float summation order; `Bake` records, per activation,
whether it is exact and, per weight layer, what the file must hold.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

from tfacd._keras import keras
from tfacd.registry import GLOBAL_AVERAGE_POOLS, layer_role
from tfacd.export._common import ACTIVATION_POLICIES, ExportError, WEIGHT_STORAGES
from tfacd.export.activations import (
    _activation_plan, _emit_activation, _exact_mean_plan, _is_nonnegative, _normalization,
    _normalization_integers)
from tfacd.export.weights import (
    _bake_weights, _batch_norm_folds, _emit_weight_layer, _inner, _output_quantizer,
    check_exportable)


def _emit_layer(inner, args, kwargs):
    """Any other layer, in inference mode. ReLU and ReLU6 are emitted as the plain TF ops the
    converter fuses into the preceding convolution (tf_keras' ReLU(6.) traces as relu + min,
    which TFLite would run as two extra int8 ops that XNNPACK does not take)."""
    if type(inner).__name__ == "ReLU" and not inner.negative_slope and not inner.threshold:
        if inner.max_value is None:
            return tf.nn.relu(args[0])
        if float(inner.max_value) == 6.0:
            return tf.nn.relu6(args[0])
    return inner(*args, training=False, **kwargs)


def _exact_pool_plans(model, plans) -> dict:
    """`{name: ActivationPlan}` for the unquantized global average poolings whose exact mean
    fits int8 (`tfacd.export.activations._exact_mean_plan`), looking through pass-through
    layers (dropout, reshapes) for the grid they average."""
    found = {}
    for layer in model.layers:
        if layer.name in plans or type(_inner(layer)).__name__ not in GLOBAL_AVERAGE_POOLS or \
                not isinstance(layer, quantize_wrapper.QuantizeWrapper):
            continue
        producer = layer
        while True:
            inbound = tf.nest.flatten(producer._inbound_nodes[0].inbound_layers)  # pylint: disable=protected-access
            if len(inbound) != 1:
                break
            producer = inbound[0]
            if producer.name in plans or layer_role(_inner(producer)) != "passthrough":
                break
        count = int(np.prod(layer.input_shape[1:-1]))
        plan = plans.get(producer.name)
        exact = None if plan is None else _exact_mean_plan(layer.name, plan, count)
        if exact is not None:
            found[layer.name] = exact
    return found


@dataclasses.dataclass
class Bake:
    """The result of `bake`: the inference function and what went into it."""

    function: tf.types.experimental.ConcreteFunction
    weights: dict            # layer name -> BakedWeights
    activations: list        # ActivationPlan, in graph order
    float_layers: list       # names of layers left unquantized (float islands)
    quantized: bool
    # (pixel value, channel) pairs whose quantized input differs from Keras's: 0, or None
    # when the input normalization was not matched to an input quantizer.
    normalization_mismatches: int | None = None


def bake(model, input_mean=None, input_std=None, activation_policy: str = "float",
         quantized: bool = True, batch_size: int | None = None,
         taps: bool = False, weight_storage: str = "int8", spreads=None) -> Bake:
    """Rewrites `model` (a tfacd QAT model) into an inference function TFLite can convert.

    Args:
      model: from `tfacd.quantize_model` (or a plain tf_keras model with `quantized=False`).
      input_mean, input_std: per-channel normalization in pixel units (0-255); the function
        takes raw pixels and applies `(p - mean) / std` itself. None: no normalization.
      activation_policy: "float" (exact, float compute), "clamp" or "round" (all int8 /
        mostly int8, approximate), for per-channel activation quantizers (module docstring).
      quantized: False bakes the float model (unquantized weights, BN folded, no fake quant):
        the reference for file size and latency.
      batch_size: the function's batch dimension (None: any).
      taps: the function returns `{layer name: output}` for every layer instead of the
        model's output (for finding where the baked graph departs from Keras; not
        convertible).
      weight_storage: "int8", or "int4" to bake layers whose integers fit int4 for
        `pack_int4_weights` (module docstring).
      spreads: `{layer name: K per output channel}` instead of the largest spread that fits
        (`tfacd.export.portable`).
    """
    if weight_storage not in WEIGHT_STORAGES:
        raise ExportError(f"weight_storage must be one of {WEIGHT_STORAGES}, got "
                          f"{weight_storage!r}")
    if activation_policy not in ACTIVATION_POLICIES:
        raise ExportError(f"activation_policy must be one of {ACTIVATION_POLICIES}, got "
                          f"{activation_policy!r}")
    if quantized:
        check_exportable(model)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError("export supports models with one input and one output")
    normalize = input_mean is not None or input_std is not None
    mean = 0.0 if input_mean is None else input_mean
    std = 1.0 if input_std is None else input_std

    weights, float_layers = {}, []
    folds = _batch_norm_folds(model)
    folded = {bn.name: name for name, bn in folds.items()}
    for layer in model.layers:
        if type(_inner(layer)).__name__ in ("Conv2D", "DepthwiseConv2D", "Dense"):
            weights[layer.name] = _bake_weights(layer, folds.get(layer.name), quantized,
                                                weight_storage,
                                                (spreads or {}).get(layer.name))
        elif not isinstance(layer, (quantize_wrapper.QuantizeWrapper,
                                    quantize_layer.QuantizeLayer, keras.layers.InputLayer)):
            float_layers.append(layer.name)
    plans = {}
    if quantized:
        for layer in model.layers:
            quantizer, variables = _output_quantizer(layer)
            if quantizer is not None:
                plans[layer.name] = _activation_plan(layer.name, quantizer, variables)
                if activation_policy == "float":
                    # Each channel on its own grid with the forward pass's own float32 ops.
                    plans[layer.name].exact = True
        plans.update(_exact_pool_plans(model, plans))

    input_quantized = any(isinstance(layer, quantize_layer.QuantizeLayer)
                          for layer in model.layers)
    if quantized and not normalize and not input_quantized:
        raise ExportError("the model has no input quantizer (quantize_input=False) and no "
                          "input_mean/input_std were given: the input's range is unknown")
    spec = tf.TensorSpec((batch_size, *model.inputs[0].shape[1:]), tf.float32, name="pixels")
    normalization, normalization_mismatches = None, None
    input_layer = next((layer for layer in model.layers
                        if isinstance(layer, quantize_layer.QuantizeLayer)), None)
    if quantized and normalize and input_layer is not None and \
            not plans[input_layer.name].per_channel:
        channels = model.inputs[0].shape[-1]
        *normalization, normalization_mismatches = _normalization_integers(
            input_layer, plans[input_layer.name],
            np.broadcast_to(np.asarray(mean, np.float64), (channels,)),
            np.broadcast_to(np.asarray(std, np.float64), (channels,)))

    @tf.function(input_signature=[spec], autograph=False)
    def inference(pixels):
        values, tapped = {}, {}
        x = _normalization(pixels, mean, std, quantized, input_quantized, normalization) \
            if normalize else pixels
        values[id(model.inputs[0])] = x
        nodes_by_depth = model._nodes_by_depth  # pylint: disable=protected-access
        for depth in sorted(nodes_by_depth, reverse=True):
            for node in nodes_by_depth[depth]:
                layer = node.layer
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                args, kwargs = tf.nest.map_structure(
                    lambda t: values[id(t)] if id(t) in values else t,
                    (node.call_args, node.call_kwargs))
                with tf.name_scope(layer.name):
                    if layer.name in folded:                    # BN folded into its producer
                        out = args[0]
                    elif layer.name in weights:
                        out = _emit_weight_layer(layer, args[0], weights[layer.name])
                    elif isinstance(layer, quantize_layer.QuantizeLayer):
                        out = args[0]
                    else:
                        kwargs = {k: v for k, v in kwargs.items() if k != "training"}
                        out = _emit_layer(_inner(layer), args, kwargs)
                    plan = plans.get(layer.name)
                    if plan is not None:
                        out = _emit_activation(out, plan, activation_policy,
                                               _is_nonnegative(_inner(layer)))
                for kt, value in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
                    values[id(kt)] = value
                tapped[layer.name] = out
        return tapped if taps else values[id(model.outputs[0])]

    function = inference.get_concrete_function()
    return Bake(function, weights, list(plans.values()), float_layers, quantized,
                normalization_mismatches)
