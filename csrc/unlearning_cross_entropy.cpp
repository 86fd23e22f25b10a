// Fused unlearning cross-entropy, C++ CPU row kernel (OpenMP over rows, vectorised columns).
//
// unlearning_cross_entropy_rows(logits [N, V], labels [N] int64, mode, alpha, ignore_index,
//                               lse_in [N] f32?, grad_scale f32 (1 or N)?, grad_out [N, V]?)
//   -> (loss [N] f32, lse [N] f32)
//
// The contract is the docstring of unlearnopt.ops.unlearning_cross_entropy.rows_function.
// With p = softmax(z), y the label, d = z_y - lse (so p_y = exp(d)):
//   nll: loss = lse - z_y              dloss/dz = (p - e_y)
//   ga : loss = z_y - lse              dloss/dz = -(p - e_y)
//   uce: loss = -log(1 - a p_y)        dloss/dz = -(a p_y / (1 - a p_y)) (p - e_y)
// (uce: dloss/dz_j = a/(1 - a p_y) * dp_y/dz_j and dp_y/dz_j = p_y (e_y - p)_j.)
// Every mode is a row coefficient c times (p - e_y); the backward writes
// grad_scale_i * c_i * (p_ij - [j == y_i]) into grad_out, which may be logits itself.
//
// Passes over a row: without lse_in, one read for the log-sum-exp (online, chunked: see
// row_log_sum_exp in common.h); with grad_scale, one more read and one write. Given lse_in
// (the backward of the autograd op), only the gradient pass runs.
#include "common.h"

#include <torch/library.h>

#include <atomic>
#include <optional>
#include <tuple>

namespace unlearnopt {
namespace {

enum Mode : int64_t { kNll = 0, kGa = 1, kUce = 2 };

struct RowTerms {
  float loss;  // the row's loss
  float c;     // d loss / d z = c * (p - e_y)
};

// d = z_y - lse. For uce both 1 - a p_y and its log must stay accurate at both ends:
// for a p_y < 1/2, log1p(-a p_y) (a plain log of 1 - a p_y ~ 1 would lose the small loss
// to cancellation); above, 1 - a p_y = (1 - a) - a expm1(d), free of cancellation even for
// a = 1 and p_y -> 1, where 1 - a exp(d) would lose every digit.
inline RowTerms row_terms(int64_t mode, float alpha, float z_y, float lse) {
  if (mode == kNll) return {lse - z_y, 1.0f};
  if (mode == kGa) return {z_y - lse, -1.0f};
  // p_y <= 1 mathematically; rounding in lse may put d a hair above 0.
  const float d = z_y - lse < 0.0f ? z_y - lse : 0.0f;
  const float ap = alpha * std::exp(d);
  if (ap < 0.5f) return {-std::log1p(-ap), -ap / (1.0f - ap)};
  const float one_minus = (1.0f - alpha) - alpha * std::expm1(d);
  return {-std::log(one_minus), -ap / one_minus};
}

template <typename Codec>
inline void fill_row(typename Codec::storage* g, int64_t v, float value) {
  const typename Codec::storage s = Codec::store(value);
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) g[j] = s;
}

struct RowsArgs {
  int64_t n, v;
  const void* logits;
  int64_t logits_stride;
  const int64_t* labels;
  int64_t mode;
  float alpha;
  int64_t ignore_index;
  const float* lse_in;      // nullptr: compute the log-sum-exp
  const float* scale;       // nullptr: no gradient
  int64_t scale_stride;     // 0 (broadcast) or 1
  void* grad;
  int64_t grad_stride;
  float* loss_out;
  float* lse_out;
};

template <typename Codec>
void rows_kernel(const RowsArgs& a, std::atomic<bool>& bad_label) {
  using S = typename Codec::storage;
  const S* zbase = static_cast<const S*>(a.logits);
  S* gbase = static_cast<S*>(a.grad);
  const int64_t v = a.v;
  // Work per row: the lse pass and/or the gradient pass over v columns.
  const int64_t work = v * ((a.lse_in == nullptr) + (a.scale != nullptr));
  parallel_rows(a.n, work, [&](int64_t i) {
    const S* z = zbase + i * a.logits_stride;
    S* g = a.scale != nullptr ? gbase + i * a.grad_stride : nullptr;
    const int64_t y = a.labels[i];
    if (y == a.ignore_index || y < 0 || y >= v) {
      if (y != a.ignore_index) bad_label.store(true, std::memory_order_relaxed);
      a.loss_out[i] = 0.0f;
      a.lse_out[i] = 0.0f;
      if (g != nullptr) fill_row<Codec>(g, v, 0.0f);
      return;
    }
    // Read z_y before the gradient pass: g may be z (in-place backward).
    const float z_y = Codec::load(z[y]);
    const float lse = a.lse_in != nullptr ? a.lse_in[i] : row_log_sum_exp<Codec>(z, v);
    const RowTerms t = row_terms(a.mode, a.alpha, z_y, lse);
    a.loss_out[i] = t.loss;
    a.lse_out[i] = lse;
    if (g == nullptr) return;
    const float coef = a.scale[i * a.scale_stride] * t.c;
    // g_j = coef * p_j for every column (in place is safe: g[j] depends on z[j] only) ...
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) g[j] = Codec::store(coef * fast_exp(Codec::load(z[j]) - lse));
    // ... then the label column, recomputed in float32 from z_y and rounded once:
    // coef * (p_y - 1) = coef * expm1(d), exact near p_y = 1 where p_y - 1 cancels.
    g[y] = Codec::store(coef * std::expm1(z_y - lse));
  });
}

