"""ClipQuantizer as a tfmot Quantizer: state, serialization, losses."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tfacd
from tfacd._keras import keras
from tfacd.data import PIXEL_GRID_RANGE
from tfacd.quantizers import ClipQuantizer


class _Holder(keras.layers.Layer):
    """A layer that owns one quantizer, as tfmot's wrappers do, and calls it in `call`."""

    def __init__(self, quantizer, shape):
        super().__init__()
        self.quantizer = quantizer
        self.variables_ = quantizer.build(tf.TensorShape(shape), "t", self)

    def call(self, inputs, training=False):
        return self.quantizer(inputs, training, self.variables_)


def _built(quantizer, shape):
    layer = _Holder(quantizer, shape)
    return layer, layer.variables_


def test_build_makes_per_channel_and_per_tensor_clips():
    _, per_channel = _built(ClipQuantizer(2, per_channel=True, axis=2, kind="weight"),
                            [3, 3, 7, 1])
    assert per_channel["lower"].shape == (7,) and per_channel["upper"].shape == (7,)
    assert per_channel["lower"].trainable and not per_channel["data_min"].trainable
    _, per_tensor = _built(ClipQuantizer(2, per_channel=False), [None, 4, 4, 7])
    assert per_tensor["lower"].shape == ()


def test_build_rejects_a_missing_axis():
    with pytest.raises(ValueError, match="axis 3"):
        _built(ClipQuantizer(2, per_channel=True, axis=3), [4, 5])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_bits=1), "1"), (dict(num_bits=2, kind="bias"), "bias"),
    (dict(num_bits=2, gradient="ste"), "ste"), (dict(num_bits=2, init_method="kl"), "kl"),
    (dict(num_bits=2, sqnr_loss_weight=-1), "-1"),
    (dict(num_bits=2, range_momentum=1.0), "1.0"),
    (dict(num_bits=4, symmetric_grid=True), "activation")])
def test_bad_arguments_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipQuantizer(**kwargs)


def test_config_round_trips_through_keras_and_tfmot_scope():
    quantizer = ClipQuantizer(3, per_channel=False, axis=-1, kind="weight", gradient="pact",
                              init_method="minmax", integer_zero_point=False,
                              sqnr_loss_weight=0.5, acd_pull=True, range_momentum=0.5)
    assert ClipQuantizer.from_config(quantizer.get_config()) == quantizer
    serialized = keras.utils.serialize_keras_object(quantizer)
    with tfacd.quantize_scope():
        restored = keras.utils.deserialize_keras_object(serialized)
    assert restored == quantizer
    # Registered with Keras itself, so models holding it reload outside quantize_scope too.
    assert keras.utils.get_registered_object("tfacd>ClipQuantizer") is ClipQuantizer
    assert isinstance(quantizer, tfmot.quantization.keras.quantizers.Quantizer)
    symmetric = ClipQuantizer(4, kind="weight", symmetric_grid=True)
    assert ClipQuantizer.from_config(symmetric.get_config()) == symmetric != \
        ClipQuantizer(4, kind="weight")


def test_symmetric_grid_is_opt_in_below_8_bits():
    """8-bit weights always take int8's symmetric grid; below 8 bits only with
    `symmetric_grid` (which `QuantizeScheme(symmetric_weights=True)` sets on weights)."""
    assert ClipQuantizer(8, kind="weight").symmetric_step
    assert not ClipQuantizer(4, kind="weight").symmetric_step
    assert ClipQuantizer(4, kind="weight", symmetric_grid=True).symmetric_step
    assert not ClipQuantizer(8, kind="activation").symmetric_step
    scheme = tfacd.QuantizeScheme(weight_bits=4, activation_bits=4, symmetric_weights=True)
    assert scheme.make_quantizer(4, "weight").symmetric_step
    assert not scheme.make_quantizer(4, "activation").symmetric_step
    assert scheme.get_config()["symmetric_weights"] is True


def test_first_call_initializes_from_data_and_tracks_the_range():
    quantizer = ClipQuantizer(2, per_channel=True, kind="activation", range_momentum=0.5)
    x = tf.constant([[0.0, -1.0, 2.0, 0.5, 0.0], [1.0, 3.0, 4.0, 0.5, 0.0]])
    layer, variables = _built(quantizer, [None, 5])
    layer(x, training=True)
    assert float(variables["initialized"]) == 1.0
    np.testing.assert_allclose(variables["lower"].numpy(), [0, -1, 0, 0, 0])
    np.testing.assert_allclose(variables["upper"].numpy(), [1, 3, 4, 0.5, 1e-6], rtol=1e-5)
    layer(2 * x, training=True)                         # EMA with momentum 0.5
    np.testing.assert_allclose(variables["data_max"].numpy(), [1.5, 4.5, 6, 0.75, 0],
                               rtol=1e-5, atol=1e-6)


def test_sqnr_loss_is_added_in_training_only_and_tunes_only_the_clips():
    quantizer = ClipQuantizer(2, per_channel=True, sqnr_loss_weight=0.5)
    layer, variables = _built(quantizer, [None, 3])
    x = tf.Variable(tf.random.normal([32, 3], seed=1))
    layer(x, training=False)
    assert not layer.losses
    with tf.GradientTape() as tape:
        layer(x, training=True)
        assert len(layer.losses) == 1
        loss = layer.losses[0]
    np.testing.assert_allclose(float(loss), -0.5 * float(variables["sqnr_db"]), rtol=1e-6)
    gx, gl, gu = tape.gradient(loss, [x, variables["lower"], variables["upper"]])
    assert gx is None or not np.any(gx.numpy())
    assert np.any(gl.numpy()) and np.any(gu.numpy())


def test_acd_pull_penalty_uses_the_pull_strengths():
    quantizer = ClipQuantizer(2, per_channel=False, acd_pull=True)
    layer, variables = _built(quantizer, [None, 2])
    layer(tf.constant([[-1.0, 1.0]]), training=False)             # clips [-1, 1]
    variables["pull_lower"].assign(2.0)
    variables["pull_upper"].assign(3.0)
    layer(tf.constant([[-3.0, 2.0]]), training=True)
    # lower: mean(relu(-1 - x)^2) = (4 + 0) / 2; upper: mean(relu(x - 1)^2) = (0 + 1) / 2
    np.testing.assert_allclose(float(layer.losses[-1]), 2.0 * 2.0 + 3.0 * 0.5, rtol=1e-5)


def test_fixed_range_holds_the_pixel_grid_exactly_and_never_moves():
    lower, upper = PIXEL_GRID_RANGE
    quantizer = ClipQuantizer(8, per_channel=False, fixed_range=(lower, upper))
    layer, variables = _built(quantizer, (None, 4, 4, 3))
    assert not variables["lower"].trainable and not variables["upper"].trainable
    pixels = np.arange(256, dtype="float32").reshape(1, 4, 64, 1).repeat(3, -1)
    x = (pixels - 128.0) / 64.0
    np.testing.assert_array_equal(layer(x, training=True).numpy(), x)
    with tfacd.quantizers.calibrating():
        layer(x * 3.0, training=False)                   # data far outside: clips stay
    assert variables["lower"].numpy() == lower and variables["upper"].numpy() == upper
    assert ClipQuantizer.from_config(quantizer.get_config()) == quantizer
    with pytest.raises(ValueError, match="fixed_range must be"):
        ClipQuantizer(8, fixed_range=(1.0, 1.0))
