"""`tfacd.export.runtime`: the three runtimes (LiteRT with XNNPACK, LiteRT's builtin kernels,
TensorFlow Lite Micro), what each can run, and refusals at export time."""

import json

import numpy as np
import pytest

from tfacd import export
from tfacd.export.runtime import RUNTIMES, runtime_support

from conftest import tiny_cnn
from export_models import MEAN, STD, _pixels, _quantized_tiny


def test_a_float_file_computes_the_keras_model_on_every_runtime(tmp_path):
    model = tiny_cnn()
    path = export.export_float_tflite(model, tmp_path / "float.tflite", input_mean=MEAN,
                                      input_std=STD)
    pixels = _pixels(40)
    keras_logits = model.predict(((pixels - MEAN) / STD).astype("float32"), verbose=0)
    for runtime in RUNTIMES:
        logits = export.run_tflite(path, pixels, runtime=runtime)
        np.testing.assert_allclose(logits, keras_logits, rtol=1e-4, atol=1e-4,
                                   err_msg=runtime)
    assert all(v["runs"] for v in runtime_support(path).values())


def test_per_tensor_int8_file_runs_on_every_runtime_and_is_exact_on_xnnpack(tmp_path):
    model = _quantized_tiny(2, "per_layer", trained_like=True)
    path = tmp_path / "w2a2.tflite"
    pixels = _pixels(60)
    export.export_tflite(model, path, input_mean=MEAN, input_std=STD, input_type="uint8",
                         data=pixels, verbose=False, check_runtimes=RUNTIMES,
                         require_runtimes=RUNTIMES)
    report = json.loads((tmp_path / "w2a2_report.json").read_text())
    assert set(report["runtimes"]) == set(RUNTIMES)
    assert all(v["runs"] for v in report["runtimes"].values())
    assert set(report["fidelity_by_runtime"]) == set(RUNTIMES)
    # XNNPACK: the file computes what the Keras model computes, logit for logit.
    assert report["fidelity"] == report["fidelity_by_runtime"]["xnnpack"]
    assert report["fidelity"]["top1_agreement"] == 1.0
    assert report["fidelity"]["max_logit_difference"] == 0.0
    for runtime in ("builtin", "micro"):          # they run; their numbers are recorded
        assert 0.0 <= report["fidelity_by_runtime"][runtime]["top1_agreement"] <= 1.0
        # ... and the report says why they need not equal XNNPACK's.
        assert not report["runtimes"][runtime]["exact"]
        assert "requantization='float'" in report["runtimes"][runtime]["inexact_why"]
    micro = export.run_tflite(path, pixels[:5], runtime="micro")
    assert micro.shape == (5, 4) and np.all(np.isfinite(micro))


def test_files_micro_cannot_run_are_named_and_can_be_refused(tmp_path):
    int4_model = _quantized_tiny(2, "per_channel", trained_like=True,
                                 activation_granularity="per_layer")
    with pytest.warns(UserWarning, match="cannot run on micro: int4 FULLY_CONNECTED"):
        export.export_tflite(int4_model, tmp_path / "int4.tflite", input_mean=MEAN,
                             input_std=STD, weight_storage="int4", verbose=False)
    support = runtime_support(tmp_path / "int4.tflite")
    assert support["xnnpack"]["runs"] and support["builtin"]["runs"]
    assert not support["micro"]["runs"] and "int4" in support["micro"]["why"]
    with pytest.raises(export.ExportError, match="would not run correctly on micro"):
        export.export_tflite(int4_model, tmp_path / "refused.tflite", input_mean=MEAN,
                             input_std=STD, weight_storage="int4", verbose=False,
                             require_runtimes=("micro",))
    assert not (tmp_path / "refused.tflite").exists()

    float_policy = _quantized_tiny(2, "per_channel", trained_like=True)
    with pytest.warns(UserWarning, match="per-channel DEQUANTIZE"):
        export.export_tflite(float_policy, tmp_path / "float_policy.tflite", input_mean=MEAN,
                             input_std=STD, verbose=False)
    assert not runtime_support(tmp_path / "float_policy.tflite")["micro"]["runs"]
    with pytest.raises(export.ExportError, match="runtime must be one of"):
        export.run_tflite(tmp_path / "int4.tflite", _pixels(2), runtime="gpu")
    with pytest.raises(export.ExportError, match="TFLite Micro cannot run this file"):
        export.run_tflite(tmp_path / "int4.tflite", _pixels(2), runtime="micro")
