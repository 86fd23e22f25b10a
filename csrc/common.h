// Shared helpers of the unlearnopt C++ CPU kernels.
//
// Everything here is header-only, inline and branch-free where it sits in an inner loop, so
// that GCC/Clang auto-vectorise the loops that call it (-O3 -march=native -fopenmp; use
// `#pragma omp simd` on the loop). No function calls survive inlining in the hot paths.
//
//   fast_exp(x)            float exp, max relative error 1.2e-7 on [-16, 0.35], 3e-7 down
//                          to -87.3, 0 below -87.7
//   fast_exp_le88(x)       the same for x <= 88 only (no upper clamp), for x - max, x - lse
//   F32 / BF16 / F16       element codecs: load(storage) -> float, store(float) -> storage
//   dispatch_float(dtype, f)  calls f(Codec{}) for float32 / bfloat16 / float16
//   parallel_rows(n, work, f) OpenMP static loop over rows, serial for small work
//   OnlineSumExp           one-pass (online, chunked) sum of exp over columns, float32
//                          math per element, double across chunks
#pragma once

#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

// Forced inlining for the helpers called inside vectorised loops: a call that survives
// (GCC's inliner gives up on big callers, e.g. a kernel with several fused loops) leaves the
// loop scalar, with one out-of-line call per element.
#define UNLEARNOPT_INLINE inline __attribute__((always_inline))

namespace unlearnopt {

// ---------------------------------------------------------------------------------------
// exp
// ---------------------------------------------------------------------------------------

template <typename To, typename From>
UNLEARNOPT_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  return __builtin_bit_cast(To, v);
}

// Branch-free select on the bits: a ternary on floats here gets sunk into a branch by GCC
// (PRE / code sinking), and the if-converter then refuses to re-flatten trapping float
// math, so the caller's loop is left scalar. An integer mask keeps it straight-line code.
UNLEARNOPT_INLINE float select_bits(bool cond, float if_true, float if_false) {
  const int32_t m = -static_cast<int32_t>(cond);
  return bit_cast<float>((bit_cast<int32_t>(if_true) & m) | (bit_cast<int32_t>(if_false) & ~m));
}

// exp(x) = 2^n * exp(r) with n = round(x / ln2) and r = x - n ln2 in [-ln2/2, ln2/2].
// r comes from one fused multiply-add with ln2 rounded to float (x - n ln2_f is exact before
// its one rounding), so r is off by n (ln2 - ln2_f) = n * 1.9e-9: at most 4.4e-8 for
// x >= -16, 2.4e-7 near -87, always under a tenth of the rounding error that x itself
// carries (half an ulp of x, >= |x| * 3e-8), and one FMA cheaper than a split ln2.
// exp(r) = 1 + r + r^2 q(r), q of degree 4 fitted to (exp(r) - 1 - r) / r^2 on Chebyshev
// nodes (relative error 1e-8 in exact arithmetic). Measured against double exp over float
// inputs: max relative error 1.2e-7 on [-16, 0.35], 3e-7 on [-87, -16].
// 2^n is built directly in the exponent bits, taken from t = x / ln2 + 1.5 * 2^23 itself
// (its low mantissa bits hold n; no float to int conversion).
// Range: x is clamped below at -88. There n = -127, whose exponent field is 0, so inputs
// below about -87.7 (and -inf) give exactly 0, with no extra select; between ln(FLT_MIN)
// = -87.34 and -87.7 the result is a (correct) subnormal. NaN stays NaN (it fails the test
// and flows through). No upper clamp: for x > 88 the result is meaningless (2^n overflows
// the exponent field), so callers pass only arguments known to be <= 88, such as a logit
// minus a running max or a log-sum-exp (<= 0 up to rounding). One compare and select fewer
// than fast_exp per element, which matters in kernels that are bound by their exps.
UNLEARNOPT_INLINE float fast_exp_le88(float x) {
  constexpr float kLo = -88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2 = 0.693147180559945309f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr uint32_t kRoundBits = 0x4B400000u;  // the bits of kRound
  const float xc = select_bits(x < kLo, kLo, x);
  // t lies in [2^23, 2^24) for |n| <= 2^22, where its ulp is 1: t = kRound + n exactly.
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  const float r = std::fma(-n, kLn2, xc);  // one rounding: see above (vfnmadd with -mfma)
  float q = 1.393364626e-03f;
  q = q * r + 8.363175206e-03f;
  q = q * r + 4.166646674e-02f;
  q = q * r + 1.666657627e-01f;
  q = q * r + 5.000000000e-01f;
  const float er = 1.0f + r + (r * r) * q;
  // Unsigned: for x > 88 the shift overflows (the result is documented as meaningless).
  const uint32_t bits = (bit_cast<uint32_t>(t) - kRoundBits + 127u) << 23;
  return er * bit_cast<float>(bits);
}

