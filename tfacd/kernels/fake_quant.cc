// tfacd's fake quantization with learnable clips as two TensorFlow CPU kernels.
//
// The math is tfacd/ops.py's (its module docstring has the formulas): the forward pass is
// that formula evaluated in float32 op by op; the backward pass gives `dx` and the LSQ+/PACT
// clip gradients (plus the SQNR noise power's, `dnoise`). Each pass is one sweep over the
// tensor, vectorized, on every core of TensorFlow's intra-op thread pool; the XLA functions
// `_fused_forward`/`_fused_backward` in ops.py are the fallback (one thread, 2-3x slower).
//
// Layout: `x` is `[rows, C]` (channel last). Clips are one value (per tensor) or `C` values
// (per channel). Per-column sums (min/max, clip gradients, signal and noise powers) are
// taken in float32 per block of rows, then the blocks are combined in double, in block
// order: the result does not depend on how the blocks were spread over threads.
//
// `input_min`/`input_max` fuse a ReLU/ReLU6 that feeds the quantizer: the kernels then read
// the ReLU's *input* `x`, quantize `clamp(x, input_min, input_max)` and let the gradient
// through where `input_min < x < input_max`, exactly what the ReLU op and its gradient op
// would do, without their two extra sweeps over the tensor. (-inf, inf): no ReLU.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfacd {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::InferenceContext;

// One column's grid: q(v) = (floor((clip(v, lo, hi) - lo) * inv + 0.5) - zero_point) * scale,
// or, for a symmetric grid, floor(clip(v, lo, hi) * inv + 0.5) * scale.
struct Grid {
  std::vector<float> lo, hi, scale, inv, zero_point, range, inv_range;
};

Grid MakeGrid(const Tensor& lower, const Tensor& upper, int64_t columns, float levels,
              bool integer_zero_point, bool symmetric_step) {
  Grid g;
  for (auto* v : {&g.lo, &g.hi, &g.scale, &g.inv, &g.zero_point, &g.range, &g.inv_range})
    v->resize(columns);
  const auto l = lower.flat<float>();
  const auto u = upper.flat<float>();
  const bool shared = l.size() == 1;
  const float limit = (levels - 1.0f) * 0.5f;
  for (int64_t c = 0; c < columns; ++c) {
    const float lo = l(shared ? 0 : c), hi = u(shared ? 0 : c);
    g.lo[c] = lo;
    g.hi[c] = hi;
    if (symmetric_step) {
      // The clip that sets the step gets the rounding term: `range` holds max(|l|, |u|).
      g.range[c] = std::max(std::fabs(lo), std::fabs(hi));
      g.scale[c] = g.range[c] / limit;
      g.zero_point[c] = 0.0f;
    } else {
      g.range[c] = hi - lo;
      g.scale[c] = (hi - lo) / levels;
      const float z = -lo / g.scale[c];
      g.zero_point[c] = integer_zero_point ? std::nearbyint(z) : z;  // ties to even, as tf.round
    }
    g.inv[c] = 1.0f / g.scale[c];
    g.inv_range[c] = 1.0f / g.range[c];
  }
  return g;
}



// q of a value already clipped to [lo, hi] (the formula of the file comment, per column).
template <bool kSymmetric>
inline float OnGrid(float clipped, float lo, float inv, float scale, float zero_point) {
  return kSymmetric ? std::floor(clipped * inv + 0.5f) * scale
                    : (std::floor((clipped - lo) * inv + 0.5f) - zero_point) * scale;
}

// Branch-free min/max on values (std::min/max return references, which keeps GCC from
// vectorizing the column loops).
inline float Min(float a, float b) { return b < a ? b : a; }
inline float Max(float a, float b) { return a < b ? b : a; }

Status CheckInputs(const Tensor& x, const Tensor& lower, const Tensor& upper) {
  if (x.dims() != 2) return InvalidArgument("x must be [rows, C], got ", x.shape().DebugString());
  const int64_t columns = x.dim_size(1);
  for (const Tensor* clip : {&lower, &upper}) {
    if (clip->NumElements() != 1 && clip->NumElements() != columns)
      return InvalidArgument("clips must have 1 or ", columns, " values, got ",
                             clip->shape().DebugString());
  }
  if (lower.NumElements() != upper.NumElements())
    return InvalidArgument("lower and upper clips differ in size");
  return Status();
}

// Rows per block: each block sums its columns in float32 on its own (a few hundred rows,
// so no precision is lost that matters); blocks are then added in double.
int64_t BlockRows(int64_t columns) {
  return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(columns, 1));
}

