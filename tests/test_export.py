"""TFLite export: the file loads and runs in LiteRT, keeps the learned grids, agrees with Keras."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

import tfacd
from tfacd import export
from tfacd._keras import keras

from conftest import tiny_cnn
from tfacd.model_summary import layer_rows

MEAN = np.array([125.0, 120.0, 110.0])
STD = np.array([60.0, 58.0, 62.0])


def _pixels(count=200, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 8, 8, 3)).astype("float32")


def _trained_like(model, seed=0):
    """Gives every BatchNormalization of `model` the kind of statistics and offsets training
    leaves (the untrained ones fold to zero biases, which sit on any grid)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.BatchNormalization):
            channels = inner.beta.shape[0]
            inner.beta.assign(rng.normal(0.3, 0.5, channels).astype("float32"))
            inner.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
            inner.moving_mean.assign(rng.normal(0, 0.3, channels).astype("float32"))
            inner.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
    return model


def _quantized_tiny(bits, granularity, first_last_bits=8, trained_like=False,
                    activation_granularity=None, symmetric_weights=False):
    tf.random.set_seed(0)
    float_model = _trained_like(tiny_cnn()) if trained_like else tiny_cnn()
    model = tfacd.quantize_model(float_model, weight_bits=bits, activation_bits=bits,
                                 granularity=granularity, first_last_bits=first_last_bits,
                                 activation_granularity=activation_granularity,
                                 symmetric_weights=symmetric_weights)
    tfacd.calibrate(model, ((_pixels(64, seed=1) - MEAN) / STD).astype("float32"))
    return model


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["per_layer", "per_channel"])
def test_export_loads_runs_and_keeps_the_grid(tmp_path, bits, granularity):
    model = _quantized_tiny(bits, granularity)
    pixels = _pixels()
    path = export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                                input_type="uint8", data=pixels, verbose=False)
    report = json.loads((tmp_path / "m_report.json").read_text())

    logits = export.run_tflite(path, pixels)
    assert logits.shape == (len(pixels), 4) and np.all(np.isfinite(logits))
    assert report["all_weight_zero_points_zero"]
    # Every quantized layer's weights are in the file, each channel on its k-bit grid.
    for name in ("quant_conv", "quant_dw", "quant_project", "quant_logits"):
        entry = report["weights"][name]
        assert entry["zero_points"] == [0]
        assert entry["max_distinct_values_per_channel"] <= 2 ** entry["weight_bits"]
    assert report["weights"]["quant_dw"]["weight_bits"] == bits
    # Per-tensor activations and weights are exact (see test_per_layer_export_is_exact, which
    # also covers the 8-bit first/last weights); per-channel activations under the default
    # `float` policy are exact up to float summation order. On this untrained model with
    # near-tied logits a last-ulp difference still flips a prediction now and then.
    assert report["fidelity"]["top1_agreement"] >= 0.95
    # The size breakdown accounts for every byte, and the int8 part holds every weight.
    parts = report["size_breakdown"]
    assert sum(parts.values()) == report["file_bytes"] == path.stat().st_size
    assert all(v >= 0 for v in parts.values())
    weight_bytes = sum(int(np.prod(e["shape"])) for e in report["weights"].values())
    assert weight_bytes <= parts["int8_tensors"] <= 1.25 * weight_bytes   # + clamp constants
    assert parts["int32_tensors"] > 0 and parts["quantization_parameters"] > 0
    ops = report["op_histogram"]
    assert ops.get("CONV_2D") == 3 and ops.get("DEPTHWISE_CONV_2D") == 2   # incl. normalization
    # Float rounding only where a tensor has per-channel grids (the `float` policy): one
    # FLOOR per activation quantizer (conv, dw, project, add, pool, logits) whose channels'
    # clips differ; the input's stays per tensor at 8 bits.
    expected_floors = 0 if granularity == "per_layer" else 6
    assert ops.get("FLOOR", 0) == expected_floors


