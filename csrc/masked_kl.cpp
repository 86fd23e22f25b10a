// Masked KL divergence to the original model, CPU rows kernel (SIU's DMK, MOLLM's retain KL).
//
// torch.ops.unlearnopt_native.masked_kl_rows(logits [N, V], ref_logits [N, V],
//     token_mask [N] f32?, vocab_mask [V] f32?, direction (0 forward, 1 reverse),
//     inv_temperature, stats_in [N, 3] f32?, grad_scale f32 (1 or N)?, grad_out [N, V]?)
//     -> (loss [N] f32, stats [N, 3] f32)
//
// The contract is the docstring of unlearnopt.ops.masked_kl.rows_function. With
// z = logits / T, r = ref_logits / T, p = softmax(z), q = softmax(r), u the vocab mask and m
// the token mask, row i gets loss m_i * KL_i (0, not computed, where m_i == 0) and stats
// (lse_z, lse_r, coef) where coef is what the gradient needs besides the two lse:
//   forward: KL = sum u q (log q - log p),  coef = S = sum u q
//   reverse: KL = sum u p (log p - log q),  coef = C = KL + sum u p
// With stats_in the statistics pass is skipped (backward) and both outputs are returned
// empty. With grad_scale, grad_out[i] receives grad_scale[i] * m_i * dKL_i/dlogits_i (zeros
// where m_i == 0); grad_out may be logits itself.
//
// Passes over a row: the statistics take one read of both rows (online log-sum-exp of each,
// as OnlineSumExp in common.h, with the masked sums riding along); the gradient takes one
// more read of both and one write. exp work, the bound on this kernel: 2 per column in the
// statistics (e^{z - m_z}, e^{r - m_r}; the KL term needs no log per column, see row_stats),
// 2 in the forward-direction gradient (p and q), 1 in the reverse one (p).
// All math is float32 whatever the input dtype (running sums in double); offsets are int64.
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace unlearnopt {
namespace {

constexpr int64_t kForward = 0;
constexpr int64_t kReverse = 1;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Sums of one chunk, all relative to the shifts (oz, or) the chunk pass was given:
//   sz = sum e^{z - oz}, sr = sum e^{r - or}; with e = e^{r - or} (forward) or e^{z - oz}
//   (reverse): a = sum u e, b = sum u e (r - z) (forward) or sum u e (z - r) (reverse), where
//   z, r are the UNSCALED logits here (b is multiplied by 1/T once per row).
// mz, mr: the chunk's maxima of z and r (scaled by 1/T), when the pass computes them.
struct ChunkSums {
  float mz, mr, sz, sr, a, b;
};

// One fused sweep over a chunk of both rows. Why no per-column log: with
// log q - log p = (r - z) + (lse_z - lse_r), sum u q (log q - log p) = b' + (lse_z - lse_r) a'
// for the normalised a' = sum u q, b' = sum u q (r - z): linear in the logits given q.
// WITH_MAX: also the chunk maxima (the online path); without: a separate max pass ran first.
// The exps take x - shift <= 88: without WITH_MAX the shifts are the maxima (x - shift <= 0);
// with it, a chunk whose maximum rose more than kLseMaxJump (64) above a shift is thrown away
// and redone by the caller, so terms past 88 (meaningless in fast_exp_le88) never count.
// u e (r - z) is 0 where u e == 0: r - z may then be +-inf or NaN (a logit of -inf), and the
// term must not turn the sum into NaN; the select on the bits keeps the loop vectorised.
template <typename Codec, int64_t DIR, bool HAS_U, bool WITH_MAX>
inline ChunkSums chunk_pass(const typename Codec::storage* __restrict z,
                            const typename Codec::storage* __restrict r,
                            const float* __restrict u, int64_t len, float inv_t, float oz,
                            float orr) {
  float mz = kNegInf, mr = kNegInf, sz = 0.0f, sr = 0.0f, a = 0.0f, b = 0.0f;
#pragma omp simd reduction(max : mz, mr) reduction(+ : sz, sr, a, b)
  for (int64_t j = 0; j < len; ++j) {
    const float zj = Codec::load(z[j]);
    const float rj = Codec::load(r[j]);
    if constexpr (WITH_MAX) {
      // inv_t > 0: the max of the scaled values is the scaled max.
      mz = zj > mz ? zj : mz;
      mr = rj > mr ? rj : mr;
    }
    const float ez = fast_exp_le88(zj * inv_t - oz);
    const float er = fast_exp_le88(rj * inv_t - orr);
    sz += ez;
    sr += er;
    const float e = DIR == kForward ? er : ez;
    const float w = HAS_U ? u[j] * e : e;
    const float d = DIR == kForward ? rj - zj : zj - rj;
    a += w;
    b += select_bits(w == 0.0f, 0.0f, w * d);
  }
  return {mz * inv_t, mr * inv_t, sz, sr, a, b};
}

// Maxima of a chunk of both rows (scaled by 1/T).
template <typename Codec>
inline void chunk_max2(const typename Codec::storage* __restrict z,
                       const typename Codec::storage* __restrict r, int64_t len, float inv_t,
                       float& mz_out, float& mr_out) {
  float mz = kNegInf, mr = kNegInf;
#pragma omp simd reduction(max : mz, mr)
  for (int64_t j = 0; j < len; ++j) {
    const float zj = Codec::load(z[j]);
    const float rj = Codec::load(r[j]);
    mz = zj > mz ? zj : mz;
    mr = rj > mr ? rj : mr;
  }
  mz_out = mz * inv_t;
  mr_out = mr * inv_t;
}

struct RowStats {
  float lse_z, lse_r, coef, kl;
};

// Running sums of a row, relative to the running maxima mz, mr (scaled logits).
struct RowRun {
  float mz = kNegInf, mr = kNegInf;
  double sz = 0.0, sr = 0.0, a = 0.0, b = 0.0;

  // Moves the shifts to new maxima (>= the old ones): each sum is multiplied by
  // e^{old - new}. a and b carry the shift of r (forward) or of z (reverse). A shift that
  // does not move is skipped (which also covers -inf to -inf, where old - new is NaN).
  template <int64_t DIR>
  void raise_to(float nmz, float nmr) {
    if (nmz != mz) {
      const double f = std::exp(static_cast<double>(mz) - nmz);
      sz *= f;
      if (DIR == kReverse) {
        a *= f;
        b *= f;
      }
      mz = nmz;
    }
    if (nmr != mr) {
      const double f = std::exp(static_cast<double>(mr) - nmr);
      sr *= f;
      if (DIR == kForward) {
        a *= f;
        b *= f;
      }
      mr = nmr;
    }
  }

  void add(const ChunkSums& c) {
    sz += c.sz;
    sr += c.sr;
    a += c.a;
    b += c.b;
  }
};

// One read of both rows: online log-sum-exp of z and r and the masked sums, chunk by chunk
// as in OnlineSumExp (common.h). Fast path (both running maxima finite): one fused sweep
// relative to the running maxima that also finds the chunk maxima; the sums are rescaled once
// per chunk if a maximum rose. If a maximum jumped by more than kLseMaxJump (terms may have
// saturated) or nothing finite was seen yet, the chunk gets a max pass first and a sweep
// relative to the new maxima (a shift of 0 while a row is still all -inf: its terms are 0).
//   forward: KL = T^-1 b / sr + (lse_z - lse_r) a / sr
//            (log q - log p = (r - z) / T + lse_z - lse_r, r and z unscaled in b)
//   reverse: KL = T^-1 b / sz + (lse_r - lse_z) a / sz
template <typename Codec, int64_t DIR, bool HAS_U>
RowStats row_stats(const typename Codec::storage* z, const typename Codec::storage* r,
                   const float* u, int64_t v, float inv_t) {
  RowRun run;
  for (int64_t c0 = 0; c0 < v; c0 += kLseChunk) {
    const int64_t len = std::min(kLseChunk, v - c0);
    const float* uc = HAS_U ? u + c0 : nullptr;
    if (run.mz > kNegInf && run.mr > kNegInf) {
      const ChunkSums c =
          chunk_pass<Codec, DIR, HAS_U, true>(z + c0, r + c0, uc, len, inv_t, run.mz, run.mr);
      if (!(c.mz - run.mz > kLseMaxJump) && !(c.mr - run.mr > kLseMaxJump)) {
        run.add(c);
        run.raise_to<DIR>(std::max(run.mz, c.mz), std::max(run.mr, c.mr));
        continue;
      }
    }
    float bmz, bmr;
    chunk_max2<Codec>(z + c0, r + c0, len, inv_t, bmz, bmr);
    run.raise_to<DIR>(std::max(run.mz, bmz), std::max(run.mr, bmr));
    run.add(chunk_pass<Codec, DIR, HAS_U, false>(z + c0, r + c0, uc, len, inv_t,
                                                 run.mz == kNegInf ? 0.0f : run.mz,
                                                 run.mr == kNegInf ? 0.0f : run.mr));
  }
  // The KL takes the lse in double: lse_z - lse_r cancels when the two rows are close.
  const double lse_z = static_cast<double>(run.mz) + std::log(run.sz);
  const double lse_r = static_cast<double>(run.mr) + std::log(run.sr);
  RowStats st;
  st.lse_z = static_cast<float>(lse_z);
  st.lse_r = static_cast<float>(lse_r);
  if constexpr (DIR == kForward) {
    const double S = run.a / run.sr;
    st.kl = static_cast<float>(inv_t * run.b / run.sr + (lse_z - lse_r) * S);
    st.coef = static_cast<float>(S);
  } else {
    const double S = run.a / run.sz;
    const double kl = inv_t * run.b / run.sz + (lse_r - lse_z) * S;
    st.kl = static_cast<float>(kl);
    st.coef = static_cast<float>(kl + S);
  }
  return st;
}

// Gradient of the row, times k = scale * m / T (the 1/T because z = logits / T).
//   forward: dKL/dz_j = -u_j q_j + S p_j            (S = sum u q)
//   reverse: with f = log p - log q, dp_v/dz_j = p_v (d_vj - p_j), df_v/dz_j = d_vj - p_j:
//            dKL/dz_j = sum_v u_v [p_v (d_vj - p_j) f_v + p_v (d_vj - p_j)]
//                     = u_j p_j (f_j + 1) - p_j sum_v u_v p_v (f_v + 1)
//                     = p_j (u_j (f_j + 1) - C),    C = KL + sum u p
// The exps take z_j - lse_z and r_j - lse_r, <= 0 up to rounding.
// g_j depends on z_j and r_j only, so writing g over z (in-place backward) in the same loop
// is safe. Reverse: the term is 0 where p_j == 0 (f_j may be +-inf or NaN there).
template <typename Codec, int64_t DIR, bool HAS_U>
void row_grad(const typename Codec::storage* z, const typename Codec::storage* __restrict r,
              const float* __restrict u, typename Codec::storage* g, int64_t v, float inv_t,
              const RowStats& st, float k) {
  const float lse_z = st.lse_z, lse_r = st.lse_r;
  if constexpr (DIR == kForward) {
    const float kc = k * st.coef;
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      const float p = fast_exp_le88(Codec::load(z[j]) * inv_t - lse_z);
      const float q = fast_exp_le88(Codec::load(r[j]) * inv_t - lse_r);
      const float ku = HAS_U ? k * u[j] : k;
      g[j] = Codec::store(kc * p - ku * q);
    }
  } else {
    const float coef = st.coef;
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      const float lp = Codec::load(z[j]) * inv_t - lse_z;
      const float lq = Codec::load(r[j]) * inv_t - lse_r;
      const float p = fast_exp_le88(lp);
      const float f1 = (lp - lq) + 1.0f;
      const float uf = HAS_U ? u[j] * f1 : f1;
      g[j] = Codec::store(select_bits(p == 0.0f, 0.0f, k * (p * (uf - coef))));
    }
  }
}