// exp for any float x: as fast_exp_le88, with inputs above 88 saturating to exp(88)
// ~ 1.65e38.
UNLEARNOPT_INLINE float fast_exp(float x) {
  constexpr float kHi = 88.0f;
  return fast_exp_le88(select_bits(x > kHi, kHi, x));
}

// ---------------------------------------------------------------------------------------
// element codecs: every kernel loads its dtype as float, computes in float, stores once
// ---------------------------------------------------------------------------------------

struct F32 {
  using storage = float;
  static UNLEARNOPT_INLINE float load(float v) { return v; }
  static UNLEARNOPT_INLINE float store(float f) { return f; }
};

// bfloat16 is the top half of a float: widening is a shift, narrowing rounds to nearest even.
struct BF16 {
  using storage = uint16_t;
  static UNLEARNOPT_INLINE float load(uint16_t v) {
    return bit_cast<float>(static_cast<uint32_t>(v) << 16);
  }
  static UNLEARNOPT_INLINE uint16_t store(float f) {
    const uint32_t u = bit_cast<uint32_t>(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    // A NaN must stay a NaN (the rounding carry could turn it into an infinity).
    const uint32_t nan = -static_cast<uint32_t>(f != f);  // a mask, see select_bits
    return static_cast<uint16_t>((0x7FC0u & nan) | (rounded & ~nan));
  }
};

// float16 by bit manipulation, branch-free so it vectorises (GCC 12 leaves _Float16
// conversions scalar without AVX512-FP16, and c10::Half's converters branch).
struct F16 {
  using storage = uint16_t;
  // Place exponent and mantissa 13 bits up, then rescale the exponent bias (15 -> 127) by a
  // multiplication with 2^112, which also turns half subnormals into the right normal
  // floats. Inf/NaN (exponent field 31) get the float exponent field 255 OR-ed in.
  static UNLEARNOPT_INLINE float load(uint16_t v) {
    const uint32_t h = v;
    const uint32_t em = h & 0x7FFFu;
    const float scaled = bit_cast<float>(em << 13) * 0x1p112f;
    const uint32_t special = -static_cast<uint32_t>(em >= 0x7C00u);
    return bit_cast<float>(bit_cast<uint32_t>(scaled) | (0x7F800000u & special) |
                           ((h & 0x8000u) << 16));
  }
  // Round to nearest even. Three candidates, chosen by integer masks:
  //  - |f| >= 65520 (rounds past the largest half) or inf/NaN: 0x7C00 / 0x7E00;
  //  - |f| < 2^-14 (half subnormal): adding 0.5 puts the half mantissa in the low float
  //    bits, rounded by the float adder itself;
  //  - normal: rebias the exponent, add 0xFFF + the lowest kept bit (ties to even), shift.
  static UNLEARNOPT_INLINE uint16_t store(float f) {
    const uint32_t u = bit_cast<uint32_t>(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
    const uint32_t sub = bit_cast<uint32_t>(bit_cast<float>(a) + 0.5f) - 0x3F000000u;
    const uint32_t norm = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    const uint32_t is_big = -static_cast<uint32_t>(a >= 0x477FF000u);
    const uint32_t is_sub = -static_cast<uint32_t>(a < 0x38800000u);
    const uint32_t out = (big & is_big) | (sub & is_sub & ~is_big) | (norm & ~is_sub & ~is_big);
    return static_cast<uint16_t>(out | sign);
  }
};

// Calls f(Codec{}) with the codec of a float32 / bfloat16 / float16 dtype.
template <typename Fn>
inline void dispatch_float(at::ScalarType dtype, const char* what, Fn&& f) {
  switch (dtype) {
    case at::kFloat: f(F32{}); break;
    case at::kBFloat16: f(BF16{}); break;
    case at::kHalf: f(F16{}); break;
    default: TORCH_CHECK(false, what, ": expected float32, bfloat16 or float16, got ", dtype);
  }
}

template <typename Codec>
inline const typename Codec::storage* data_as(const at::Tensor& t) {
  return reinterpret_cast<const typename Codec::storage*>(t.const_data_ptr());
}

template <typename Codec>
inline typename Codec::storage* mutable_data_as(const at::Tensor& t) {
  return reinterpret_cast<typename Codec::storage*>(t.mutable_data_ptr());
}

// ---------------------------------------------------------------------------------------
// threading
// ---------------------------------------------------------------------------------------

// Below this many elements in total, thread start-up costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

// f(row) for row in [0, n): one static OpenMP split of the rows (equal-length rows, so
// static is balanced), serial when n * work_per_row is small. f must not throw: record
// errors in a flag and check them after the loop.
template <typename Fn>
inline void parallel_rows(int64_t n, int64_t work_per_row, const Fn& f) {
#ifdef _OPENMP
  const bool parallel = n > 1 && n * work_per_row >= kParallelGrain && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < n; ++i) f(i);
#else
  for (int64_t i = 0; i < n; ++i) f(i);
#endif
}

// ---------------------------------------------------------------------------------------
// log-sum-exp of one row
// ---------------------------------------------------------------------------------------

// Columns per chunk of the online log-sum-exp (8 KiB of float32, an L1-sized piece).
constexpr int64_t kLseChunk = 2048;
// How far a chunk's max may rise above the running max before its fused sum could
// saturate: each term is then at most e^64 and a chunk sums to at most 2048 e^64 ~ 1.3e31,
// far from FLT_MAX (fast_exp saturates only above e^88).
constexpr float kLseMaxJump = 64.0f;

template <typename Codec>
inline float chunk_max(const typename Codec::storage* z, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < len; ++j) {
    const float x = Codec::load(z[j]);
    m = x > m ? x : m;
  }
  return m;
}

