"""Activations in the baked graph, and the file's input normalization.

* Per-tensor k-bit activations (exact): 8-bit fake-quant over `[l', l' + 255 s]` (same step,
  same zero point) and a `minimum` at the k-bit top `u'`, which is on the grid, so clamping
  and rounding commute; after a ReLU the range is `[u' - 255 s, u']` and int8 saturation is
  the upper clip, no extra op.
* Per-channel activations, by `activation_policy`: `float` (exact up to float summation
  order: each channel put on its own grid by the forward pass's own float32 ops,
  `_on_channel_grids`), `clamp` (int8 over the union of the channels' ranges, per-channel
  clip constants; a different function) or `round` (`clamp` plus per-channel rounding in
  float; up to half a union step off).
* Global average pooling without a quantizer (`QuantizeScheme(exact_average_pooling=True)`,
  exact): the mean of `c` values on a per-tensor grid of step `s` is on the grid of step
  `s / c`; an 8-bit fake quant at that step and origin holds it when the input's `n + 1`
  levels give `n c <= 255`. TFLite's MEAN then has `s_in / (s_out c) = 1` (to a float32
  ulp): no rounding on any runtime, where a k-bit pooled output is rounded by each
  runtime's own requantization and XNNPACK, the builtin and the Micro kernels disagree.
* Input (exact): raw pixels normalized by a 1x1 int8 depthwise convolution whose weight and
  int32 bias are searched per channel so that the file's integer equals the Keras input
  quantizer's on all 256 pixel values.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfacd import ops
from tfacd.quantizers import effective_clips
from tfacd.export._common import ExportError, _INT8_MAX
from tfacd.export.requantization import requantize_fixed_point, requantize_float
from tfacd.export.weights import BakedWeights, _bias_constant, _weight_tensor


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


def _exact_mean_plan(name: str, producer: ActivationPlan, count: int) -> ActivationPlan | None:
    """The int8 grid that holds the exact mean of `count` values of `producer`'s per-tensor
    grid (module docstring), or None when it does not fit int8 or `producer` is per
    channel."""
    if producer.per_channel:
        return None
    lower, step, _ = _per_tensor_grid(producer)
    if ops.num_levels(producer.bits) * count > 255:
        return None
    fine = step / count
    return ActivationPlan(name, 8, False, np.asarray(lower, np.float32),
                          np.asarray(lower + 255 * fine, np.float32), exact=True)


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
    channel) pairs no pair could match in float (XNNPACK's) arithmetic (0 when the search
    succeeds). Among the pairs exact in float, the search prefers those whose fixed-point
    requantization (`tfacd.export.requantization`, the builtin kernels' and TFLite
    Micro's) is exact too; where a pixel value's result lies within that arithmetic's
    rounding window of a tie, none is.
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
                # Both arithmetics of tfacd.export.requantization must give Keras's integer:
                # the fixed-point runtimes' and XNNPACK's float one.
                accumulators = w * np.arange(256, dtype=np.int64) + b
                fixed = np.clip(zero_point + requantize_fixed_point(accumulators, multiplier),
                                -128, 127)
                floated = np.clip(zero_point + requantize_float(accumulators, multiplier),
                                  -128, 127)
                # XNNPACK's (float) exactness first, then the fixed-point runtimes'.
                wrong = int(np.sum(floated != target[:, c]))
                fixed_wrong = int(np.sum(fixed != target[:, c]))
                # Distance to the nearest rounding tie, over the values that are not clamped.
                free = (result > -128) & (result < 127)
                margin = float(np.min(np.abs(argument[free] - np.floor(argument[free]) - 0.5))) \
                    if free.any() else 0.5
                key = (wrong, fixed_wrong, -margin)
                if best is None or key < best[0]:
                    best = (key, w, b, step)
        (wrong, _, _), weights[c], biases[c], steps[c] = best
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