@pytest.mark.parametrize("first_last_bits", [7, 8])
def test_per_layer_export_is_exact(tmp_path, first_last_bits):
    """Per-tensor activations and weights at any bit width are held exactly (module
    docstring); 8-bit weights on their int8 grid need no clamping."""
    model = _quantized_tiny(2, "per_layer", first_last_bits=first_last_bits)
    pixels = _pixels()
    path = export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                                data=pixels, verbose=False)
    report = json.loads(path.with_name("m_report.json").read_text())
    assert report["clamped_weights"] == 0
    fidelity = report["fidelity"]
    assert fidelity["top1_agreement"] == 1.0
    # What is left is the output's 8-bit rounding: a step of the logits quantizer, rarely.
    assert fidelity["mean_logit_difference"] < 1e-3


def test_bias_snap_makes_the_model_compute_what_the_file_computes(tmp_path):
    """The file stores each bias as int32 on the grid s_in * s_w; after the snap the Keras
    model adds exactly that, and with per-tensor activations the logits are bit-equal."""
    model = _quantized_tiny(2, "per_layer", trained_like=True)
    pixels = _pixels()
    path = export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                                data=pixels, verbose=False, float_reference=False)
    report = json.loads(path.with_name("m_report.json").read_text())
    before, after = report["fidelity_before_bias_snap"], report["fidelity"]
    assert before["max_logit_difference"] > 0           # the float biases were off the grid
    assert after["max_logit_difference"] == 0.0
    assert after["top1_agreement"] == 1.0
    snap = report["bias_snap"]
    assert snap["layers"] == 4                  # conv, dw, project, logits
    assert 0 < snap["largest_change_in_bias_steps"] <= 0.5
    # The snapped model exports to the same file: its biases already sit on the grid.
    again = export.export_tflite(model, tmp_path / "again.tflite", input_mean=MEAN,
                                 input_std=STD, verbose=False, float_reference=False)
    assert again.read_bytes() == path.read_bytes()
    # Snapping again moves nothing but float32 rounding (the 8-bit stem's grid is fine enough
    # for one ulp of beta to be a thousandth of a grid step).
    assert export.snap_biases_to_file(model, path) == pytest.approx(
        {name: 0.0 for name in ("quant_conv", "quant_dw", "quant_project", "quant_logits")},
        abs=0.01)


def test_without_bias_snap_the_model_is_untouched(tmp_path):
    model = _quantized_tiny(2, "per_layer", trained_like=True)
    weights = [w.numpy() for w in model.weights]
    export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                         data=_pixels(), verbose=False, snap_biases=False,
                         float_reference=False)
    report = json.loads((tmp_path / "m_report.json").read_text())
    assert "bias_snap" not in report and "fidelity_before_bias_snap" not in report
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_bias_snap_refuses_another_model_s_file_and_changes_nothing(tmp_path):
    """A file whose layers have other channel counts than the model's (here the logits: 4
    classes in the file, 3 in the model) is refused by name, and the model keeps every
    weight, including the layers checked before the mismatch was found."""
    exported = _quantized_tiny(2, "per_layer", trained_like=True)
    path = export.export_tflite(exported, tmp_path / "m.tflite", input_mean=MEAN,
                                input_std=STD, verbose=False, float_reference=False,
                                snap_biases=False)
    tf.random.set_seed(0)
    other = tfacd.quantize_model(_trained_like(tiny_cnn(num_classes=3), seed=1),
                                 weight_bits=2, activation_bits=2, granularity="per_layer")
    tfacd.calibrate(other, ((_pixels(64, seed=1) - MEAN) / STD).astype("float32"))
    weights = [w.numpy() for w in other.weights]
    with pytest.raises(export.ExportError, match="quant_logits.*not this model's export"):
        export.snap_biases_to_file(other, path)
    for before, after in zip(weights, other.weights):
        np.testing.assert_array_equal(before, after.numpy())


def test_input_normalization_equals_the_input_quantizer_on_every_pixel_value(tmp_path):
    """The file's normalization + input quantization gives Keras's integer for all 256 values
    of every channel (with w = 127 and a rounded bias, some land one step off)."""
    model = _quantized_tiny(2, "per_layer")
    # With these, w = 127 and the nearest bias put 3 of the 768 values one step off
    # (found by emulating the requantization; the test then fails with that choice).
    mean, std = np.array([104.438, 124.589, 120.499]), np.array([66.81, 57.87, 67.04])
    baked = export.bake(model, mean, std)
    assert baked.normalization_mismatches == 0
    content = export._convert(baked)                    # pylint: disable=protected-access
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


