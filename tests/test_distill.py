"""tfacd.distill: the Distiller trains the student only, and its loss is the documented one."""

import numpy as np
import pytest
import tensorflow as tf

import tfacd
from tfacd._keras import keras
from tfacd.distill import Distiller, distillation_loss
from tests.conftest import tiny_cnn


def _pair(x):
    keras.utils.set_random_seed(1)
    teacher = tiny_cnn()
    keras.utils.set_random_seed(2)
    student = tfacd.quantize_model(tiny_cnn(regularize=True), weight_bits=2, activation_bits=2,
                                   sqnr_weight=0.05)
    tfacd.calibrate(student, x)
    return student, teacher


def test_distillation_loss_is_t_squared_kl():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    for temperature in (1.0, 3.0):
        p = np.exp(t / temperature) / np.exp(t / temperature).sum(-1, keepdims=True)
        q = np.exp(s / temperature) / np.exp(s / temperature).sum(-1, keepdims=True)
        expected = temperature ** 2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
        got = float(distillation_loss(t.astype("float32"), s.astype("float32"), temperature))
        assert got == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(t.astype("float32"), t.astype("float32"), 2.0)) == \
        pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_the_student_only(tiny_data):
    x, y = tiny_data
    student, teacher = _pair(x)
    teacher_before = [w.numpy().copy() for w in teacher.weights]
    student_before = [w.numpy().copy() for w in student.trainable_weights]
    distiller = Distiller(student, teacher, weight=0.7, temperature=2.0)
    assert {v.ref() for v in distiller.trainable_variables} == \
        {v.ref() for v in student.trainable_variables}
    distiller.compile(keras.optimizers.Adam(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0,
                            validation_data=(x, y))
    for before, after in zip(teacher_before, teacher.weights):   # moving statistics too
        np.testing.assert_array_equal(before, after.numpy())
    moved = [not np.array_equal(b, a.numpy())
             for b, a in zip(student_before, student.trainable_weights)]
    assert sum(moved) >= len(moved) - 2
    for key in ("loss", "task_loss", "distill_loss", "accuracy", "val_loss", "val_accuracy"):
        assert key in history.history and np.all(np.isfinite(history.history[key]))
    assert "val_distill_loss" not in history.history


def test_one_step_follows_the_documented_loss(tiny_data):
    """One SGD step of the Distiller equals one step on the loss written out by hand."""
    x, y = tiny_data
    x, y = x[:16], y[:16]
    student, teacher = _pair(x)
    weight, temperature, rate = 0.6, 3.0, 0.1
    variables = student.trainable_variables
    start = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        logits = student(x, training=True)
        task = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
        loss = ((1 - weight) * task
                + weight * distillation_loss(teacher(x, training=False), logits, temperature)
                + tf.add_n(student.losses))
    expected = [s - rate * g.numpy() if g is not None else s
                for s, g in zip(start, tape.gradient(loss, variables))]
    for variable, value in zip(variables, start):      # undo the BN updates of the pass above
        variable.assign(value)
    student.set_weights(student.get_weights())
    distiller = Distiller(student, teacher, weight=weight, temperature=temperature)
    distiller.compile(keras.optimizers.SGD(rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    # Graph mode (fit) and the eager tape above sum in other orders, and a 2-bit rounding
    # decision can flip on a tie: the two steps agree to 1% of the step's own length, where
    # a loss with another weight, temperature or a missing term is off by a large part of it.
    step = np.concatenate([(w - s).ravel() for w, s in zip(expected, start)])
    error = np.concatenate([(v.numpy() - w).ravel() for v, w in zip(variables, expected)])
    assert np.linalg.norm(step) > 1e-3
    assert np.linalg.norm(error) < 0.01 * np.linalg.norm(step)


def test_callbacks_find_the_students_quantizers_not_the_teachers(tiny_data):
    x, y = tiny_data
    student, _ = _pair(x)
    keras.utils.set_random_seed(3)
    qat_teacher = tfacd.quantize_model(tiny_cnn(), weight_bits=4, activation_bits=4)
    tfacd.calibrate(qat_teacher, x)
    def clips(model):
        return [v.numpy().copy() for i in tfacd.list_quantizers(model)
                for v in (i.variables["lower"], i.variables["upper"])]

    teacher_clips, student_clips = clips(qat_teacher), clips(student)
    distiller = Distiller(student, qat_teacher, weight=1.0)
    found = list(tfacd.iter_quantizers(distiller))
    assert len(found) == len(list(tfacd.iter_quantizers(student)))
    distiller.compile(keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[
        tfacd.callbacks.ClipDecay(mode="l2", lower_strength=0.5, upper_strength=0.5,
                                  schedule="constant")])
    for before, after in zip(teacher_clips, clips(qat_teacher)):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(student_clips[1::2], clips(student)[1::2]):   # upper clips
        np.testing.assert_allclose(after, 0.5 * before, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=1.5), "weight must be in"), (dict(temperature=0.0), "temperature must be")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distiller(tiny_cnn(), tiny_cnn(), **kwargs)
    with pytest.raises(ValueError, match="do not match"):
        Distiller(tiny_cnn(num_classes=4), tiny_cnn(num_classes=3))
