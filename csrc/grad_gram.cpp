// Gradient Gram matrices over many tensors (multi-tensor, one read of every element).
//
//   grad_gram(Tensor?[] grads, int num_objectives, int chunk) -> Tensor [P, K, K] float64
//
// `grads` holds K * P entries, objective-major (grads[k * P + p] is objective k's gradient of
// tensor p), each a 1-D contiguous float32 / bfloat16 / float16 tensor or None (= zeros).
// The Python op (unlearnopt/ops/grad_gram.py) validates and flattens; here only internal
// invariants are checked.
//
// Work split: every tensor is cut into chunks of at most `chunk` elements and ALL chunks of
// ALL tensors form one list, so OpenMP balances the concatenated element range (one 29M
// embedding and a 576-element norm weigh what they hold, not one task each). A chunk is
// processed in L1-sized blocks: the K rows of a block are loaded once (16-bit inputs are
// widened into a per-thread float buffer) and all K(K+1)/2 products are accumulated from
// that read in float32 vector registers; each block's sums are added to float64 chunk
// accumulators (so a 50M-element tensor is not one long float32 reduction). Each chunk
// writes its K(K+1)/2 partials to its own slot; a second pass sums the slots of each tensor
// in chunk order. No atomics, so the result does not depend on the thread count or schedule.

#include <torch/library.h>
#include <torch/types.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// 8 floats = one AVX2 register; GCC/Clang lower it to whatever -march=native offers.
typedef float vf8 __attribute__((vector_size(32)));

inline vf8 loadu8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum8(vf8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Index of pair (a, b), a <= b, in the packed upper triangle stored row by row.
inline int64_t pair_index(int64_t a, int64_t b, int64_t k) { return a * k - a * (a - 1) / 2 + (b - a); }

// All pairs of K rows of length n in one pass (every row loaded once per 8 elements);
// acc[pair_index(a, b, K)] += <x_a, x_b>. K <= 4 keeps K(K+1)/2 + K vector registers live
// (at most 14 of AVX2's 16).
template <int K>
void gram_fused(const float* const* x, int64_t n, double* acc) {
  constexpr int NP = K * (K + 1) / 2;
  vf8 s[NP];
  for (int q = 0; q < NP; ++q) s[q] = vf8{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vf8 v[K];
#pragma GCC unroll 8
    for (int a = 0; a < K; ++a) v[a] = loadu8(x[a] + i);
    int q = 0;
#pragma GCC unroll 8
    for (int a = 0; a < K; ++a) {
#pragma GCC unroll 8
      for (int b = a; b < K; ++b) s[q++] += v[a] * v[b];
    }
  }
  float tail[NP] = {};
  for (; i < n; ++i) {
    int q = 0;
    for (int a = 0; a < K; ++a)
      for (int b = a; b < K; ++b) tail[q++] += x[a][i] * x[b][i];
  }
  for (int q = 0; q < NP; ++q) acc[q] += static_cast<double>(hsum8(s[q]) + tail[q]);
}

// Row a against C rows b..b+C-1 (one load of x_a feeds C products); the tile path for
// K > 4, where the fused form would spill its accumulators.
template <int C>
void dot_tile(const float* xa, const float* const* xb, int64_t n, double* out) {
  vf8 s[C];
  for (int c = 0; c < C; ++c) s[c] = vf8{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const vf8 va = loadu8(xa + i);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) s[c] += va * loadu8(xb[c] + i);
  }
  float tail[C] = {};
  for (; i < n; ++i)
    for (int c = 0; c < C; ++c) tail[c] += xa[i] * xb[c][i];
  for (int c = 0; c < C; ++c) out[c] += static_cast<double>(hsum8(s[c]) + tail[c]);
}

// Any K: row by row, tiles of up to 4 columns. The block is L1-resident, so re-reading
// x_a once per tile costs no memory traffic.
void gram_tiled(const float* const* x, int k, int64_t n, double* acc) {
  for (int a = 0; a < k; ++a) {
    for (int b = a; b < k; b += 4) {
      double* out = acc + pair_index(a, b, k);
      switch (std::min(4, k - b)) {
        case 4: dot_tile<4>(x[a], x + b, n, out); break;
        case 3: dot_tile<3>(x[a], x + b, n, out); break;
        case 2: dot_tile<2>(x[a], x + b, n, out); break;
        default: dot_tile<1>(x[a], x + b, n, out); break;
      }
    }
  }
}

void gram_block(const float* const* x, int k, int64_t n, double* acc) {
  switch (k) {
    case 1: gram_fused<1>(x, n, acc); break;
    case 2: gram_fused<2>(x, n, acc); break;
    case 3: gram_fused<3>(x, n, acc); break;
    case 4: gram_fused<4>(x, n, acc); break;
    default: gram_tiled(x, k, n, acc); break;
  }
}

// bfloat16 is the top half of a float: widening is a 16-bit shift (vectorises).
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

