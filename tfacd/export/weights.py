"""Reading a QAT model's layers and baking their weights: exact at every bit width.

A k-bit weight channel with nudged clips `l' = -z s`, `u' = (n - z) s` holds values `m s`, `m`
an integer in `[-z, n - z]`. A BatchNormalization after the layer is folded in per output
channel (`w' = w * gamma / sqrt(var + eps)`, bias likewise), which scales the step and keeps
`m`. The folded kernel is emitted as an 8-bit symmetric per-channel fake-quant with range
`[-127 s'/K, 127 s'/K]`, so TFLite stores exactly `K m` as int8 with zero point 0, where the
spread `K = floor(127 / max |m|)` (or `floor(7 / max |m|)` for int4 storage) makes the
int32 bias grid `s_in s' / K` as fine as the weights allow. Guarantee: the file's weight
integers times their scales are the Keras model's (BN-folded) quantized weights, exactly;
zero points 0; at most `2^k` distinct values per channel. A layer whose weights cannot be
held so raises `ExportError` naming it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

from tfacd import ops
from tfacd._keras import keras
from tfacd.quantizers import ClipQuantizer, effective_clips
from tfacd.scheme import _BATCH_NORMS, _consumers, _is_linear  # the layout's own rules
from tfacd.export._common import ExportError, _INT4_MAX, _INT4_MIN, _INT8_MAX
from tfacd.export.int4 import _runs_int4_exactly


def _inner(layer):
    return layer.layer if isinstance(layer, quantize_wrapper.QuantizeWrapper) else layer


def _kernel_attribute(layer) -> str:
    """The name of a weight layer's kernel: `depthwise_kernel` or `kernel`."""
    return "depthwise_kernel" if type(_inner(layer)).__name__ == "DepthwiseConv2D" \
        else "kernel"


def _weight_quantizers(layer) -> dict:
    """`{attribute: (float variable, quantizer, quantizer variables)}` of a wrapped layer."""
    found = {}
    for weight, quantizer, variables in getattr(layer, "_weight_vars", []):
        attribute = weight.name.split("/")[-1].split(":")[0]
        found[attribute] = (weight, quantizer, variables)
    return found


def _output_quantizer(layer):
    """`(quantizer, variables)` of a wrapped layer's output, or `(None, None)`."""
    if isinstance(layer, quantize_layer.QuantizeLayer):
        return layer.quantizer, layer.quantizer_vars
    quantizers = getattr(layer, "_output_quantizers", None) or []
    if quantizers:
        return quantizers[0], layer._output_quantizer_vars  # pylint: disable=protected-access
    return None, None


def check_exportable(model):
    """Raises `ExportError` unless `model` is a tfacd-quantized tf_keras model."""
    if not isinstance(model, keras.Model):
        raise ExportError(f"expected a tf_keras model, got {type(model).__name__}")
    wrappers = [layer for layer in model.layers
                if isinstance(layer, (quantize_wrapper.QuantizeWrapper,
                                      quantize_layer.QuantizeLayer))]
    if not wrappers:
        raise ExportError(f"model {model.name!r} was never quantized: export_tflite takes a "
                          "model from tfacd.quantize_model (use export_float_tflite for a "
                          "float model)")
    foreign = [layer.name for layer in wrappers
               if any(not isinstance(q, ClipQuantizer) for _, q, _ in
                      getattr(layer, "_weight_vars", []))
               or (_output_quantizer(layer)[0] is not None
                   and not isinstance(_output_quantizer(layer)[0], ClipQuantizer))]
    if foreign:
        raise ExportError("these layers are quantized by another scheme (e.g. tfmot's "
                          f"default), not tfacd: {foreign[:5]}; convert such a model with "
                          "tf.lite.TFLiteConverter directly")