def test_exported_int8_weights_equal_the_keras_grid(tmp_path):
    model = _quantized_tiny(2, "per_channel")
    baked = export.bake(model, MEAN, STD)
    dw = baked.weights["quant_dw"]
    # 2-bit integers m, one step per channel, with BatchNorm folded in, stored spread over
    # int8 as K m with K = 127 // max |m| (a finer bias grid; the same values).
    indices = dw.integers // dw.spread
    np.testing.assert_array_equal(indices * dw.spread, dw.integers)
    assert set(np.unique(indices)) <= {-3, -2, -1, 0, 1, 2, 3}
    largest = np.maximum(np.abs(indices).reshape(-1, indices.shape[-1]).max(axis=0), 1)
    np.testing.assert_array_equal(dw.spread, 127 // largest)
    assert dw.spread.min() >= 42
    per_channel = [len(np.unique(dw.integers[..., c])) for c in range(dw.integers.shape[-1])]
    assert max(per_channel) <= 4
    content = export._convert(baked)                    # pylint: disable=protected-access
    runner = export.interpreter(content, delegates=False)
    runner.allocate_tensors()
    filters = [d for d in runner.get_tensor_details()
               if d["dtype"] == np.int8 and "quant_dw/" in d["name"]
               and len(d["shape"]) == 4]
    assert filters, "the depthwise filter is not an int8 tensor"
    stored = runner.get_tensor(filters[0]["index"])[0]          # [kh, kw, C]
    np.testing.assert_array_equal(stored, dw.integers)
    np.testing.assert_allclose(filters[0]["quantization_parameters"]["scales"], dw.step,
                               rtol=1e-6)


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
    plan = export.ActivationPlan("q", bits, True, nudged_lower, nudged_upper, exact=True)
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
    actual = export._on_channel_grids(tf.constant(x), plan, nonnegative=after_relu).numpy()
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
    keras_values = export._keras_logits(model, pixels, MEAN, STD).reshape(-1, 4)
    step = uppers / 3
    assert np.all(np.abs(lite / step - np.round(lite / step)) < 1e-5)   # own 2-bit grids
    assert np.all((lite >= 0) & (lite <= uppers * (1 + 1e-6)))
    assert len(np.unique(np.round(lite / step), axis=0)) > 1
    # Equal up to the convolution's float summation order (XNNPACK's vs TensorFlow's),
    # which can move a value sitting on a rounding boundary by one step.
    assert np.mean(lite == keras_values) >= 0.99
    assert np.all(np.abs(lite - keras_values) <= step * (1 + 1e-5))


def _stored_filter_types(path) -> list:
    """The tensor type of every weight op's filter as the file stores it."""
    model = export._flatbuffer(pathlib.Path(path).read_bytes())
    return [int(tensor.type) for _, tensor, _, _ in export._weight_ops(model)]


@pytest.mark.parametrize("bits", [2, 4])
def test_float_policy_export_matches_keras_with_int8_filters(tmp_path, bits):
    """Per-channel activations under the `float` policy: the file computes what the Keras
    model computes (up to float summation order), and every quantized filter is stored as
    int8 (zero point 0, at most 2^k values per channel) behind a DEQUANTIZE, none as
    float32."""
    model = _quantized_tiny(bits, "per_channel", trained_like=True)
    pixels = _pixels(300)
    path = export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                                activation_policy="float", data=pixels, verbose=False)
    report = json.loads((tmp_path / "m_report.json").read_text())
    assert report["fidelity"]["top1_agreement"] >= 0.99
    assert report["fidelity"]["mean_logit_difference"] < 1e-3
    assert all(entry["exact"] for entry in report["activations"].values())
    assert report["all_weight_zero_points_zero"] and report["all_distinct_within_2^bits"]
    for name in ("quant_conv", "quant_dw", "quant_project", "quant_logits"):
        entry = report["weights"][name]
        assert (entry["computes_in"], entry["storage"]) == ("float", "int8")
    assert report["weights"]["quant_dw"]["max_distinct_values_per_channel"] <= 2 ** bits
    types = _stored_filter_types(path)
    assert len(types) == 5 and set(types) == {export._tensor_types().INT8}
    assert report["op_histogram"]["DEQUANTIZE"] >= 4 + 1     # 4 filters + the input
    assert report["op_histogram"]["FLOOR"] == 6              # one per activation quantizer
    # The int8 part holds every weight; the float32 part is biases and per-channel constants,
    # less than the filters would take as float32.
    weights = sum(int(np.prod(e["shape"])) for e in report["weights"].values())
    assert report["size_breakdown"]["int8_tensors"] >= weights
    assert report["size_breakdown"]["float32_tensors"] < 4 * weights


