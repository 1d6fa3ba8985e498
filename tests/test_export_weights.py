"""`tfacd.export.weights`: the file's weights are the Keras model's grid, exactly."""


import numpy as np

from tfacd import export

from export_models import MEAN, STD, _quantized_tiny


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
    content = export.convert._convert(baked)                    # pylint: disable=protected-access
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