def _bn_fold_target(layer):
    """The wrapped BatchNormalization to fold into weight layer `layer`, or None."""
    if type(_inner(layer)).__name__ not in ("Conv2D", "DepthwiseConv2D", "Dense"):
        return None
    if _output_quantizer(layer)[0] is not None:
        return None           # a quantized output between the layer and BN: nothing to fold
    if not _is_linear(_inner(layer)):
        return None
    consumers = _consumers(layer)
    if len(consumers) == 1 and type(_inner(consumers[0])).__name__ in _BATCH_NORMS:
        return consumers[0]
    return None


def _batch_norm_folds(model) -> dict:
    """`{weight layer name: the BatchNormalization layer folded into it}`."""
    folds = {}
    for layer in model.layers:
        target = _bn_fold_target(layer)
        if target is not None:
            folds[layer.name] = target
    return folds


@dataclasses.dataclass
class BakedWeights:
    """A weight layer's kernel after quantization and BN folding, in TFLite's terms."""

    kernel: np.ndarray          # float values the graph uses (integers * step, per channel)
    bias: np.ndarray
    integers: np.ndarray | None  # int values per channel (None for a float export)
    step: np.ndarray | None      # per output channel
    bits: int | None
    clamped: int = 0             # values outside int8's [-127, 127] that had to be clamped
    spread: np.ndarray | None = None  # K per output channel: integers = K * (k-bit index)
    storage: str | None = None   # "int8" or "int4": how the file stores the integers


def _bn_multiplier_and_shift(bn_layer, channels: int):
    bn = _inner(bn_layer)
    rank = len(bn_layer.output_shape)
    if [a % rank for a in np.atleast_1d(bn.axis)] != [rank - 1]:
        raise ExportError(f"{bn.name}: only channels-last BatchNormalization can be folded")
    gamma = bn.gamma.numpy() if bn.scale else np.ones(channels, np.float32)
    beta = bn.beta.numpy() if bn.center else np.zeros(channels, np.float32)
    multiplier = gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    shift = beta - bn.moving_mean.numpy() * multiplier
    return multiplier.astype(np.float64), shift.astype(np.float64)