inline void widen(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

constexpr int kMaxObjectives = 64;

struct Chunk {
  int64_t tensor;  // tensor index p
  int64_t start;   // first element
  int64_t len;     // elements
};

// One chunk: its present rows, in blocks small enough that K rows stay in L1.
template <typename T>
void chunk_gram(const void* const* data, int k, const Chunk& c, int64_t block, float* buffer,
                double* acc) {
  const float* x[kMaxObjectives];
  for (int64_t off = 0; off < c.len; off += block) {
    const int64_t n = std::min(block, c.len - off);
    for (int a = 0; a < k; ++a) {
      const T* src = static_cast<const T*>(data[a]) + c.start + off;
      if constexpr (std::is_same_v<T, float>) {
        x[a] = src;
      } else {
        widen(src, buffer + a * block, n);
        x[a] = buffer + a * block;
      }
    }
    gram_block(x, k, n, acc);
  }
}

at::Tensor grad_gram(const c10::List<std::optional<at::Tensor>>& grads, int64_t num_objectives,
                     int64_t chunk) {
  const int64_t k = num_objectives;
  TORCH_CHECK(k >= 1 && k <= kMaxObjectives, "grad_gram: num_objectives must be in [1, ",
              kMaxObjectives, "], got ", k);
  TORCH_CHECK(static_cast<int64_t>(grads.size()) % k == 0,
              "grad_gram: expected K * P gradients, got ", grads.size(), " for K = ", k);
  TORCH_CHECK(chunk >= 64, "grad_gram: chunk must be >= 64, got ", chunk);
  const int64_t p_count = static_cast<int64_t>(grads.size()) / k;
  auto out = at::zeros({p_count, k, k}, at::TensorOptions().dtype(at::kDouble));

  // Per tensor: its present objectives (compact rows), their data, dtype and numel.
  std::vector<std::vector<int64_t>> present(p_count);
  std::vector<std::vector<const void*>> data(p_count);
  std::vector<at::ScalarType> dtype(p_count, at::kFloat);
  std::vector<int64_t> numel(p_count, 0);
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk(p_count + 1, 0);
  for (int64_t p = 0; p < p_count; ++p) {
    for (int64_t j = 0; j < k; ++j) {
      const std::optional<at::Tensor> g = grads.get(j * p_count + p);
      if (!g.has_value() || !g->defined()) continue;
      const at::Tensor& t = *g;
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 1,
                  "grad_gram: gradients must be 1-D contiguous CPU tensors (internal)");
      if (present[p].empty()) {
        dtype[p] = t.scalar_type();
        numel[p] = t.numel();
      }
      TORCH_CHECK(t.scalar_type() == dtype[p] && t.numel() == numel[p],
                  "grad_gram: gradients of tensor ", p, " differ in dtype or size (internal)");
      TORCH_CHECK(dtype[p] == at::kFloat || dtype[p] == at::kBFloat16 || dtype[p] == at::kHalf,
                  "grad_gram: dtype must be float32, bfloat16 or float16, got ", dtype[p]);
      present[p].push_back(j);
      data[p].push_back(t.data_ptr());
    }
    first_chunk[p] = static_cast<int64_t>(chunks.size());
    if (!present[p].empty())
      for (int64_t s = 0; s < numel[p]; s += chunk)
        chunks.push_back({p, s, std::min(chunk, numel[p] - s)});
  }
  first_chunk[p_count] = static_cast<int64_t>(chunks.size());
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t np_max = k * (k + 1) / 2;
  std::vector<double> partial(static_cast<size_t>(n_chunks * np_max), 0.0);
  // Elements per block: the K rows of a block take ~8 KB (a quarter of L1d) whatever K
  // is, and a float32 lane sums at most 256 products before they move to float64.
  const int64_t block = std::max<int64_t>(64, (2048 / k) / 16 * 16);

  // One OpenMP region, and only as many threads as there are ~1M-value slices of work:
  // a region's fork and join cost more than a small Gram (and much more on a busy machine).
  int64_t work = 0;
  for (const Chunk& c : chunks) work += c.len * static_cast<int64_t>(present[c.tensor].size());
  const int64_t slices = std::max<int64_t>(1, std::min(n_chunks, work >> 20));
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), slices));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buffer(static_cast<size_t>(k * block));
    // Dynamic schedule balances uneven tails; each chunk owns its partial slot, so the
    // schedule cannot change the result.
#pragma omp for schedule(dynamic, 1)
    for (int64_t ci = 0; ci < n_chunks; ++ci) {
      const Chunk& c = chunks[ci];
      double* acc = partial.data() + ci * np_max;
      const void* const* rows = data[c.tensor].data();
      const int kp = static_cast<int>(data[c.tensor].size());
      switch (dtype[c.tensor]) {
        case at::kFloat: chunk_gram<float>(rows, kp, c, block, buffer.data(), acc); break;
        case at::kBFloat16: chunk_gram<c10::BFloat16>(rows, kp, c, block, buffer.data(), acc); break;
        default: chunk_gram<c10::Half>(rows, kp, c, block, buffer.data(), acc); break;
      }
    }
  }

  // Second pass (serial: ~n_chunks * K^2 adds): per tensor, its chunks' partials in chunk
  // order, scattered from the compact (present-only) pairs to the full symmetric K x K.
  double* o = out.data_ptr<double>();
  for (int64_t p = 0; p < p_count; ++p) {
    const auto& idx = present[p];
    const int64_t kp = static_cast<int64_t>(idx.size());
    for (int64_t ci = first_chunk[p]; ci < first_chunk[p + 1]; ++ci) {
      const double* part = partial.data() + ci * np_max;
      for (int64_t a = 0; a < kp; ++a)
        for (int64_t b = a; b < kp; ++b) o[(p * k + idx[a]) * k + idx[b]] += part[pair_index(a, b, kp)];
    }
    for (int64_t a = 0; a < kp; ++a)
      for (int64_t b = a + 1; b < kp; ++b)
        o[(p * k + idx[b]) * k + idx[a]] = o[(p * k + idx[a]) * k + idx[b]];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m) {
  m.def("grad_gram_per_tensor(Tensor?[] grads, int num_objectives, int chunk) -> Tensor");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CompositeExplicitAutograd, m) {
  m.impl("grad_gram_per_tensor", &grad_gram);
}
