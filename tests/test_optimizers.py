"""The quantizer parameters' own optimizer group (tfacd.optimizers)."""

import numpy as np
import pytest
import tensorflow as tf

import tfacd
from tfacd._keras import keras
from tfacd.optimizers import with_clip_learning_rate
from tests.conftest import tiny_cnn


def _calibrated(x):
    keras.utils.set_random_seed(0)            # the same initial weights every time
    qat = tfacd.quantize_model(tiny_cnn(regularize=True), weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    return qat


def _clips(model):
    """Every clip variable once (quantizers can share theirs)."""
    unique = {v.ref(): v for i in tfacd.list_quantizers(model)
              for v in (i.variables["lower"], i.variables["upper"])}
    return list(unique.values())


def _kernel(model):
    return next(v for v in model.trainable_weights if v.name.endswith("kernel:0"))


_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(x, y, make_optimizer, steps):
    """`steps` full-batch steps of `fit`; returns the clips and the first kernel after them."""
    qat = _calibrated(x)
    qat.compile(optimizer=make_optimizer(qat), loss=_LOSS)
    qat.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    return [v.numpy() for v in _clips(qat)], _kernel(qat).numpy()


class _Scaled(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, schedule, factor):
        self.schedule, self.factor = schedule, factor

    def __call__(self, step):
        return self.factor * self.schedule(step)

    def get_config(self):
        return {}


def _train(x, y, steps, make_optimizers):
    """`steps` full-batch steps of a hand-written loop (the same gradients whatever the
    optimizers); `make_optimizers(model, weights, clips)` gives `(optimizer, variables)`
    pairs. Returns the clips and the first kernel after the steps."""
    qat = _calibrated(x)
    clips = _clips(qat)
    clip_refs = {v.ref() for v in clips}
    weights = [v for v in qat.trainable_variables if v.ref() not in clip_refs]
    groups = make_optimizers(qat, weights, clips)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = _LOSS(y, qat(x, training=True)) + tf.add_n(qat.losses)
        grads = dict(zip([v.ref() for v in weights + clips],
                         tape.gradient(loss, weights + clips)))
        for optimizer, variables in groups:
            optimizer.apply_gradients([(grads[v.ref()], v) for v in variables])
    return [v.numpy() for v in clips], _kernel(qat).numpy()


@pytest.mark.parametrize("make_base", [
    lambda: keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.05, 10)),
    lambda: keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.05, 10),
                                 momentum=0.9, nesterov=True),
    lambda: keras.optimizers.RMSprop(keras.optimizers.schedules.CosineDecay(0.01, 10),
                                     momentum=0.5),
], ids=["adam", "sgd_nesterov", "rmsprop_momentum"])
def test_clips_train_at_their_own_learning_rate(tiny_data, make_base):
    """Three steps with the clip group equal three steps with a separate optimizer at
    `0.1 * lr(t)` for the clips (same schedule); the weights keep the full rate."""
    x, y = tiny_data

    def grouped(model, weights, clips):
        return [(with_clip_learning_rate(make_base(), model, multiplier=0.1), weights + clips)]

    def two_optimizers(model, weights, clips):
        del model
        weight_optimizer = make_base()
        config = weight_optimizer.get_config()
        config["learning_rate"] = _Scaled(weight_optimizer._learning_rate, 0.1)  # pylint: disable=protected-access
        return [(weight_optimizer, weights), (type(weight_optimizer).from_config(config), clips)]

    clips, kernel = _train(x, y, 3, grouped)
    ref_clips, ref_kernel = _train(x, y, 3, two_optimizers)
    full_clips, _ = _train(x, y, 3, lambda m, w, c: [(make_base(), w + c)])
    start = [v.numpy() for v in _clips(_calibrated(x))]
    for got, want in zip(clips, ref_clips):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kernel, ref_kernel, rtol=1e-4, atol=1e-6)
    # The scaled clips moved, and moved less than at the weights' rate.
    moved = sum(not np.allclose(s, c) for s, c in zip(start, clips))
    assert moved >= len(clips) // 2
    assert (sum(np.abs(c - s).sum() for s, c in zip(start, clips))
            < 0.5 * sum(np.abs(f - s).sum() for s, f in zip(start, full_clips)))


def test_optimizer_not_linear_in_the_rate_scales_the_update(tiny_data):
    """Ftrl's update is not linear in its learning rate: the clip group scales the update it
    computes instead. After one step from the same state, every clip moved `m` times as far
    as at the full rate, and the weights moved as far."""
    x, y = tiny_data
    start = [v.numpy() for v in _clips(_calibrated(x))]

    def step(make_optimizer):
        return _train(x, y, 1, lambda m, w, c: [(make_optimizer(m), w + c)])

    clips, kernel = step(lambda m: with_clip_learning_rate(keras.optimizers.Ftrl(0.5), m,
                                                           multiplier=0.25))
    full_clips, full_kernel = step(lambda m: keras.optimizers.Ftrl(0.5))
    assert sum(not np.allclose(s, f) for s, f in zip(start, full_clips)) >= len(start) // 2
    for s, got, full in zip(start, clips, full_clips):
        np.testing.assert_allclose(got - s, 0.25 * (full - s), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kernel, full_kernel, rtol=1e-6)


