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