def test_float_filters_off_the_layer_grid_are_refused():
    """`store_float_filters_as_int8` checks each float filter against the layer's integers
    and steps: a filter the converter changed is an error, not a silently different file."""
    model = _quantized_tiny(2, "per_channel")
    baked = export.bake(model, MEAN, STD, "float")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([baked.function], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    content = converter.convert()                      # float filters, as the converter writes
    _, stored = export.store_float_filters_as_int8(content, baked)
    assert stored == 4
    project = baked.weights["quant_project"]
    baked.weights["quant_project"] = dataclasses.replace(project, step=project.step * 1.37)
    with pytest.raises(export.ExportError, match="quant_project.*no longer on the layer's grid"):
        export.store_float_filters_as_int8(content, baked)


def test_float_input_and_int8_output(tmp_path):
    # Per-tensor activations, so Keras and TFLite compute the same function in integers (with
    # per-channel ones the file's convolutions would run in float, not a test of int8 I/O).
    model = _quantized_tiny(4, "per_layer")
    pixels = _pixels(50)
    path = export.export_tflite(model, tmp_path / "io.tflite", input_mean=MEAN, input_std=STD,
                                input_type="float32", output_type="int8", data=pixels,
                                verbose=False, float_reference=False)
    runner = export.interpreter(path)
    assert runner.get_input_details()[0]["dtype"] == np.float32
    assert runner.get_output_details()[0]["dtype"] == np.int8
    report = json.loads((tmp_path / "io_report.json").read_text())
    assert report["fidelity"]["top1_agreement"] >= 0.95


def test_report_sizes_and_true_bit_memory(tmp_path):
    model = _quantized_tiny(2, "per_channel")
    export.export_tflite(model, tmp_path / "s.tflite", input_mean=MEAN, input_std=STD,
                         verbose=False)
    report = json.loads((tmp_path / "s_report.json").read_text())
    assert report["file_bytes"] == (tmp_path / "s.tflite").stat().st_size
    assert report["float_file_bytes"] > 0
    assert report["size_vs_float"] == pytest.approx(report["file_bytes"]
                                                    / report["float_file_bytes"])
    # Weight bits: conv and logits 8, dw and project 2.
    sizes = {name: w.kernel.size for name, w in export.bake(model, MEAN, STD).weights.items()}
    expected = (8 * (sizes["quant_conv"] + sizes["quant_logits"])
                + 2 * (sizes["quant_dw"] + sizes["quant_project"])) / 8
    assert report["weight_memory_bytes_true_bits"] == pytest.approx(expected)


def test_int4_packing_keeps_every_integer(tmp_path):
    """`pack_int4_weights` changes how the filters are stored, not what the file computes:
    the 1x1 convolution becomes an int4 FULLY_CONNECTED whose outputs equal the int8
    CONV_2D's bit for bit, with XNNPACK (which runs int4 only in FULLY_CONNECTED) and with
    the builtin kernels. The depthwise filter stays int8 although its integers fit.
    (Integer layers: the `clamp` policy keeps the per-channel activations int8.)"""
    model = _quantized_tiny(2, "per_channel")
    baked = export.bake(model, MEAN, STD, "clamp", weight_storage="int4")
    unpacked = export._convert(baked)  # pylint: disable=protected-access
    packed, count = export.pack_int4_weights(unpacked)
    assert count == 1                                # the 2-bit 1x1 project layer
    before = {e["tensor"]: e for e in export.weight_tensors(unpacked)}
    after = {e["tensor"]: e for e in export.weight_tensors(packed)}
    assert sorted((e["op"], e["storage"]) for e in after.values()) == [
        ("CONV_2D", "int8"), ("CONV_2D", "int8"), ("DEPTHWISE_CONV_2D", "int8"),
        ("DEPTHWISE_CONV_2D", "int8"), ("FULLY_CONNECTED", "int4")]
    for name, entry in after.items():                # same statistics, read back unpacked
        assert {k: v for k, v in entry.items() if k not in ("storage", "op", "shape")} == \
            {k: v for k, v in before[name].items() if k not in ("storage", "op", "shape")}
    assert export.op_histogram(packed)["CONV_2D"] == export.op_histogram(unpacked)["CONV_2D"] - 1
    pixels = _pixels(100)
    for delegates in (True, False):
        np.testing.assert_array_equal(
            export.run_tflite(packed, pixels, delegates=delegates),
            export.run_tflite(unpacked, pixels, delegates=delegates))
    parts_before, parts_after = export.size_breakdown(unpacked), export.size_breakdown(packed)
    assert parts_after["int4_tensors"] > 0
    assert parts_before["int8_tensors"] - parts_after["int8_tensors"] == \
        pytest.approx(2 * parts_after["int4_tensors"], abs=2)       # odd sizes pad a nibble
    assert len(packed) < len(unpacked)


@pytest.mark.parametrize("bits,symmetric_weights", [(2, False), (4, True)])
def test_int4_storage_export_is_exact(tmp_path, bits, symmetric_weights):
    """Per-channel 2-bit weights (or 4-bit ones on the symmetric grid) stored as int4,
    per-tensor activations, trained-like biases: after the bias snap the file's logits equal
    the Keras model's bit for bit, as with int8 storage (the XNNPACK FULLY_CONNECTED kernel
    requantizes like the CONV_2D one)."""
    model = _quantized_tiny(bits, "per_channel", trained_like=True,
                            activation_granularity="per_layer",
                            symmetric_weights=symmetric_weights)
    pixels = _pixels()
    path = export.export_tflite(model, tmp_path / "int4.tflite", input_mean=MEAN,
                                input_std=STD, data=pixels, verbose=False,
                                weight_storage="int4", float_reference=False)
    report = json.loads(path.with_name("int4_report.json").read_text())
    assert {name: (w["op"], w["storage"]) for name, w in report["weights"].items()} == {
        "input_normalization": ("DEPTHWISE_CONV_2D", "int8"),
        "quant_conv": ("CONV_2D", "int8"), "quant_dw": ("DEPTHWISE_CONV_2D", "int8"),
        "quant_project": ("FULLY_CONNECTED", "int4"), "quant_logits": ("CONV_2D", "int8")}
    assert report["all_weight_zero_points_zero"] and report["all_distinct_within_2^bits"]
    assert report["weights"]["quant_project"]["weight_bits"] == bits
    assert report["options"]["weight_storage"] == "int4"
    assert report["fidelity"]["max_logit_difference"] == 0.0
    assert report["fidelity"]["top1_agreement"] == 1.0
    with pytest.raises(export.ExportError, match="weight_storage"):
        export.export_tflite(model, tmp_path / "x.tflite", weight_storage="int2")


def test_int4_storage_of_asymmetric_4bit_weights_warns_and_stays_int8(tmp_path):
    """A 4-bit asymmetric grid `[-z, 15 - z]` leaves int4's range: the file is still right,
    stored int8, and the warning names the option that makes 4-bit weights fit."""
    model = _quantized_tiny(4, "per_channel", trained_like=True,
                            activation_granularity="per_layer")
    with pytest.warns(UserWarning, match="symmetric_weights=True"):
        path = export.export_tflite(model, tmp_path / "a.tflite", input_mean=MEAN,
                                    input_std=STD, verbose=False, weight_storage="int4",
                                    float_reference=False)
    report = json.loads(path.with_name("a_report.json").read_text())
    assert {w["storage"] for w in report["weights"].values()} == {"int8"}


def test_quantization_vectors_are_stored_once(tmp_path):
    """The converter writes one scale and one zero-point vector per tensor; the export
    shares equal ones. Same model (outputs bit-equal), fewer bytes, and the size breakdown
    counts what is stored."""
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils
    model = _quantized_tiny(2, "per_channel")
    content = export._convert(export.bake(model, MEAN, STD))  # pylint: disable=protected-access
    unshared = bytes(flatbuffer_utils.convert_object_to_bytearray(
        export._flatbuffer(content)))                          # pylint: disable=protected-access
    # Zero-point vectors: one per quantized tensor before, one per distinct length after.
    tensors = [t for sg in export._flatbuffer(content).subgraphs  # pylint: disable=protected-access
               for t in sg.tensors if t.quantization is not None
               and t.quantization.zeroPoint is not None]
    distinct = {tuple(t.quantization.zeroPoint) for t in tensors}
    saved = sum(8 * len(t.quantization.zeroPoint) for t in tensors) - \
        sum(8 * len(v) for v in distinct)
    assert saved > 0
    assert len(unshared) - len(content) >= saved
    pixels = _pixels(50)
    np.testing.assert_array_equal(export.run_tflite(content, pixels),
                                  export.run_tflite(unshared, pixels))
    assert export.size_breakdown(content)["quantization_parameters"] < \
        export.size_breakdown(unshared)["quantization_parameters"]


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(export.ExportError, match="never quantized"):
        export.export_tflite(tiny_cnn(), tmp_path / "x.tflite")


def test_tfmot_default_model_is_refused(tmp_path):
    import tensorflow_model_optimization as tfmot
    model = tfmot.quantization.keras.quantize_model(tiny_cnn())
    with pytest.raises(export.ExportError, match="another scheme"):
        export.export_tflite(model, tmp_path / "x.tflite")


def test_tfmot_default_model_exports_through_tfmot_s_own_conversion(tmp_path):
    # The reference row: tfmot's documented conversion, with tfacd's raw-pixel input.
    import tensorflow_model_optimization as tfmot
    model = tfmot.quantization.keras.quantize_model(tiny_cnn())
    pixels = _pixels(64)
    normalized = ((pixels - MEAN) / STD).astype("float32")
    for _ in range(3):                      # tfmot learns its activation ranges in training
        model(normalized, training=True)
    path = export.export_tfmot_tflite(model, tmp_path / "tfmot.tflite", input_mean=MEAN,
                                      input_std=STD)
    ops = export.op_histogram(path)
    assert ops.get("QUANTIZE", 0) >= 1 and ops.get("CONV_2D", 0) >= 1
    assert export.weight_tensors(path)            # int8 weights
    result = export.fidelity(model, path.read_bytes(), pixels, None, MEAN, STD)
    assert result["top1_agreement"] >= 0.9


def test_unwritable_path_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = _quantized_tiny(4, "per_layer")
    with pytest.raises(export.ExportError, match="cannot write"):
        export.export_tflite(model, blocker / "sub" / "m.tflite")


def test_bad_options_are_named(tmp_path):
    model = _quantized_tiny(4, "per_layer")
    with pytest.raises(export.ExportError, match="activation_policy"):
        export.export_tflite(model, tmp_path / "m.tflite", activation_policy="exact")
    with pytest.raises(export.ExportError, match="input_type"):
        export.export_tflite(model, tmp_path / "m.tflite", input_type="int16",
                             float_reference=False)
    with pytest.raises(export.ExportError, match="TFLite file not found"):
        export.run_tflite(tmp_path / "missing.tflite", _pixels(1))


def test_float_export_matches_the_float_model(tmp_path):
    tf.random.set_seed(0)
    model = tiny_cnn()
    pixels = _pixels(50)
    path = export.export_float_tflite(model, tmp_path / "f.tflite", input_mean=MEAN,
                                      input_std=STD)
    fidelity = export.fidelity(model, path, pixels, None, MEAN, STD)
    assert fidelity["max_logit_difference"] < 1e-4


def test_summary_lists_bits_and_memory():
    model = _quantized_tiny(2, "per_channel")
    text = tfacd.summary(model, print_fn=None)
    rows = {row.name: row for row in layer_rows(model)}
    assert rows["quant_dw"].weight_bits == "2" and rows["quant_conv"].weight_bits == "8"
    assert rows["quant_dw"].memory_bytes == pytest.approx(3 * 3 * 8 * 2 / 8)
    assert rows["quant_dw_relu"].activation_bits == "2"
    assert rows["quant_dw"].granularity == "per_channel"
    assert "Model memory" in text and "quant_project_bn" in text
