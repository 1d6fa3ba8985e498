"""TFLite export: bake a tfacd QAT model into what TFLite can run, convert, and check it.

The TFLite converter (TF 2.21) turns per-channel weight fake-quant into int8 per-axis weights,
but refuses asymmetric weight zero points, activation fake-quant below 8 bits and per-channel
activation fake-quant. `bake` rewrites the trained model into an equivalent inference graph that
uses only what it accepts; `export_tflite` converts that graph and writes an export report.

What the bake does, and what is exact
------------------------------------
* **Weights (exact).** A k-bit weight channel with nudged clips `l' = -z s`, `u' = (n - z) s`
  holds values `m s`, `m` an integer in `[-z, n - z]`. BatchNormalization after the layer is
  folded in (`w' = w * gamma / sqrt(var + eps)` per output channel, bias likewise), which scales
  the step per output channel and keeps `m`. The folded kernel is emitted as an 8-bit symmetric
  per-channel fake-quant with range `[-127 s', 127 s']`, so TFLite stores exactly `m` as int8
  with scale `s'` and zero point 0. 8-bit weights (256 asymmetric levels would not fit int8's
  symmetric 255) are trained on the int8 grid itself, `s = max(|l|, |u|) / 127`, `m` in
  `[-127, 127]` (`symmetric_step` in `tfacd.ops`). The report counts weights that had to be
  clamped into int8 (`clamped_weights`): 0 by construction, kept as a check.
* **Bias (exact after the snap).** TFLite stores the (folded) bias as int32 with the scale
  `s_in * s'_c`. At 2 bits both steps are coarse, and rounding the bias to that grid moved
  trained models' outputs across rounding boundaries. So each channel's integers are spread
  over int8, `m s' = (K m) (s' / K)` with `K = floor(127 / max |m|)` (42 at 2 bits): the
  same values and the same number of distinct values, with a bias grid `K` times finer. The
  rounding left (at most `s_in s' / (2K)`) is then moved into the Keras model:
  `export_tflite(..., snap_biases=True)` (the default; `snap_biases_to_file`) adds each
  channel's difference to the layer's bias or its folded BatchNorm's beta, so the Keras
  model adds exactly the file's integers. The file does not change; the Keras model's
  accuracy moves by the bias rounding's effect (the report gives it before and after).
* **Weight storage.** int8 by default. `weight_storage="int4"` stores the filters of
  Dense layers and 1x1 stride-1 Conv2Ds (93% of a 2-bit MobileNetV2-CIFAR's weights) as
  packed int4 wherever their integers fit `[-8, 7]` (2- and 3-bit weights, and 4-bit weights
  trained on the symmetric grid, `QuantizeScheme(symmetric_weights=True)`, `[-7, 7]`; an
  asymmetric 4-bit channel only if its grid is `[-8, 7]` exactly), with the spread
  `K = floor(7 / max |m|)` (2 or 3 at 2 bits, 1 at 4 bits). `pack_int4_weights` writes each
  such Conv2D as a FULLY_CONNECTED over the channel axis, because XNNPACK runs int4 filters
  only there; an int4 CONV_2D or DEPTHWISE_CONV_2D falls back to TFLite's builtin kernels,
  which round differently (below), so depthwise and k x k filters stay int8. Same weight
  values, half their bytes, and with the bias snap the same exactness as int8 storage.
* **Shared quantization vectors.** Every file is re-serialized so that equal scale and
  zero-point vectors are stored once (`_serialize`): the zero points are all 0, and the
  converter's one vector per tensor cost 12 bytes per channel twice (weight and bias).
* **Per-tensor activations (exact).** A k-bit activation with clips `[l', u']` and step `s` is
  emitted as 8-bit fake-quant over `[l', l' + 255 s]` (same step, same origin: the zero point is
  the same integer) followed by `minimum(., u')`; `u'` is on the grid, so clamping after
  rounding equals rounding after clamping, and TFLite's int8 tensor holds the k-bit values
  exactly. After a ReLU the lower clip never binds, and the range is `[u' - 255 s, u']`
  instead: int8 saturation is the upper clip, no extra op (XNNPACK does not delegate int8
  `MINIMUM`, and each one splits the delegated graph).
* **Per-channel activations (a policy).** TFLite has one scale per activation tensor, so a
  tensor whose channels have their own k-bit grids cannot be an int8 tensor that holds them.
  `activation_policy` says what the file does instead:

  - `"float"` (the default; exact up to float summation order): the tensor stays float32,
    and each channel is put on its own grid by the forward pass's own float32 ops
    (`_on_channel_grids`: `MAXIMUM`/`SUB`/`MUL`/`ADD`/`FLOOR`/`MINIMUM`/`SUB`/`MUL` with
    `l'`, `1/s`, `z` and `s` per channel; after a ReLU `MUL`/`ADD`/`FLOOR`/`MINIMUM`/`MUL`
    with `1/s` and `s`). The convolutions that read such a tensor run in float, and their
    filters are stored as the int8 integers they hold behind a `DEQUANTIZE`
    (`store_float_filters_as_int8`), so the file keeps int8 filter bytes. The price is
    float compute: on trained width-1.0 MobileNetV2s, 99.70% agreement at W2A2 and W4A4,
    at 1.6x the float file's latency (docs/export.md, "Measured on the shipped
    files").
  - `"clamp"` (all int8): the tensor is quantized to 8 bits over the union of the channels'
    ranges `[min_c l'_c, max_c u'_c]`, and each channel keeps its own clips as per-channel
    `maximum`/`minimum` constants; its k-bit rounding is replaced by the union's 8-bit
    rounding. Approximate: a different function, which at 2 bits trained models do not
    survive (38% top-1 agreement on a trained W2A2 run, docs/export.md).
  - `"round"`: `clamp`, plus each channel rounded to its own k-bit grid in float between a
    `DEQUANTIZE` and a `QUANTIZE` onto the union grid. Values match up to half a union step.

  The export report says, per activation, whether it is exact (`activations`) and, per
  weight layer, whether it computes in integers or in float (`computes_in`).

* **Input (exact).** The file takes raw RGB pixels (0-255) and normalizes them itself, as a
  1x1 depthwise convolution (`(p - mean_c) / std_c`, int8) followed by the model's input
  quantizer. Its int8 weight and int32 bias are searched per channel so that the file's
  integer equals the Keras input quantizer's on all 256 pixel values (`w = 127` with the
  nearest bias put 0.4% of a trained run's input values one step off).

With per-tensor activations, the input normalization and the snapped biases, the file
computes what the Keras model computes: on the trained CIFAR-10 runs the logits of 5,000
validation images were equal bit for bit with XNNPACK (LiteRT's default; docs/export.md).
TFLite's builtin kernels (no XNNPACK) are not exact: their per-channel depthwise
requantization came out 7e-5 to 1e-4 (relative) off the file's multiplier, enough to move
2-bit rounding decisions.

The LiteRT interpreter (`ai_edge_litert`) runs the files; `tf.lite.Interpreter` is deprecated.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import time
import warnings

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

from tfacd import ops
from tfacd._keras import keras
from tfacd.quantizers import ClipQuantizer, effective_clips
from tfacd.scheme import _BATCH_NORMS, _consumers, _is_linear  # the layout's own rules

ACTIVATION_POLICIES = ("clamp", "round", "float")
IO_TYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}
WEIGHT_STORAGES = ("int8", "int4")
_INT8_MAX = 127
_INT4_MIN, _INT4_MAX = -8, 7
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


class ExportError(ValueError):
    """The model or the options cannot be exported; the message says why."""


# ------------------------------------------------------------------------------------------
# Reading the QAT model
# ------------------------------------------------------------------------------------------

def _inner(layer):
    return layer.layer if isinstance(layer, quantize_wrapper.QuantizeWrapper) else layer


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


# ------------------------------------------------------------------------------------------
# Weights: quantized integers and steps, BatchNorm folding
# ------------------------------------------------------------------------------------------

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


def _bake_weights(layer, bn_layer, quantized: bool,
                  weight_storage: str = "int8") -> BakedWeights:
    """Kernel and bias of weight layer `layer` (Conv2D, DepthwiseConv2D or Dense), quantized
    (unless `quantized=False`) and with `bn_layer` folded in. With `weight_storage="int4"`,
    a layer whose integers all fit int4's `[-8, 7]` is stored as int4 (`pack_int4_weights`)."""
    inner = _inner(layer)
    kind = type(inner).__name__
    attribute = "depthwise_kernel" if kind == "DepthwiseConv2D" else "kernel"
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
        spread = np.maximum(limit // np.maximum(largest, 1), 1)
        integers = integers * spread
        step = step / spread
        kernel = integers * step
    return BakedWeights(kernel=kernel.astype(np.float32), bias=bias.astype(np.float32),
                        integers=None if integers is None else integers.astype(np.int32),
                        step=None if step is None else step.astype(np.float32), bits=bits,
                        clamped=clamped,
                        spread=None if spread is None else spread.astype(np.int32),
                        storage=storage)


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


# ------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ActivationPlan:
    """How one activation quantizer is emitted."""

    name: str
    bits: int
    per_channel: bool
    lower: np.ndarray
    upper: np.ndarray
    exact: bool


def _activation_plan(name, quantizer, variables) -> ActivationPlan:
    if not quantizer.integer_zero_point:
        raise ExportError(f"{name}: activations quantized with integer_zero_point=False have "
                          "no integer zero point; TFLite needs one")
    lower, upper = effective_clips(quantizer, variables)
    per_channel = quantizer.per_channel and np.ndim(lower) == 1 and (
        np.ptp(lower) > 0 or np.ptp(upper) > 0)
    return ActivationPlan(name, quantizer.num_bits, per_channel,
                          np.asarray(lower, np.float32), np.asarray(upper, np.float32),
                          exact=not per_channel)


def _fake_quant_8bit(x, lower: float, upper: float):
    return tf.quantization.fake_quant_with_min_max_vars(x, lower, upper, num_bits=8)


def _per_tensor_grid(plan: ActivationPlan):
    """`(lower, step, upper)` of a per-tensor activation `plan`: its k-bit grid, which the
    file holds on an 8-bit tensor with the same step and origin."""
    levels = ops.num_levels(plan.bits)
    lower = float(np.min(plan.lower))
    step = (float(np.max(plan.upper)) - lower) / levels
    return lower, step, lower + levels * step


def _emit_activation(x, plan: ActivationPlan, policy: str, nonnegative: bool = False):
    """The activation quantizer `plan` on `x`. `nonnegative`: `x` comes out of a ReLU, so the
    lower clip (always <= 0 after the zero-point nudge) never binds."""
    levels = ops.num_levels(plan.bits)
    if not plan.per_channel:
        lower, step, upper = _per_tensor_grid(plan)
        if nonnegative and levels < 255:
            # Same step and origin, with the k-bit top as the top of the 8-bit range: int8
            # saturation is the upper clip and the (fused) ReLU the lower one; no extra op.
            return _fake_quant_8bit(x, upper - 255 * step, upper)
        # Same step and origin, 8 bits; the k-bit top is a clamp on the grid.
        x = _fake_quant_8bit(x, lower, lower + 255 * step)
        if levels < 255:
            x = _fake_quant_8bit(tf.minimum(x, upper), lower, lower + 255 * step)
        return x
    if policy == "float":
        return _on_channel_grids(x, plan, nonnegative)
    union_lower, union_upper = float(plan.lower.min()), float(plan.upper.max())
    x = _fake_quant_8bit(x, union_lower, union_upper)
    if policy == "round":
        step = (plan.upper - plan.lower) / levels
        clipped = tf.clip_by_value(x, plan.lower, plan.upper)
        x = tf.floor((clipped - plan.lower) / step + 0.5) * step + plan.lower
    else:
        if not (nonnegative and np.all(plan.lower <= 0)):
            x = tf.maximum(x, plan.lower)
        x = tf.minimum(x, plan.upper)
    return _fake_quant_8bit(x, union_lower, union_upper)


def _on_channel_grids(x, plan: ActivationPlan, nonnegative: bool = False):
    """Each channel of `x` on its own k-bit grid, in float32, computing what tfacd's forward
    pass computes (`tfacd.ops._on_grid`; its C++ kernel is built with `-ffp-contract=off`)::

        s = (u' - l') / n,   z = round(-l' / s)
        q = (floor((clip(x, l', u') - l') (1/s) + 0.5) - z) s

    with `s`, `1/s` and `z` computed here in float32 as the forward pass computes them.
    The upper clip is applied to the grid index instead, `k = min(floor((max(x, l') - l')
    (1/s) + 0.5), n)`: the same `k` for every float32 `x` (rounded subtraction and
    multiplication by `1/s > 0` are monotonic, and `(u' - l') (1/s)` rounds to within an
    ulp of `n`), with the scalar `n` in place of a per-channel vector. The lower clip stays
    on `x`: it shares its constant with the subtraction, and it keeps the converter from
    folding the subtraction and multiplication into a preceding convolution's filter and
    bias (it does, measured, for a convolution without a fused activation, and the filter
    then leaves the layer's grid). After a ReLU (`l' = 0`, `z = 0`; the convolution's
    fused ReLU keeps the converter off) both drop out. The tensor stays float and its
    consumers run in float (the `float` policy)."""
    lower = np.asarray(plan.lower, np.float32)
    upper = np.asarray(plan.upper, np.float32)
    levels = np.float32(ops.num_levels(plan.bits))
    scale = (upper - lower) / levels
    inverse = np.float32(1.0) / scale
    zero_point = np.round(-lower / scale)                  # ties to even, as tf.round
    if not (nonnegative and np.all(lower == 0)):
        x = tf.maximum(x, lower) - lower
    index = tf.minimum(tf.floor(x * inverse + np.float32(0.5)), levels)
    if np.any(zero_point):
        index = index - zero_point
    return index * scale


def _is_nonnegative(inner) -> bool:
    """True when `inner`'s output cannot be negative (a ReLU of any flavour without a slope)."""
    kind = type(inner).__name__
    if kind == "ReLU":
        return not inner.negative_slope
    activation = getattr(inner, "activation", None)
    if activation is None:
        return False
    name = getattr(activation, "__name__", "")
    return name in ("relu", "relu6")


# ------------------------------------------------------------------------------------------
# The baked graph
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Bake:
    """The result of `bake`: the inference function and what went into it."""

    function: tf.types.experimental.ConcreteFunction
    weights: dict            # layer name -> BakedWeights
    activations: list        # ActivationPlan, in graph order
    float_layers: list       # names of layers left unquantized (float islands)
    quantized: bool
    model: object = dataclasses.field(default=None, repr=False)
    # (pixel value, channel) pairs whose quantized input differs from Keras's: 0, or None
    # when the input normalization was not matched to an input quantizer.
    normalization_mismatches: int | None = None


def _tflite_activation_grid(plan: ActivationPlan):
    """Scale and int8 zero point TFLite gives a per-tensor activation emitted from `plan`
    (`_emit_activation`'s 8-bit fake quant over `[lower, lower + 255 step]`, whose bounds
    TF holds as float32, nudged as TF's FakeQuant op nudges it)."""
    lower, step, _ = _per_tensor_grid(plan)
    top, lower = np.float32(lower + 255 * step), np.float32(lower)
    scale = np.float32((top - lower) / np.float32(255))
    zero_point = int(np.clip(np.floor(-float(lower) / float(scale) + 0.5), 0, 255)) - 128
    return float(scale), zero_point


def _round_half_away(values):
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def _normalization_integers(input_layer, plan: ActivationPlan, mean, std):
    """Per channel, the int8 weight `w` and int32 bias `b` of the 1x1 convolution that turns
    raw pixels into the model's quantized input, chosen so that TFLite's result equals the
    Keras model's on every pixel value 0..255.

    Keras computes `Q((p - mean) / std)` in float32 (`tfacd.data.normalize`, then the input
    quantizer `Q`); TFLite computes `zp + round(M (w p + b))` with `M = s_w / s_out` and the
    bias on the grid `s_w` (the pixels' scale is 1). With `w = 127` and `b = round(-127 mean)`,
    the bias's rounding moves the argument by up to `0.5 / (127 std s_out)` steps, and 0.4%
    of a trained model's input values came out one step off (measured on the CIFAR-10 runs).
    Each channel has only 256 inputs, so the search tries every `w` and the nearest few `b`
    and keeps the pair that gives Keras's integer on all 256, farthest from a rounding tie
    (so TFLite's fixed-point and XNNPACK's float requantization round alike).

    Returns `(w, b, s_w, mismatches)`: arrays per channel, and the number of (pixel value,
    channel) pairs no pair could match (0 when the search succeeds).
    """
    channels = len(mean)
    pixels = np.arange(256, dtype=np.float32)
    pixels64 = pixels.astype(np.float64)
    normalized = (pixels[:, None] - mean.astype(np.float32)) / std.astype(np.float32)
    keras_values = input_layer(tf.constant(normalized.reshape(1, 256, 1, channels)),
                               training=False).numpy().reshape(256, channels)
    scale, zero_point = _tflite_activation_grid(plan)
    target = np.clip(np.round(keras_values / scale) + zero_point, -128, 127)
    weights = np.zeros(channels, np.int64)
    biases = np.zeros(channels, np.int64)
    steps = np.zeros(channels, np.float32)
    mismatches = 0
    for c in range(channels):
        best = None
        for w in range(_INT8_MAX, 0, -1):
            step = np.float32(1.0 / (float(std[c]) * w))
            multiplier = float(step) / scale
            center = -float(mean[c]) * w
            for b in range(int(np.floor(center)) - 2, int(np.floor(center)) + 4):
                argument = multiplier * (w * pixels64 + b)
                result = np.clip(zero_point + _round_half_away(argument), -128, 127)
                wrong = int(np.sum(result != target[:, c]))
                # Distance to the nearest rounding tie, over the values that are not clamped.
                free = (result > -128) & (result < 127)
                margin = float(np.min(np.abs(argument[free] - np.floor(argument[free]) - 0.5))) \
                    if free.any() else 0.5
                key = (wrong, -margin)
                if best is None or key < best[0]:
                    best = (key, w, b, step)
        (wrong, _), weights[c], biases[c], steps[c] = best
        mismatches += wrong
    return weights, biases, steps, mismatches


def _normalization(x, mean, std, quantized: bool, input_quantized: bool, integers=None):
    """Raw pixels -> `(p - mean) / std`, as a 1x1 depthwise convolution (int8 in TFLite).
    `integers`: `(w, b, s_w)` per channel from `_normalization_integers` (the quantized
    result then equals Keras's on every pixel value); None: `w = 127`, float bias."""
    channels = x.shape[-1]
    mean = np.broadcast_to(np.asarray(mean, np.float64), (channels,))
    std = np.broadcast_to(np.asarray(std, np.float64), (channels,))
    if np.any(std <= 0):
        raise ExportError(f"input_std must be > 0, got {std.tolist()}")
    scale, shift = 1.0 / std, -mean / std
    if quantized:
        x = _fake_quant_8bit(x, 0.0, 255.0)      # scale 1, zero point 0: pixels exactly
        if integers is not None:
            integers, bias, step = integers
            shift = bias * step.astype(np.float64)
        else:
            # One int8 weight per channel, 127, with scale 1 / (127 std_c).
            integers, step = np.full(channels, _INT8_MAX), (scale / _INT8_MAX).astype(np.float32)
        baked = BakedWeights(kernel=(integers * step).reshape(1, 1, 1, channels).astype(np.float32),
                             bias=shift.astype(np.float32),
                             integers=integers.reshape(1, 1, 1, channels), step=step, bits=8)
        kernel = tf.reshape(_weight_tensor(baked), (1, 1, channels, 1))
    else:
        kernel = tf.constant(scale.reshape(1, 1, channels, 1).astype(np.float32))
    y = tf.nn.depthwise_conv2d(x, kernel, (1, 1, 1, 1), "VALID")
    y = tf.nn.bias_add(y, _bias_constant(shift))
    if quantized and not input_quantized:
        # No input quantizer to set this tensor's grid: 8 bits over the normalized pixels.
        y = _fake_quant_8bit(y, float(np.min(shift)), float(np.max(255 * scale + shift)))
    return y


def bake(model, input_mean=None, input_std=None, activation_policy: str = "float",
         quantized: bool = True, batch_size: int | None = None,
         taps: bool = False, weight_storage: str = "int8") -> Bake:
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
                                                weight_storage)
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
    return Bake(function, weights, list(plans.values()), float_layers, quantized, model,
                normalization_mismatches)


