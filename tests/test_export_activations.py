"""`tfacd.export.activations`: activation policies and the input normalization."""


import numpy as np
import pytest
import tensorflow as tf

import tfacd
from tfacd import export
from tfacd.export.activations import ActivationPlan, _on_channel_grids
from tfacd._keras import keras

from export_models import MEAN, STD, _pixels, _quantized_tiny


def test_input_normalization_equals_the_input_quantizer_on_every_pixel_value(tmp_path):
    """The file's normalization + input quantization gives Keras's integer for all 256 values
    of every channel (with w = 127 and a rounded bias, some land one step off)."""
    model = _quantized_tiny(2, "per_layer")
    # With these, w = 127 and the nearest bias put 3 of the 768 values one step off
    # (found by emulating the requantization; the test then fails with that choice).
    mean, std = np.array([104.438, 124.589, 120.499]), np.array([66.81, 57.87, 67.04])
    baked = export.bake(model, mean, std)
    assert baked.normalization_mismatches == 0
    content = export.convert._convert(baked)                    # pylint: disable=protected-access
    pixels = np.zeros((4, 8, 8, 3), np.float32)
    pixels.reshape(-1, 3)[:] = np.arange(256)[:, None]
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
    # XNNPACK (LiteRT's default), as `run_tflite` and the report's fidelity run the file.
    runner = Interpreter(model_content=content, experimental_preserve_all_tensors=True)
    detail = runner.get_input_details()[0]
    runner.resize_tensor_input(detail["index"], pixels.shape)
    runner.allocate_tensors()
    runner.set_tensor(detail["index"], pixels)
    runner.invoke()
    # The normalization is the depthwise op with a [1, 1, 1, 3] filter.
    ops = runner._get_ops_details()                      # pylint: disable=protected-access
    details = runner.get_tensor_details()
    normalization = next(op for op in ops if op["op_name"] == "DEPTHWISE_CONV_2D"
                         and list(details[op["inputs"][1]]["shape"]) == [1, 1, 1, 3])
    output = details[normalization["outputs"][0]]
    scale, zero_point = output["quantization"]
    lite = runner.get_tensor(output["index"]).astype(np.int64) - zero_point
    input_layer = next(layer for layer in model.layers if layer.name.startswith("quantize_layer"))
    keras_values = input_layer(((pixels - mean) / std).astype("float32"), training=False)
    np.testing.assert_array_equal(lite, np.round(keras_values.numpy() / scale))


