"""`tfacd.export.bias_snap`: the Keras model moved onto the file's int32 bias grid."""

import json

import numpy as np
import pytest
import tensorflow as tf

import tfacd
from tfacd import export

from conftest import tiny_cnn
from export_models import MEAN, STD, _pixels, _quantized_tiny, _trained_like


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
