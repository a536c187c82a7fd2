// powergrad's tampered cross-entropy on the CPU as one C++ autograd op (float and double), for
// powergrad/kernels.py: F.cross_entropy's forward (its own ops, to the last bit), and a backward
// that is one fused pass per row. tamper.py's module docstring derives the gradient; per row n:
//
//     grad[n, :] = s_n * (m_n * softmax(alpha * log_p[n, :]) - u_n)
//
//   class index y:      u = (1 - e) onehot(y) + e / C,   m = 1   (an ignored row: all zero)
//   distribution q:     u = (1 - e) q + e / C,           m = (1 - e) sum(q) + e
//
// with e the label smoothing and s_n the reduction's factor: the incoming gradient (of row n for
// "none"), divided for "mean" by the number of counted rows (index) or of rows (distribution).
// Unweighted (N, C) input only: tamper.py's autograd.Function does the rest (class weights,
// (N, C, d...) input, GPUs) with PyTorch's ops, and is what this op is tested against.
//
// Why: PyTorch's ops make four trips through memory over the (N, C) array for this backward (the
// alpha scaling, softmax's two, the row scale); here each row comes from memory once and is
// finished while it sits in the L1 cache. And no Python runs in the step: a Python
// autograd.Function's fixed cost is most of cross-entropy's whole backward on small inputs.
// Measured in benchmarks/loss.py (docs/performance.md).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Reduction.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <string_view>

namespace {

using at::vec::Vectorized;

// row <- exp(alpha * row - shift), returning the row's new sum: row / sum = softmax(alpha * row).
// One pass: each term is summed as it is written. The row is a log-softmax (max >= -log C, all
// <= 0), so for alpha <= 1 no term overflows and the largest is at least 1 / C: no shift. For
// alpha > 1 the shift is alpha * max, so that the terms cannot all underflow.
template <typename T>
T exp_alpha_(T* row, int64_t c, T alpha) {
  using V = Vectorized<T>;
  T shift = 0;
  if (alpha > T(1)) {
    shift = alpha * at::vec::reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, row, c);
  }
  const V a(alpha), b(shift);
  V sum(T(0));
  int64_t d = 0;
  for (; d + V::size() <= c; d += V::size()) {
    const V e = (V::loadu(row + d) * a - b).exp_u20();  // PyTorch's softmax uses exp_u20 too
    e.store(row + d);
    sum = sum + e;
  }
  if (d < c) {  // the tail: lanes past the row's end must add nothing
    const V e = V::set(V(T(0)), (V::loadu(row + d, c - d) * a - b).exp_u20(), c - d);
    e.store(row + d, c - d);
    sum = sum + e;
  }
  return at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, sum);
}

// sum(x[0:c]): vectorised (a scalar loop over 1000 classes is a 4-cycle add chain per element:
// it made the distribution-target kernel 5x slower), scalar for a row shorter than one vector.
template <typename T>
T row_sum(const T* x, int64_t c) {
  using V = Vectorized<T>;
  if (c < V::size()) return std::accumulate(x, x + c, T(0));
  return at::vec::reduce_all<T>([](V& a, V& b) { return a + b; }, x, c);
}

