"""SQNR: the metric, the loss, and measuring it on a model.

Per quantizer and channel, `SQNR_c = 10 log10(sum x^2 / (sum (x - q(x))^2 + eps))` dB (see
`tfacd.ops.sqnr_db_per_channel`), averaged over channels, then over quantizers.

* Loss: `QuantizeScheme(sqnr_weight=w)` makes every quantizer add
  `-(w / num_quantizers) * SQNR_q` with `add_loss` in training, i.e. `-w * mean SQNR` in
  total. Its gradient reaches only the clips (through the LSQ+ rounding term). `set_loss_weight`
  changes `w` on an existing model (recompile afterwards).
* Metric: `measure` / `mean_sqnr` evaluate a model on a batch; `SQNRMonitor` puts
  `mean_sqnr_db` (and per-kind means) into the epoch logs, so `model.fit`'s history and a
  TensorBoard callback placed after it show it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfacd import ops
from tfacd._keras import keras
from tfacd.quantizers import iter_quantizers, recording_sqnr

sqnr_db_per_channel = ops.sqnr_db_per_channel
mean_sqnr_db = ops.mean_sqnr_db


def measure(model, x) -> dict[str, float]:
    """Mean SQNR (dB) of every quantizer on the inference pass of batch `x`.

    Keys are `"<layer>/<tensor>"` (`tensor` is "kernel", "output", "input", ...).
    """
    with recording_sqnr():
        model(tf.convert_to_tensor(x), training=False)
    return {f"{layer.name}/{tensor}": float(variables["sqnr_db"].numpy())
            for layer, tensor, _, variables in iter_quantizers(model)}


def mean_sqnr(model, x) -> float:
    """Mean over all quantizers of `measure(model, x)`."""
    values = list(measure(model, x).values())
    return float(np.mean(values)) if values else float("nan")


def set_loss_weight(model, sqnr_weight: float) -> int:
    """Sets the SQNR loss to `-sqnr_weight * mean SQNR` over all quantizers of `model`.

    Takes effect when the training function is next traced: recompile the model. Returns the
    number of quantizers.
    """
    if not float(sqnr_weight) >= 0:
        raise ValueError(f"sqnr_weight must be >= 0, got {sqnr_weight!r}")
    quantizers = [q for _, _, q, _ in iter_quantizers(model)]
    for quantizer in quantizers:
        quantizer.sqnr_loss_weight = float(sqnr_weight) / len(quantizers)
    return len(quantizers)


class SQNRMonitor(keras.callbacks.Callback):
    """Adds `mean_sqnr_db`, `weight_sqnr_db` and `activation_sqnr_db` to each epoch's logs.

    Measured by `measure` on a fixed batch `x` (inference pass). Place it before a
    TensorBoard callback in the callback list so TensorBoard sees the values.
    """

    def __init__(self, x, prefix: str = ""):
        super().__init__()
        self._x = tf.convert_to_tensor(x)
        self._prefix = prefix
        self.last = {}

    def on_epoch_end(self, epoch, logs=None):
        values = measure(self.model, self._x)
        kinds = {f"{layer.name}/{tensor}": q.kind
                 for layer, tensor, q, _ in iter_quantizers(self.model)}
        summary = {"mean_sqnr_db": float(np.mean(list(values.values())))}
        for kind in ("weight", "activation"):
            picked = [v for k, v in values.items() if kinds[k] == kind]
            if picked:
                summary[f"{kind}_sqnr_db"] = float(np.mean(picked))
        self.last = values
        if logs is not None:
            logs.update({self._prefix + k: v for k, v in summary.items()})