template <typename Codec>
inline float chunk_sum_exp(const typename Codec::storage* z, int64_t len, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < len; ++j) s += fast_exp(Codec::load(z[j]) - shift);
  return s;
}

// Online sum of exp over columns, float32 math per element, reading each column once:
// after add(z, len) calls, s = sum of exp(z_j - m) over the columns added and m is their
// max. log-sum-exp = m + log(s), formed by the caller in double.
// Per chunk of kLseChunk columns, one fused pass: the chunk's max and its sum of
// exp(z - m) together (the exp work overlaps the memory stream; a separate max pass would
// stall on memory and then compute from L1). Whenever a chunk's max exceeds m, the chunk
// is summed again relative to its own max (from L1) and s is rescaled by exp(m - max) in
// double: relative to an old, lower m, z - m is rounded at the magnitude of the gap
// (2e-6 absolute for a gap of 40), an error every large term would keep. Before the first
// finite value (m still -inf) a chunk takes a max pass, then a sum pass. s is a double
// (touched once per chunk) so rows of 10^5+ columns lose nothing there. A NaN among the
// columns makes s NaN (the max skips NaNs, the sum does not); +inf makes it NaN too
// (inf - inf); columns of -inf add 0.
struct OnlineSumExp {
  float m = -std::numeric_limits<float>::infinity();
  double s = 0.0;

  template <typename Codec>
  inline void add(const typename Codec::storage* z, int64_t len) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t c0 = 0; c0 < len; c0 += kLseChunk) {
      const int64_t n = len - c0 < kLseChunk ? len - c0 : kLseChunk;
      const typename Codec::storage* zc = z + c0;
      if (m > kNegInf) {
        float cm = kNegInf;
        float cs = 0.0f;
#pragma omp simd reduction(max : cm) reduction(+ : cs)
        for (int64_t j = 0; j < n; ++j) {
          const float x = Codec::load(zc[j]);
          cm = x > cm ? x : cm;
          cs += fast_exp(x - m);
        }
        if (cm > m) {
          // Redo relative to the new max (the fused terms may also have saturated).
          cs = chunk_sum_exp<Codec>(zc, n, cm);
          s = s * std::exp(static_cast<double>(m) - cm) + cs;
          m = cm;
        } else {
          s += cs;
        }
      } else {
        // Nothing finite yet (s is 0, or NaN). An all -inf chunk is summed with shift 0:
        // its terms are exp(-inf) = 0, and a NaN in it (skipped by the max) still shows.
        const float cm = chunk_max<Codec>(zc, n);
        s += chunk_sum_exp<Codec>(zc, n, cm == kNegInf ? 0.0f : cm);
        m = cm;
      }
    }
  }
};

}  // namespace unlearnopt
