"""One-off diagnostic: the first depthwise layer of a W2A2 run's
TFLite file, recomputed from its int8 tensors, against the baked graph.

    PYTHONPATH=. python scripts/diagnostics/depthwise_bias.py RUNS/c10_w2a2_pl_s0

Reads the run's model.tflite with the reference kernels and all tensors kept, and prints the
layer's input/output quantization, how its int32 bias (times its scale) differs from the
baked graph's float bias, and where the two outputs differ. On the file exported before the
bias fix it showed the bias off by up to 0.25 (output step 0.95): int32 bias values of
-1..4 on a grid of s_in * s_w (docs/export.md).
"""
import sys, pathlib, re, numpy as np, tensorflow as tf
from tfacd import train, export
model, splits, _ = train._rebuild(pathlib.Path(sys.argv[1]), "--model_dir")
pixels = splits.x_val[:20].astype(np.float32)
b = export.bake(model, splits.mean, splits.std, "clamp", taps=True)
taps = {k: v.numpy() for k, v in b.function(tf.constant(pixels)).items()}
content = (pathlib.Path(sys.argv[1]) / "model.tflite").read_bytes()
from ai_edge_litert.interpreter import Interpreter, OpResolverType
it = Interpreter(model_content=content, experimental_preserve_all_tensors=True,
                 experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
d = it.get_input_details()[0]
it.resize_tensor_input(d["index"], pixels.shape); it.allocate_tensors()
it.set_tensor(d["index"], export.runtime._to_input(pixels, it.get_input_details()[0])); it.invoke()
ops = it._get_ops_details()
for op in ops:
    outs = [it._get_tensor_details(i, 0) if False else None for i in op["outputs"]]
    names = [t["name"] for t in it.get_tensor_details() if t["index"] in op["outputs"]]
    if "block0_depthwise" in " ".join(names) and op["op_name"] == "DEPTHWISE_CONV_2D":
        dw = op; break
det = {t["index"]: t for t in it.get_tensor_details()}
inp, w, bias = (det[i] for i in dw["inputs"]); out = det[dw["outputs"][0]]
print("in", inp["name"][:60], inp["quantization"]); print("out", out["name"][:60], out["quantization"])
x = it.get_tensor(inp["index"]).astype(np.float64); W = it.get_tensor(w["index"]).astype(np.float64); B = it.get_tensor(bias["index"]).astype(np.float64)
y = it.get_tensor(out["index"]).astype(np.float64)
s_in, z_in = inp["quantization"]; s_out, z_out = out["quantization"]
ws = w["quantization_parameters"]["scales"]; bs = bias["quantization_parameters"]["scales"]
print("w shape", W.shape, "zero points w", set(w["quantization_parameters"]["zero_points"]), "bias scales vs s_in*ws", np.abs(bs - s_in*ws).max()/bs.max())
xin = x - z_in
acc = tf.nn.depthwise_conv2d(xin[None][0] if False else xin, np.transpose(W, (1,2,3,0)).reshape(3,3,-1,1), (1,1,1,1), "SAME").numpy() + B
real = acc * s_in * ws
expect = np.clip(np.floor(real / s_out + 0.5) + z_out, -128, 127)
print("tflite vs numpy-int-exact: frac differ", np.mean(expect != y), "max", np.abs(expect - y).max())
# vs baked graph tap (dequantized)
deq = (y - z_out) * s_out
print("tflite vs baked", np.mean(np.abs(deq - taps["quant_block0_depthwise_relu"]) > 0.1 * 0.3))
bk = taps["quant_block0_depthwise_relu"]
ex = (expect - z_out) * s_out
print("numpy-exact vs baked frac", np.mean(np.abs(ex - bk) > 1e-3))
# real-valued pre-quant from baked weights for flipped positions
flip = np.argwhere(np.abs(deq - bk) > 1e-3)[:5]
for f in flip:
    f = tuple(f); print(f, "real/s_out", real[f]/s_out, "tfl", y[f]-z_out, "baked", bk[f]/s_out)
print("---")
expect2 = np.clip(np.floor(real / s_out + 0.5) + z_out, z_out, 127)
print("with relu clamp: tflite vs numpy", np.mean(expect2 != y), "interior", np.mean(expect2[:,1:-1,1:-1] != y[:,1:-1,1:-1]))
print("numpy vs baked", np.mean(np.abs((expect2 - z_out)*s_out - bk) > 1e-3))
# baked weights for this layer
bw = b.weights["quant_block0_depthwise"]
print("baked ints == tflite ints", np.array_equal(bw.integers.reshape(-1), np.transpose(W,(1,2,3,0)).reshape(-1)), "step rel diff", np.abs(bw.step - ws).max()/ws.max())
print("baked bias vs tflite bias*scale", np.abs(bw.bias - B*bs).max(), np.abs(bw.bias).max())
np.set_printoptions(precision=4, suppress=True, linewidth=200)
print("baked bias ", bw.bias)
print("tflite bias", B * bs)
print("B ints", B)
print("baked shift in steps", bw.bias / bs)
