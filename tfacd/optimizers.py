"""The quantizer parameters' own optimizer group: their own learning rate, no weight decay.

`with_clip_learning_rate(optimizer, model, multiplier=m)` returns a copy of `optimizer` that
scales the update of every clip variable (`lower`, `upper` of every tfacd quantizer in
`model`) inside its own update step::

    l <- l + m * delta_l        (u the same)

where `delta_l` is the update the optimizer computes for `l` at its learning rate `lr(t)`.
The states of Adam (moments of the gradient) are independent of the learning rate and the
state of SGD with (Nesterov) momentum is proportional to it, so every update is linear in
`lr(t)`: scaling it by `m` is exactly a learning rate of `m * lr(t)` for the clips, following
the weights' schedule. Give either `multiplier` or the clips' absolute `learning_rate` at
step 0 (then `m = learning_rate / lr(0)`).

How: for the optimizers whose update is linear in the learning rate (SGD with or without
momentum, Adam, AdamW, Adamax, Nadam, Adagrad, Adadelta, RMSprop, Lion) the clips' update
step reads the learning rate as `m * lr(t)`: one scalar multiply per clip variable, in the
optimizer's traced step. For any other optimizer (Ftrl, Adafactor) the update is computed at
`lr(t)` and then scaled, `l <- l_old + m * (l_new - l_old)`: exact for every optimizer but
five more tensor ops per clip variable, which on a per-channel MobileNetV2 (over 200 clip
variables) cost 0.15-0.36x a float step on 2 CPU cores (docs/benchmarks.md).

No weight decay reaches the clips: tfacd's models put their L2 decay on kernels only
(`kernel_regularizer`), the clips carry no regularizer, and an optimizer's own decoupled
weight decay (AdamW, `weight_decay=`) skips them. ACD (`tfacd.callbacks.ClipDecay`) moves
clips outside the optimizer and is not scaled.

Why: LSQ's gradient scale `g = 1 / sqrt(N n)` (`tfacd.ops`) sets the clips' step size relative
to the weights' under SGD, but Adam normalizes every variable's step to about `lr` whatever its
gradient's scale, so per-channel clips, which see few elements each, move as fast as the
weights. Published low-bit recipes train quantizer parameters at `lr / 100` (PROFIT, Park and
Yoo 2020) or `lr / 10` (N2UQ, Liu et al. 2022).
"""

from __future__ import annotations

import tensorflow as tf

from tfacd._keras import keras
from tfacd.quantizers import clip_variables

_GROUP_CLASSES: dict[type, type] = {}

# Optimizers whose update of a variable is `lr(t)` times a function of the gradients (their
# state does not depend on the learning rate, or is proportional to it, as SGD's momentum).
_LINEAR_IN_LEARNING_RATE = tuple(
    getattr(keras.optimizers, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "Nadam", "Adagrad", "Adadelta", "RMSprop",
                 "Lion")
    if hasattr(keras.optimizers, name))


def with_clip_learning_rate(optimizer, model, multiplier: float | None = None,
                            learning_rate: float | None = None):
    """A copy of `optimizer` (not yet used) whose updates of `model`'s clips are scaled.

    Args:
      optimizer: a `keras.optimizers.Optimizer` (Adam, SGD, ...; not a legacy optimizer) that
        has not taken a step yet; its configuration (learning rate or schedule, clipping) is
        copied.
      model: a model whose tfacd quantizers are built (after `quantize_model`); quantizers of
        nested trainable models count (a `tfacd.distill.Distiller`'s student).
      multiplier: `m >= 0`; 0 freezes the clips where calibration put them.
      learning_rate: the clips' learning rate at step 0 (> 0), instead of `multiplier`.

    Returns:
      The new optimizer, to pass to `model.compile`.
    """
    if (multiplier is None) == (learning_rate is None):
        raise ValueError("give exactly one of multiplier and learning_rate")
    if multiplier is not None and not float(multiplier) >= 0.0:
        raise ValueError(f"multiplier must be >= 0, got {multiplier!r}")
    if learning_rate is not None and not float(learning_rate) > 0.0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    _check_unused(optimizer)
    clips = clip_variables(model)
    if not clips:
        raise ValueError("with_clip_learning_rate found no tfacd quantizers in the model")
    if learning_rate is not None:
        scale = float(learning_rate) / initial_learning_rate(optimizer)
    else:
        scale = float(multiplier)
    return _grouped(optimizer, clips, scale)


