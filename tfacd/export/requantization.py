"""The two ways TFLite runtimes requantize a convolution's int32 accumulator, side by side.

An int8 `CONV_2D`, `DEPTHWISE_CONV_2D` or `FULLY_CONNECTED` output channel `c` is::

    y = clamp(zp_out + R(acc, M_c)),    acc = sum((x - zp_in) w) + bias_c,
    M_c = s_in s_w,c / s_out

and the runtimes differ in `R`:

* **float rescale** (XNNPACK, `R_float`): `rint(float32(acc) * float32(M_c))`, one rounding,
  half to even. The Keras model computes this up to float32 summation order.
* **fixed point** (LiteRT's builtin kernels, TensorFlow Lite Micro's reference kernels,
  `R_fixed`): `M_c = M0 2^(shift - 31)` with an int32 `M0` in `[2^30, 2^31)`, and::

      r1 = SaturatingRoundingDoublingHighMul(acc 2^max(shift, 0), M0)  # round(acc M0 / 2^31)
      R  = RoundingDivideByPOT(r1, max(-shift, 0))                      # round(r1 / 2^e)

  two roundings, half away from zero (LiteRT's CONV_2D and FULLY_CONNECTED, on ruy's
  GEMM, break the second one's ties toward +infinity instead). `r1` keeps only `e = -shift` fraction bits of
  the output step: where `acc M_c` lies within `2^-(e+1)` of a half-integer the two
  roundings can land one step away from the single one. Low-bit layers have small
  accumulators and multipliers near `2^-6` (the weight spread `K` of `tfacd.export.weights`
  divides them), so `e` is small and this happens to a fraction of a percent of outputs per
  layer; a 2-bit network amplifies each flipped step.

`requantization_check(file, pixels)` runs a file on the builtin kernels with every
intermediate tensor kept, recomputes each such layer's accumulators from its actual int8
inputs, and counts per layer where the builtin output equals `R_fixed` (the check that the
arithmetic above is what the runtime does) and where `R_float` would differ.
"""

from __future__ import annotations

import numpy as np