int64_t NumBlocks(int64_t rows, int64_t columns) {
  const int64_t block = BlockRows(columns);
  return std::max<int64_t>(1, (rows + block - 1) / block);
}

// Runs `work(first_row, end_row, block)` for every block of rows on the intra-op pool.
template <typename Work>
void ForBlocks(OpKernelContext* context, int64_t rows, int64_t columns, const Work& work) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  const int64_t block = BlockRows(columns);
  tensorflow::Shard(workers.num_threads, workers.workers, NumBlocks(rows, columns),
                    block * columns * 20, [&](int64_t begin, int64_t end) {
                      for (int64_t b = begin; b < end; ++b)
                        work(b * block, std::min(rows, (b + 1) * block), b);
                    });
}

// One sweep of the forward pass over rows [r0, r1): q, and per column min, max and (with
// kNoise) the signal and noise powers. Written so that the compiler vectorizes the column
// loop: compile-time switches, no aliasing, branch-free selects.
template <bool kSymmetric, bool kNoise>
void ForwardRows(const float* __restrict xs, float* __restrict qs, int64_t r0, int64_t r1,
                 int64_t columns, const Grid& g, float input_min, float input_max,
                 float* __restrict mn, float* __restrict mx, float* __restrict sg,
                 float* __restrict ns) {
  const float* __restrict lo = g.lo.data();
  const float* __restrict hi = g.hi.data();
  const float* __restrict scale = g.scale.data();
  const float* __restrict inv = g.inv.data();
  const float* __restrict zp = g.zero_point.data();
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict xr = xs + r * columns;
    float* __restrict qr = qs + r * columns;
    for (int64_t c = 0; c < columns; ++c) {
      const float v = Min(Max(xr[c], input_min), input_max);   // the fused ReLU, if any
      const float clipped = Min(Max(v, lo[c]), hi[c]);
      const float qv = OnGrid<kSymmetric>(clipped, lo[c], inv[c], scale[c], zp[c]);
      qr[c] = qv;
      mn[c] = Min(mn[c], v);
      mx[c] = Max(mx[c], v);
      if (kNoise) {
        const float e = v - qv;
        sg[c] += v * v;
        ns[c] += e * e;
      }
    }
  }
}

// One sweep of the backward pass over rows [r0, r1): dx, and per column the clip gradients.
// `to_lower`/`to_upper` weight the LSQ+ rounding term per column (0 for PACT; for a
// symmetric grid only the clip that sets the step gets it).
template <bool kSymmetric>
void BackwardRows(const float* __restrict xs, const float* __restrict dqs,
                  float* __restrict dxs, int64_t r0, int64_t r1, int64_t columns,
                  const Grid& g, float input_min, float input_max,
                  const float* __restrict two_dnoise,
                  const float* __restrict to_lower, const float* __restrict to_upper,
                  float* __restrict dl, float* __restrict du) {
  const float* __restrict lo = g.lo.data();
  const float* __restrict hi = g.hi.data();
  const float* __restrict scale = g.scale.data();
  const float* __restrict inv = g.inv.data();
  const float* __restrict zp = g.zero_point.data();
  const float* __restrict inv_range = g.inv_range.data();
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict xr = xs + r * columns;
    const float* __restrict gr = dqs + r * columns;
    float* __restrict dr = dxs + r * columns;
    for (int64_t c = 0; c < columns; ++c) {
      const float d = gr[c];
      const float v = Min(Max(xr[c], input_min), input_max);   // the fused ReLU, if any
      // The ReLU's own gradient: it passes where input_min < x < input_max (TF's ReluGrad
      // and Relu6Grad). Without a fused ReLU the bounds are infinite and it always passes.
      const bool relu_passes = input_min < xr[c] && xr[c] < input_max;
      const float clipped = Min(Max(v, lo[c]), hi[c]);
      const float qv = OnGrid<kSymmetric>(clipped, lo[c], inv[c], scale[c], zp[c]);
      const bool below = v < lo[c], above = v > hi[c];
      const bool inside = !(below || above);
      dr[c] = inside && relu_passes ? d : 0.0f;
      // d(sum (x - q)^2)/dq = -2 (x - q): the noise power's gradient, clips only.
      const float dclip = d - two_dnoise[c] * (v - qv);
      const float rounding = inside ? dclip * (qv - v) * inv_range[c] : 0.0f;
      dl[c] += (below ? dclip : 0.0f) - rounding * to_lower[c];
      du[c] += (above ? dclip : 0.0f) + rounding * to_upper[c];
    }
  }
}

