// Fused unlearning cross-entropy, C++ CPU row kernel (OpenMP over rows, vectorised columns).
//
// unlearning_cross_entropy_rows(logits [N, V], labels [N] int64, mode, alpha, ignore_index,
//                               stats_in [N, 2] f64?, grad_scale f32 (1 or N)?,
//                               grad_out [N, V]?)
//   -> (loss [N] f32, stats [N, 2] f64)
//
// The contract is the docstring of unlearnopt.ops.unlearning_cross_entropy.rows_function.
// With p = softmax(z), y the label:
//   nll: loss = -log p_y               dloss/dz = (p - e_y)
//   ga : loss = log p_y                dloss/dz = -(p - e_y)
//   uce: loss = -log(1 - a p_y)        dloss/dz = -(a p_y / (1 - a p_y)) (p - e_y)
// (uce: dloss/dz_j = a/(1 - a p_y) * dp_y/dz_j and dp_y/dz_j = p_y (e_y - p)_j.)
// Every mode is a row coefficient c times (p - e_y); the backward writes
// grad_scale_i * c_i * (p_ij - [j == y_i]) into grad_out, which may be logits itself.
//
// Per row stats = (lse, q) in float64, q = 1 - p_y. The forward pass sums exp over every
// column but the label's (the two segments around it, so no per-element test), then takes
// z_y into the max m: others = sum_{j != y} exp(z_j - m), S = others + exp(z_y - m),
// lse = m + log S, q = others / S. So 1 - p_y is never formed as a
// difference: near p_y = 1 (a confident row) it keeps full relative accuracy, and with it
// the nll loss -log1p(-q), the uce coefficient and the label's gradient entry -c q. The
// float32 gradient uses lse split into hi + lo floats, p_j = exp((z_j - hi) - lo): a
// float32 lse near 40 is off by up to 2e-6, an error every p_j would inherit.
//
// Non-finite input: a NaN or +inf logit in a kept row makes its loss, stats and gradient
// NaN; ignored rows get loss 0, stats 0 and a zero gradient whatever they hold; a label
// outside [0, V) (not ignore_index) is never read: NaN loss, stats and gradient row.
//
// Passes over a row: without stats_in, one read for the sums; with grad_scale, one more
// read and one write. Given stats_in (the backward of the autograd op), only the gradient
// pass runs.
#include "common.h"

#include <torch/library.h>

#include <optional>
#include <tuple>