def _bake_weights(layer, bn_layer, quantized: bool, weight_storage: str = "int8",
                  given_spread=None) -> BakedWeights:
    """Kernel and bias of weight layer `layer` (Conv2D, DepthwiseConv2D or Dense), quantized
    (unless `quantized=False`) and with `bn_layer` folded in. With `weight_storage="int4"`,
    a layer whose integers all fit int4's `[-8, 7]` is stored as int4 (`pack_int4_weights`).
    `given_spread`: K per output channel instead of the largest that fits (portable
    requantization, `tfacd.export.portable`)."""
    inner = _inner(layer)
    kind = type(inner).__name__
    attribute = _kernel_attribute(layer)
    entries = _weight_quantizers(layer)
    float_kernel = getattr(inner, attribute)
    quantizer = variables = None
    if attribute in entries:
        float_kernel, quantizer, variables = entries[attribute]
    kernel = float_kernel.numpy().astype(np.float64)
    out_channels = kernel.shape[2] * kernel.shape[3] if kind == "DepthwiseConv2D" \
        else kernel.shape[-1]
    bias = inner.bias.numpy().astype(np.float64) if inner.use_bias \
        else np.zeros(out_channels, np.float64)

    integers = step = None
    if quantized and quantizer is not None:
        if not quantizer.integer_zero_point:
            raise ExportError(f"{layer.name}: weights quantized with integer_zero_point=False "
                              "have no integer grid through zero; TFLite needs one")
        lower, upper = effective_clips(quantizer, variables)
        clip_step = np.asarray(ops.grid_step(lower, upper, quantizer.num_bits,
                                             quantizer.symmetric_step), np.float64)
        shape = [1] * kernel.ndim
        if quantizer.per_channel:
            shape[quantizer.axis % kernel.ndim] = -1
        clip_step = np.reshape(clip_step, shape)
        quantized_kernel = ops.quantize_forward(
            tf.constant(kernel, tf.float32), lower, upper, quantizer.num_bits,
            quantizer.axis % kernel.ndim if quantizer.per_channel else None,
            integer_zero_point=True, symmetric_step=quantizer.symmetric_step).numpy()
        integers = np.round(quantized_kernel / clip_step)
        step = np.broadcast_to(clip_step, kernel.shape).astype(np.float64)
        kernel = integers * step
    # Per output channel view: Conv2D [kh, kw, in, out], Depthwise [kh, kw, in * mult],
    # Dense [in, out].
    if kind == "DepthwiseConv2D":
        flat = (kernel.shape[0], kernel.shape[1], out_channels)
        kernel = kernel.reshape(flat)
        if integers is not None:
            integers, step = integers.reshape(flat), step.reshape(flat)
    if bn_layer is not None:
        multiplier, shift = _bn_multiplier_and_shift(bn_layer, out_channels)
        kernel = kernel * multiplier
        bias = bias * multiplier + shift
        if integers is not None:
            # A negative multiplier flips the integers' sign; a zero one zeroes the channel.
            integers = integers * np.sign(multiplier)
            step = step * np.abs(multiplier)
    bits = quantizer.num_bits if quantizer is not None and quantized else None
    clamped, spread, storage = 0, None, None
    if integers is not None:
        # One step per output channel (it is constant along the other axes by construction).
        step = step.reshape(-1, out_channels).max(axis=0)
        step = np.where(step > 0, step, 1.0)
        clamped = int(np.sum(np.abs(integers) > _INT8_MAX))
        integers = np.clip(integers, -_INT8_MAX, _INT8_MAX)
        # Spread each channel's integers over int8: m s = (K m) (s / K). Same values, same
        # number of levels, but TFLite's int32 bias has the scale s_in * s / K, K times finer.
        # At 2 bits the bias's own rounding (up to s_in * s / 2) is otherwise a sixth of an
        # output step and moved 9% of a trained model's first depthwise outputs to the next
        # level (measured, docs/export.md).
        # With int4 storage the spread is limited to int4's [-8, 7]: K = 2 or 3 at 2 bits
        # instead of 42, a coarser bias grid (the bias snap makes Keras add the same bias).
        storage = "int4" if weight_storage == "int4" and _runs_int4_exactly(inner) and \
            _INT4_MIN <= integers.min() and integers.max() <= _INT4_MAX else "int8"
        limit = _INT4_MAX if storage == "int4" else _INT8_MAX
        largest = np.abs(integers.reshape(-1, out_channels)).max(axis=0)
        if given_spread is None:
            spread = np.maximum(limit // np.maximum(largest, 1), 1)
        else:
            spread = np.asarray(given_spread, np.int64)
            if np.any(spread * largest > limit):
                raise ExportError(f"{layer.name}: the given weight spread puts integers "
                                  f"beyond {limit}")
        integers = integers * spread
        step = step / spread
        kernel = integers * step
    return BakedWeights(kernel=kernel.astype(np.float32), bias=bias.astype(np.float32),
                        integers=None if integers is None else integers.astype(np.int32),
                        step=None if step is None else step.astype(np.float32), bits=bits,
                        clamped=clamped,
                        spread=None if spread is None else spread.astype(np.int32),
                        storage=storage)


def grid_reach(layer) -> np.ndarray | None:
    """Per output channel of weight layer `layer`, the largest `|m|` its weight grid holds:
    `max(z, n - z)` for the integers `[-z, n - z]` (127 on the 8-bit symmetric grid),
    whatever the kernel holds now. None for unquantized weights."""
    entry = _weight_quantizers(layer).get(_kernel_attribute(layer))
    if entry is None:
        return None
    kernel, quantizer, variables = entry
    lower, upper = effective_clips(quantizer, variables)
    if quantizer.symmetric_step:
        reach = np.full(np.shape(lower), float(ops.symmetric_limit(quantizer.num_bits)))
    else:
        step = np.asarray(ops.grid_step(lower, upper, quantizer.num_bits), np.float64)
        zero_point = np.round(-np.asarray(lower, np.float64) / step)
        reach = np.maximum(zero_point, ops.num_levels(quantizer.num_bits) - zero_point)
    shape = [1] * len(kernel.shape)
    if quantizer.per_channel:
        shape[quantizer.axis % len(kernel.shape)] = -1
    reach = np.broadcast_to(np.reshape(reach, shape), kernel.shape)
    out_channels = kernel.shape[2] * kernel.shape[3] \
        if _kernel_attribute(layer) == "depthwise_kernel" else kernel.shape[-1]
    return reach.reshape(-1, out_channels).max(axis=0).astype(np.int64)


def _weight_tensor(baked: BakedWeights):
    """The kernel as the graph sees it: an 8-bit symmetric per-channel fake quant that puts
    exactly `integers` into TFLite's int8 weights (last axis = output channel)."""
    kernel = tf.constant(baked.kernel)
    if baked.integers is None:
        return kernel
    limit = tf.constant(_INT8_MAX * baked.step)
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        kernel, -limit, limit, num_bits=8, narrow_range=True)