// Whether the byte ranges spanned by two [N, V] views (unit column stride) intersect.
bool ranges_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    const auto* lo = static_cast<const char*>(t.const_data_ptr());
    const int64_t elems = (t.size(0) - 1) * t.stride(0) + t.size(1);
    return std::make_pair(lo, lo + elems * t.element_size());
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

std::tuple<at::Tensor, at::Tensor> unlearning_cross_entropy_rows(
    const at::Tensor& logits, const at::Tensor& labels, int64_t mode, double alpha,
    int64_t ignore_index, const std::optional<at::Tensor>& lse_in,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& grad_out) {
  TORCH_CHECK(logits.device().is_cpu(), "logits: expected a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "logits: expected [N, V], got shape ", logits.sizes());
  const int64_t n = logits.size(0);
  const int64_t v = logits.size(1);
  TORCH_CHECK(v > 0, "logits: expected V > 0, got shape ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || v == 1,
              "logits: expected unit stride over V, got strides ", logits.strides());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n,
              "labels: expected shape [", n, "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels: expected int64, got ",
              labels.scalar_type());
  TORCH_CHECK(mode == kNll || mode == kGa || mode == kUce,
              "mode: expected 0 (nll), 1 (ga) or 2 (uce), got ", mode);
  TORCH_CHECK(mode != kUce || (alpha > 0.0 && alpha <= 1.0),
              "alpha: expected a value in (0, 1] for uce, got ", alpha);
  TORCH_CHECK(grad_scale.has_value() == grad_out.has_value(),
              "grad_scale and grad_out: give both (gradient wanted) or neither");

  const at::Tensor labels_c = labels.contiguous();
  at::Tensor lse_in_c;
  if (lse_in.has_value()) {
    TORCH_CHECK(lse_in->scalar_type() == at::kFloat && lse_in->numel() == n,
                "lse_in: expected float32 with ", n, " elements, got ", lse_in->scalar_type(),
                " of shape ", lse_in->sizes());
    lse_in_c = lse_in->contiguous();
  }
  at::Tensor scale_c;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->scalar_type() == at::kFloat &&
                    (grad_scale->numel() == 1 || grad_scale->numel() == n),
                "grad_scale: expected float32 with 1 or ", n, " elements, got ",
                grad_scale->scalar_type(), " of shape ", grad_scale->sizes());
    scale_c = grad_scale->contiguous();
    const at::Tensor& g = *grad_out;
    TORCH_CHECK(g.scalar_type() == logits.scalar_type(), "grad_out: expected dtype ",
                logits.scalar_type(), " (that of logits), got ", g.scalar_type());
    TORCH_CHECK(g.device().is_cpu(), "grad_out: expected a CPU tensor, got ", g.device());
    TORCH_CHECK(g.dim() == 2 && g.size(0) == n && g.size(1) == v,
                "grad_out: expected shape [", n, ", ", v, "], got ", g.sizes());
    TORCH_CHECK(g.stride(1) == 1 || v == 1,
                "grad_out: expected unit stride over V, got strides ", g.strides());
    // In place is fine (each element is read before it is written); a shifted view of the
    // logits is not. Conservative: any overlap of the two address ranges that is not the
    // very same view is refused.
    const bool same_view = g.data_ptr() == logits.data_ptr() && g.strides() == logits.strides();
    TORCH_CHECK(same_view || !ranges_overlap(logits, g),
                "grad_out: must be either logits itself or not overlap it");
  }

  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, f32);
  at::Tensor lse = at::empty({n}, f32);
  if (n == 0) return {loss, lse};

  RowsArgs a;
  a.n = n;
  a.v = v;
  a.logits = logits.const_data_ptr();
  a.logits_stride = logits.stride(0);
  a.labels = labels_c.const_data_ptr<int64_t>();
  a.mode = mode;
  a.alpha = static_cast<float>(alpha);
  a.ignore_index = ignore_index;
  a.lse_in = lse_in.has_value() ? lse_in_c.const_data_ptr<float>() : nullptr;
  a.scale = grad_scale.has_value() ? scale_c.const_data_ptr<float>() : nullptr;
  a.scale_stride = grad_scale.has_value() && scale_c.numel() == n && n > 1 ? 1 : 0;
  a.grad = grad_out.has_value() ? grad_out->mutable_data_ptr() : nullptr;
  a.grad_stride = grad_out.has_value() ? grad_out->stride(0) : 0;
  a.loss_out = loss.mutable_data_ptr<float>();
  a.lse_out = lse.mutable_data_ptr<float>();

  std::atomic<bool> bad_label{false};
  dispatch_float(logits.scalar_type(), "logits",
                 [&](auto codec) { rows_kernel<decltype(codec)>(a, bad_label); });
  TORCH_CHECK(!bad_label.load(), "labels: expected values in [0, ", v, ") or ignore_index (",
              ignore_index, ")");
  return {loss, lse};
}

}  // namespace
}  // namespace unlearnopt

TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m) {
  m.def(
      "unlearning_cross_entropy_rows(Tensor logits, Tensor labels, int mode, float alpha, "
      "int ignore_index, Tensor? lse_in, Tensor? grad_scale, Tensor(a!)? grad_out) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CPU, m) {
  m.impl("unlearning_cross_entropy_rows", &unlearnopt::unlearning_cross_entropy_rows);
}