# ------------------------------------------------------------------------------------------
# Conversion and the interpreter
# ------------------------------------------------------------------------------------------

def _convert(baked: Bake, input_type: str = "float32", output_type: str = "float32") -> bytes:
    for name, value in (("input_type", input_type), ("output_type", output_type)):
        if value not in IO_TYPES:
            raise ExportError(f"{name} must be one of {sorted(IO_TYPES)}, got {value!r}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([baked.function], baked.model)
    if baked.quantized:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = IO_TYPES[input_type]
        converter.inference_output_type = IO_TYPES[output_type]
    elif (input_type, output_type) != ("float32", "float32"):
        raise ExportError("a float export has float32 input and output")
    try:
        content = converter.convert()
    except Exception as error:  # the converter raises several unrelated types
        first = str(error).strip().splitlines()
        raise ExportError(f"the TFLite converter refused the baked model: "
                          f"{first[0] if first else type(error).__name__}") from error
    if baked.quantized:
        # Float ops' filters (the `float` policy) as int8 + DEQUANTIZE; none otherwise.
        content, _ = store_float_filters_as_int8(content, baked)
        return content
    return _compact(content)


def _writable(output_path) -> pathlib.Path:
    path = pathlib.Path(output_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _content(model_path_or_bytes) -> bytes:
    if isinstance(model_path_or_bytes, (bytes, bytearray)):
        return bytes(model_path_or_bytes)
    path = pathlib.Path(model_path_or_bytes)
    if not path.is_file():
        raise ExportError(f"TFLite file not found: {path}")
    return path.read_bytes()


def interpreter(model_path_or_bytes, num_threads: int | None = None,
                delegates: bool = True):
    """A LiteRT interpreter for a file (path) or flatbuffer (bytes). `delegates=False` runs
    TFLite's builtin kernels only (no XNNPACK)."""
    # pylint: disable-next=import-outside-toplevel
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if delegates else \
        OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_content=_content(model_path_or_bytes), num_threads=num_threads,
                       experimental_op_resolver_type=resolver)


def run_tflite(model_path_or_bytes, pixels, batch_size: int = 64,
               num_threads: int | None = None, delegates: bool = True) -> np.ndarray:
    """Float logits of a tfacd-exported file on raw pixels `[N, H, W, C]` (0-255);
    `delegates=False` runs TFLite's builtin kernels only (no XNNPACK)."""
    pixels = np.asarray(pixels)
    runner = interpreter(model_path_or_bytes, num_threads, delegates)
    detail = runner.get_input_details()[0]
    signature = detail["shape_signature"]
    fixed_batch = int(signature[0]) if signature[0] > 0 else None
    outputs, start, shape = [], 0, None
    while start < len(pixels):
        chunk = pixels[start:start + (fixed_batch or batch_size)]
        start += len(chunk)
        real = len(chunk)
        if fixed_batch and real < fixed_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - real, 0)])
        if shape != chunk.shape:
            if not fixed_batch:
                runner.resize_tensor_input(detail["index"], chunk.shape)
            runner.allocate_tensors()
            shape = chunk.shape
        runner.set_tensor(detail["index"], _to_input(chunk, runner.get_input_details()[0]))
        runner.invoke()
        out = runner.get_output_details()[0]
        outputs.append(_from_output(runner.get_tensor(out["index"]), out)[:real])
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def _to_input(x, detail):
    dtype = detail["dtype"]
    if dtype == np.float32:
        return x.astype(np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def _from_output(y, detail):
    if detail["dtype"] == np.float32:
        return y
    scale, zero_point = detail["quantization"]
    return (y.astype(np.float32) - zero_point) * scale


# ------------------------------------------------------------------------------------------
# The export report
# ------------------------------------------------------------------------------------------

def op_histogram(model_path_or_bytes) -> dict:
    """`{op name: count}` of a TFLite file (delegates not applied)."""
    runner = interpreter(model_path_or_bytes, delegates=False)
    details = runner._get_ops_details()  # pylint: disable=protected-access
    return dict(collections.Counter(op["op_name"] for op in details))


def _flatbuffer(content: bytes):
    """The file as TFLite's flatbuffer object model (`schema_py_generated.ModelT`)."""
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils.read_model_from_bytearray(bytearray(content))


def _serialize(model) -> bytes:
    """The flatbuffer of `model` (schema object API) with every quantization parameter
    vector stored once: tensors whose scales or zero points are equal point at one copy.

    The converter writes a scale (float32) and a zero point (int64) per channel for every
    per-channel weight *and* its bias, each its own vector: 12 bytes a channel, twice. In a
    MobileNetV2 most of those channels have few weights (a depthwise channel has 9), so the
    parameters were 23% of a 2-bit file (224 kB of 992 kB). The zero points are all 0, and
    a flatbuffer table may point at any vector already written, so one zero vector per
    channel count serves every tensor (TFLite requires as many zero points as scales)."""
    # pylint: disable-next=import-outside-toplevel
    import flatbuffers
    schema = _schema()
    shared = {}

    def vector(kind, values, start, prepend, builder):
        key = (kind, tuple(values))
        if key not in shared:
            start(builder, len(values))
            for value in reversed(values):
                prepend(value)
            shared[key] = builder.EndVector()
        return shared[key]

    class SharedQuantizationParameters(schema.QuantizationParametersT):
        """`QuantizationParametersT.Pack` with scale and zero-point vectors shared."""

        def Pack(self, builder):  # pylint: disable=invalid-name  (flatbuffers' name)
            if self.details is not None:                   # custom quantization: as is
                return super().Pack(builder)
            offsets = {}
            if self.scale is not None:
                offsets["scale"] = vector(
                    "scale", [float(v) for v in np.asarray(self.scale, np.float32)],
                    schema.QuantizationParametersStartScaleVector, builder.PrependFloat32,
                    builder)
            if self.zeroPoint is not None:
                offsets["zero_point"] = vector(
                    "zero_point", [int(v) for v in self.zeroPoint],
                    schema.QuantizationParametersStartZeroPointVector, builder.PrependInt64,
                    builder)
            for name in ("min", "max"):
                values = getattr(self, name)
                if values is not None:
                    offsets[name] = builder.CreateNumpyVector(np.asarray(values, np.float32))
            schema.QuantizationParametersStart(builder)
            for name, add in (("min", schema.QuantizationParametersAddMin),
                              ("max", schema.QuantizationParametersAddMax),
                              ("scale", schema.QuantizationParametersAddScale),
                              ("zero_point", schema.QuantizationParametersAddZeroPoint)):
                if name in offsets:
                    add(builder, offsets[name])
            schema.QuantizationParametersAddDetailsType(builder, self.detailsType)
            schema.QuantizationParametersAddQuantizedDimension(builder,
                                                               self.quantizedDimension)
            return schema.QuantizationParametersEnd(builder)

    params = [tensor.quantization for subgraph in model.subgraphs
              for tensor in subgraph.tensors if tensor.quantization is not None]
    for entry in params:
        entry.__class__ = SharedQuantizationParameters
    try:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    finally:                                    # `model` is the caller's: leave it as it was
        for entry in params:
            entry.__class__ = schema.QuantizationParametersT
    return bytes(builder.Output())


def _compact(content: bytes) -> bytes:
    """`content` re-serialized with its quantization vectors shared (`_serialize`): the same
    model, byte for byte the same tensors, fewer bytes."""
    return _serialize(_flatbuffer(content))


def _schema():
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _tensor_types():
    return _schema().TensorType


def _weight_op_entries(model):
    """`(subgraph, op, op name)` of every Conv2D, DepthwiseConv2D and FullyConnected op with
    a filter."""
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            name = _op_name(model, op)
            if name in _WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
                yield subgraph, op, name


def _weight_ops(model):
    """`(op name, stored filter tensor, bias tensor or None, dequantized)` of every Conv2D,
    DepthwiseConv2D and FullyConnected op. A filter computed by a `DEQUANTIZE` of a constant
    (`store_float_filters_as_int8`: the op runs in float) is given as that constant, the
    tensor the file stores, with `dequantized` True."""
    dequantized = {}                     # (subgraph, output tensor) -> DEQUANTIZE's input
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if _op_name(model, op) == "DEQUANTIZE" and \
                    model.buffers[subgraph.tensors[op.inputs[0]].buffer].data is not None:
                dequantized[id(subgraph), int(op.outputs[0])] = int(op.inputs[0])
    for subgraph, op, name in _weight_op_entries(model):
        bias = subgraph.tensors[op.inputs[2]] \
            if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        stored = dequantized.get((id(subgraph), int(op.inputs[1])), int(op.inputs[1]))
        yield name, subgraph.tensors[stored], bias, stored != int(op.inputs[1])


def _tensor_name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _pack_int4(values: np.ndarray) -> np.ndarray:
    """int4 values, two per byte, the first in the low nibble (TFLite's packing)."""
    flat = np.asarray(values, np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = flat.astype(np.uint8) & 0x0F
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed, count: int) -> np.ndarray:
    raw = np.frombuffer(bytes(packed), np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > _INT4_MAX, nibbles - 16, nibbles).astype(np.int8)


def _runs_int4_exactly(inner) -> bool:
    """Whether the file can hold `inner`'s filter as int4 and still compute what Keras does:
    a Dense layer, or a 1x1 stride-1 Conv2D (`pack_int4_weights` writes it as a
    FULLY_CONNECTED). XNNPACK, LiteRT's default CPU path, runs int4 filters only in
    FULLY_CONNECTED; an int4 CONV_2D or DEPTHWISE_CONV_2D falls back to TFLite's builtin
    kernels, whose requantization rounds differently (measured: the int4 file of a trained
    2-bit run agreed with Keras on 35% of images, docs/export.md)."""
    if isinstance(inner, keras.layers.Dense):
        return True
    return (type(inner) is keras.layers.Conv2D  # pylint: disable=unidiomatic-typecheck
            and tuple(inner.kernel_size) == (1, 1) and tuple(inner.strides) == (1, 1)
            and getattr(inner, "groups", 1) == 1)


# The FULLY_CONNECTED version for int8 inputs with int4 filters (TFLite's op_version.cc).
_FULLY_CONNECTED_INT4_VERSION = 10


def pack_int4_weights(model_path_or_bytes) -> tuple[bytes, int]:
    """Stores every FULLY_CONNECTED filter, and every 1x1 stride-1 CONV_2D filter, whose values
    all lie in int4's `[-8, 7]` as a packed int4 tensor (half the bytes, same values, same
    scales). Such a CONV_2D becomes a FULLY_CONNECTED with `keep_num_dims` over the channel
    axis: the same arithmetic (its `[out, 1, 1, in]` filter is the `[out, in]` matrix),
    and the op XNNPACK runs with int4 filters; measured bit-equal to the int8 CONV_2D with
    XNNPACK and with the builtin kernels. DEPTHWISE_CONV_2D and larger CONV_2D filters stay
    int8 (`_runs_int4_exactly`).

    The converter (TF 2.21) writes int8 filters whatever the fake-quant's bits. Returns the
    new flatbuffer and the number of tensors packed.
    """
    model = _flatbuffer(_content(model_path_or_bytes))
    schema = _schema()
    users = collections.Counter(t.buffer for sg in model.subgraphs for t in sg.tensors)
    int4_code = None
    packed = 0
    for subgraph, op, name in _weight_op_entries(model):
        tensor = subgraph.tensors[op.inputs[1]]
        buffer = model.buffers[tensor.buffer]
        if tensor.type != schema.TensorType.INT8 or buffer.data is None or \
                users[tensor.buffer] != 1:
            continue
        if name == "CONV_2D":
            options = op.builtinOptions
            if list(tensor.shape[1:3]) != [1, 1] or (options.strideH, options.strideW) != \
                    (1, 1):
                continue
        elif name != "FULLY_CONNECTED":
            continue
        values = np.frombuffer(bytes(buffer.data), np.int8)
        if not values.size or values.min() < _INT4_MIN or values.max() > _INT4_MAX:
            continue
        if int4_code is None:
            int4_code = _operator_code(model, schema.BuiltinOperator.FULLY_CONNECTED,
                                       _FULLY_CONNECTED_INT4_VERSION)
        if name == "CONV_2D":
            fully_connected = schema.FullyConnectedOptionsT()
            fully_connected.fusedActivationFunction = op.builtinOptions.fusedActivationFunction
            fully_connected.keepNumDims = True
            op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
            op.builtinOptions = fully_connected
            tensor.shape = np.array([tensor.shape[0], tensor.shape[3]], np.int32)
        op.opcodeIndex = int4_code
        buffer.data = _pack_int4(values)
        tensor.type = schema.TensorType.INT4
        packed += 1
    _drop_unused_operator_codes(model)
    return _serialize(model), packed


def _drop_unused_operator_codes(model):
    """Removes operator codes no operator uses (a rewrite may leave CONV_2D's behind)."""
    used = sorted({op.opcodeIndex for sg in model.subgraphs for op in sg.operators})
    remap = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            op.opcodeIndex = remap[op.opcodeIndex]


# The DEQUANTIZE version for per-channel int8 inputs (TFLite's op_version.cc).
_DEQUANTIZE_PER_CHANNEL_VERSION = 5
# Filter axis of the output channels, as TFLite lays filters out: CONV_2D [out, kh, kw, in],
# DEPTHWISE_CONV_2D [1, kh, kw, out], FULLY_CONNECTED [out, in].
_FILTER_CHANNEL_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}