// Rows [begin, end) of x through exp_alpha_, each then handed to finish(i, row, sum). Rows
// shorter than one vector (CIFAR-10's 10 classes) would be all tail, so for alpha <= 1 (no
// shift) their exp runs as one flat pass over the block and the rest in scalar code.
template <typename T, typename Finish>
void for_each_row(T* x, int64_t c, T alpha, int64_t begin, int64_t end, const Finish& finish) {
  using V = Vectorized<T>;
  if (c < V::size() && alpha <= T(1)) {
    T* block = x + begin * c;
    at::vec::map([alpha](V v) { return (v * V(alpha)).exp_u20(); }, block, block, (end - begin) * c);
    for (int64_t i = begin; i < end; ++i) {
      T* row = x + i * c;
      finish(i, row, row_sum(row, c));
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    T* row = x + i * c;
    finish(i, row, exp_alpha_(row, c, alpha));
  }
}

// row <- row * k - off (vectorised, or scalar for a row shorter than one vector)
template <typename T>
void scale_shift_(T* row, int64_t c, T k, T off) {
  using V = Vectorized<T>;
  if (c < V::size()) {
    for (int64_t j = 0; j < c; ++j) row[j] = row[j] * k - off;
  } else {
    at::vec::map([k, off](V x) { return x * V(k) - V(off); }, row, row, c);
  }
}

template <typename T>
void index_target_rows(T* grad, const int64_t* y, const T* s, bool per_row, T div, T alpha,
                       T ls, int64_t ignore, int64_t c, int64_t begin, int64_t end) {
  for_each_row(grad, c, alpha, begin, end, [&](int64_t i, T* row, T sum) {
    if (y[i] == ignore) {
      std::fill(row, row + c, T(0));
      return;
    }
    TORCH_CHECK(y[i] >= 0 && y[i] < c, "Target ", y[i], " is out of bounds.");
    const T si = (per_row ? s[i] : s[0]) / div;
    scale_shift_(row, c, si / sum, si * ls / T(c));
    row[y[i]] -= si * (T(1) - ls);
  });
}

template <typename T>
void prob_target_rows(T* grad, const T* q, const T* s, bool per_row, T div, T alpha, T ls,
                      int64_t c, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  for_each_row(grad, c, alpha, begin, end, [&](int64_t i, T* row, T sum) {
    const T* qi = q + i * c;
    const T si = (per_row ? s[i] : s[0]) / div;
    const T m = (T(1) - ls) * row_sum(qi, c) + ls;
    const T k = si * m / sum, kq = si * (T(1) - ls), off = si * ls / T(c);
    if (c < V::size()) {
      for (int64_t j = 0; j < c; ++j) row[j] = row[j] * k - qi[j] * kq - off;
    } else {
      at::vec::map2([k, kq, off](V e, V qv) { return e * V(k) - qv * V(kq) - V(off); }, row, row,
                    qi, c);
    }
  });
}

// Writes the gradient over log_p (the forward's log_softmax(z, 1), which nothing else reads).
void tampered_gradient_(at::Tensor& log_p, const at::Tensor& target, const at::Tensor& grad_out,
                        double alpha, double label_smoothing, int64_t reduction,
                        int64_t ignore_index) {
  const int64_t n = log_p.size(0), c = log_p.size(1);
  const bool soft = target.is_floating_point();
  const auto t = soft ? target.to(log_p.scalar_type()).contiguous() : target.contiguous();
  const auto g = grad_out.to(log_p.scalar_type()).contiguous();
  const bool per_row = reduction == at::Reduction::None;
  if (alpha == 0) {
    // The limit alpha -> 0+: uniform over the classes whose logit is finite (0 * -inf is NaN;
    // a masked class stays at 0, as for any alpha > 0). exp(1 * 0) = 1, exp(-inf) = 0.
    log_p.masked_fill_(log_p > -std::numeric_limits<double>::infinity(), 0.0);
    alpha = 1;
  }
  int64_t div = 1;  // "mean": the rows counted (at least 1: no counted row gives a zero gradient)
  if (reduction == at::Reduction::Mean) {
    div = n;
    if (!soft) {
      const int64_t* y = t.data_ptr<int64_t>();
      div = std::max<int64_t>(1, n - std::count(y, y + n, ignore_index));
    }
  }
  // Enough rows per task for about 32k elements: small inputs stay on one thread.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(c, 1));
  AT_DISPATCH_FLOATING_TYPES(log_p.scalar_type(), "tampered_gradient_", [&] {
    scalar_t* out = log_p.data_ptr<scalar_t>();
    const scalar_t* s = g.data_ptr<scalar_t>();
    const auto a = static_cast<scalar_t>(alpha), ls = static_cast<scalar_t>(label_smoothing);
    const auto d = static_cast<scalar_t>(div);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      if (soft) {
        prob_target_rows(out, t.data_ptr<scalar_t>(), s, per_row, d, a, ls, c, begin, end);
      } else {
        index_target_rows(out, t.data_ptr<int64_t>(), s, per_row, d, a, ls, ignore_index, c,
                          begin, end);
      }
    });
  });
}