// The attributes both ops share: the grid and the fused ReLU's bounds.
class FakeQuantOp : public OpKernel {
 public:
  explicit FakeQuantOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("levels", &levels_));
    OP_REQUIRES_OK(context, context->GetAttr("integer_zero_point", &integer_zero_point_));
    OP_REQUIRES_OK(context, context->GetAttr("symmetric_step", &symmetric_step_));
    OP_REQUIRES_OK(context, context->GetAttr("input_min", &input_min_));
    OP_REQUIRES_OK(context, context->GetAttr("input_max", &input_max_));
  }

 protected:
  Grid GridOf(const Tensor& lower, const Tensor& upper, int64_t columns) const {
    return MakeGrid(lower, upper, columns, levels_, integer_zero_point_, symmetric_step_);
  }

  float levels_, input_min_, input_max_;
  bool integer_zero_point_, symmetric_step_;
};

class ForwardOp : public FakeQuantOp {
 public:
  explicit ForwardOp(OpKernelConstruction* context) : FakeQuantOp(context) {
    OP_REQUIRES_OK(context, context->GetAttr("with_noise", &with_noise_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& lower = context->input(1);
    const Tensor& upper = context->input(2);
    OP_REQUIRES_OK(context, CheckInputs(x, lower, upper));
    const int64_t rows = x.dim_size(0), columns = x.dim_size(1);
    const Grid g = GridOf(lower, upper, columns);
    Tensor *q, *data_min, *data_max, *signal, *noise;
    const TensorShape powers({with_noise_ ? columns : 0});
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &q));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({columns}), &data_min));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({columns}), &data_max));
    OP_REQUIRES_OK(context, context->allocate_output(3, powers, &signal));
    OP_REQUIRES_OK(context, context->allocate_output(4, powers, &noise));

    const int64_t blocks = NumBlocks(rows, columns);
    std::vector<float> mins(blocks * columns, std::numeric_limits<float>::infinity());
    std::vector<float> maxs(blocks * columns, -std::numeric_limits<float>::infinity());
    std::vector<float> sig(blocks * columns, 0.0f), noi(blocks * columns, 0.0f);
    const float* xs = x.flat<float>().data();
    float* qs = q->flat<float>().data();
    const bool symmetric = symmetric_step_, noisy = with_noise_;
    const float lo_in = input_min_, hi_in = input_max_;
    const auto sweep = symmetric ? (noisy ? ForwardRows<true, true> : ForwardRows<true, false>)
                                 : (noisy ? ForwardRows<false, true> : ForwardRows<false, false>);
    ForBlocks(context, rows, columns, [&](int64_t r0, int64_t r1, int64_t b) {
      const int64_t at = b * columns;
      sweep(xs, qs, r0, r1, columns, g, lo_in, hi_in, &mins[at], &maxs[at], &sig[at], &noi[at]);
    });
    auto out_min = data_min->flat<float>();
    auto out_max = data_max->flat<float>();
    for (int64_t c = 0; c < columns; ++c) {
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
      double sg = 0.0, ns = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        mn = std::min(mn, mins[b * columns + c]);
        mx = std::max(mx, maxs[b * columns + c]);
        sg += sig[b * columns + c];
        ns += noi[b * columns + c];
      }
      out_min(c) = mn;
      out_max(c) = mx;
      if (with_noise_) {
        signal->flat<float>()(c) = static_cast<float>(sg);
        noise->flat<float>()(c) = static_cast<float>(ns);
      }
    }
  }

 private:
  bool with_noise_;
};