_REQUANTIZED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def quantize_multiplier(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's `QuantizeMultiplier`: `(M0, shift)` with `multiplier = M0 2^(shift - 31)`,
    `M0` an int32 in `[2^30, 2^31)` (rounded to nearest), for each `multiplier > 0`."""
    mantissa, exponent = np.frexp(np.asarray(multiplier, np.float64))
    m0 = np.round(mantissa * (1 << 31)).astype(np.int64)
    carry = m0 == (1 << 31)
    return np.where(carry, m0 // 2, m0), np.where(carry, exponent + 1, exponent).astype(np.int64)


def _rounding_doubling_high_mul(a, m0):
    """`round(a m0 / 2^31)`, ties away from zero (gemmlowp's
    SaturatingRoundingDoublingHighMul, without the one saturating case)."""
    product = np.asarray(a, np.int64) * np.asarray(m0, np.int64)
    nudged = product + np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    return np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))   # divide, toward zero


def _rounding_divide_by_pot(x, exponent, ties: str = "away"):
    """`round(x / 2^exponent)`, ties away from zero (gemmlowp's RoundingDivideByPOT) or,
    with `ties="up"`, toward +infinity (ruy's GEMM kernels)."""
    x = np.asarray(x, np.int64)
    exponent = np.asarray(exponent, np.int64)
    if ties == "up":
        return (x + ((np.int64(1) << exponent) >> 1)) >> exponent
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def requantize_fixed_point(acc, multiplier, ties: str = "away") -> np.ndarray:
    """`R_fixed(acc, M)`: TFLite's `MultiplyByQuantizedMultiplier` (double rounding);
    `multiplier` broadcasts against `acc` (per channel on the last axis). `ties`: how the
    final shift breaks ties, "away" from zero (the reference kernels, TFLite Micro, LiteRT's
    depthwise convolution) or "up" (LiteRT's CONV_2D and FULLY_CONNECTED, which run on
    ruy's GEMM)."""
    m0, shift = quantize_multiplier(multiplier)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    high = _rounding_doubling_high_mul(np.asarray(acc, np.int64) << left, m0)
    return _rounding_divide_by_pot(high, right, ties)


def requantize_float(acc, multiplier) -> np.ndarray:
    """`R_float(acc, M)`: float32 product, rounded once half to even (XNNPACK)."""
    product = np.asarray(acc).astype(np.float32) * np.asarray(multiplier).astype(np.float32)
    return np.rint(product).astype(np.int64)


def _accumulators(op_name, options, x, w, bias, out_shape, zero_point):
    """int32 accumulators of one image's op from its int8 tensors (exact in float64)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    x = x.astype(np.float64) - zero_point
    if op_name == "FULLY_CONNECTED":
        acc = x.reshape(-1, w.shape[1]) @ w.astype(np.float64).T
        return np.rint(acc).astype(np.int64).reshape(out_shape) + bias
    stride = [1, options.strideH, options.strideW, 1]
    padding = "SAME" if options.padding == 0 else "VALID"
    if op_name == "DEPTHWISE_CONV_2D":
        kernel = np.transpose(w, (1, 2, 3, 0)).astype(np.float64)   # [1,h,w,C] -> [h,w,C,1]
        acc = tf.nn.depthwise_conv2d(x, kernel, stride, padding)
    else:
        kernel = np.transpose(w, (1, 2, 3, 0)).astype(np.float64)   # [O,h,w,I] -> [h,w,I,O]
        acc = tf.nn.conv2d(x, kernel, stride, padding)
    return np.rint(acc.numpy()).astype(np.int64) + bias


def _activation_range(activation: int, scale: float, zero_point: int) -> tuple[int, int]:
    """TFLite's `CalculateActivationRangeQuantized` for int8 (NONE, RELU, RELU6)."""
    low, high = -128, 127
    if activation in (1, 3):                                   # RELU, RELU6
        low = max(low, zero_point)
    if activation == 3:
        high = min(high, zero_point + int(np.round(6.0 / scale)))
    return low, high


def requantization_check(model_path_or_bytes, pixels) -> list[dict]:
    """Per int8 convolution / fully-connected layer of a file, on the builtin kernels:
    `op_index`, `op`, `filter` (the filter tensor's name, which holds the Keras layer's),
    `outputs`, `builtin_equals_fixed_point` (outputs where the runtime computed `R_fixed`),
    `float_differs` (outputs where `R_float` would give another int8 value), `right_shift`
    (the smallest `e` over the layer's channels)."""
    from tfacd.export.runtime import _to_input  # pylint: disable=import-outside-toplevel
    from tfacd.export._common import _content  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # pylint: disable=import-outside-toplevel
    runner = Interpreter(
        model_content=_content(model_path_or_bytes),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True)
    runner.allocate_tensors()
    from tfacd.export.flatbuffer import _flatbuffer  # pylint: disable=import-outside-toplevel
    operators = _flatbuffer(_content(model_path_or_bytes)).subgraphs[0].operators
    details = {d["index"]: d for d in runner.get_tensor_details()}
    ops = [op for op in runner._get_ops_details()  # pylint: disable=protected-access
           if op["op_name"] in _REQUANTIZED_OPS
           and all(details[i]["dtype"] == np.int8 for i in op["inputs"][:2])
           and details[op["outputs"][0]]["dtype"] == np.int8]
    layers = {}
    input_detail = runner.get_input_details()[0]
    for image in np.asarray(pixels):
        runner.set_tensor(input_detail["index"],
                          _to_input(image[None].astype(np.float32), input_detail))
        runner.invoke()
        for op in ops:
            x_index, w_index, b_index = op["inputs"][:3]
            out_index = op["outputs"][0]

            def params(index):
                parameters = details[index]["quantization_parameters"]
                return (parameters["scales"].astype(np.float64),
                        parameters["zero_points"].astype(np.int64))
            (s_in,), (z_in,) = params(x_index)
            s_w, _ = params(w_index)
            (s_out,), (z_out,) = params(out_index)
            y = runner.get_tensor(out_index).astype(np.int64)
            bias = runner.get_tensor(b_index).astype(np.int64) if b_index >= 0 else 0
            options = operators[op["index"]].builtinOptions
            acc = _accumulators(op["op_name"], options, runner.get_tensor(x_index),
                                runner.get_tensor(w_index), bias, y.shape, z_in)
            multiplier = s_in * s_w / s_out
            low, high = _activation_range(options.fusedActivationFunction, s_out, z_out)
            ties = "away" if op["op_name"] == "DEPTHWISE_CONV_2D" else "up"
            fixed = np.clip(requantize_fixed_point(acc, multiplier, ties) + z_out, low, high)
            floated = np.clip(requantize_float(acc, multiplier) + z_out, low, high)
            entry = layers.setdefault(op["index"], {
                "op_index": int(op["index"]), "op": op["op_name"],
                "filter": details[w_index]["name"], "outputs": 0,
                "builtin_equals_fixed_point": 0, "float_differs": 0,
                "right_shift": int(-quantize_multiplier(multiplier)[1].max())})
            entry["outputs"] += int(y.size)
            entry["builtin_equals_fixed_point"] += int((fixed == y).sum())
            entry["float_differs"] += int((floated != fixed).sum())
    return list(layers.values())
