// Masked KL divergence to the original model, CPU rows kernel (SIU's DMK, MOLLM's retain KL).
//
// torch.ops.unlearnopt_native.masked_kl_rows(logits [N, V], ref_logits [N, V],
//     token_mask [N] f32?, vocab_mask [V] f32?, direction (0 forward, 1 reverse),
//     inv_temperature, stats_in [N, 3] f32?, grad_scale f32 (1 or N)?, grad_out [N, V]?)
//     -> (loss [N] f32, stats [N, 3] f32)
//
// With z = logits / T, r = ref_logits / T, p = softmax(z), q = softmax(r), u the vocab mask
// and m the token mask, row i gets loss m_i * KL_i (0, not computed, where m_i == 0) and
// stats (lse_z, lse_r, coef) where coef is what the gradient needs besides the two lse:
//   forward: KL = sum u q (log q - log p),  coef = S = sum u q
//   reverse: KL = sum u p (log p - log q),  coef = C = KL + sum u p
// Statistics come from ONE read of both rows (online log-sum-exp of each, with the masked
// sums rescaled whenever a running max grows). With stats_in the statistics pass is skipped
// (backward) and both outputs are returned empty. With grad_scale, grad_out[i] receives
// grad_scale[i] * m_i * dKL_i/dlogits_i (zeros where m_i == 0); grad_out may be logits.
// All math is float32 whatever the input dtype; offsets are int64.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {
namespace masked_kl_detail {

constexpr int64_t kBlock = 2048;  // 2 x 8 KB of fp32 per block: stays in L1 between the loops
constexpr int kForward = 0;
constexpr int kReverse = 1;

// The row loops below are only vectorised by GCC without -ftrapping-math: with it, the
// compares of the clamps and selects count as possibly trapping and block if-conversion
// ("control flow in loop"). Nothing here relies on FP exceptions.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

// exp(x) for float, written so that `omp simd` loops vectorise it (std::exp does not without
// -ffast-math). e^x = 2^n e^f with n = round(x / ln2), f = x - n ln2 (two-part ln2), and e^f
// from a degree-7 polynomial (Cephes expf coefficients); relative error ~1e-7. Inputs below
// ln(FLT_MIN) give exactly 0 (so exp(-inf) = 0); inputs above 88 are clamped.
__attribute__((always_inline)) static inline float fast_exp(float x) {
  const float lo = -87.33654475f;
  const float hi = 88.0f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // Adding 1.5 * 2^23 rounds to the nearest integer; its low mantissa bits hold n.
  const float magic = 12582912.0f;
  float t = xc * 1.44269504088896341f + magic;
  float n = t - magic;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  int32_t ni = ti - 0x4B400000;
  float f = xc - n * 0.693359375f;
  f = f - n * (-2.12194440e-4f);
  float poly = 1.9875691500e-4f;
  poly = poly * f + 1.3981999507e-3f;
  poly = poly * f + 8.3334519073e-3f;
  poly = poly * f + 4.1665795894e-2f;
  poly = poly * f + 1.6666665459e-1f;
  poly = poly * f + 5.0000001201e-1f;
  float ef = poly * (f * f) + f + 1.0f;
  int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float res = ef * scale;
  return x < lo ? 0.0f : res;
}

// exp(old_max - new_max) for rescaling running sums; 1 when the max did not move (which also
// covers both being -inf, where the difference would be NaN).
static inline float rescale(float old_max, float new_max) {
  return old_max == new_max ? 1.0f : std::exp(old_max - new_max);
}

struct RowStats {
  float lse_z, lse_r, coef, kl;
};

// One read of both rows: online log-sum-exp of z and r and the masked sums.
//   forward: a = sum u e^{r - mr},  b = sum u e^{r - mr} (r - z)   (scaled by 1/sum e^{r - mr})
//            KL = b/sr + (lse_z - lse_r) a/sr   since log q - log p = (r - z) + (lse_z - lse_r)
//   reverse: a = sum u e^{z - mz},  b = sum u e^{z - mz} (z - r)
//            KL = b/sz + (lse_r - lse_z) a/sz
template <typename scalar_t, int DIR, bool HAS_U>
RowStats row_stats(const scalar_t* __restrict z_row, const scalar_t* __restrict r_row,
                   const float* __restrict u, int64_t V, float inv_t, float* __restrict zb,
                   float* __restrict rb) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float mz = ninf, mr = ninf, sz = 0.f, sr = 0.f, a = 0.f, b = 0.f;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t len = std::min(kBlock, V - start);
    float bmz = ninf, bmr = ninf;
#pragma omp simd reduction(max : bmz, bmr)
    for (int64_t j = 0; j < len; ++j) {
      const float zj = static_cast<float>(z_row[start + j]) * inv_t;
      const float rj = static_cast<float>(r_row[start + j]) * inv_t;
      zb[j] = zj;
      rb[j] = rj;
      bmz = zj > bmz ? zj : bmz;
      bmr = rj > bmr ? rj : bmr;
    }
    const float nmz = std::max(mz, bmz), nmr = std::max(mr, bmr);
    const float cz = rescale(mz, nmz), cr = rescale(mr, nmr);
    sz *= cz;
    sr *= cr;
    if constexpr (DIR == kForward) {
      a *= cr;
      b *= cr;
    } else {
      a *= cz;
      b *= cz;
    }
    mz = nmz;
    mr = nmr;
    // A block of -inf only (possible only if the whole row so far is -inf) adds nothing.
    const float oz = mz == ninf ? 0.f : mz, orr = mr == ninf ? 0.f : mr;
    float ssz = 0.f, ssr = 0.f, sa = 0.f, sb = 0.f;
    const float* __restrict ub = HAS_U ? u + start : nullptr;
#pragma omp simd reduction(+ : ssz, ssr, sa, sb)
    for (int64_t j = 0; j < len; ++j) {
      const float ez = fast_exp(zb[j] - oz);
      const float er = fast_exp(rb[j] - orr);
      ssz += ez;
      ssr += er;
      if constexpr (DIR == kForward) {
        const float w = HAS_U ? ub[j] * er : er;
        sa += w;
        // w == 0 guards 0 * inf when a logit is -inf (product formed unconditionally so the
        // select is if-converted and the loop vectorises).
        const float t = w * (rb[j] - zb[j]);
        sb += w == 0.f ? 0.f : t;
      } else {
        const float w = HAS_U ? ub[j] * ez : ez;
        sa += w;
        const float t = w * (zb[j] - rb[j]);
        sb += w == 0.f ? 0.f : t;
      }
    }
    sz += ssz;
    sr += ssr;
    a += sa;
    b += sb;
  }
  RowStats st;
  st.lse_z = mz + std::log(sz);
  st.lse_r = mr + std::log(sr);
  if constexpr (DIR == kForward) {
    const float S = a / sr;
    st.kl = b / sr + (st.lse_z - st.lse_r) * S;
    st.coef = S;
  } else {
    const float S = a / sz;
    st.kl = b / sz + (st.lse_r - st.lse_z) * S;
    st.coef = st.kl + S;
  }
  return st;
}

