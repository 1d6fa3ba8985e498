"""MobileNetV2 for 32x32 inputs (CIFAR), as a flat tf_keras Functional model.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018
(arXiv:1801.04381). ImageNet's MobileNetV2 downsamples 32x by its fifth stage; on 32x32 images
that leaves a 1x1 map. As CIFAR implementations do, the stem convolution and the first
stride-2 stage run at stride 1, so the last feature map is 4x4.

The model is built only from layers tfmot/tfacd can wrap (Conv2D, DepthwiseConv2D,
BatchNormalization, ReLU, Add, GlobalAveragePooling2D, Dense): no Lambda layers, no nested
models. It outputs logits (no softmax); train with `from_logits=True`.
"""

from __future__ import annotations

import numpy as np

from tfacd._keras import keras

layers = keras.layers

#: (expansion t, output channels c, repeats n, first stride s), with CIFAR strides.
CIFAR_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),      # stride 2 in the ImageNet model
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


#: A two-stage table for smoke tests and CI: every layer type of the full model, few layers.
TINY_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
)

ARCHITECTURES = {"mobilenet_v2_cifar": CIFAR_BLOCKS, "mobilenet_v2_cifar_tiny": TINY_BLOCKS}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds channel counts the way the reference MobileNetV2 does."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def mobilenet_v2_cifar(width: float = 1.0, num_classes: int = 10, input_shape=(32, 32, 3),
                       bn_momentum: float = 0.999, weight_decay: float = 4e-5,
                       blocks=CIFAR_BLOCKS, name: str | None = None) -> keras.Model:
    """MobileNetV2-CIFAR.

    Args:
      width: the width multiplier alpha (0.35, 0.5, 0.75, 1.0, ...).
      num_classes: size of the logits.
      input_shape: (height, width, channels) of the normalized input images.
      bn_momentum: BatchNormalization momentum; 0.999 as in the reference model, lower (e.g.
        0.9) for short runs, where 0.999 leaves the moving statistics at their init.
      weight_decay: L2 on convolution and dense kernels (0 for none).
      blocks: the (t, c, n, s) table; `CIFAR_BLOCKS` by default (smaller tables make tiny
        test models).
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum!r}")
    regularizer = keras.regularizers.l2(weight_decay) if weight_decay else None

    def bn_relu(x, prefix, relu=True):
        x = layers.BatchNormalization(momentum=bn_momentum, epsilon=1e-3,
                                      name=f"{prefix}_bn")(x)
        return layers.ReLU(6.0, name=f"{prefix}_relu")(x) if relu else x

    def conv(x, filters, kernel, stride, prefix):
        return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                             kernel_regularizer=regularizer, name=prefix)(x)

    inputs = keras.Input(shape=input_shape, name="image")
    stem = make_divisible(32 * width)
    x = bn_relu(conv(inputs, stem, 3, 1, "stem_conv"), "stem")
    in_channels = stem
    index = 0
    for expansion, channels, repeats, first_stride in blocks:
        out_channels = make_divisible(channels * width)
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            prefix = f"block{index}"
            shortcut = x
            if expansion != 1:
                x = bn_relu(conv(x, in_channels * expansion, 1, 1, f"{prefix}_expand"),
                            f"{prefix}_expand")
            x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                       name=f"{prefix}_depthwise")(x)
            x = bn_relu(x, f"{prefix}_depthwise")
            x = bn_relu(conv(x, out_channels, 1, 1, f"{prefix}_project"), f"{prefix}_project",
                        relu=False)
            if stride == 1 and in_channels == out_channels:
                x = layers.Add(name=f"{prefix}_add")([shortcut, x])
            in_channels = out_channels
            index += 1
    head = make_divisible(1280 * width) if width > 1.0 else 1280
    x = bn_relu(conv(x, head, 1, 1, "head_conv"), "head")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=regularizer, name="logits")(x)
    return keras.Model(inputs, outputs,
                       name=name or f"mobilenet_v2_cifar_{width:g}".replace(".", "_"))


def build(architecture: str, **kwargs) -> keras.Model:
    """`mobilenet_v2_cifar` with the block table named by `architecture`."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: use one of "
                         f"{sorted(ARCHITECTURES)}")
    return mobilenet_v2_cifar(blocks=ARCHITECTURES[architecture], **kwargs)


def renormalize_input(model: keras.Model, old_mean, old_std, new_mean, new_std) -> None:
    """Makes a float `model` trained on `(p - old_mean) / old_std` take `(p - new_mean) /
    new_std` instead (per channel, pixel units), by changing its first convolution in place.

    With `x_old = a x_new + d`, `a = new_std / old_std`, `d = (new_mean - old_mean) / old_std`
    per input channel, the convolution's kernel `K` becomes `K a` (scaled along its input
    channels) and its output gains `o = sum over taps and channels of K d`. `o` goes into the
    convolution's bias, or, without one, into the moving mean of the BatchNormalization that
    follows (`mean - o`): the same function away from the border. At the border the
    convolution pads with zero, which is the pixel `old_mean` before and `new_mean` after
    (for the pixel grid against CIFAR-10's statistics, up to 0.2 of a normalized unit).

    Raises:
      ValueError: the input feeds anything but one Conv2D, or that convolution has neither a
        bias nor a single BatchNormalization after it.
    """
    def consumers_of(layer):        # in this model only (an Input can feed several models)
        return [node.outbound_layer for node in layer._outbound_nodes  # pylint: disable=protected-access
                if any(node.outbound_layer is other for other in model.layers)]

    consumers = consumers_of(model.layers[0])
    if len(consumers) != 1 or type(consumers[0]).__name__ != "Conv2D":
        names = [f"{layer.name} ({type(layer).__name__})" for layer in consumers]
        raise ValueError(f"renormalize_input needs the input to feed one Conv2D, got {names}")
    conv = consumers[0]
    kernel = conv.kernel.numpy().astype(np.float64)
    old_std = np.broadcast_to(np.asarray(old_std, np.float64), kernel.shape[2:3])
    scale = np.asarray(new_std, np.float64) / old_std
    shift = (np.asarray(new_mean, np.float64) - np.asarray(old_mean, np.float64)) / old_std
    offset = np.einsum("hwco,c->o", kernel, np.broadcast_to(shift, kernel.shape[2:3]))
    new_kernel = kernel * np.broadcast_to(scale, kernel.shape[2:3])[None, None, :, None]
    if conv.use_bias:
        conv.bias.assign((conv.bias.numpy() + offset).astype(np.float32))
    else:
        after = consumers_of(conv)
        if len(after) != 1 or type(after[0]).__name__ != "BatchNormalization":
            raise ValueError(f"renormalize_input: {conv.name} has no bias and no single "
                             "BatchNormalization after it to take the offset")
        after[0].moving_mean.assign((after[0].moving_mean.numpy() - offset).astype(np.float32))
    conv.kernel.assign(new_kernel.astype(np.float32))