def _bias_constant(bias: np.ndarray):
    """The bias as a graph constant. The converter quantizes a per-channel bias whose values are
    all equal (a "splat" constant) with the first channel's scale for every channel (TF 2.21,
    measured); one value moved by one float32 ulp keeps it from being a splat."""
    bias = np.array(bias, np.float32)
    if bias.size > 1 and bias[0] != 0 and np.all(bias == bias[0]):
        bias[-1] = np.nextafter(bias[-1], np.float32(np.inf))
    return tf.constant(bias)


def _padding(inner):
    return inner.padding.upper()


def _emit_weight_layer(layer, x, baked: BakedWeights):
    inner = _inner(layer)
    kind = type(inner).__name__
    if kind == "Conv2D":
        if inner.groups != 1:
            raise ExportError(f"{layer.name}: grouped Conv2D is not supported by the export")
        y = tf.nn.conv2d(x, _weight_tensor(baked), strides=inner.strides,
                         padding=_padding(inner), dilations=inner.dilation_rate)
    elif kind == "DepthwiseConv2D":
        kh, kw, channels = baked.kernel.shape
        # Per-channel fake quant works on the last axis: quantize as [kh, kw, 1, C], then
        # reshape to depthwise_conv2d's [kh, kw, in, multiplier] (TFLite's own layout).
        flat = dataclasses.replace(baked, kernel=baked.kernel.reshape(kh, kw, 1, channels))
        kernel = tf.reshape(_weight_tensor(flat),
                            (kh, kw, x.shape[-1], inner.depth_multiplier))
        y = tf.nn.depthwise_conv2d(x, kernel, strides=(1, *inner.strides, 1),
                                   padding=_padding(inner), dilations=inner.dilation_rate)
    elif kind == "Dense":
        if x.shape.rank != 2:
            raise ExportError(f"{layer.name}: Dense on a rank-{x.shape.rank} input is not "
                              "supported by the export (flatten or pool first)")
        # As a 1x1 convolution: TFLite's per-axis FULLY_CONNECTED quantization needs the
        # kernel transposed, which the converter refuses for per-channel fake quant.
        in_units, units = baked.kernel.shape
        conv = dataclasses.replace(baked, kernel=baked.kernel.reshape(1, 1, in_units, units))
        y = tf.nn.conv2d(tf.reshape(x, (-1, 1, 1, in_units)), _weight_tensor(conv), 1, "VALID")
        y = tf.reshape(y, (-1, units))
    else:
        raise ExportError(f"{layer.name}: {kind} weights are not supported by the export "
                          "(supported: Conv2D, DepthwiseConv2D, Dense)")
    y = tf.nn.bias_add(y, _bias_constant(baked.bias))
    return inner.activation(y)