class BackwardOp : public FakeQuantOp {
 public:
  explicit BackwardOp(OpKernelConstruction* context) : FakeQuantOp(context) {
    OP_REQUIRES_OK(context, context->GetAttr("lsq", &lsq_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& x = context->input(0);
    const Tensor& dq = context->input(1);
    const Tensor& dnoise = context->input(2);
    const Tensor& lower = context->input(3);
    const Tensor& upper = context->input(4);
    OP_REQUIRES_OK(context, CheckInputs(x, lower, upper));
    OP_REQUIRES(context, dq.shape() == x.shape(),
                InvalidArgument("dq must have x's shape ", x.shape().DebugString()));
    const int64_t rows = x.dim_size(0), columns = x.dim_size(1);
    OP_REQUIRES(context, dnoise.NumElements() == 1 || dnoise.NumElements() == columns,
                InvalidArgument("dnoise must have 1 or ", columns, " values"));
    const Grid g = GridOf(lower, upper, columns);
    std::vector<float> two_dnoise(columns), to_lower(columns), to_upper(columns);
    const auto dn = dnoise.flat<float>();
    for (int64_t c = 0; c < columns; ++c) {
      two_dnoise[c] = 2.0f * dn(dn.size() == 1 ? 0 : c);
      const bool upper_sets_step = g.hi[c] >= -g.lo[c];
      to_lower[c] = !lsq_ ? 0.0f : symmetric_step_ ? (upper_sets_step ? 0.0f : 1.0f) : 1.0f;
      to_upper[c] = !lsq_ ? 0.0f : symmetric_step_ ? (upper_sets_step ? 1.0f : 0.0f) : 1.0f;
    }
    Tensor *dx, *dl, *du;
    OP_REQUIRES_OK(context, context->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({columns}), &dl));
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({columns}), &du));
    const int64_t blocks = NumBlocks(rows, columns);
    std::vector<float> dls(blocks * columns, 0.0f), dus(blocks * columns, 0.0f);
    const float* xs = x.flat<float>().data();
    const float* dqs = dq.flat<float>().data();
    float* dxs = dx->flat<float>().data();
    const bool symmetric = symmetric_step_;
    const float lo_in = input_min_, hi_in = input_max_;
    const auto sweep = symmetric ? BackwardRows<true> : BackwardRows<false>;
    ForBlocks(context, rows, columns, [&](int64_t r0, int64_t r1, int64_t b) {
      const int64_t at = b * columns;
      sweep(xs, dqs, dxs, r0, r1, columns, g, lo_in, hi_in, two_dnoise.data(), to_lower.data(),
            to_upper.data(), &dls[at], &dus[at]);
    });
    auto out_l = dl->flat<float>();
    auto out_u = du->flat<float>();
    for (int64_t c = 0; c < columns; ++c) {
      double sl = 0.0, su = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        sl += dls[b * columns + c];
        su += dus[b * columns + c];
      }
      out_l(c) = static_cast<float>(sl);
      out_u(c) = static_cast<float>(su);
    }
  }

 private:
  bool lsq_;
};

Status ForwardShape(InferenceContext* c) {
  bool with_noise;
  TF_RETURN_IF_ERROR(c->GetAttr("with_noise", &with_noise));
  auto columns = c->Dim(c->input(0), 1);
  c->set_output(0, c->input(0));
  c->set_output(1, c->Vector(columns));
  c->set_output(2, c->Vector(columns));
  c->set_output(3, c->Vector(with_noise ? columns : c->MakeDim(0)));
  c->set_output(4, c->Vector(with_noise ? columns : c->MakeDim(0)));
  return Status();
}

Status BackwardShape(InferenceContext* c) {
  auto columns = c->Dim(c->input(0), 1);
  c->set_output(0, c->input(0));
  c->set_output(1, c->Vector(columns));
  c->set_output(2, c->Vector(columns));
  return Status();
}

REGISTER_OP("TfacdFakeQuantForward")
    .Input("x: float")
    .Input("lower: float")
    .Input("upper: float")
    .Output("q: float")
    .Output("data_min: float")
    .Output("data_max: float")
    .Output("signal: float")
    .Output("noise: float")
    .Attr("levels: float")
    .Attr("integer_zero_point: bool")
    .Attr("symmetric_step: bool")
    .Attr("with_noise: bool")
    .Attr("input_min: float")
    .Attr("input_max: float")
    .SetShapeFn(ForwardShape);

REGISTER_OP("TfacdFakeQuantBackward")
    .Input("x: float")
    .Input("dq: float")
    .Input("dnoise: float")
    .Input("lower: float")
    .Input("upper: float")
    .Output("dx: float")
    .Output("dlower: float")
    .Output("dupper: float")
    .Attr("levels: float")
    .Attr("integer_zero_point: bool")
    .Attr("symmetric_step: bool")
    .Attr("lsq: bool")
    .Attr("input_min: float")
    .Attr("input_max: float")
    .SetShapeFn(BackwardShape);

REGISTER_KERNEL_BUILDER(Name("TfacdFakeQuantForward").Device(DEVICE_CPU), ForwardOp);
REGISTER_KERNEL_BUILDER(Name("TfacdFakeQuantBackward").Device(DEVICE_CPU), BackwardOp);

}  // namespace tfacd