struct RowsArgs {
  int64_t n, v;
  const void* logits;
  int64_t logits_stride;
  const void* ref;
  int64_t ref_stride;
  const float* tmask;     // nullptr: every token counts
  const float* u;         // nullptr: no vocab mask
  float inv_t;
  float* stats;           // [N, 3]: written, or read when have_stats
  bool have_stats;
  float* loss;            // [N], unused when have_stats
  const float* scale;     // nullptr: no gradient
  int64_t scale_stride;   // 0 (broadcast) or 1
  void* grad;
  int64_t grad_stride;
};

template <typename Codec, int64_t DIR, bool HAS_U>
void rows_kernel(const RowsArgs& a) {
  using S = typename Codec::storage;
  const S* zbase = static_cast<const S*>(a.logits);
  const S* rbase = static_cast<const S*>(a.ref);
  S* gbase = static_cast<S*>(a.grad);
  const int64_t v = a.v;
  const int64_t work = v * (!a.have_stats + (a.scale != nullptr));
  parallel_rows(a.n, work, [&](int64_t i) {
    const float m = a.tmask != nullptr ? a.tmask[i] : 1.0f;
    S* g = a.scale != nullptr ? gbase + i * a.grad_stride : nullptr;
    float* st_row = a.stats + 3 * i;
    if (m == 0.0f) {
      // Masked token: no loss, no gradient, nothing read.
      if (!a.have_stats) {
        st_row[0] = st_row[1] = st_row[2] = 0.0f;
        a.loss[i] = 0.0f;
      }
      if (g != nullptr) {
        const S zero = Codec::store(0.0f);
        std::fill(g, g + v, zero);
      }
      return;
    }
    const S* z = zbase + i * a.logits_stride;
    const S* r = rbase + i * a.ref_stride;
    RowStats st;
    if (a.have_stats) {
      st = {st_row[0], st_row[1], st_row[2], 0.0f};
    } else {
      st = row_stats<Codec, DIR, HAS_U>(z, r, a.u, v, a.inv_t);
      st_row[0] = st.lse_z;
      st_row[1] = st.lse_r;
      st_row[2] = st.coef;
      a.loss[i] = m * st.kl;
    }
    if (g != nullptr) {
      const float k = a.scale[i * a.scale_stride] * m * a.inv_t;
      row_grad<Codec, DIR, HAS_U>(z, r, a.u, g, v, a.inv_t, st, k);
    }
  });
}

