// Fused unlearning cross-entropy, C++ CPU row kernel (OpenMP over rows, vectorised columns).
//
// unlearning_cross_entropy_rows(logits [N, V], labels [N] int64, mode, alpha, ignore_index,
//                               stats_in [N, 3] f64?, grad_scale f32 (1 or N)?,
//                               grad_out [N, V]?, beta1 = 1, beta2 = 1)
//   -> (loss [N] f32, stats [N, 3] f64)
//
// The contract is the row kernel comment of unlearnopt/ops/unlearning_cross_entropy.py.
// With p = softmax(z), y the label, q = 1 - p_y, weights and targets detached:
//   nll   : loss = -log p_y              dloss/dz = (p - e_y)
//   ga    : loss = log p_y               dloss/dz = -(p - e_y)
//   uce   : loss = -log(1 - a p_y)       dloss/dz = -(a p_y / (1 - a p_y)) (p - e_y)
//   wga   : loss = w log p_y             dloss/dz = -w (p - e_y),  w = p_y^b1
//   satimp: loss = w log p_y             dloss/dz = -w (p - e_y),  w = p_y^b1 q^b2
//   ce_u  : loss = -sum_v r_v log p_v    dloss/dz = p - r = -(p_y / q) (p - e_y)
//           r = softmax(z with z_y = -inf) (r_v = p_v / q for v != y, r_y = 0)
// (uce: dloss/dz_j = a/(1 - a p_y) * dp_y/dz_j and dp_y/dz_j = p_y (e_y - p)_j.)
// Every mode is a row coefficient c times (p - e_y); the backward writes
// grad_scale_i * c_i * (p_ij - [j == y_i]) into grad_out, which may be logits itself.
// ce_u's loss is -sum_v r_v (z_v - lse) = (lse - lse_others) + H(r) = -log q + H(r): two
// non-negative terms, H(r) = log s - u / s the entropy of r, from s = sum_{v != y} e_v and
// u = sum_{v != y} e_v (z_v - m) (<= 0), e_v = exp(z_v - m), one more online sum in the
// forward pass (ce_u only).
//
// Per row stats = (lse, q, h) in float64, q = 1 - p_y, h = H(r) (ce_u; 0 in the other
// modes). The forward pass sums exp over every
// column but the label's (the two segments around it, so no per-element test), then takes
// z_y into the max m: others = sum_{j != y} exp(z_j - m), S = others + exp(z_y - m),
// lse = m + log S, q = others / S. So 1 - p_y is never formed as a
// difference: near p_y = 1 (a confident row) it keeps full relative accuracy, and with it
// the nll loss -log1p(-q), the uce and ce_u coefficients, satimp's weight and the label's
// gradient entry -c q. The
// float32 gradient uses lse split into hi + lo floats, p_j = exp((z_j - hi) - lo): a
// float32 lse near 40 is off by up to 2e-6, an error every p_j would inherit.
//
// Non-finite input: a NaN or +inf logit in a kept row makes its loss, stats and gradient
// NaN; ignored rows get loss 0, stats 0 and a zero gradient whatever they hold; a label
// outside [0, V) (not ignore_index) is never read: NaN loss, stats and gradient row. ce_u
// needs another class with a finite logit (else r is 0/0): NaN loss and gradient. ce_u and
// uce with a = 1 have c = -p_y / q, beyond float32 once q < ~1e-38 (a label logit ~87 above
// the others), where p_j underflows: ce_u folds log|c| into the exponent of the gradient
// sweep (see row_terms); uce with a = 1 gives a NaN gradient there.
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

enum Mode : int64_t { kNll = 0, kGa = 1, kUce = 2, kWga = 3, kSatimp = 4, kCeU = 5 };

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct RowTerms {
  double loss;        // the row's loss
  double c;           // d loss / d z = c * (p - e_y)
  double fold = 0.0;  // log(c / unit) > 0 where c is folded into the exponent of the sweep
  double unit = c;    // c e^-fold: the sweep writes unit * exp(z_j - (lse - fold))
};

struct ModeParams {
  int64_t mode;
  double alpha;  // uce
  double beta1;  // wga, satimp: exponent of p_y
  double beta2;  // satimp: exponent of 1 - p_y
};