namespace unlearnopt {
namespace {

enum Mode : int64_t { kNll = 0, kGa = 1, kUce = 2 };

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct RowTerms {
  double loss;  // the row's loss
  double c;     // d loss / d z = c * (p - e_y)
};

// Loss and coefficient from z_y, lse and q = 1 - p_y (both accurate, see the header).
// nll: -log p_y = -log1p(-q) while p_y > 1/2 (small losses keep their digits), else
// lse - z_y. uce: 1 - a p_y as 1 - a p_y while a p_y < 1/2 (log1p), else as
// (1 - a) + a q, a sum of non-negative terms, exact even for a = 1 and p_y -> 1.
inline RowTerms row_terms(int64_t mode, double alpha, double z_y, double lse, double q) {
  const double p_y = std::exp(z_y - lse);
  const double nll = q < 0.5 ? -std::log1p(-q) : lse - z_y;
  if (mode == kNll) return {nll, 1.0};
  if (mode == kGa) return {-nll, -1.0};
  const double ap = alpha * p_y;
  if (ap < 0.5) return {-std::log1p(-ap), -ap / (1.0 - ap)};
  const double one_minus = (1.0 - alpha) + alpha * q;
  return {-std::log(one_minus), -ap / one_minus};
}

// (lse, q) of row z with label y: see the header. NaN if z_y is NaN.
template <typename Codec>
inline void row_stats(const typename Codec::storage* z, int64_t v, int64_t y, float z_y,
                      double* lse, double* q) {
  if (z_y != z_y) {
    *lse = *q = kNaN;
    return;
  }
  OnlineSumExp acc;
  acc.add<Codec>(z, y);
  acc.add<Codec>(z + y + 1, v - y - 1);
  // Bring z_y into the max in double (differences of floats are exact there).
  const double m = std::max(static_cast<double>(acc.m), static_cast<double>(z_y));
  const double others = acc.s == 0.0 ? 0.0 : acc.s * std::exp(acc.m - m);
  const double total = others + std::exp(z_y - m);
  *lse = m + std::log(total);
  *q = others / total;
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
  double alpha;
  int64_t ignore_index;
  const double* stats_in;   // nullptr: compute the stats
  const float* scale;       // nullptr: no gradient
  int64_t scale_stride;     // 0 (broadcast) or 1
  void* grad;
  int64_t grad_stride;
  float* loss_out;
  double* stats_out;
};

template <typename Codec>
void rows_kernel(const RowsArgs& a) {
  using S = typename Codec::storage;
  const S* zbase = static_cast<const S*>(a.logits);
  S* gbase = static_cast<S*>(a.grad);
  const int64_t v = a.v;
  // Work per row: the stats pass and/or the gradient pass over v columns.
  const int64_t work = v * ((a.stats_in == nullptr) + (a.scale != nullptr));
  parallel_rows(a.n, work, [&](int64_t i) {
    const S* z = zbase + i * a.logits_stride;
    S* g = a.scale != nullptr ? gbase + i * a.grad_stride : nullptr;
    double* st = a.stats_out + 2 * i;
    const int64_t y = a.labels[i];
    if (y == a.ignore_index || y < 0 || y >= v) {
      // Ignored: exactly nothing. Out of range (the eager check was off): NaN, unread.
      const bool ignored = y == a.ignore_index;
      a.loss_out[i] = ignored ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      st[0] = st[1] = ignored ? 0.0 : kNaN;
      if (g != nullptr) fill_row<Codec>(g, v, static_cast<float>(st[0]));
      return;
    }
    // Read z_y before the gradient pass: g may be z (in-place backward).
    const float z_y = Codec::load(z[y]);
    double lse, q;
    if (a.stats_in != nullptr) {
      lse = a.stats_in[2 * i];
      q = a.stats_in[2 * i + 1];
    } else {
      row_stats<Codec>(z, v, y, z_y, &lse, &q);
    }
    const RowTerms t = row_terms(a.mode, a.alpha, z_y, lse, q);
    a.loss_out[i] = static_cast<float>(t.loss);
    st[0] = lse;
    st[1] = q;
    if (g == nullptr) return;
    const float coef = static_cast<float>(a.scale[i * a.scale_stride] * t.c);
    const float hi = static_cast<float>(lse);
    const float lo = static_cast<float>(lse - hi);
    // g_j = coef * p_j for every column (in place is safe: g[j] depends on z[j] only) ...
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      g[j] = Codec::store(coef * fast_exp_le88((Codec::load(z[j]) - hi) - lo));
    }
    // ... then the label column, coef * (p_y - 1) = -coef * q, rounded once.
    g[y] = Codec::store(static_cast<float>(-static_cast<double>(coef) * q));
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
    int64_t ignore_index, const std::optional<at::Tensor>& stats_in,
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
  at::Tensor stats_in_c;
  if (stats_in.has_value()) {
    TORCH_CHECK(stats_in->scalar_type() == at::kDouble && stats_in->dim() == 2 &&
                    stats_in->size(0) == n && stats_in->size(1) == 2,
                "stats_in: expected float64 of shape [", n, ", 2], got ",
                stats_in->scalar_type(), " of shape ", stats_in->sizes());
    stats_in_c = stats_in->contiguous();
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

  at::Tensor loss = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({n, 2}, logits.options().dtype(at::kDouble));
  if (n == 0) return {loss, stats};

  RowsArgs a;
  a.n = n;
  a.v = v;
  a.logits = logits.const_data_ptr();
  a.logits_stride = logits.stride(0);
  a.labels = labels_c.const_data_ptr<int64_t>();
  a.mode = mode;
  a.alpha = alpha;
  a.ignore_index = ignore_index;
  a.stats_in = stats_in.has_value() ? stats_in_c.const_data_ptr<double>() : nullptr;
  a.scale = grad_scale.has_value() ? scale_c.const_data_ptr<float>() : nullptr;
  a.scale_stride = grad_scale.has_value() && scale_c.numel() == n && n > 1 ? 1 : 0;
  a.grad = grad_out.has_value() ? grad_out->mutable_data_ptr() : nullptr;
  a.grad_stride = grad_out.has_value() ? grad_out->stride(0) : 0;
  a.loss_out = loss.mutable_data_ptr<float>();
  a.stats_out = stats.mutable_data_ptr<double>();

  dispatch_float(logits.scalar_type(), "logits",
                 [&](auto codec) { rows_kernel<decltype(codec)>(a); });
  return {loss, stats};
}

}  // namespace
}  // namespace unlearnopt

TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m) {
  m.def(
      "unlearning_cross_entropy_rows(Tensor logits, Tensor labels, int mode, float alpha, "
      "int ignore_index, Tensor? stats_in, Tensor? grad_scale, Tensor(a!)? grad_out) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CPU, m) {
  m.impl("unlearning_cross_entropy_rows", &unlearnopt::unlearning_cross_entropy_rows);
}
