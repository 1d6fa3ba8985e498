"""Knowledge distillation from a float teacher, as a Keras model with its own `train_step`.

The student (the QAT model) learns from the labels and from the teacher's softened outputs::

    loss = (1 - w) * CE(y, s) + w * T^2 * KL(softmax(t / T) || softmax(s / T)) + R

where `s`, `t` are the student's and teacher's logits, `w` in `[0, 1]` the distillation
weight, `T > 0` the temperature, and `R` the student's own added losses (the L2 kernel decay,
the SQNR loss, the ACD "pull" penalty), which are never scaled by `w`. The `T^2` factor keeps
the distillation gradient's scale independent of `T` (Hinton et al. 2015, "Distilling the
knowledge in a neural network"). `w = 1` trains on the teacher alone, as N2UQ (Liu et al. 2022)
does for MobileNetV2 at 4 bits; QKD (Kim et al. 2019) and PROFIT (Park and Yoo 2020) also
distill low-bit MobileNets from their float model.

Backward: gradients reach the student only. The teacher runs in inference mode (BatchNorm on
its moving statistics, dropout off) under `tf.stop_gradient`, and is set non-trainable, so
`Distiller.trainable_variables` are the student's.

Use it where a model would be used::

    distiller = tfacd.distill.Distiller(qat_model, float_model, weight=0.9, temperature=2.0)
    distiller.compile(optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    distiller.fit(train_data, validation_data=val_data, callbacks=[tfacd.callbacks.ClipDecay()])
    qat_model.save_weights(...)        # the student is the model to keep and export

Both models must output logits. Validation (`evaluate`) measures the student alone: `loss` is
then `CE + R`. tfacd's callbacks (`ClipDecay`, `SQNRMonitor`) and
`tfacd.optimizers.with_clip_learning_rate` find the student's quantizers through the distiller
(`tfacd.iter_quantizers` searches trainable nested models and skips the frozen teacher).
"""

from __future__ import annotations

import tensorflow as tf

from tfacd._keras import keras


def distillation_loss(teacher_logits, student_logits, temperature: float):
    """`T^2 * mean over the batch of KL(softmax(t / T) || softmax(s / T))`."""
    t = tf.convert_to_tensor(teacher_logits, tf.float32) / temperature
    s = tf.convert_to_tensor(student_logits, tf.float32) / temperature
    log_p_teacher = tf.nn.log_softmax(t, axis=-1)
    log_p_student = tf.nn.log_softmax(s, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return temperature ** 2 * tf.reduce_mean(kl)


class Distiller(keras.Model):
    """Trains `student` on the labels and on a frozen `teacher` (see the module docstring).

    Args:
      student: the model that trains (a tfacd QAT model), outputting logits.
      teacher: a model with the same inputs and classes, outputting logits; it never trains.
      weight: `w` in [0, 1], the share of the distillation term in the task loss.
      temperature: `T` > 0.
    """

    def __init__(self, student, teacher, weight: float = 0.5, temperature: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight!r}")
        if not float(temperature) > 0.0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature!r}")
        if student.output_shape != teacher.output_shape:
            raise ValueError(f"the teacher's outputs {teacher.output_shape} do not match the "
                             f"student's {student.output_shape}")
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.task_loss = None
        self._loss_tracker = keras.metrics.Mean(name="loss")
        self._task_tracker = keras.metrics.Mean(name="task_loss")
        self._distill_tracker = keras.metrics.Mean(name="distill_loss")

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As `keras.Model.compile`; `loss` is the student's task loss on the labels."""
        if loss is None:
            raise ValueError("Distiller.compile needs the task loss, e.g. "
                             "SparseCategoricalCrossentropy(from_logits=True)")
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)
        self.task_loss = keras.losses.get(loss)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def _added_losses(self):
        return tf.add_n(self.student.losses) if self.student.losses else 0.0

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher_logits = tf.stop_gradient(self.teacher(x, training=False))
        with tf.GradientTape() as tape:
            logits = self.student(x, training=True)
            task = self.task_loss(y, logits, sample_weight=sample_weight)
            distill = distillation_loss(teacher_logits, logits, self.temperature)
            loss = (1.0 - self.weight) * task + self.weight * distill + self._added_losses()
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        return self._update_metrics(y, logits, sample_weight, loss, task, distill)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.student(x, training=False)
        task = self.task_loss(y, logits, sample_weight=sample_weight)
        return self._update_metrics(y, logits, sample_weight, task + self._added_losses(),
                                    task, None)

    def _update_metrics(self, y, logits, sample_weight, loss, task, distill):
        self._loss_tracker.update_state(loss)
        self._task_tracker.update_state(task)
        if distill is not None:
            self._distill_tracker.update_state(distill)
        self.compiled_metrics.update_state(y, logits, sample_weight)
        results = {m.name: m.result() for m in self.metrics}
        if distill is None:
            results.pop("distill_loss", None)
        return results

    def get_config(self):
        return {"weight": self.weight, "temperature": self.temperature}
