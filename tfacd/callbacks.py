"""ACD, asymmetric clipping-value decay, as a Keras callback.

The thesis that proposed ACD says only that it "adjusts the activation dynamic range to the
current clipping values to reduce quantization error". tfacd implements two readings.

**mode="decay" (default).** After every training step, each channel's clips decay toward the
range its data occupies, lower and upper separately (`tfacd.ops.clip_decay`)::

    u_c <- u_c - lambda_u(t) * max(u_c - m_c^max, 0)
    l_c <- l_c + lambda_l(t) * max(m_c^min - l_c, 0)

`m_c^min`, `m_c^max` are the channel's data range, tracked by the quantizer (the kernel's range
for weights; an exponential moving average of batch min/max for activations). Levels beyond
the data are never used; removing that part of the range shrinks the step for free. The update
is applied to the variables directly, decoupled from the optimizer (like AdamW's decoupled
weight decay), so it does not depend on the learning rate or optimizer state.

**mode="pull".** The clips are held where training put them and the activations are pulled
into them: each activation quantizer (built with `QuantizeScheme(acd_pull=True)`) adds::

    lambda_l(t) * mean(relu(l_c - x)^2) + lambda_u(t) * mean(relu(x - u_c)^2)

to the loss, whose gradient flows into the weights that produce `x`, never into the clips.

**mode="l2".** PACT's clip L2 decay with separate lower and upper strengths, decoupled from
the optimizer (`tfacd.ops.clip_l2_decay`), after every training step::

    l_c <- (1 - lambda_l(t)) * l_c
    u_c <- (1 - lambda_u(t)) * u_c

It shrinks every clip toward zero whatever the data range; the task loss (and the SQNR loss)
push back where clipping costs accuracy.

**Schedules** of the strengths over training progress `t` in [0, 1] (optimizer steps done /
total steps, so a resumed run continues where it was):

* "constant": `lambda(t) = lambda_0`
* "ramp": `lambda(t) = lambda_0 * min(1, t / warmup)` (rises, then holds)
* "cosine": `lambda(t) = lambda_0 * (1 + cos(pi t)) / 2` (strong early, fades)
* "linear": `lambda(t) = lambda_0 * (1 - t)`

The current strengths go into each epoch's logs as `acd_lower_strength` and
`acd_upper_strength` (and so into the History and TensorBoard).
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfacd import ops
from tfacd._keras import keras
from tfacd.quantizers import iter_quantizers

SCHEDULES = ("constant", "ramp", "cosine", "linear")
MODES = ("decay", "pull", "l2")
TARGETS = ("all", "weights", "activations")


def schedule_value(schedule: str, strength: float, progress: float, warmup: float = 0.1):
    """The strength at training progress `progress` in [0, 1] (see the module docstring)."""
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return strength
    if schedule == "ramp":
        return strength * (min(1.0, t / warmup) if warmup > 0 else 1.0)
    if schedule == "cosine":
        return strength * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return strength * (1.0 - t)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class ClipDecay(keras.callbacks.Callback):
    """Asymmetric clipping-value decay (ACD) for tfacd-quantized models.

    Args:
      lower_strength: `lambda_l` at full strength. In "decay" mode the fraction of the unused
        range below the data removed per step (in [0, 1]); in "l2" mode the fraction of the
        clip removed per step (in [0, 1]); in "pull" mode the penalty weight.
      upper_strength: `lambda_u`, the same for the upper clips.
      schedule: "constant", "ramp", "cosine" or "linear".
      mode: "decay", "l2" or "pull".
      apply_to: "all", "weights" or "activations" ("decay" and "l2" modes).
      warmup: fraction of training over which "ramp" rises.
      every_n_steps: apply the decay every n steps (decay mode).
    """

    def __init__(self, lower_strength: float = 0.01, upper_strength: float = 0.01,
                 schedule: str = "cosine", mode: str = "decay", apply_to: str = "all",
                 warmup: float = 0.1, every_n_steps: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if apply_to not in TARGETS:
            raise ValueError(f"apply_to must be one of {TARGETS}, got {apply_to!r}")
        for name, value in (("lower_strength", lower_strength),
                            ("upper_strength", upper_strength)):
            if not float(value) >= 0 or (mode != "pull" and float(value) > 1):
                bound = "in [0, 1]" if mode != "pull" else ">= 0"
                raise ValueError(f"{name} must be {bound} in {mode} mode, got {value!r}")
        if not (isinstance(every_n_steps, int) and every_n_steps >= 1):
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.lower_strength = float(lower_strength)
        self.upper_strength = float(upper_strength)
        self.schedule = schedule
        self.mode = mode
        self.apply_to = apply_to
        self.warmup = float(warmup)
        self.every_n_steps = every_n_steps
        self.current = (0.0, 0.0)
        self._targets = []
        self._apply = None
        self._apply_key = None
        self._total_steps = None

    def get_config(self):
        return {"lower_strength": self.lower_strength, "upper_strength": self.upper_strength,
                "schedule": self.schedule, "mode": self.mode, "apply_to": self.apply_to,
                "warmup": self.warmup, "every_n_steps": self.every_n_steps}

    # ------------------------------------------------------------------ Keras hooks

    def on_train_begin(self, logs=None):
        kinds = {"all": ("weight", "activation"), "weights": ("weight",),
                 "activations": ("activation",)}[self.apply_to]
        # A quantizer with a fixed range (the pixel-grid input) has no clips to decay.
        self._targets = [variables for _, _, quantizer, variables in iter_quantizers(self.model)
                         if quantizer.kind in kinds and quantizer.fixed_range is None]
        if not self._targets:
            raise ValueError("ClipDecay found no tfacd quantizers in the model: quantize it "
                             "with tfacd.quantize_model first")
        if self.mode == "pull":
            pulled = [q for _, _, q, _ in iter_quantizers(self.model) if q.acd_pull]
            if not pulled:
                raise ValueError("ClipDecay(mode='pull') needs activation quantizers built "
                                 "with QuantizeScheme(acd_pull=True)")
            self._targets = [v for _, _, q, v in iter_quantizers(self.model) if q.acd_pull]
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        self._total_steps = epochs * steps if epochs and steps else None
        if self.mode != "pull":
            # One traced function per model and targets, kept across `fit` calls: tracing it
            # (two variable updates per quantizer) costs about a second, which a loop that
            # calls `fit` repeatedly would otherwise pay at every call.
            key = (id(self.model), tuple(id(v["lower"]) for v in self._targets))
            if self._apply is None or self._apply_key != key:
                self._apply, self._apply_key = tf.function(self._decay_all), key
        else:
            self._apply = None
        self._set_strengths(self._progress())

    def on_train_batch_end(self, batch, logs=None):
        progress = self._progress()
        lam_l, lam_u = self._set_strengths(progress)
        if self.mode != "pull":
            step = int(self.model.optimizer.iterations.numpy())
            if step % self.every_n_steps == 0 and (lam_l > 0 or lam_u > 0):
                self._apply(tf.constant(lam_l, tf.float32), tf.constant(lam_u, tf.float32))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["acd_lower_strength"], logs["acd_upper_strength"] = self.current

    # ------------------------------------------------------------------ internals

    def _progress(self) -> float:
        if not self._total_steps:
            return 0.0
        return float(self.model.optimizer.iterations.numpy()) / self._total_steps

    def _set_strengths(self, progress):
        lam_l = schedule_value(self.schedule, self.lower_strength, progress, self.warmup)
        lam_u = schedule_value(self.schedule, self.upper_strength, progress, self.warmup)
        self.current = (lam_l, lam_u)
        if self.mode == "pull":
            for variables in self._targets:
                variables["pull_lower"].assign(lam_l)
                variables["pull_upper"].assign(lam_u)
        return lam_l, lam_u

    def _decay_all(self, lam_l, lam_u):
        for variables in self._targets:
            if self.mode == "l2":
                lower, upper = ops.clip_l2_decay(variables["lower"], variables["upper"],
                                                 lam_l, lam_u)
            else:
                lower, upper = ops.clip_decay(variables["lower"], variables["upper"],
                                              variables["data_min"], variables["data_max"],
                                              lam_l, lam_u)
            variables["lower"].assign(lower)
            variables["upper"].assign(upper)
