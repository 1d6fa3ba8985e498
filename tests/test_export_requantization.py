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


def _int8_file(function, *specs) -> bytes:
    import tensorflow as tf
    concrete = tf.function(function, input_signature=list(specs)).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf.Module())
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _int8_outputs(content, inputs, runtime):
    """The int8 output of `content` on every runtime, fed int8 `inputs` one example at a
    time (TFLite Micro's `runtime` takes one)."""
    from tfacd.export.runtime import interpreter, micro_interpreter
    outputs = []
    if runtime == "micro":
        runner = micro_interpreter(content)
        for example in zip(*inputs):
            for i, x in enumerate(example):
                runner.set_input(x[None], i)
            runner.invoke()
            outputs.append(runner.get_output(0)[0].copy())
        return np.stack(outputs)
    runner = interpreter(content, delegates=runtime == "xnnpack")
    runner.allocate_tensors()
    details = runner.get_input_details()
    for example in zip(*inputs):
        for detail, x in zip(details, example):
            runner.set_tensor(detail["index"], x[None])
        runner.invoke()
        outputs.append(runner.get_tensor(runner.get_output_details()[0]["index"])[0].copy())
    return np.stack(outputs)


def test_int8_add_is_the_same_integer_on_every_runtime():
    # The residual adds need no portable scales: XNNPACK, the builtin kernels and TFLite
    # Micro compute TFLite's ADD alike for any input and output scales.
    import tensorflow as tf
    rng = np.random.default_rng(0)
    spec = tf.TensorSpec((1, 4, 4, 8), tf.float32)
    for _ in range(4):
        sa, sb, so = (float(v) for v in rng.uniform(0.02, 0.2, 3))
        la, lb, lo = (float(v) for v in rng.uniform(-3, 0, 3))

        def add(a, b, sa=sa, sb=sb, so=so, la=la, lb=lb, lo=lo):
            fake = tf.quantization.fake_quant_with_min_max_vars
            return fake(fake(a, la, la + 255 * sa) + fake(b, lb, lb + 255 * sb),
                        lo, lo + 255 * so)

        content = _int8_file(add, spec, spec)
        inputs = [rng.integers(-128, 128, (30, 4, 4, 8), dtype=np.int8) for _ in range(2)]
        expected = _int8_outputs(content, inputs, "xnnpack")
        for runtime in ("builtin", "micro"):
            np.testing.assert_array_equal(_int8_outputs(content, inputs, runtime), expected)


def test_int8_mean_rounds_differently_unless_its_sum_is_kept_exact():
    # Global average pooling of 16 values on a 4-bit grid: rescaled onto a coarser grid the
    # runtimes round the mean differently; at the input's step / 16 (exact_average_pooling)
    # no runtime rounds and all agree.
    import tensorflow as tf
    step, rng = 0.37, np.random.default_rng(0)
    spec = tf.TensorSpec((1, 4, 4, 64), tf.float32)
    inputs = [rng.integers(-128, -112, (40, 4, 4, 64), dtype=np.int8)]    # 16 levels
    differing = {}
    for name, top in (("rounded", 15 * step), ("exact", 255 * step / 16)):
        def pool(x, top=top):
            fake = tf.quantization.fake_quant_with_min_max_vars
            x = fake(x, 0.0, 255 * step)
            return fake(tf.reduce_mean(x, axis=[1, 2]), 0.0, top)

        content = _int8_file(pool, spec)
        expected = _int8_outputs(content, inputs, "xnnpack")
        differing[name] = [np.mean(_int8_outputs(content, inputs, r) != expected)
                           for r in ("builtin", "micro")]
    assert all(share > 0.005 for share in differing["rounded"]), differing
    assert differing["exact"] == [0.0, 0.0], differing