void check_rows_arg(const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == n && t.is_contiguous(),
              "masked_kl_rows: ", name, " must be a contiguous [", n, "] float32 tensor, got ",
              t.sizes(), " ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> masked_kl_rows(
    const at::Tensor& logits, const at::Tensor& ref_logits,
    const std::optional<at::Tensor>& token_mask, const std::optional<at::Tensor>& vocab_mask,
    int64_t direction, double inv_temperature, const std::optional<at::Tensor>& stats_in,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& grad_out) {
  TORCH_CHECK(logits.device().is_cpu(), "masked_kl_rows: logits must be a CPU tensor, got ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1,
              "masked_kl_rows: logits must be [N, V] with unit column stride, got ", logits.sizes(),
              " strides ", logits.strides());
  TORCH_CHECK(ref_logits.sizes() == logits.sizes() && ref_logits.stride(1) == 1 &&
                  ref_logits.scalar_type() == logits.scalar_type(),
              "masked_kl_rows: ref_logits must match logits (shape ", logits.sizes(), ", dtype ",
              logits.scalar_type(), ", unit column stride), got ", ref_logits.sizes(), " ",
              ref_logits.scalar_type());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "masked_kl_rows: logits must be float32/bfloat16/float16, got ", dt);
  TORCH_CHECK(direction == kForward || direction == kReverse,
              "masked_kl_rows: direction must be 0 (forward) or 1 (reverse), got ", direction);
  TORCH_CHECK(inv_temperature > 0, "masked_kl_rows: inv_temperature must be > 0");
  const int64_t N = logits.size(0), V = logits.size(1);
  const float* tmask = nullptr;
  if (token_mask.has_value()) {
    check_rows_arg("token_mask", *token_mask, N);
    tmask = token_mask->const_data_ptr<float>();
  }
  const float* u = nullptr;
  if (vocab_mask.has_value()) {
    check_rows_arg("vocab_mask", *vocab_mask, V);
    u = vocab_mask->const_data_ptr<float>();
  }
  auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor stats, loss;
  const bool have_stats = stats_in.has_value();
  if (have_stats) {
    TORCH_CHECK(stats_in->scalar_type() == at::kFloat && stats_in->dim() == 2 &&
                    stats_in->size(0) == N && stats_in->size(1) == 3 && stats_in->is_contiguous(),
                "masked_kl_rows: stats_in must be a contiguous [", N, ", 3] float32 tensor");
    // Backward: nothing new to return (returning stats_in itself would alias an input).
    stats = at::empty({0, 3}, fopts);
    loss = at::empty({0}, fopts);
  } else {
    stats = at::empty({N, 3}, fopts);
    loss = at::empty({N}, fopts);
  }
  const float* scale = nullptr;
  int64_t scale_stride = 0;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_out.has_value(), "masked_kl_rows: grad_out is required with grad_scale");
    TORCH_CHECK(grad_scale->scalar_type() == at::kFloat && grad_scale->is_contiguous() &&
                    (grad_scale->numel() == 1 || grad_scale->numel() == N),
                "masked_kl_rows: grad_scale must be contiguous float32 with 1 or ", N,
                " elements");
    TORCH_CHECK(grad_out->sizes() == logits.sizes() && grad_out->stride(1) == 1 &&
                    grad_out->scalar_type() == dt,
                "masked_kl_rows: grad_out must be [", N, ", ", V, "] ", dt,
                " with unit column stride");
    scale = grad_scale->const_data_ptr<float>();
    scale_stride = grad_scale->numel() == 1 ? 0 : 1;
  } else {
    TORCH_CHECK(!grad_out.has_value(), "masked_kl_rows: grad_out given without grad_scale");
    TORCH_CHECK(!have_stats, "masked_kl_rows: stats_in without grad_scale does nothing");
  }
  if (N == 0 || V == 0) return {loss, stats};

  RowsArgs a;
  a.n = N;
  a.v = V;
  a.logits = logits.const_data_ptr();
  a.logits_stride = logits.stride(0);
  a.ref = ref_logits.const_data_ptr();
  a.ref_stride = ref_logits.stride(0);
  a.tmask = tmask;
  a.u = u;
  a.inv_t = static_cast<float>(inv_temperature);
  a.stats = have_stats ? const_cast<float*>(stats_in->const_data_ptr<float>())
                       : stats.mutable_data_ptr<float>();
  a.have_stats = have_stats;
  a.loss = have_stats ? nullptr : loss.mutable_data_ptr<float>();
  a.scale = scale;
  a.scale_stride = scale_stride;
  a.grad = grad_scale.has_value() ? grad_out->mutable_data_ptr() : nullptr;
  a.grad_stride = grad_scale.has_value() ? grad_out->stride(0) : 0;
  dispatch_float(dt, "masked_kl_rows: logits", [&](auto codec) {
    using C = decltype(codec);
    if (direction == kForward) {
      u != nullptr ? rows_kernel<C, kForward, true>(a) : rows_kernel<C, kForward, false>(a);
    } else {
      u != nullptr ? rows_kernel<C, kReverse, true>(a) : rows_kernel<C, kReverse, false>(a);
    }
  });
  return {loss, stats};
}

}  // namespace
}  // namespace unlearnopt

TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m) {
  m.def(
      "masked_kl_rows(Tensor logits, Tensor ref_logits, Tensor? token_mask, Tensor? vocab_mask, "
      "int direction, float inv_temperature, Tensor? stats_in, Tensor? grad_scale, "
      "Tensor(a!)? grad_out) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CPU, m) {
  m.impl("masked_kl_rows", &unlearnopt::masked_kl_rows);
}
