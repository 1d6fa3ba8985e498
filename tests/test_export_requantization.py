"""`tfacd.export.requantization`: the fixed-point and float requantizations, and the check
that LiteRT's builtin kernels compute the fixed-point one."""

import numpy as np

from tfacd import export
from tfacd.export.requantization import (quantize_multiplier, requantization_check,
                                         requantize_fixed_point, requantize_float)

from export_models import MEAN, STD, _pixels, _quantized_tiny


def test_quantize_multiplier_is_tflites():
    multipliers = np.array([0.01050780053944822, 0.5, 0.75, 0.999999, 1.5, 3e-5])
    m0, shift = quantize_multiplier(multipliers)
    assert np.all((m0 >= 1 << 30) & (m0 < 1 << 31))
    np.testing.assert_allclose(m0 * 2.0 ** (shift - 31), multipliers, rtol=2 ** -30)
    # 0.5 and 0.75 are exact: M0 = 2^30 and 3 * 2^29.
    assert m0[1] == 1 << 30 and m0[2] == 3 << 29


def test_double_rounding_where_the_float_rescale_rounds_once():
    """A measured case from a trained 2-bit depthwise layer: acc M = 0.4939 rounds to 0, but
    the fixed point first rounds acc M0 / 2^31 = 31.6 to 32, then 32 / 2^6 = 0.5 to 1."""
    acc, multiplier = 47, 0.01050780053944822
    assert quantize_multiplier(multiplier)[1] == -6
    assert requantize_float(acc, multiplier) == 0
    assert requantize_fixed_point(acc, multiplier) == 1
    # The window is 2^-(e+1) output steps wide on either side of every half-integer: the
    # share of accumulators that differ shrinks with the right shift e, and is never 0.
    accumulators = np.arange(-200000, 200001)
    for multiplier in (0.37, 0.0037, 0.000037):
        e = -int(quantize_multiplier(multiplier)[1])
        differ = np.mean(requantize_fixed_point(accumulators, multiplier)
                         != requantize_float(accumulators, multiplier))
        assert 0 < differ <= 2.0 ** -e, (multiplier, e, differ)


def test_builtin_kernels_compute_the_fixed_point_requantization(tmp_path):
    model = _quantized_tiny(2, "per_channel", trained_like=True,
                            activation_granularity="per_layer")
    path = tmp_path / "w2a2.tflite"
    export.export_tflite(model, path, input_mean=MEAN, input_std=STD, input_type="uint8",
                         verbose=False, float_reference=False)
    layers = requantization_check(path, _pixels(20))
    assert {layer["op"] for layer in layers} == {"CONV_2D", "DEPTHWISE_CONV_2D"}
    for layer in layers:                              # bit for bit, every output
        assert layer["builtin_equals_fixed_point"] == layer["outputs"], layer
        assert layer["right_shift"] >= 0
