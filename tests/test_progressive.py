"""tfacd.progressive: a lower-bit stage carries the weights and derives its own clips."""

import numpy as np
import pytest

import tfacd
from tfacd._keras import keras
from tfacd.progressive import transfer_weights
from tests.conftest import tiny_cnn


def test_a_progressive_start_carries_weights_and_gives_valid_clips(tiny_data):
    x, y = tiny_data
    keras.utils.set_random_seed(1)
    w4a4 = tfacd.quantize_model(tiny_cnn(), weight_bits=4, activation_bits=4)
    tfacd.calibrate(w4a4, x)
    w4a4.compile(keras.optimizers.Adam(0.01),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    w4a4.fit(x, y, batch_size=16, epochs=1, verbose=0)      # trained weights, moved stats

    keras.utils.set_random_seed(2)
    target = tiny_cnn()                                       # other initial weights
    assert transfer_weights(w4a4, target) == 7        # 3 convs, 3 BatchNorms, the Dense
    carried = {v.name: v.numpy() for v in w4a4.weights}
    for variable in target.weights:                   # kernels, biases, BN state: equal
        np.testing.assert_array_equal(variable.numpy(), carried[variable.name])

    w2a2 = tfacd.quantize_model(target, weight_bits=2, activation_bits=2)
    tfacd.calibrate(w2a2, x)
    checked = 0
    for info in tfacd.list_quantizers(w2a2):
        assert info.num_bits in (2, 8)
        assert np.all(np.isfinite(info.lower)) and np.all(np.isfinite(info.upper))
        assert np.all(info.upper > info.lower)
        if info.kind == "weight" and info.num_bits == 2:
            # Derived from the carried kernel at 2 bits: each channel's clips lie inside that
            # channel's range (the MSE search clips, never widens), and they are not the
            # 4-bit stage's clips.
            kernel = next(w for w in target.get_layer(info.layer[len("quant_"):]).weights
                          if "kernel" in w.name).numpy()
            axis = info.quantizer.axis % kernel.ndim
            others = tuple(a for a in range(kernel.ndim) if a != axis)
            lower, upper = info.variables["lower"].numpy(), info.variables["upper"].numpy()
            assert np.all(lower >= kernel.min(axis=others) - 1e-6)
            assert np.all(upper <= kernel.max(axis=others) + 1e-6)
            old = next(i for i in tfacd.list_quantizers(w4a4)
                       if i.layer == info.layer and i.tensor == info.tensor)
            assert old.num_bits == 4 and not np.allclose(old.upper, info.upper)
            checked += 1
    assert checked == 2                                   # dw and project at 2 bits
    logits = w2a2.predict(x, verbose=0)
    assert np.all(np.isfinite(logits))


def test_mismatched_architectures_name_the_layers():
    source = tfacd.quantize_model(tiny_cnn(num_classes=3), weight_bits=4, activation_bits=4)
    with pytest.raises(ValueError, match=r"logits: shapes kernel \(8, 3\)"):
        transfer_weights(source, tiny_cnn(num_classes=4))
    inputs = keras.Input((8, 8, 3))
    other = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs))
    with pytest.raises(ValueError, match="head: not in"):
        transfer_weights(source, other)