def test_per_channel_activation_clips_survive_in_tflite(tmp_path):
    """A layer whose channels have very different clips keeps each channel's clip."""
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(4, 1, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    outputs = keras.layers.GlobalMaxPooling2D(name="peak")(x)
    model = tfacd.quantize_model(keras.Model(inputs, outputs), weight_bits=4,
                                 activation_bits=4, first_last_bits=None)
    uppers = np.array([0.5, 1.0, 3.0, 6.0], np.float32)
    for info in tfacd.list_quantizers(model):
        if info.layer == "quant_relu":
            info.variables["lower"].assign(np.zeros(4, np.float32))
            info.variables["upper"].assign(uppers)
            info.variables["initialized"].assign(1.0)
        elif info.tensor == "input":
            info.variables["lower"].assign(-3.0)
            info.variables["upper"].assign(3.0)
            info.variables["initialized"].assign(1.0)
    # Kernel: every output channel sees a large positive input, so every channel saturates.
    conv = model.get_layer("quant_conv")
    kernel = np.full((1, 1, 3, 4), 2.0, np.float32)
    conv._weight_vars[0][0].assign(kernel)      # pylint: disable=protected-access
    tfacd.scheme.initialize_weight_clips(model)
    pixels = np.full((2, 4, 4, 3), 255.0, np.float32)
    path = export.export_tflite(model, tmp_path / "clip.tflite", input_mean=[127.5] * 3,
                                input_std=[42.5] * 3, verbose=False, float_reference=False)
    peaks = export.run_tflite(path, pixels)
    keras_peaks = model((pixels - 127.5) / 42.5, training=False).numpy()
    np.testing.assert_allclose(keras_peaks[0], uppers, rtol=1e-5)
    # Each channel stops at its own clip, within half a step of the union's 8-bit grid.
    union_step = float(uppers.max() - 0.0) / 255
    np.testing.assert_allclose(peaks[0], uppers, atol=union_step / 2 + 1e-6)


def _one_relu_model(uppers, bits):
    """Conv -> ReLU with per-channel clips `[0, uppers]`, the ReLU's quantized output
    flattened as the model output, so TFLite's activation values can be read directly."""
    tf.random.set_seed(1)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(len(uppers), 1, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    model = tfacd.quantize_model(keras.Model(inputs, keras.layers.Flatten(name="flat")(x)),
                                 weight_bits=4, activation_bits=bits, first_last_bits=None)
    tfacd.calibrate(model, ((_pixels(32, seed=2)[:, :4, :4] - MEAN) / STD).astype("float32"))
    for info in tfacd.list_quantizers(model):
        if info.layer == "quant_relu":
            info.variables["lower"].assign(np.zeros(len(uppers), np.float32))
            info.variables["upper"].assign(np.asarray(uppers, np.float32))
    return model


def test_round_policy_rounds_each_channel_to_its_grid(tmp_path):
    uppers = np.array([0.3, 1.0, 2.0, 6.0], np.float32)
    model = _one_relu_model(uppers, bits=2)
    pixels = _pixels(20)[:, :4, :4, :]
    values = {}
    for policy in ("clamp", "round"):
        path = export.export_tflite(model, tmp_path / f"{policy}.tflite", input_mean=MEAN,
                                    input_std=STD, activation_policy=policy, verbose=False,
                                    float_reference=False)
        values[policy] = export.run_tflite(path, pixels).reshape(-1, 4)
    assert export.op_histogram(tmp_path / "round.tflite").get("FLOOR", 0) > 0
    assert "FLOOR" not in export.op_histogram(tmp_path / "clamp.tflite")
    step = uppers / 3                                  # 2 bits: 4 levels per channel
    union_half_step = uppers.max() / 255 / 2 + 1e-6
    off_grid = np.abs(values["round"] / step - np.round(values["round"] / step)) * step
    assert np.all(off_grid <= union_half_step)        # every channel on its own 2-bit grid
    assert np.all(values["round"] <= uppers + union_half_step)
    # The clamp policy keeps each channel's clip but not its 2-bit rounding.
    clamp_off = np.abs(values["clamp"] / step - np.round(values["clamp"] / step)) * step
    assert clamp_off.max() > union_half_step
    assert np.all(values["clamp"] <= uppers + union_half_step)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("after_relu", [False, True])
def test_channel_grid_ops_equal_the_forward_pass_bit_for_bit(bits, after_relu):
    """The `float` policy's ops (`_on_channel_grids`, the upper clip moved onto the grid
    index) give the forward pass's numbers exactly, also on the float32 values next to every
    rounding boundary and beyond both clips."""
    from tfacd import ops  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(bits)
    channels = 6
    lower = np.zeros(channels, np.float32) if after_relu else \
        rng.uniform(-2.0, 0.3, channels).astype(np.float32)
    upper = (lower + rng.uniform(0.05, 5.0, channels)).astype(np.float32)
    nudged_lower, nudged_upper = (t.numpy() for t in ops.effective_clips(lower, upper, bits))
    plan = ActivationPlan("q", bits, True, nudged_lower, nudged_upper, exact=True)
    step = (nudged_upper - nudged_lower) / np.float32(ops.num_levels(bits))
    levels = np.arange(-2, ops.num_levels(bits) + 3, dtype=np.float32)[:, None]
    boundaries = (nudged_lower + (levels + np.float32(0.5)) * step).astype(np.float32)
    x = np.concatenate([
        boundaries, np.nextafter(boundaries, np.float32(np.inf)),
        np.nextafter(boundaries, np.float32(-np.inf)), nudged_lower[None], nudged_upper[None],
        rng.uniform(-8, 8, (2000, channels)).astype(np.float32)])
    if after_relu:
        x = np.maximum(x, 0.0)
    expected = ops.quantize_forward(tf.constant(x), lower, upper, bits, axis=-1).numpy()
    actual = _on_channel_grids(tf.constant(x), plan, nonnegative=after_relu).numpy()
    np.testing.assert_array_equal(actual, expected)


def test_float_policy_keeps_each_channel_grid_exactly(tmp_path):
    """The `float` policy computes each channel's own k-bit rounding with the forward pass's
    float32 ops: the file's activations are the Keras model's, value for value."""
    uppers = np.array([0.3, 1.0, 2.0, 6.0], np.float32)
    model = _one_relu_model(uppers, bits=2)
    pixels = _pixels(50)[:, :4, :4, :]
    path = export.export_tflite(model, tmp_path / "float.tflite", input_mean=MEAN,
                                input_std=STD, activation_policy="float", verbose=False,
                                float_reference=False)
    lite = export.run_tflite(path, pixels).reshape(-1, 4)
    keras_values = export.report._keras_logits(model, pixels, MEAN, STD).reshape(-1, 4)
    step = uppers / 3
    assert np.all(np.abs(lite / step - np.round(lite / step)) < 1e-5)   # own 2-bit grids
    assert np.all((lite >= 0) & (lite <= uppers * (1 + 1e-6)))
    assert len(np.unique(np.round(lite / step), axis=0)) > 1
    # Equal up to the convolution's float summation order (XNNPACK's vs TensorFlow's),
    # which can move a value sitting on a rounding boundary by one step.
    assert np.mean(lite == keras_values) >= 0.99
    assert np.all(np.abs(lite - keras_values) <= step * (1 + 1e-5))