def store_float_filters_as_int8(model_path_or_bytes, baked: Bake) -> tuple[bytes, int]:
    """Stores the float32 filter of every weight op that runs in float (its input is a float
    tensor, e.g. under `activation_policy="float"`) as the int8 integers it holds, with the
    layer's per-channel steps as scales and zero point 0, and a `DEQUANTIZE` in front of the
    op: the same float32 values (`DEQUANTIZE` computes `s_c m`, the product the filter
    holds), a quarter of the bytes.

    The converter (TF 2.21) writes a weight fake-quant that feeds a float op as the float32
    values it computes, and none of its QDQ modes keeps int8 filters in front of float ops
    (docs/export.md). XNNPACK turns a constant
    filter's `DEQUANTIZE` into float weights once, when the delegate is built.

    Only layers `baked` quantized are touched (their integers and steps are known); each
    filter is checked against them, and a filter that is not `m s_c` on the layer's grid
    (the converter folded something into it) raises `ExportError`. Returns the new
    flatbuffer and the number of filters stored as int8.
    """
    model = _flatbuffer(_content(model_path_or_bytes))
    schema = _schema()
    users = collections.Counter(t.buffer for sg in model.subgraphs for t in sg.tensors)
    layer_names = list(baked.weights)
    code = None
    dequantize_before = {}                           # id(op) -> the DEQUANTIZE to insert
    for subgraph, op, name in _weight_op_entries(model):
        tensor = subgraph.tensors[op.inputs[1]]
        buffer = model.buffers[tensor.buffer]
        if tensor.type != schema.TensorType.FLOAT32 or buffer.data is None or \
                not len(buffer.data):
            continue
        layer = _layer_for_tensor(_tensor_name(tensor), layer_names)
        weights = baked.weights.get(layer)
        if weights is None or weights.integers is None:
            continue
        shape = [int(d) for d in tensor.shape]
        axis = _FILTER_CHANNEL_AXIS[name]
        values = np.frombuffer(bytes(buffer.data), np.float32).reshape(shape)
        if shape[axis] != weights.step.size:
            raise ExportError(f"{layer}: the file's {name} filter has {shape[axis]} output "
                              f"channels, the layer {weights.step.size}")
        step_shape = [1] * len(shape)
        step_shape[axis] = -1
        step = weights.step.reshape(step_shape)
        units = values / step
        integers = np.round(units)
        if np.max(np.abs(units - integers)) > 1e-3 or np.max(np.abs(integers)) > _INT8_MAX:
            raise ExportError(f"{layer}: the converter changed the float filter of its "
                              f"{name}; it is no longer on the layer's grid")
        if code is None:
            code = _operator_code(model, schema.BuiltinOperator.DEQUANTIZE,
                                  _DEQUANTIZE_PER_CHANNEL_VERSION)
        if users[tensor.buffer] == 1:
            buffer.data = None                       # the float copy goes
        int8_buffer = schema.BufferT()
        int8_buffer.data = np.frombuffer(integers.astype(np.int8).tobytes(), np.uint8)
        model.buffers.append(int8_buffer)
        int8_tensor = schema.TensorT()
        int8_tensor.shape = np.array(shape, np.int32)
        int8_tensor.type = schema.TensorType.INT8
        int8_tensor.buffer = len(model.buffers) - 1
        int8_tensor.name = tensor.name + b"/int8" if isinstance(tensor.name, bytes) \
            else f"{tensor.name}/int8"
        params = schema.QuantizationParametersT()
        params.scale = weights.step.astype(np.float32).tolist()
        params.zeroPoint = [0] * weights.step.size
        params.quantizedDimension = axis
        int8_tensor.quantization = params
        subgraph.tensors.append(int8_tensor)
        # The float filter tensor stays, with no data: DEQUANTIZE's output.
        tensor.buffer = 0
        dequantize = schema.OperatorT()
        dequantize.opcodeIndex = code
        dequantize.inputs = np.array([len(subgraph.tensors) - 1], np.int32)
        dequantize.outputs = np.array([op.inputs[1]], np.int32)
        dequantize_before[id(op)] = dequantize
    for subgraph in model.subgraphs:
        operators = []
        for op in subgraph.operators:
            if id(op) in dequantize_before:
                operators.append(dequantize_before[id(op)])
            operators.append(op)
        subgraph.operators = operators
    return _serialize(model), len(dequantize_before)


