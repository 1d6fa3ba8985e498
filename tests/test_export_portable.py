"""`tfacd.export.portable`: scales that every runtime requantizes alike."""

import json
import math

import numpy as np
import pytest

from tfacd import export
from tfacd.export.portable import _choose
from tfacd.export.requantization import (quantize_multiplier, requantization_check,
                                         requantize_fixed_point, requantize_float)
from tfacd.export.runtime import RUNTIMES

from tfacd.data import PIXEL_GRID

from export_models import MEAN, STD, _pixels, _quantized_tiny


@pytest.mark.parametrize("largest", [1, 2, 3, 7])
def test_portable_ratios_are_near_and_requantize_alike(largest):
    rng = np.random.default_rng(0)
    for ratio in np.exp(rng.uniform(np.log(1e-3), np.log(2.0), 200)):
        value, spread, t, _ = _choose(float(ratio), largest)
        assert spread % 2 ** (t + 1) == 0 and spread * largest <= 127
        # Within half the widest gap of the portable values near it (7 % at 2 bits).
        assert abs(math.log(value / ratio)) < (0.07 if largest <= 3 else 0.3)
        multiplier = value / spread
        _, shift = quantize_multiplier(multiplier)
        assert -shift >= 2                                  # e >= 2: no ties (module docstring)
        # Every accumulator of the residue class requantizes alike.
        residue = 2 ** t
        acc = residue + 2 ** (t + 1) * np.arange(-3000, 3001)
        np.testing.assert_array_equal(requantize_fixed_point(acc, multiplier),
                                      requantize_float(acc, multiplier))


@pytest.mark.parametrize("granularity, activation_granularity",
                         [("per_channel", "per_layer"), ("per_layer", None)])
def test_portable_file_computes_the_keras_model_on_every_runtime(
        tmp_path, granularity, activation_granularity):
    model = _quantized_tiny(2, granularity, trained_like=True,
                            activation_granularity=activation_granularity)
    path = tmp_path / "w2a2.tflite"
    pixels = _pixels(200)
    export.export_tflite(model, path, input_mean=MEAN, input_std=STD, input_type="uint8",
                         data=pixels, verbose=False, check_runtimes=RUNTIMES,
                         requantization="portable", float_reference=False)
    report = json.loads((tmp_path / "w2a2_report.json").read_text())
    portable = report["portable"]
    # The 2-bit layers are portable; the 8-bit first and last layers are named.
    assert portable["layers"] == 2
    assert set(portable["skipped"]) == {"quant_conv", "quant_logits"}
    assert all("8-bit" in why for why in portable["skipped"].values())
    assert "without portable scales: quant_conv, quant_logits" in \
        report["runtimes"]["builtin"]["inexact_why"]
    assert 0 < portable["largest_weight_step_change"] < 0.07
    assert report["input_normalization_mismatches"] == 0
    for runtime in RUNTIMES:
        fidelity = report["fidelity_by_runtime"][runtime]
        assert fidelity["top1_agreement"] == 1.0, runtime
    # Every output of the portable layers: the float and the fixed-point arithmetic agree.
    checked = [layer for layer in requantization_check(path, pixels[:40])
               if any(f"{name}/" in layer["filter"] for name in ("quant_dw", "quant_project"))]
    assert len(checked) == 2
    assert all(layer["float_differs"] == 0 for layer in checked), checked


@pytest.mark.parametrize("bits, symmetric", [(2, False), (4, True)])
def test_pixel_grid_input_and_5_bit_edges_make_every_layer_portable(tmp_path, bits, symmetric):
    # The input on the pixel grid needs no searched normalization, and 5-bit first and last
    # weight layers leave room for the spread: nothing is left that a runtime computes
    # differently. At 4 bits the weights are on the symmetric grid [-7, 7]
    # (configs/cifar10_w4a4_micro.yaml).
    model = _quantized_tiny(bits, "per_channel", first_last_bits=5, trained_like=True,
                            activation_granularity="per_layer", pixel_grid=True,
                            symmetric_weights=symmetric)
    path = tmp_path / "w2a2.tflite"
    pixels = _pixels(200)
    export.export_tflite(model, path, input_mean=PIXEL_GRID[0], input_std=PIXEL_GRID[1],
                         input_type="uint8", data=pixels, verbose=False,
                         check_runtimes=RUNTIMES, requantization="portable",
                         float_reference=False)
    report = json.loads((tmp_path / "w2a2_report.json").read_text())
    assert report["portable"]["layers"] == 4 and report["portable"]["skipped"] == {}
    assert report["input_normalization_mismatches"] == 0
    for runtime in RUNTIMES:
        assert report["fidelity_by_runtime"][runtime]["top1_agreement"] == 1.0, runtime
    # The pooled output is rounded (no exact_average_pooling): the report says so.
    assert not report["runtimes"]["builtin"]["exact"]
    assert "MEAN rescales its sum" in report["runtimes"]["micro"]["inexact_why"]
    # Every pixel value on every channel, then natural-looking images.
    every_value = np.arange(256, dtype="float32").reshape(4, 8, 8, 1).repeat(3, axis=-1)
    layers = requantization_check(path, np.concatenate([every_value, pixels[:40]]))
    assert len(layers) >= 5                     # the normalization, 4 weight layers
    assert all(layer["float_differs"] == 0 for layer in layers), layers