// Gradient of the row, times k = scale * m / T (the 1/T because z = logits / T).
//   forward: dKL/dz_j = -u_j q_j + S p_j            (S = sum u q)
//   reverse: with f = log p - log q, dp_v/dz_j = p_v (d_vj - p_j), df_v/dz_j = d_vj - p_j:
//            dKL/dz_j = sum_v u_v [p_v (d_vj - p_j) f_v + p_v (d_vj - p_j)]
//                     = u_j p_j (f_j + 1) - p_j sum_v u_v p_v (f_v + 1)
//                     = p_j (u_j (f_j + 1) - C),    C = KL + sum u p
template <typename scalar_t, int DIR, bool HAS_U>
void row_grad(const scalar_t* z_row, const scalar_t* __restrict r_row, const float* __restrict u,
              scalar_t* g_row, int64_t V, float inv_t, const RowStats& st, float k,
              float* __restrict zb, float* __restrict rb) {
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t len = std::min(kBlock, V - start);
    // Load the whole block first: g_row may alias z_row.
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      zb[j] = static_cast<float>(z_row[start + j]) * inv_t;
      rb[j] = static_cast<float>(r_row[start + j]) * inv_t;
    }
    const float* __restrict ub = HAS_U ? u + start : nullptr;
    const float lse_z = st.lse_z, lse_r = st.lse_r, coef = st.coef;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float p = fast_exp(zb[j] - lse_z);
      float g;
      if constexpr (DIR == kForward) {
        const float q = fast_exp(rb[j] - lse_r);
        const float uq = HAS_U ? ub[j] * q : q;
        g = coef * p - uq;
      } else {
        const float f = (zb[j] - lse_z) - (rb[j] - lse_r);
        const float uf = HAS_U ? ub[j] * (f + 1.f) : (f + 1.f);
        const float t = p * (uf - coef);
        g = p == 0.f ? 0.f : t;
      }
      zb[j] = k * g;
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) g_row[start + j] = static_cast<scalar_t>(zb[j]);
  }
}

#pragma GCC pop_options