def _op_name(model, op) -> str:
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)


def _operator_code(model, builtin: int, version: int) -> int:
    """The index of `model`'s operator code for `builtin` at `version`, added if missing."""
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and \
                code.version == version:
            return index
    code = _schema().OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin      # both < 127: the same
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def weight_tensors(model_path_or_bytes) -> list[dict]:
    """Every constant int8 or int4 weight tensor of a file with its per-channel statistics
    (also those a `DEQUANTIZE` turns into a float op's filter: `dequantized`)."""
    model = _flatbuffer(_content(model_path_or_bytes))
    types = _tensor_types()
    found = []
    for op_name, tensor, _, dequantized in _weight_ops(model):
        data = model.buffers[tensor.buffer].data
        if tensor.type not in (types.INT8, types.INT4) or data is None:
            continue
        shape = [int(d) for d in tensor.shape]
        count = int(np.prod(shape))
        values = (np.frombuffer(bytes(data), np.int8) if tensor.type == types.INT8
                  else _unpack_int4(data, count)).astype(np.int32).reshape(shape)
        params = tensor.quantization
        axis = int(params.quantizedDimension)
        per_channel = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        found.append({
            "op": op_name, "tensor": _tensor_name(tensor), "shape": shape,
            "storage": "int8" if tensor.type == types.INT8 else "int4",
            "zero_points": sorted({int(z) for z in params.zeroPoint}),
            "max_distinct_per_channel": int(max(len(np.unique(row)) for row in per_channel)),
            "scales": [float(v) for v in params.scale],
            # The op computes in float on this tensor's DEQUANTIZE (the `float` policy).
            "dequantized": bool(dequantized),
        })
    return found