def test_exact_average_pooling_is_computed_alike_by_every_runtime(tmp_path):
    # The pooled mean held on int8 at the input's step / 64 (the tiny model pools 8x8): the
    # MEAN op rescales by exactly 1 and no runtime rounds; the logits (int8 out) are equal
    # integers on XNNPACK, the builtin kernels and TFLite Micro, and equal to Keras's.
    model = _quantized_tiny(2, "per_channel", first_last_bits=5, trained_like=True,
                            activation_granularity="per_layer", pixel_grid=True,
                            exact_average_pooling=True)
    assert not model.get_layer("quant_pool")._output_quantizers   # pylint: disable=protected-access
    path = tmp_path / "pool.tflite"
    pixels = _pixels(200)
    export.export_tflite(model, path, input_mean=PIXEL_GRID[0], input_std=PIXEL_GRID[1],
                         input_type="uint8", output_type="int8", data=pixels, verbose=False,
                         check_runtimes=RUNTIMES, requantization="portable",
                         float_reference=False)
    report = json.loads((tmp_path / "pool_report.json").read_text())
    assert report["activations"]["quant_pool"] == {"bits": 8, "per_channel": False,
                                                   "exact": True}
    assert report["runtimes"]["builtin"] == {"runs": True, "why": "", "exact": True,
                                             "inexact_why": ""}
    for runtime in RUNTIMES:
        fidelity = report["fidelity_by_runtime"][runtime]
        assert fidelity["top1_agreement"] == 1.0, runtime
        assert fidelity["max_logit_difference"] == 0.0, runtime
    from tfacd.export.flatbuffer import _flatbuffer, _op_name
    flat = _flatbuffer(path.read_bytes())
    graph = flat.subgraphs[0]
    means = [op for op in graph.operators if _op_name(flat, op) == "MEAN"]
    assert len(means) == 1
    x, y = (graph.tensors[means[0].inputs[0]], graph.tensors[means[0].outputs[0]])
    ratio = x.quantization.scale[0] / (64 * y.quantization.scale[0])
    assert abs(ratio - 1) < 1e-6
    logits = [export.run_tflite(path, pixels[:50], runtime=r) for r in RUNTIMES]
    for other in logits[1:]:
        np.testing.assert_array_equal(logits[0], other)


def test_exact_average_pooling_refuses_a_mean_that_does_not_fit_int8():
    # 4-bit activations over 8x8: the exact mean spans 15 * 64 = 960 steps.
    with pytest.raises(ValueError, match="pool averages 64 values.*960 steps"):
        _quantized_tiny(4, "per_channel", activation_granularity="per_layer",
                        exact_average_pooling=True)
    with pytest.raises(ValueError, match="needs per-tensor activations"):
        _quantized_tiny(2, "per_channel", exact_average_pooling=True)


def test_portable_refuses_int4_storage(tmp_path):
    model = _quantized_tiny(2, "per_channel", activation_granularity="per_layer")
    with pytest.raises(export.ExportError, match="needs weight_storage='int8'"):
        export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                             verbose=False, weight_storage="int4", requantization="portable",
                             float_reference=False)
    with pytest.raises(export.ExportError, match="requantization must be one of"):
        export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                             verbose=False, requantization="exact")


def test_spreads_leave_room_for_every_integer_the_grid_holds():
    # The depthwise layer's first channel holds only zeros: a spread chosen for the kernel's
    # own integers would leave no room for the integers training may move those weights to
    # (--portable_in_place), and the export would have to choose another ratio.
    from tfacd.export.bake import bake
    from tfacd.export.convert import _convert
    from tfacd.export.portable import plan_portable
    from tfacd.export.weights import _weight_quantizers, grid_reach
    model = _quantized_tiny(2, "per_channel", trained_like=True,
                            activation_granularity="per_layer")
    layer = model.get_layer("quant_dw")
    kernel = _weight_quantizers(layer)["depthwise_kernel"][0]
    values = kernel.numpy()
    values[..., 0, 0] = 0.0
    kernel.assign(values)
    reach = grid_reach(layer)
    assert reach.shape == (8,) and set(reach.tolist()) <= {2, 3}      # 2 bits: [-z, 3 - z]
    baked = bake(model, MEAN, STD, "float", True)
    assert np.all(baked.weights["quant_dw"].integers[..., 0] == 0)
    plan = plan_portable(model, baked, _convert(baked)).layers["quant_dw"]
    assert np.all(plan.spread * reach <= 127)
    assert np.all(plan.spread % plan.modulus == 0)
