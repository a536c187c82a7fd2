// The tampered cross-entropy's backward as one CPU kernel (float and double), for
// powergrad/kernels.py. tamper.py's module docstring derives the gradient; per row n:
//
//     grad[n, :] = s_n * (m_n * softmax(alpha * log_p[n, :]) - u_n)
//
//   class index y:      u = (1 - e) onehot(y) + e / C,   m = 1   (an ignored row: all zero)
//   distribution q:     u = (1 - e) q + e / C,           m = (1 - e) sum(q) + e
//
// with e the label smoothing and s_n the reduction's factor: the incoming gradient (of row n for
// "none"), divided for "mean" by the number of counted rows (index) or of rows (distribution).
// Unweighted (N, C) input only: tamper.py sends the rest to its PyTorch-op backward, which is
// also what this kernel is tested against.
//
// Why a kernel: PyTorch's ops make four trips through memory over the (N, C) array (the alpha
// scaling, softmax's two, the row scale); here each row comes from memory once and is finished
// while it sits in the L1 cache. Measured in benchmarks/loss.py (docs/performance.md).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
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

// Writes the gradient over log_p (the forward's log_softmax(z, 1), which nothing else reads)
// and returns it.
at::Tensor tampered_ce_backward_(at::Tensor log_p, const at::Tensor& target,
                                 const at::Tensor& grad_out, double alpha, double label_smoothing,
                                 std::string_view reduction, int64_t ignore_index) {
  TORCH_CHECK(log_p.dim() == 2 && log_p.is_contiguous(), "log_p must be a contiguous (N, C)");
  const int64_t n = log_p.size(0), c = log_p.size(1);
  const bool soft = target.is_floating_point();
  const auto t = soft ? target.to(log_p.scalar_type()).contiguous() : target.contiguous();
  const auto g = grad_out.to(log_p.scalar_type()).contiguous();
  const bool per_row = reduction == "none";
  TORCH_CHECK(per_row ? g.numel() == n : g.numel() == 1, "grad_out has the wrong size");
  int64_t div = 1;  // "mean": the rows counted (at least 1: no counted row gives a zero gradient)
  if (reduction == "mean") {
    div = n;
    if (!soft) {
      const int64_t* y = t.data_ptr<int64_t>();
      div = std::max<int64_t>(1, n - std::count(y, y + n, ignore_index));
    }
  }
  // Enough rows per task for about 32k elements: small inputs stay on one thread.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(c, 1));
  AT_DISPATCH_FLOATING_TYPES(log_p.scalar_type(), "tampered_ce_backward_", [&] {
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
  return log_p;
}

}  // namespace

TORCH_LIBRARY(powergrad, m) {
  m.def(
      "tampered_ce_backward_(Tensor(a!) log_p, Tensor target, Tensor grad_out, float alpha, "
      "float label_smoothing, str reduction, int ignore_index) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(powergrad, CPU, m) {
  m.impl("tampered_ce_backward_", &tampered_ce_backward_);
}