// Loss and coefficient from z_y, lse, q = 1 - p_y (both accurate, see the header) and h.
// nll: -log p_y = -log1p(-q) while p_y > 1/2 (small losses keep their digits), else
// lse - z_y. uce: 1 - a p_y as 1 - a p_y while a p_y < 1/2 (log1p), else as
// (1 - a) + a q, a sum of non-negative terms, exact even for a = 1 and p_y -> 1.
// log q likewise: log(q) while q < 1/2, else log1p(-p_y). Weights are
// exp(b1 log p_y + b2 log q), a zero exponent contributing a factor 1 (0^0 = 1).
inline RowTerms row_terms(const ModeParams& mp, double z_y, double lse, double q, double h) {
  const double p_y = std::exp(z_y - lse);
  const double nll = q < 0.5 ? -std::log1p(-q) : lse - z_y;
  const int64_t mode = mp.mode;
  if (mode == kNll) return {nll, 1.0};
  if (mode == kGa) return {-nll, -1.0};
  if (mode != kUce) {
    const double log_q = q < 0.5 ? std::log(q) : std::log1p(-p_y);
    if (mode == kCeU) {
      // c = -p_y / q is huge when p_y -> 1 (and overflows float32 before p_j underflows),
      // so it is folded into the exponent: c p_j = -exp(z_j - (lse - t)), t = log(p_y / q)
      // the label's log-odds, z_j - (lse - t) = z_j - lse_others <= 0 for j != y.
      const double t = -nll - log_q;
      if (t > 0.0) return {h - log_q, -p_y / q, t, -1.0};
      return {h - log_q, -p_y / q};
    }
    double log_w = mp.beta1 == 0.0 ? 0.0 : -mp.beta1 * nll;
    if (mode == kSatimp && mp.beta2 != 0.0) log_w += mp.beta2 * log_q;
    const double w = std::exp(log_w);
    return {-w * nll, -w};
  }
  const double alpha = mp.alpha;
  const double ap = alpha * p_y;
  if (ap < 0.5) return {-std::log1p(-ap), -ap / (1.0 - ap)};
  const double one_minus = (1.0 - alpha) + alpha * q;
  return {-std::log(one_minus), -ap / one_minus};
}

// Online sum of exp and of exp times exponent over columns: after add(z, len) calls,
// m = max, s = sum exp(z_j - m) = top + rest (top: the columns at the max, each exactly 1;
// rest: the others, kept apart so that log s = log top + log1p(rest / top) keeps its digits
// when one column dominates and the entropy is small), u = sum exp(z_j - m) (z_j - m) <= 0,
// so the entropy of softmax over those columns is log s - u / s (two non-negative terms).
// Per chunk of kLseChunk columns a max pass, then one fused pass for the sums (from L1); a
// larger max rescales them in double: with d = m_old - m_new, u <- (u + d s) e^d,
// rest <- s e^d, top <- 0. NaN shows in rest (and u); an all -inf chunk adds 0 (a NaN in
// it, skipped by the max, is still added); +inf makes rest NaN.
struct OnlineSumExpEntropy {
  float m = -std::numeric_limits<float>::infinity();
  double top = 0.0;
  double rest = 0.0;
  double u = 0.0;

  double sum() const { return top + rest; }
  double entropy() const {
    // No finite column (top = 0): log 0 - 0/0, NaN.
    return std::log(top) + std::log1p(rest / top) - u / sum();
  }

  template <typename Codec>
  inline void add(const typename Codec::storage* z, int64_t len) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    // exp(x) is 0 below -88: clamping the exponent there keeps 0 * (x - m) at 0 for x = -inf.
    constexpr float kFloor = -100.0f;
    for (int64_t c0 = 0; c0 < len; c0 += kLseChunk) {
      const int64_t n = len - c0 < kLseChunk ? len - c0 : kLseChunk;
      const typename Codec::storage* zc = z + c0;
      const float cm = chunk_max<Codec>(zc, n);
      if (cm == kNegInf) {
        rest += chunk_sum_exp<Codec>(zc, n, 0.0f);  // 0, or NaN
        continue;
      }
      if (cm > m) {
        if (sum() != 0.0) {
          const double d = static_cast<double>(m) - cm;
          const double e = std::exp(d);
          u = (u + d * sum()) * e;
          rest = sum() * e;
          top = 0.0;
        }
        m = cm;
      }
      float c_rest = 0.0f;
      float c_top = 0.0f;
      float c_u = 0.0f;
#pragma omp simd reduction(+ : c_rest, c_top, c_u)
      for (int64_t j = 0; j < n; ++j) {
        const float x = Codec::load(zc[j]) - m;
        const float xc = select_bits(x < kFloor, kFloor, x);  // NaN stays NaN
        const float e = fast_exp_le88(xc);
        const float at_max = select_bits(xc == 0.0f, 1.0f, 0.0f);  // e is exactly 1 there
        c_rest += e - at_max;
        c_top += at_max;
        c_u += e * xc;
      }
      rest += c_rest;
      top += c_top;
      u += c_u;
    }
  }
};

