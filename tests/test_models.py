"""MobileNetV2-CIFAR."""

import numpy as np
import pytest

import tfacd
from tfacd._keras import keras


def test_cifar_model_keeps_a_4x4_final_map_and_has_only_wrappable_layers():
    model = tfacd.mobilenet_v2_cifar(width=0.35, num_classes=100)
    assert model.output_shape == (None, 100)
    assert model.get_layer("head_relu").output_shape == (None, 4, 4, 1280)
    assert model.get_layer("stem_conv").strides == (1, 1)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert kinds == {"InputLayer", "Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU",
                     "Add", "GlobalAveragePooling2D", "Dense"}
    assert len([l for l in model.layers if type(l).__name__ == "DepthwiseConv2D"]) == 17
    logits = model(np.zeros([2, 32, 32, 3], "float32"))
    assert logits.shape == (2, 100)


def test_width_scales_the_channels():
    small = tfacd.mobilenet_v2_cifar(width=0.5)
    large = tfacd.mobilenet_v2_cifar(width=1.0)
    assert small.get_layer("stem_conv").filters == 16
    assert large.get_layer("stem_conv").filters == 32
    assert small.count_params() < large.count_params()


@pytest.mark.parametrize("kwargs", [dict(width=0), dict(num_classes=1),
                                    dict(bn_momentum=1.0)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        tfacd.mobilenet_v2_cifar(**kwargs)


def test_bn_momentum_is_applied():
    model = tfacd.mobilenet_v2_cifar(width=0.35, bn_momentum=0.9)
    assert all(layer.momentum == 0.9 for layer in model.layers
               if isinstance(layer, keras.layers.BatchNormalization))


def _stem_bn_output(model, x):
    return keras.Model(model.inputs, model.get_layer("stem_bn").output)(x, training=False).numpy()


def test_renormalize_input_keeps_the_function_away_from_the_border():
    rng = np.random.default_rng(0)
    model = tfacd.models.build("mobilenet_v2_cifar_tiny", width=0.35, input_shape=(8, 8, 3))
    bn = model.get_layer("stem_bn")
    bn.moving_mean.assign(rng.normal(0, 0.3, bn.moving_mean.shape).astype("float32"))
    old_mean, old_std = np.array([125.3, 123.0, 113.9]), np.array([63.0, 62.1, 66.7])
    pixels = rng.integers(0, 256, (4, 8, 8, 3)).astype("float32")
    before = _stem_bn_output(model, (pixels - old_mean) / old_std)
    tfacd.models.renormalize_input(model, old_mean, old_std, 128.0, 64.0)
    after = _stem_bn_output(model, (pixels - 128.0) / 64.0)
    # Inside, the same function; on the 1-pixel border the zero padding means another pixel.
    np.testing.assert_allclose(after[:, 1:-1, 1:-1], before[:, 1:-1, 1:-1], atol=1e-4)
    assert np.abs(after[:, 0] - before[:, 0]).max() > 1e-3


def test_renormalize_input_names_what_it_cannot_rewrite():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ValueError, match="needs the input to feed one Conv2D"):
        tfacd.models.renormalize_input(model, 0.0, 1.0, 128.0, 64.0)
    conv = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    model = keras.Model(inputs, keras.layers.ReLU()(conv))
    with pytest.raises(ValueError, match="no single BatchNormalization"):
        tfacd.models.renormalize_input(model, 0.0, 1.0, 128.0, 64.0)
