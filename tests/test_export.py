"""TFLite export end to end: the file loads and runs in LiteRT, keeps the learned grids, agrees
with Keras; refusals and options; float and tfmot exports (`tfacd.export`)."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfacd
from tfacd import export

from conftest import tiny_cnn
from tfacd.model_summary import layer_rows
from export_models import MEAN, STD, _pixels, _quantized_tiny


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


def test_a_layer_left_in_float_keeps_its_variables_in_the_file(tmp_path):
    """The converter is handed only the variables the baked function reads (not the Keras
    model): a float island with weights of its own (here a LayerNormalization, which no
    convolution can absorb) must still reach the file with those values."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.LayerNormalization(beta_initializer="ones")(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    baked = export.bake(model, quantized=False)
    assert len(baked.function.captured_inputs) == 2 and "layer_normalization" in \
        baked.float_layers
    pixels = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    path = export.export_float_tflite(model, tmp_path / "island.tflite")
    np.testing.assert_allclose(export.run_tflite(path, pixels), model(pixels).numpy(),
                               atol=1e-5)


def test_summary_lists_bits_and_memory():
    model = _quantized_tiny(2, "per_channel")
    text = tfacd.summary(model, print_fn=None)
    rows = {row.name: row for row in layer_rows(model)}
    assert rows["quant_dw"].weight_bits == "2" and rows["quant_conv"].weight_bits == "8"
    assert rows["quant_dw"].memory_bytes == pytest.approx(3 * 3 * 8 * 2 / 8)
    assert rows["quant_dw_relu"].activation_bits == "2"
    assert rows["quant_dw"].granularity == "per_channel"
    assert "Model memory" in text and "quant_project_bn" in text