// (lse, q, h) of row z with label y: see the header; h only with `entropy` (else 0). NaN
// if z_y is NaN.
template <typename Codec>
inline void row_stats(const typename Codec::storage* z, int64_t v, int64_t y, float z_y,
                      bool entropy, double* lse, double* q, double* h) {
  if (z_y != z_y) {
    *lse = *q = *h = kNaN;
    return;
  }
  OnlineSumExp acc;
  if (entropy) {
    OnlineSumExpEntropy ent;
    ent.add<Codec>(z, y);
    ent.add<Codec>(z + y + 1, v - y - 1);
    acc.m = ent.m;
    acc.s = ent.sum();
    // No other class with a finite logit: r = 0/0, h NaN, and so the loss.
    *h = ent.entropy();
  } else {
    acc.add<Codec>(z, y);
    acc.add<Codec>(z + y + 1, v - y - 1);
  }
  // Bring z_y into the max in double (differences of floats are exact there).
  const double m = std::max(static_cast<double>(acc.m), static_cast<double>(z_y));
  const double others = acc.s == 0.0 ? 0.0 : acc.s * std::exp(acc.m - m);
  const double total = others + std::exp(z_y - m);
  *lse = m + std::log(total);
  *q = others / total;
  // The other modes: 0. A NaN row (e.g. z_y = +inf) has a NaN h in every mode.
  *h = (entropy ? *h : 0.0) + 0.0 * *q;
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
  ModeParams params;
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
    double* st = a.stats_out + 3 * i;
    const int64_t y = a.labels[i];
    if (y == a.ignore_index || y < 0 || y >= v) {
      // Ignored: exactly nothing. Out of range (the eager check was off): NaN, unread.
      const bool ignored = y == a.ignore_index;
      a.loss_out[i] = ignored ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      st[0] = st[1] = st[2] = ignored ? 0.0 : kNaN;
      if (g != nullptr) fill_row<Codec>(g, v, static_cast<float>(st[0]));
      return;
    }
    // Read z_y before the gradient pass: g may be z (in-place backward).
    const float z_y = Codec::load(z[y]);
    double lse, q, h;
    if (a.stats_in != nullptr) {
      lse = a.stats_in[3 * i];
      q = a.stats_in[3 * i + 1];
      h = a.stats_in[3 * i + 2];
    } else {
      row_stats<Codec>(z, v, y, z_y, a.params.mode == kCeU, &lse, &q, &h);
    }
    const RowTerms t = row_terms(a.params, z_y, lse, q, h);
    a.loss_out[i] = static_cast<float>(t.loss);
    st[0] = lse;
    st[1] = q;
    st[2] = h;
    if (g == nullptr) return;
    const double scale = a.scale[i * a.scale_stride];
    const float coef = static_cast<float>(scale * t.unit);
    const double shift = lse - t.fold;
    const float hi = static_cast<float>(shift);
    const float lo = static_cast<float>(shift - hi);
    // g_j = scale c p_j = coef * exp(z_j - shift) for every column (in place is safe: g[j]
    // depends on z[j] only; the label's value, possibly meaningless, is replaced) ...
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      g[j] = Codec::store(coef * fast_exp_le88((Codec::load(z[j]) - hi) - lo));
    }
    // ... then the label column, scale c (p_y - 1) = -scale c q, rounded once.
    g[y] = Codec::store(static_cast<float>(-scale * t.c * q));
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
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& grad_out,
    double beta1, double beta2) {
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
  TORCH_CHECK(mode >= kNll && mode <= kCeU,
              "mode: expected 0 (nll), 1 (ga), 2 (uce), 3 (wga), 4 (satimp) or 5 (ce_u), got ",
              mode);
  TORCH_CHECK(mode != kUce || (alpha > 0.0 && alpha <= 1.0),
              "alpha: expected a value in (0, 1] for uce, got ", alpha);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < std::numeric_limits<double>::infinity() && beta2 >= 0.0 &&
                  beta2 < std::numeric_limits<double>::infinity(),
              "beta1, beta2: expected finite numbers >= 0, got ", beta1, " and ", beta2);
  TORCH_CHECK(grad_scale.has_value() == grad_out.has_value(),
              "grad_scale and grad_out: give both (gradient wanted) or neither");

  const at::Tensor labels_c = labels.contiguous();
  at::Tensor stats_in_c;
  if (stats_in.has_value()) {
    TORCH_CHECK(stats_in->scalar_type() == at::kDouble && stats_in->dim() == 2 &&
                    stats_in->size(0) == n && stats_in->size(1) == 3,
                "stats_in: expected float64 of shape [", n, ", 3], got ",
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
  at::Tensor stats = at::empty({n, 3}, logits.options().dtype(at::kDouble));
  if (n == 0) return {loss, stats};

  RowsArgs a;
  a.n = n;
  a.v = v;
  a.logits = logits.const_data_ptr();
  a.logits_stride = logits.stride(0);
  a.labels = labels_c.const_data_ptr<int64_t>();
  a.params = {mode, alpha, beta1, beta2};
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
      "int ignore_index, Tensor? stats_in, Tensor? grad_scale, Tensor(a!)? grad_out, "
      "float beta1=1., float beta2=1.) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CPU, m) {
  m.impl("unlearning_cross_entropy_rows", &unlearnopt::unlearning_cross_entropy_rows);
}
