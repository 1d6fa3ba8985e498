"""One-off diagnostic: what 8-bit weights on level -128 do.

    PYTHONPATH=. python scripts/diagnostics/clamp_effect.py RUNS/c10_w2a2_pl_s0

Sets the first and last layers' weights whose 8-bit index is outside [-127, 127] to +-127 in
the Keras model (what the export did to them while 8-bit weights had an asymmetric grid),
then prints, per quantized activation, the fraction of values that Keras and the baked graph
round differently. On a per-layer W2A2 run trained while 8-bit weights had an asymmetric
grid: 3 weights changed, top-1 agreement of the two 0.99 (0.71 without the change). Since
8-bit weights train on int8's symmetric grid (`symmetric_step`), nothing is outside
[-127, 127]: the script prints 0 clamped and measures Keras vs the baked graph as they are.
"""
import sys, pathlib, numpy as np, tensorflow as tf
from tfacd import train, export, ops
from tfacd._keras import keras
from tfacd.quantizers import effective_clips
model, splits, _ = train._rebuild(pathlib.Path(sys.argv[1]), "--model_dir")
for name in ("quant_stem_conv", "quant_logits"):
    layer = model.get_layer(name)
    entries = export.weights._weight_quantizers(layer)
    (attr, (kernel, quantizer, variables)), = entries.items()
    lower, upper = effective_clips(quantizer, variables)
    step = np.asarray(ops.grid_step(lower, upper, quantizer.num_bits, quantizer.symmetric_step))
    q = ops.quantize_forward(kernel, lower, upper, quantizer.num_bits, quantizer.axis % kernel.shape.rank).numpy()
    ints = np.round(q / step)
    bad = np.abs(ints) > 127
    print(name, "clamped", bad.sum())
    k = kernel.numpy(); k[bad] = (np.sign(ints) * 127 * np.broadcast_to(step, k.shape))[bad]
    kernel.assign(k)
pixels = splits.x_val[:100].astype(np.float32)
x = ((pixels - splits.mean) / splits.std).astype(np.float32)
b = export.bake(model, splits.mean, splits.std, "clamp", taps=True)
t = b.function(tf.constant(pixels))
plans = {p.name: p for p in b.activations}
names = [l.name for l in model.layers if l.name in plans]
outs = keras.Model(model.inputs, [model.get_layer(n).output for n in names])(x, training=False)
for n, o in zip(names, outs):
    p = plans[n]; s = np.reshape((p.upper - p.lower) / (2 ** p.bits - 1), -1)
    d = np.abs(o.numpy() - t[n].numpy()) / s
    print(f"{n:40s} {np.mean(d > 0.1):.5f} {d.max():.2f}")
full = export.bake(model, splits.mean, splits.std, "clamp")
kl = model(x, training=False).numpy(); bl = full.function(tf.constant(pixels)).numpy()
print("agreement keras vs baked", np.mean(kl.argmax(1) == bl.argmax(1)), np.abs(kl - bl).max())