// F.cross_entropy(z, ...) from log_p = log_softmax(z, 1), to the last bit: PyTorch's own ops in
// PyTorch's order (aten/src/ATen/native/LossNLL.cpp), unweighted; tamper.py's
// _cross_entropy_from_log_probs is the same in Python (with class weights), and the tests compare
// both with F.cross_entropy by torch.equal.
at::Tensor cross_entropy_from_log_probs(const at::Tensor& log_p, const at::Tensor& t, double ls,
                                        int64_t reduction, int64_t ignore_index) {
  const int64_t c = log_p.size(1);
  if (t.is_floating_point()) {  // class probabilities
    const auto terms = log_p * (ls > 0 ? t * (1 - ls) + ls / c : t);
    if (reduction == at::Reduction::None) return -terms.sum(1);
    if (reduction == at::Reduction::Sum) return -terms.sum();
    return -terms.sum() / (log_p.numel() / c);
  }
  const auto nll = at::nll_loss(log_p, t, {}, reduction, ignore_index);
  if (ls == 0) return nll;
  auto smooth = -log_p.sum(1);
  const auto ignored = t == ignore_index;
  smooth.masked_fill_(ignored, 0.0);
  if (reduction == at::Reduction::Mean) {
    smooth = smooth.sum() / (~ignored).sum();
  } else if (reduction == at::Reduction::Sum) {
    smooth = smooth.sum();
  }
  return nll * (1 - ls) + smooth * (ls / c);
}

}  // namespace

namespace powergrad {

// The loss as one C++ autograd node: no Python in the step.
struct TamperedCrossEntropy : public torch::autograd::Function<TamperedCrossEntropy> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& target, double alpha, double ls, int64_t reduction,
                            int64_t ignore_index) {
    const auto log_p = at::log_softmax(logits, 1);
    // Kept for the backward to write over, as cross-entropy's autograd keeps its log-softmax;
    // not saved (a saved tensor may not be modified): a second backward (retain_graph) finds it
    // gone and recomputes it from the logits.
    ctx->saved_data["log_p"] = log_p;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["ls"] = ls;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->save_for_backward({logits, target});
    return cross_entropy_from_log_probs(log_p, target, ls, reduction, ignore_index);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    // The tampered backward is not the gradient of the forward, and has none of its own.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "power_grad_cross_entropy has no second derivative: backward with "
                "create_graph=True is not supported");
    const auto saved = ctx->get_saved_variables();
    auto log_p = ctx->saved_data["log_p"];
    ctx->saved_data["log_p"] = c10::IValue();
    at::Tensor grad = log_p.isTensor() ? log_p.toTensor().contiguous() : at::Tensor();
    if (!grad.defined()) grad = at::log_softmax(saved[0], 1).contiguous();
    tampered_gradient_(grad, saved[1], grad_out[0], ctx->saved_data["alpha"].toDouble(),
                       ctx->saved_data["ls"].toDouble(), ctx->saved_data["reduction"].toInt(),
                       ctx->saved_data["ignore_index"].toInt());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace powergrad

namespace {

int64_t reduction_enum(std::string_view reduction) {
  if (reduction == "none") return at::Reduction::None;
  if (reduction == "sum") return at::Reduction::Sum;
  TORCH_CHECK(reduction == "mean", "reduction must be mean, sum or none");
  return at::Reduction::Mean;
}

// Unweighted (N, C) float or double logits on the CPU (kernels.py checks before calling).
at::Tensor tampered_cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                  double alpha, double label_smoothing,
                                  std::string_view reduction, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.is_cpu(),
              "logits must be (N, C) with C > 0, on the CPU");
  return powergrad::TamperedCrossEntropy::apply(logits, target, alpha, label_smoothing,
                                     reduction_enum(reduction), ignore_index);
}

}  // namespace

TORCH_LIBRARY(powergrad, m) {
  m.def(
      "tampered_cross_entropy(Tensor logits, Tensor target, float alpha, float label_smoothing, "
      "str reduction, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(powergrad, CompositeImplicitAutograd, m) {
  m.impl("tampered_cross_entropy", &tampered_cross_entropy);
}