def size_breakdown(model_path_or_bytes) -> dict:
    """Where a file's bytes go: `{part: bytes}` with the parts

    * `int8_tensors`, `int4_tensors`, `int32_tensors`, `float32_tensors`, `other_tensors`:
      constant tensor data (weights are int8 or packed int4, biases int32 in an int8 file);
    * `quantization_parameters`: the scales (float32) and zero points (int64, as the
      flatbuffer stores them), per channel for the weights *and* their biases, each
      distinct vector once (`_serialize` shares equal ones);
    * `graph_and_metadata`: the rest (operators, tensor names, shapes, signatures).

    The parts sum to the file's size (the last is the remainder).
    """
    content = _content(model_path_or_bytes)
    model = _flatbuffer(content)
    types = _tensor_types()
    names = {types.INT8: "int8_tensors", types.INT4: "int4_tensors",
             types.INT32: "int32_tensors", types.FLOAT32: "float32_tensors"}
    parts = collections.Counter()
    parts["quantization_parameters"] = _stored_quantization_bytes(content)
    counted = set()
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            data = model.buffers[tensor.buffer].data if tensor.buffer else None
            if data is not None and len(data) and tensor.buffer not in counted:
                counted.add(tensor.buffer)
                parts[names.get(tensor.type, "other_tensors")] += len(data)
    result = {key: int(parts.get(key, 0)) for key in (
        "int8_tensors", "int4_tensors", "int32_tensors", "float32_tensors", "other_tensors",
        "quantization_parameters")}
    result["graph_and_metadata"] = len(content) - sum(result.values())
    return result