def test_decoupled_weight_decay_skips_the_clips(tiny_data):
    """AdamW's own weight decay shrinks the kernels, never the clips (zero gradients, so only
    the decay moves anything)."""
    qat = _calibrated(tiny_data[0])
    optimizer = with_clip_learning_rate(keras.optimizers.AdamW(0.1, weight_decay=0.5), qat,
                                        multiplier=1.0)
    clips, kernel = _clips(qat), _kernel(qat)
    before_clips, before_kernel = [v.numpy() for v in clips], kernel.numpy()
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in qat.trainable_variables])
    np.testing.assert_allclose(kernel.numpy(), before_kernel * (1 - 0.1 * 0.5), rtol=1e-6)
    for before, v in zip(before_clips, clips):
        np.testing.assert_array_equal(v.numpy(), before)


def test_frozen_variables_never_move_and_the_rest_train(tiny_data):
    x, y = tiny_data
    qat = _calibrated(x)
    frozen = _clips(qat)[:3] + [_kernel(qat)]
    before = [v.numpy() for v in qat.trainable_variables]
    qat.compile(optimizer=tfacd.optimizers.with_frozen_variables(
        keras.optimizers.AdamW(0.05, weight_decay=0.1), frozen), loss=_LOSS)
    qat.fit(x, y, batch_size=len(x), epochs=2, verbose=0)
    frozen_refs = {v.ref() for v in frozen}
    for start, v in zip(before, qat.trainable_variables):
        if v.ref() in frozen_refs:
            np.testing.assert_array_equal(v.numpy(), start)
    assert sum(not np.array_equal(start, v.numpy())
               for start, v in zip(before, qat.trainable_variables)
               if v.ref() not in frozen_refs) >= (len(before) - len(frozen)) // 2
    with pytest.raises(ValueError, match="no variables"):
        tfacd.optimizers.with_frozen_variables(keras.optimizers.Adam(), [])


def test_multiplier_zero_freezes_the_clips_and_absolute_rate_equals_multiplier(tiny_data):
    x, y = tiny_data
    start = [v.numpy() for v in _clips(_calibrated(x))]
    frozen, kernel = _fit(x, y, lambda m: with_clip_learning_rate(
        keras.optimizers.Adam(0.05), m, multiplier=0.0), steps=2)
    for s, f in zip(start, frozen):
        np.testing.assert_array_equal(f, s)
    assert not np.allclose(kernel, _kernel(_calibrated(x)).numpy())   # the weights trained
    # The clips' absolute learning rate 0.025 against the weights' 0.05 is the multiplier 0.5.
    half, _ = _fit(x, y, lambda m: with_clip_learning_rate(
        keras.optimizers.Adam(0.05), m, multiplier=0.5), steps=2)
    absolute, _ = _fit(x, y, lambda m: with_clip_learning_rate(
        keras.optimizers.Adam(0.05), m, learning_rate=0.025), steps=2)
    for h, a in zip(half, absolute):
        np.testing.assert_allclose(a, h, rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_named(tiny_data):
    x, y = tiny_data
    qat = _calibrated(x)
    with pytest.raises(ValueError, match="multiplier must be >= 0"):
        with_clip_learning_rate(keras.optimizers.Adam(), qat, multiplier=-0.5)
    with pytest.raises(ValueError, match="exactly one"):
        with_clip_learning_rate(keras.optimizers.Adam(), qat, multiplier=0.5, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        with_clip_learning_rate(keras.optimizers.Adam(), qat, learning_rate=0.0)
    with pytest.raises(ValueError, match="no tfacd quantizers"):
        with_clip_learning_rate(keras.optimizers.Adam(), tiny_cnn(), multiplier=0.5)
    with pytest.raises(TypeError, match="legacy"):
        with_clip_learning_rate(keras.optimizers.legacy.Adam(), qat, multiplier=0.5)
    used = keras.optimizers.Adam()
    qat.compile(optimizer=used, loss=_LOSS)
    qat.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="has not taken a step"):
        with_clip_learning_rate(used, qat, multiplier=0.5)


def test_config_round_trip_keeps_the_scale(tiny_data):
    qat = _calibrated(tiny_data[0])
    grouped = with_clip_learning_rate(keras.optimizers.Adam(0.01), qat, multiplier=0.1)
    again = type(grouped).from_config(grouped.get_config())
    assert again.clip_scale == pytest.approx(0.1)
    assert again.get_config()["learning_rate"] == pytest.approx(0.01)


def test_no_weight_decay_reaches_the_clips():
    """The quantizer-parameter group has no weight decay: the model's regularization losses
    (the L2 decay on kernels) have no gradient with respect to any clip."""
    qat = tfacd.quantize_model(tiny_cnn(regularize=True), weight_bits=2, activation_bits=2)
    clips = _clips(qat)
    with tf.GradientTape() as tape:
        qat(np.zeros((2, 8, 8, 3), "float32"), training=True)
        decay = tf.add_n(qat.losses)
    assert float(decay) > 0                                  # the kernels are decayed
    assert all(g is None for g in tape.gradient(decay, clips))
