"""ClipDecay (ACD)."""

import numpy as np
import pytest

import tfacd
from tfacd._keras import keras
from tfacd.callbacks import ClipDecay, ClipLearningRate, schedule_value


def test_schedules():
    assert schedule_value("constant", 0.2, 0.7) == 0.2
    assert schedule_value("ramp", 0.2, 0.05, warmup=0.1) == pytest.approx(0.1)
    assert schedule_value("ramp", 0.2, 0.5, warmup=0.1) == pytest.approx(0.2)
    assert schedule_value("cosine", 0.2, 0.0) == pytest.approx(0.2)
    assert schedule_value("cosine", 0.2, 0.5) == pytest.approx(0.1)
    assert schedule_value("cosine", 0.2, 1.0) == pytest.approx(0.0)
    assert schedule_value("linear", 0.2, 0.25) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="exp"):
        schedule_value("exp", 0.2, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="shrink"), "shrink"), (dict(schedule="step"), "step"),
    (dict(lower_strength=1.5), "lower_strength"), (dict(upper_strength=-1), "upper_strength"),
    (dict(apply_to="biases"), "biases"), (dict(every_n_steps=0), "every_n_steps")])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipDecay(**kwargs)


def _frozen_fit(model, x, y, callback, epochs=1):
    # A learning rate of 0 freezes the optimizer, so only ACD moves the clips.
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model.fit(x, y, batch_size=len(x), epochs=epochs, verbose=0, callbacks=[callback])