def _stored_quantization_bytes(content: bytes) -> int:
    """Bytes of the scale and zero-point vectors a file stores, each stored vector once
    however many tensors point at it (read where the vectors lie, not what they hold)."""
    schema = _schema()
    root = schema.Model.GetRootAs(content, 0)
    positions = {}
    for g in range(root.SubgraphsLength()):
        subgraph = root.Subgraphs(g)
        for t in range(subgraph.TensorsLength()):
            params = subgraph.Tensors(t).Quantization()
            if params is None:
                continue
            table = params._tab  # pylint: disable=protected-access
            # vtable slots of QuantizationParameters.scale (float32) and .zero_point (int64)
            for slot, width in ((8, 4), (10, 8)):
                field = table.Offset(slot)
                if field:
                    positions[table.Vector(field)] = width * table.VectorLen(field)
    return sum(positions.values())


def _layer_for_tensor(tensor_name: str, layer_names) -> str | None:
    # The converter names a weight after the ops that made it, prefixed by our name scopes.
    hits = [name for name in layer_names if f"{name}/" in tensor_name]
    return max(hits, key=len) if hits else None


def _mean_std(input_mean, input_std):
    """Per-channel input mean and std as float32; a missing one is 0 (mean) or 1 (std)."""
    mean = np.zeros(3) if input_mean is None else np.asarray(input_mean)
    std = np.ones(3) if input_std is None else np.asarray(input_std)
    return mean.astype(np.float32), std.astype(np.float32)


def _keras_logits(qat_model, pixels, input_mean=None, input_std=None, batch_size: int = 64):
    pixels = np.asarray(pixels, np.float32)
    normalized = pixels
    if input_mean is not None or input_std is not None:
        mean, std = _mean_std(input_mean, input_std)
        normalized = (pixels - mean) / std
    return np.concatenate([
        qat_model(normalized[i:i + batch_size], training=False).numpy()
        for i in range(0, len(pixels), batch_size)])