template <typename scalar_t, int DIR, bool HAS_U>
void run_rows(const at::Tensor& logits, const at::Tensor& ref, const float* tmask, const float* u,
              float inv_t, float* stats, bool have_stats, float* loss, const float* scale,
              int64_t scale_stride, const at::Tensor* grad_out) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t zs = logits.stride(0), rs = ref.stride(0);
  const scalar_t* zp = logits.data_ptr<scalar_t>();
  const scalar_t* rp = ref.data_ptr<scalar_t>();
  scalar_t* gp = grad_out ? grad_out->data_ptr<scalar_t>() : nullptr;
  const int64_t gs = grad_out ? grad_out->stride(0) : 0;
  const int nthreads =
      static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(N, 1)));
#pragma omp parallel num_threads(nthreads)
  {
    alignas(64) float zb[kBlock];
    alignas(64) float rb[kBlock];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const float m = tmask ? tmask[i] : 1.0f;
      const scalar_t* z_row = zp + i * zs;
      const scalar_t* r_row = rp + i * rs;
      if (m == 0.f) {
        // Masked token: no loss, no gradient, nothing read.
        if (!have_stats) {
          stats[3 * i] = stats[3 * i + 1] = stats[3 * i + 2] = 0.f;
          loss[i] = 0.f;
        }
        if (gp) std::fill(gp + i * gs, gp + i * gs + V, static_cast<scalar_t>(0.f));
        continue;
      }
      RowStats st;
      if (have_stats) {
        st.lse_z = stats[3 * i];
        st.lse_r = stats[3 * i + 1];
        st.coef = stats[3 * i + 2];
        st.kl = 0.f;
      } else {
        st = row_stats<scalar_t, DIR, HAS_U>(z_row, r_row, u, V, inv_t, zb, rb);
        stats[3 * i] = st.lse_z;
        stats[3 * i + 1] = st.lse_r;
        stats[3 * i + 2] = st.coef;
        loss[i] = m * st.kl;
      }
      if (gp) {
        const float k = scale[i * scale_stride] * m * inv_t;
        row_grad<scalar_t, DIR, HAS_U>(z_row, r_row, u, gp + i * gs, V, inv_t, st, k, zb, rb);
      }
    }
  }
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
    tmask = token_mask->data_ptr<float>();
  }
  const float* u = nullptr;
  if (vocab_mask.has_value()) {
    check_rows_arg("vocab_mask", *vocab_mask, V);
    u = vocab_mask->data_ptr<float>();
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
  const at::Tensor* gout = nullptr;
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
    scale = grad_scale->data_ptr<float>();
    scale_stride = grad_scale->numel() == 1 ? 0 : 1;
    gout = &(*grad_out);
  } else {
    TORCH_CHECK(!grad_out.has_value(), "masked_kl_rows: grad_out given without grad_scale");
    TORCH_CHECK(!have_stats, "masked_kl_rows: stats_in without grad_scale does nothing");
  }
  if (N == 0 || V == 0) return {loss, stats};
  const float inv_t = static_cast<float>(inv_temperature);
  float* loss_p = have_stats ? nullptr : loss.data_ptr<float>();
  float* stats_p = have_stats ? const_cast<float*>(stats_in->data_ptr<float>())
                              : stats.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "masked_kl_rows", [&] {
    if (direction == kForward) {
      if (u)
        run_rows<scalar_t, kForward, true>(logits, ref_logits, tmask, u, inv_t, stats_p,
                                           have_stats, loss_p, scale, scale_stride, gout);
      else
        run_rows<scalar_t, kForward, false>(logits, ref_logits, tmask, u, inv_t, stats_p,
                                            have_stats, loss_p, scale, scale_stride, gout);
    } else {
      if (u)
        run_rows<scalar_t, kReverse, true>(logits, ref_logits, tmask, u, inv_t, stats_p,
                                           have_stats, loss_p, scale, scale_stride, gout);
      else
        run_rows<scalar_t, kReverse, false>(logits, ref_logits, tmask, u, inv_t, stats_p,
                                            have_stats, loss_p, scale, scale_stride, gout);
    }
  });
  return {loss, stats};
}

}  // namespace masked_kl_detail
}  // namespace

TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m) {
  m.def(
      "masked_kl_rows(Tensor logits, Tensor ref_logits, Tensor? token_mask, Tensor? vocab_mask, "
      "int direction, float inv_temperature, Tensor? stats_in, Tensor? grad_scale, "
      "Tensor(a!)? grad_out) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CPU, m) {
  m.impl("masked_kl_rows", &masked_kl_detail::masked_kl_rows);
}