def with_frozen_variables(optimizer, variables):
    """A copy of `optimizer` (not yet used) that never moves `variables`: their updates are
    scaled by 0 (the clip group's mechanism with `m = 0`; no weight decay reaches them) while
    every other variable trains as before. Used to train with portable requantization ratios
    in place (`tfacd.export.portable.ratio_variables`)."""
    _check_unused(optimizer)
    variables = list(variables)
    if not variables:
        raise ValueError("with_frozen_variables got no variables to freeze")
    return _grouped(optimizer, variables, 0.0)


def _grouped(optimizer, variables, scale: float):
    """A copy of `optimizer` whose updates of `variables` are scaled by `scale`."""
    grouped = _group_class(type(optimizer)).from_config(optimizer.get_config())
    grouped.clip_scale = scale
    # The optimizer's own variable keys: the same for a distributed variable and the
    # per-replica component its update step receives.
    grouped._clip_keys = frozenset(grouped._var_key(v) for v in variables)  # pylint: disable=protected-access
    return grouped


def _check_unused(optimizer):
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"tfacd's optimizer groups need a keras.optimizers.Optimizer (Adam, "
                        f"SGD, ...), got {type(optimizer).__name__}; legacy optimizers are not "
                        f"supported")
    if int(optimizer.iterations.numpy()) > 0:
        raise ValueError("tfacd's optimizer groups need an optimizer that has not taken a step "
                         "yet (its state would be lost in the copy)")


def _group_class(base: type) -> type:
    """`base` with an update step that scales the clips' updates by `clip_scale`."""
    if base in _GROUP_CLASSES:
        return _GROUP_CLASSES[base]
    if getattr(base, "_tfacd_clip_group", False):
        return base

    scale_learning_rate = issubclass(base, _LINEAR_IN_LEARNING_RATE)
    base_learning_rate = base.learning_rate      # the property, found along the MRO

    class ClipGroup(base):  # pylint: disable=too-few-public-methods
        _tfacd_clip_group = True
        clip_scale = 1.0
        _clip_keys = frozenset()
        # True while the update step of a clip variable is traced (Python state: the
        # update step is traced once per variable).
        _updating_clip = False

        @property
        def learning_rate(self):
            rate = base_learning_rate.fget(self)
            if self._updating_clip:
                return rate * self.clip_scale
            return rate

        @learning_rate.setter
        def learning_rate(self, value):
            base_learning_rate.fset(self, value)

        def update_step(self, gradient, variable):
            if self.clip_scale == 1.0 or self._var_key(variable) not in self._clip_keys:
                return super().update_step(gradient, variable)
            if scale_learning_rate:
                self._updating_clip = True
                try:
                    return super().update_step(gradient, variable)
                finally:
                    self._updating_clip = False
            before = tf.identity(variable)
            super().update_step(gradient, variable)
            return variable.assign(before + self.clip_scale * (variable - before))

        def _use_weight_decay(self, variable):
            if self._var_key(variable) in self._clip_keys:
                return False
            return super()._use_weight_decay(variable)

        def get_config(self):
            return {**super().get_config(), "clip_scale": self.clip_scale}

        @classmethod
        def from_config(cls, config, custom_objects=None):
            config = dict(config)
            scale = config.pop("clip_scale", 1.0)
            # Which variables are clips is not serializable: with_clip_learning_rate
            # registers them again for the model being trained.
            optimizer = super().from_config(config, custom_objects)
            optimizer.clip_scale = scale
            return optimizer

    ClipGroup.__name__ = ClipGroup.__qualname__ = f"ClipGroup{base.__name__}"
    _GROUP_CLASSES[base] = ClipGroup
    return ClipGroup


def initial_learning_rate(optimizer) -> float:
    """The optimizer's learning rate at step 0, for a constant rate or a schedule."""
    # The schedule itself (the public property gives the rate of the last step taken).
    rate = optimizer._learning_rate  # pylint: disable=protected-access
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        rate = rate(0)
    return float(tf.convert_to_tensor(rate).numpy())