def _compare(keras_logits, lite_logits, labels=None) -> dict:
    difference = np.abs(keras_logits - lite_logits)
    result = {
        "num_examples": int(len(keras_logits)),
        "top1_agreement": float(np.mean(keras_logits.argmax(1) == lite_logits.argmax(1))),
        "max_logit_difference": float(difference.max()),
        "mean_logit_difference": float(difference.mean()),
        "keras_accuracy": None, "tflite_accuracy": None,
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        result["keras_accuracy"] = float(np.mean(keras_logits.argmax(1) == labels))
        result["tflite_accuracy"] = float(np.mean(lite_logits.argmax(1) == labels))
    return result


def fidelity(qat_model, tflite, pixels, labels=None, input_mean=None, input_std=None,
             batch_size: int = 64) -> dict:
    """Top-1 agreement and logit differences between the Keras QAT model and a file (run
    with XNNPACK, LiteRT's default), and both accuracies when `labels` are given. `pixels`
    are raw (0-255)."""
    return _compare(_keras_logits(qat_model, pixels, input_mean, input_std, batch_size),
                    run_tflite(tflite, np.asarray(pixels, np.float32), batch_size), labels)


def snap_biases_to_file(qat_model, tflite) -> dict:
    """Moves `qat_model`'s biases onto the int32 grid the file `tflite` stores them on, so
    the Keras model computes what the file computes. Changes `qat_model` in place; the file
    is unchanged (exporting the snapped model again gives the same integers).

    TFLite keeps each weight layer's (BN-folded) bias as an int32 `b_c` with the scale
    `s_in s_c`, the product of the input's and the channel's weight steps, so the file adds
    `b_c s_in s_c` where Keras adds its float bias `beta_c`: a difference of up to
    `s_in s_c / 2` per channel. Small, but a 2-bit model's rounding decisions move under
    relative changes of 1e-5 (docs/export.md), and after a few layers a quarter of the
    values differ. Here each channel's difference is added to the Keras layer's bias, or to
    the beta of the BatchNormalization folded into it: `beta_c <- beta_c + (b_c s_in s_c -
    bias_c)`. Keras then adds exactly what the file adds.

    Returns `{layer name: largest change in units of that layer's bias grid}`: at most 0.5
    (plus float32 rounding) where the file's integer is the rounded bias. The converter
    divides in float32, so an int32 beyond 2^24 can be a unit or two further off (measured
    up to 1.007 on a depthwise layer with a tiny input step, `clamp` policy); the snap reads
    the file's integer either way.
    Raises `ExportError` for a file that does not belong to the model.
    """
    content = _content(tflite)
    model = _flatbuffer(content)
    names = [layer.name for layer in qat_model.layers]
    folded = _batch_norm_folds(qat_model)
    shifts, moves = {}, []
    for _, filter_tensor, bias_tensor, _ in _weight_ops(model):
        name = _layer_for_tensor(_tensor_name(filter_tensor), names)
        if name is None or bias_tensor is None:
            continue                              # the input normalization: not a layer
        data = model.buffers[bias_tensor.buffer].data
        scales = bias_tensor.quantization.scale if bias_tensor.quantization else None
        if data is None or scales is None or len(scales) == 0:
            continue                              # a float bias: nothing to snap
        layer = qat_model.get_layer(name)
        grid = np.asarray(scales, np.float64)
        file_bias = np.frombuffer(bytes(data), np.int32).astype(np.float64) * grid
        current = _bake_weights(layer, folded.get(name), True).bias.astype(np.float64)
        if current.shape != file_bias.shape:
            raise ExportError(f"{name}: the file's bias has {file_bias.size} channels, the "
                              f"model's {current.size}: the file is not this model's export")
        delta = file_bias - current
        bn = folded.get(name)
        change = delta
        if bn is not None and _inner(bn).center:
            variable = _inner(bn).beta
        elif _inner(layer).use_bias:
            variable = _inner(layer).bias
            if bn is not None:                    # folded bias = bias * multiplier + shift
                multiplier, _ = _bn_multiplier_and_shift(bn, current.size)
                if np.any((multiplier == 0) & (delta != 0)):
                    raise ExportError(f"{name}: a channel with BatchNormalization gamma 0 "
                                      "has a bias that cannot be snapped")
                change = np.divide(delta, multiplier, out=np.zeros_like(delta),
                                   where=multiplier != 0)
        elif np.any(delta):
            raise ExportError(f"{name}: no bias or BatchNormalization beta to snap")
        else:
            continue
        moves.append((variable, change))
        shifts[name] = float(np.max(np.abs(delta) / grid)) if delta.size else 0.0
    # Only once every layer has been checked: a file that is not this model's export raises
    # above and leaves the model as it was.
    for variable, change in moves:
        variable.assign((variable.numpy().astype(np.float64) + change).astype(np.float32))
    return shifts


def _report(qat_model, baked: Bake, content: bytes, float_content: bytes | None,
            options: dict) -> dict:
    layer_names = [layer.name for layer in qat_model.layers]
    per_layer = {}
    for entry in weight_tensors(content):
        layer = _layer_for_tensor(entry["tensor"], layer_names)
        weights = baked.weights.get(layer)
        if weights is None:
            layer, bits, clamped = "input_normalization", 8, 0
        else:
            bits, clamped = weights.bits, weights.clamped
        per_layer[layer] = {
            "op": entry["op"], "weight_bits": bits, "storage": entry["storage"],
            "computes_in": "float" if entry["dequantized"] else "integer",
            "shape": entry["shape"],
            "max_distinct_values_per_channel": entry["max_distinct_per_channel"],
            "distinct_within_2^bits": bool(entry["max_distinct_per_channel"] <= 2 ** bits),
            "zero_points": entry["zero_points"],
            "clamped_weights": clamped,
        }
    float_bits = sum(w.kernel.size * 32 for w in baked.weights.values())
    true_bits = sum(w.kernel.size * (w.bits or 32) for w in baked.weights.values())
    return {
        "file_bytes": len(content),
        "float_file_bytes": len(float_content) if float_content is not None else None,
        "size_vs_float": (len(content) / len(float_content)) if float_content else None,
        "size_breakdown": size_breakdown(content),
        "op_histogram": op_histogram(content),
        "weights": per_layer,
        "all_weight_zero_points_zero": all(v["zero_points"] == [0] for v in per_layer.values()),
        "all_distinct_within_2^bits": all(v["distinct_within_2^bits"]
                                          for v in per_layer.values()),
        "clamped_weights": sum(v["clamped_weights"] for v in per_layer.values()),
        "weight_memory_bytes_true_bits": true_bits / 8,
        "weight_memory_bytes_float32": float_bits / 8,
        "weight_memory_vs_float32": true_bits / float_bits if float_bits else None,
        "activations": {
            plan.name: {"bits": plan.bits, "per_channel": bool(plan.per_channel),
                        "exact": bool(plan.exact)}
            for plan in baked.activations},
        "float_layers": baked.float_layers,
        # (pixel value, channel) pairs whose quantized input differs from Keras's input
        # quantizer (0 by construction; None: no input quantizer to match).
        "input_normalization_mismatches": baked.normalization_mismatches,
        "options": options,
    }


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------

def export_tflite(qat_model, output_path, *, input_mean=None, input_std=None,
                  input_type: str = "float32", output_type: str = "float32",
                  activation_policy: str = "float", data=None, labels=None,
                  batch_size: int | None = None, float_reference: bool = True,
                  report_path=None, verbose: bool = True,
                  weight_storage: str = "int8", snap_biases: bool = True) -> pathlib.Path:
    """Exports a tfacd QAT model to a TFLite file that takes raw RGB pixels.

    Args:
      qat_model: from `tfacd.quantize_model` (trained).
      output_path: the `.tflite` file to write; the report goes beside it as
        `<stem>_report.json` (or to `report_path`).
      input_mean, input_std: per-channel normalization (pixel units) the model was trained
        with; the file applies it itself.
      input_type, output_type: "float32", "int8" or "uint8" model input/output. With int8 or
        uint8 input the caller passes pixels as integers (scale 1, zero point 0 for uint8,
        -128 for int8); `run_tflite` does this, and dequantizes int8 outputs.
      activation_policy: for per-channel activations: "float" (exact; those layers compute
        in float on int8-stored filters), "clamp" or "round" (int8, approximate; module
        docstring).
      data, labels: raw pixels `[N, H, W, C]` (and labels) for the report's fidelity section.
      batch_size: the file's fixed batch size (None: any; resized at run time).
      float_reference: also convert the float model of the same weights, for the size ratio.
      weight_storage: "int8" (default), or "int4": layers whose weights have at most 16
        levels that fit `[-8, 7]` (2- and 3-bit layers; 4-bit ones trained with
        `symmetric_weights=True`) are stored as packed int4, half the bytes, with a coarser
        bias grid (module docstring); the report says which.
      snap_biases: move `qat_model`'s biases (in place) onto the int32 grid the file stores
        them on (`snap_biases_to_file`), so that the model and the file compute the same
        thing; the report's `fidelity` is then against the snapped model, and
        `fidelity_before_bias_snap` against the model as it came. False: leave the model
        as it is.

    Returns:
      The path written. Raises `ExportError` naming the problem for a model that was never
      quantized, a path that cannot be written, or anything the converter refuses.
    """
    path = _writable(output_path)
    options = {"input_type": input_type, "output_type": output_type, "snap_biases": snap_biases,
               "activation_policy": activation_policy, "weight_storage": weight_storage,
               "input_mean": None if input_mean is None else np.asarray(input_mean).tolist(),
               "input_std": None if input_std is None else np.asarray(input_std).tolist()}
    baked = bake(qat_model, input_mean, input_std, activation_policy, True, batch_size,
                 weight_storage=weight_storage)
    content = _convert(baked, input_type, output_type)
    if weight_storage == "int4":
        content, packed = pack_int4_weights(content)
        if not packed:
            # Not an error: the file is still right, only not smaller (e.g. 4-bit weights on
            # the asymmetric grid, whose integers [-z, 15 - z] leave int4's range).
            warnings.warn("weight_storage='int4' stored no filter as int4: no integer 1x1 "
                          "or Dense layer's integers fit [-8, 7] (4-bit weights need "
                          "QuantizeScheme(symmetric_weights=True); layers that compute in "
                          "float under activation_policy='float' keep int8 filters)",
                          stacklevel=2)
    float_content = None
    if float_reference:
        float_content = _convert(bake(qat_model, input_mean, input_std, activation_policy,
                                      False, batch_size))
    report = _report(qat_model, baked, content, float_content, options)
    lite_logits = None
    if data is not None:
        lite_logits = run_tflite(content, np.asarray(data, np.float32))
        if snap_biases:
            report["fidelity_before_bias_snap"] = _compare(
                _keras_logits(qat_model, data, input_mean, input_std), lite_logits, labels)
    if snap_biases:
        shifts = snap_biases_to_file(qat_model, content)
        report["bias_snap"] = {
            "layers": len(shifts),
            "largest_change_in_bias_steps": max(shifts.values(), default=0.0)}
    if lite_logits is not None:
        report["fidelity"] = _compare(_keras_logits(qat_model, data, input_mean, input_std),
                                      lite_logits, labels)
    path.write_bytes(content)
    report["path"] = str(path)
    report_file = pathlib.Path(report_path) if report_path else \
        path.with_name(f"{path.stem}_report.json")
    report_file.write_text(json.dumps(report, indent=2, default=_json_default))
    if verbose:
        print(format_report(report))
    return path


def export_float_tflite(model, output_path, *, input_mean=None, input_std=None,
                        batch_size: int | None = None) -> pathlib.Path:
    """The float TFLite file of a float (or QAT) model, BN folded, raw-pixel input."""
    path = _writable(output_path)
    path.write_bytes(_convert(bake(model, input_mean, input_std, quantized=False,
                                   batch_size=batch_size)))
    return path


def export_tfmot_tflite(qat_model, output_path, *, input_mean=None,
                        input_std=None) -> pathlib.Path:
    """The int8 TFLite file of a model quantized by tfmot's own default 8-bit scheme, the
    way tfmot documents it (`TFLiteConverter.from_keras_model` with `Optimize.DEFAULT`), with
    the input normalization in front so that, like tfacd's files, it takes raw RGB pixels
    (float32). For the reference row of an ablation; tfacd models go through
    `export_tflite`."""
    path = _writable(output_path)
    inputs = keras.Input(qat_model.input_shape[1:])
    x = inputs
    if input_mean is not None or input_std is not None:
        mean, std = _mean_std(input_mean, input_std)
        x = keras.layers.Normalization(mean=mean, variance=np.square(std))(x)
    wrapper = keras.Model(inputs, qat_model(x, training=False))
    converter = tf.lite.TFLiteConverter.from_keras_model(wrapper)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        path.write_bytes(converter.convert())
    except Exception as error:  # the converter raises several unrelated types
        first = str(error).strip().splitlines()
        raise ExportError(f"the TFLite converter refused the tfmot model: "
                          f"{first[0] if first else type(error).__name__}") from error
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_report(report: dict) -> str:
    """A short human-readable rendering of an export report."""
    lines = [f"TFLite file: {report.get('path', '?')}  {report['file_bytes']:,} bytes"]
    if report.get("size_vs_float"):
        lines.append(f"  vs float TFLite ({report['float_file_bytes']:,} bytes): "
                     f"{report['size_vs_float']:.3f}x")
    if report.get("size_breakdown"):
        lines.append("  bytes: " + ", ".join(f"{k} {v:,}"
                                              for k, v in report["size_breakdown"].items()))
    if report.get("weight_memory_vs_float32") is not None:
        lines.append(f"  weight memory at true bit widths: "
                     f"{report['weight_memory_bytes_true_bits']:,.0f} bytes "
                     f"({report['weight_memory_vs_float32']:.4f}x float32)")
    lines.append(f"  weight zero points all 0: {report['all_weight_zero_points_zero']}; "
                 f"distinct values per channel <= 2^bits: "
                 f"{report['all_distinct_within_2^bits']}; clamped 8-bit weights: "
                 f"{report['clamped_weights']}")
    ops_line = ", ".join(f"{k} {v}" for k, v in sorted(report["op_histogram"].items()))
    lines.append(f"  ops: {ops_line}")
    if report.get("float_layers"):
        lines.append(f"  float layers: {report['float_layers']}")
    fid = report.get("fidelity")
    if fid:
        lines.append(f"  fidelity on {fid['num_examples']} examples: top-1 agreement "
                     f"{fid['top1_agreement']:.4f}, logit diff max "
                     f"{fid['max_logit_difference']:.4f} mean "
                     f"{fid['mean_logit_difference']:.4f}")
        if fid.get("keras_accuracy") is not None:
            lines.append(f"  accuracy: Keras {fid['keras_accuracy']:.4f}, "
                         f"TFLite {fid['tflite_accuracy']:.4f}")
    before = report.get("fidelity_before_bias_snap")
    if before:
        accuracy = "" if before.get("keras_accuracy") is None else \
            f", Keras accuracy {before['keras_accuracy']:.4f}"
        lines.append(f"  before the bias snap ({report['bias_snap']['layers']} layers): "
                     f"top-1 agreement {before['top1_agreement']:.4f}{accuracy}")
    return "\n".join(lines)