def test_decay_moves_each_clip_toward_the_data_range_as_documented(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    infos = tfacd.list_quantizers(qat)
    for info in infos:                     # widen every clip beyond its data
        info.variables["lower"].assign(info.variables["lower"] - 1.0)
        info.variables["upper"].assign(info.variables["upper"] + 2.0)
    before = {id(i.variables["lower"]): (i.variables["lower"].numpy(),
                                         i.variables["upper"].numpy()) for i in infos}
    history = _frozen_fit(qat, x, y, ClipDecay(lower_strength=0.5, upper_strength=0.25,
                                               schedule="constant"))
    for info in infos:
        lower0, upper0 = before[id(info.variables["lower"])]
        data_min = info.variables["data_min"].numpy()
        data_max = info.variables["data_max"].numpy()
        expected_l = lower0 + 0.5 * np.maximum(data_min - lower0, 0)
        expected_u = upper0 - 0.25 * np.maximum(upper0 - data_max, 0)
        np.testing.assert_allclose(info.variables["lower"].numpy(), expected_l, rtol=1e-5,
                                   atol=1e-6, err_msg=f"{info.layer}/{info.tensor}")
        np.testing.assert_allclose(info.variables["upper"].numpy(), expected_u, rtol=1e-5,
                                   atol=1e-6, err_msg=f"{info.layer}/{info.tensor}")
        assert np.all(info.variables["upper"].numpy() < upper0)
    assert history.history["acd_lower_strength"] == [0.5]
    assert history.history["acd_upper_strength"] == [0.25]


def test_decay_can_target_weights_only(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    infos = tfacd.list_quantizers(qat)
    for info in infos:
        info.variables["upper"].assign(info.variables["upper"] + 2.0)
    before = [i.variables["upper"].numpy() for i in infos]
    _frozen_fit(qat, x, y, ClipDecay(upper_strength=0.5, schedule="constant",
                                     apply_to="weights"))
    for info, upper0 in zip(infos, before):
        moved = not np.allclose(info.variables["upper"].numpy(), upper0)
        assert moved == (info.kind == "weight"), (info.layer, info.tensor)


def test_decay_function_is_traced_once_across_fit_calls(tiny_model, tiny_data):
    # A loop that calls `fit` repeatedly (one call per epoch, say) must not re-trace it.
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    variables = tfacd.list_quantizers(qat)[0].variables
    variables["upper"].assign(variables["upper"] + 1.0)      # above the data: decays
    callback = ClipDecay(schedule="constant")
    _frozen_fit(qat, x, y, callback)
    first = callback._apply                                  # pylint: disable=protected-access
    upper = variables["upper"].numpy()
    qat.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[callback])
    assert callback._apply is first                          # pylint: disable=protected-access
    assert first.experimental_get_tracing_count() == 1
    assert np.all(variables["upper"].numpy() < upper)        # and it still runs


def test_default_clip_decay_runs_and_logs_its_schedule(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    history = _frozen_fit(qat, x, y, ClipDecay(), epochs=2)
    lower = history.history["acd_lower_strength"]
    # cosine from 0.01: after 1 of 2 steps 0.005, after 2 of 2 steps 0.
    np.testing.assert_allclose(lower, [0.005, 0.0], atol=1e-9)


def test_pull_mode_sets_penalty_strengths_and_needs_pull_quantizers(tiny_model, tiny_data):
    x, y = tiny_data
    plain = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    with pytest.raises(ValueError, match="acd_pull"):
        _frozen_fit(plain, x, y, ClipDecay(mode="pull"))
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2, acd_pull=True)
    tfacd.calibrate(qat, x)
    callback = ClipDecay(mode="pull", lower_strength=3.0, upper_strength=5.0,
                         schedule="constant")
    _frozen_fit(qat, x, y, callback)
    pulled = [i for i in tfacd.list_quantizers(qat) if i.quantizer.acd_pull]
    assert pulled and all(i.kind == "activation" for i in pulled)
    assert all(float(i.variables["pull_lower"]) == 3.0 for i in pulled)
    assert all(float(i.variables["pull_upper"]) == 5.0 for i in pulled)
    with_penalty = qat(x, training=True)
    assert len(qat.losses) == len(pulled)


def _clips_after_one_step(model_fn, x, y, callbacks):
    qat = tfacd.quantize_model(model_fn(), weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    before = [v.numpy().copy() for i in tfacd.list_quantizers(qat)
              for v in (i.variables["lower"], i.variables["upper"])]
    kernel = next(v for v in qat.trainable_weights if v.name.endswith("kernel:0"))
    kernel_before = kernel.numpy().copy()
    qat.compile(optimizer=keras.optimizers.Adam(0.05),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=callbacks)
    after = [v.numpy() for i in tfacd.list_quantizers(qat)
             for v in (i.variables["lower"], i.variables["upper"])]
    return before, after, (kernel_before, kernel.numpy())


def test_clip_learning_rate_scales_the_clips_step_exactly(tiny_data):
    from tests.conftest import tiny_cnn  # pylint: disable=import-outside-toplevel
    x, y = tiny_data

    def model():                 # the same initial weights every time
        keras.utils.set_random_seed(0)
        return tiny_cnn()

    before, full, kernel_full = _clips_after_one_step(model, x, y, [])
    _, half, kernel_half = _clips_after_one_step(model, x, y, [ClipLearningRate(0.5)])
    _, frozen, kernel_frozen = _clips_after_one_step(model, x, y, [ClipLearningRate(0.0)])
    moved = [not np.allclose(b, f) for b, f in zip(before, full)]
    assert sum(moved) >= len(moved) // 2                 # Adam moved most clips
    for b, f, h, z in zip(before, full, half, frozen):
        np.testing.assert_allclose(h, b + 0.5 * (f - b), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(z, b)
    # The weights take their full step either way (one step: same gradients).
    np.testing.assert_allclose(kernel_half[1], kernel_full[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(kernel_frozen[1], kernel_frozen[0])
    # The clips' absolute learning rate: 0.025 against the weights' 0.05 is the multiplier 0.5.
    _, absolute, kernel_absolute = _clips_after_one_step(
        model, x, y, [ClipLearningRate(learning_rate=0.025)])
    for h, a in zip(half, absolute):
        np.testing.assert_allclose(a, h, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kernel_absolute[1], kernel_full[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiplier must be >= 0"):
        ClipLearningRate(-0.5)
    with pytest.raises(ValueError, match="exactly one"):
        ClipLearningRate(0.5, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        ClipLearningRate(learning_rate=0.0)


def test_no_weight_decay_reaches_the_clips():
    """The quantizer-parameter group has no weight decay: the model's regularization losses
    (the L2 decay on kernels) have no gradient with respect to any clip."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tests.conftest import tiny_cnn  # pylint: disable=import-outside-toplevel
    qat = tfacd.quantize_model(tiny_cnn(regularize=True), weight_bits=2, activation_bits=2)
    clips = [i.variables[name] for i in tfacd.list_quantizers(qat) for name in ("lower", "upper")]
    with tf.GradientTape() as tape:
        qat(np.zeros((2, 8, 8, 3), "float32"), training=True)
        decay = tf.add_n(qat.losses)
    assert float(decay) > 0                                  # the kernels are decayed
    assert all(g is None for g in tape.gradient(decay, clips))


def test_l2_mode_moves_lower_and_upper_clips_by_their_own_strengths(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    before = {(i.layer, i.tensor): (i.variables["lower"].numpy().copy(),
                                    i.variables["upper"].numpy().copy())
              for i in tfacd.list_quantizers(qat)}
    callback = ClipDecay(mode="l2", lower_strength=0.1, upper_strength=0.3,
                         schedule="constant")
    _frozen_fit(qat, x, y, callback)                         # one step, optimizer frozen
    for info in tfacd.list_quantizers(qat):
        lower, upper = before[(info.layer, info.tensor)]
        np.testing.assert_allclose(info.variables["lower"].numpy(), 0.9 * lower, rtol=1e-6)
        np.testing.assert_allclose(info.variables["upper"].numpy(), 0.7 * upper, rtol=1e-6)
    with pytest.raises(ValueError, match="lower_strength must be in"):
        ClipDecay(mode="l2", lower_strength=1.5)
