// Batched min-norm (MGDA) QP on CPU: OpenMP over problems, float64 math.
//
// min_norm(gram [B, K, K] float64 contiguous, int max_steps) -> (weights [B, K] f64, value [B] f64)
//
// minimise w^T G w over the probability simplex. The recipe, tolerances and their reasons
// are those of unlearnopt/reference/min_norm.py (the executable specification); in short:
//   * symmetrise, scale G by its max diagonal m (m == 0: uniform weights);
//   * K == 1: w = 1; K == 2: closed form (degenerate denominator: the smaller vertex,
//     or (1/2, 1/2) on a tie);
//   * 3 <= K <= kEnumMaxK: every face S of the simplex; on S the affine minimiser is
//     w_S = G'^-1_S 1 / (1^T G'^-1_S 1) with G' = G + 11^T, which is positive definite
//     exactly on affinely independent faces. Faces are visited depth first in increasing
//     index order, so the Cholesky factor of a face is its parent's plus one row (O(s^2)
//     per face instead of O(s^3)), and a pivot below kPivotTol prunes the whole subtree
//     (a superset of an affinely dependent set is dependent). Feasible faces are clamped
//     onto the simplex and the one with the smallest KKT residual wins; a face whose
//     residual is at rounding level ends the search.
//   * K > kEnumMaxK: Lawson-Hanson NNLS on H = G + 11^T (w = u / sum(u)), exact; at most
//     `max_steps` active-set steps (each adds or drops one index).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace unlearnopt {
namespace {

constexpr int kEnumMaxK = 8;        // reference ENUM_MAX_K
constexpr double kPivotTol = 1e-13; // reference PIVOT_TOL
constexpr double kFeasTol = 1e-10;  // reference FEAS_TOL
constexpr double kDualTol = 1e-13;  // reference DUAL_TOL
constexpr double kDoneTol = 1e-14;  // a residual this small is optimal to rounding: stop
constexpr double kInf = std::numeric_limits<double>::infinity();

// KKT residual of w for the scaled G (max diagonal 1), see reference kkt_residual.
double kkt_residual(const double* g, const double* w, int k) {
  double gw[64 > kEnumMaxK ? 64 : kEnumMaxK];
  std::vector<double> big;
  double* gwp = gw;
  if (k > 64) {
    big.resize(k);
    gwp = big.data();
  }
  double v = 0;
  for (int i = 0; i < k; ++i) {
    double acc = 0;
    for (int j = 0; j < k; ++j) acc += g[i * k + j] * w[j];
    gwp[i] = acc;
    v += w[i] * acc;
  }
  double r = 0;
  for (int i = 0; i < k; ++i) {
    const double d = gwp[i] - v;
    r = std::max(r, w[i] > 0 ? std::abs(d) : std::max(-d, 0.0));
  }
  return r;
}

void clamp_renormalize(double* w, int k) {
  double s = 0;
  for (int i = 0; i < k; ++i) {
    w[i] = std::max(w[i], 0.0);
    s += w[i];
  }
  const double inv = 1.0 / std::max(s, std::numeric_limits<double>::min());
  for (int i = 0; i < k; ++i) w[i] *= inv;
}

// Depth-first face enumeration with incremental Cholesky of G' = G + 11^T.
struct FaceSearch {
  const double* g;  // scaled, symmetric [k, k]
  int k;
  double L[kEnumMaxK][kEnumMaxK];
  double z[kEnumMaxK];  // L z = 1 on the current face
  int idx[kEnumMaxK];
  double best_r = kInf;
  double best_w[kEnumMaxK];
  bool done = false;

  void evaluate(int s, double zz) {
    // u = L^-T z, w_S = u / (1^T u) and 1^T u = z^T z.
    double u[kEnumMaxK];
    for (int i = s - 1; i >= 0; --i) {
      double acc = z[i];
      for (int p = i + 1; p < s; ++p) acc -= L[p][i] * u[p];
      u[i] = acc / L[i][i];
    }
    double w[kEnumMaxK] = {0};
    const double inv = 1.0 / zz;
    for (int i = 0; i < s; ++i) {
      const double wi = u[i] * inv;
      if (!(wi >= -kFeasTol)) return;  // infeasible (or NaN)
      w[idx[i]] = wi;
    }
    clamp_renormalize(w, k);
    const double r = kkt_residual(g, w, k);
    if (r < best_r) {
      best_r = r;
      std::copy(w, w + k, best_w);
      if (r <= kDoneTol) done = true;
    }
  }

  void visit(int s, int next, double zz) {
    for (int j = next; j < k && !done; ++j) {
      idx[s] = j;
      double d = g[j * k + j] + 1.0;
      for (int p = 0; p < s; ++p) {
        double acc = g[j * k + idx[p]] + 1.0;
        for (int q = 0; q < p; ++q) acc -= L[s][q] * L[p][q];
        L[s][p] = acc / L[p][p];
        d -= L[s][p] * L[s][p];
      }
      if (!(d > kPivotTol)) continue;  // affinely dependent: so is every superset
      L[s][s] = std::sqrt(d);
      double acc = 1.0;
      for (int q = 0; q < s; ++q) acc -= L[s][q] * z[q];
      z[s] = acc / L[s][s];
      const double zz_next = zz + z[s] * z[s];
      evaluate(s + 1, zz_next);
      visit(s + 1, j + 1, zz_next);
    }
  }
};

// s_P = H_PP^-1 1_P on the support P (s = 0 off P), H = G + 11^T; false when a Cholesky
// pivot is below kPivotTol (P affinely dependent). s may have entries <= 0.
bool equality_solve(const double* g, const std::vector<char>& support, int k,
                    std::vector<int>& idx, std::vector<double>& L, std::vector<double>& z,
                    std::vector<double>& s) {
  idx.clear();
  for (int i = 0; i < k; ++i)
    if (support[i]) idx.push_back(i);
  const int n = static_cast<int>(idx.size());
  std::fill(s.begin(), s.end(), 0.0);
  for (int a = 0; a < n; ++a) {
    double d = g[idx[a] * k + idx[a]] + 1.0;
    for (int p = 0; p < a; ++p) {
      double acc = g[idx[a] * k + idx[p]] + 1.0;
      for (int q = 0; q < p; ++q) acc -= L[a * k + q] * L[p * k + q];
      L[a * k + p] = acc / L[p * k + p];
      d -= L[a * k + p] * L[a * k + p];
    }
    if (!(d > kPivotTol)) return false;
    L[a * k + a] = std::sqrt(d);
    double acc = 1.0;
    for (int q = 0; q < a; ++q) acc -= L[a * k + q] * z[q];
    z[a] = acc / L[a * k + a];
  }
  for (int i = n - 1; i >= 0; --i) {
    double acc = z[i];
    for (int p = i + 1; p < n; ++p) acc -= L[p * k + i] * s[idx[p]];
    s[idx[i]] = acc / L[i * k + i];
  }
  return true;
}

// Lawson-Hanson NNLS on H = G + 11^T: min_{u >= 0} u^T H u - 2 1^T u, w = u / sum(u).
// The state machine of the reference's _solve_active_set, one problem at a time and
// stopping as soon as it is done (see there for why each step is what it is).
void solve_active_set(const double* g, int k, int max_steps, double* w_out) {
  std::vector<char> support(k, 0);
  std::vector<double> u(k, 0.0), s(k), L(static_cast<size_t>(k) * k), z(k);
  std::vector<int> idx;
  idx.reserve(k);
  int first = 0;
  for (int i = 1; i < k; ++i)
    if (g[i * k + i] < g[first * k + first]) first = i;
  support[first] = 1;
  int last = first;
  bool just_added = false;
  for (int step = 0; step < max_steps; ++step) {
    const bool ok = equality_solve(g, support, k, idx, L, z, s);
    if (!ok || (just_added && !(s[last] > 0))) {
      // Added on a rounding-level dual: undo; u is optimal on the support without it.
      if (just_added) support[last] = 0;
      break;
    }
    bool feasible = true;
    for (int i = 0; i < k; ++i)
      if (support[i] && !(s[i] > 0)) feasible = false;
    if (feasible) {
      u = s;
      double r_best = -kInf;
      int j_best = -1;
      for (int j = 0; j < k; ++j) {
        if (support[j]) continue;
        double hs = 0;
        for (int i = 0; i < k; ++i) hs += (g[j * k + i] + 1.0) * s[i];
        const double r = 1.0 - hs;
        if (r > r_best) {
          r_best = r;
          j_best = j;
        }
      }
      if (!(r_best > kDualTol)) break;  // KKT point
      support[j_best] = 1;
      last = j_best;
      just_added = true;
    } else {
      // Move towards s until the first coordinate reaches 0, and drop it.
      double alpha = kInf;
      int i_drop = -1;
      for (int i = 0; i < k; ++i) {
        if (!support[i] || s[i] > 0) continue;
        const double ratio = u[i] / std::max(u[i] - s[i], std::numeric_limits<double>::min());
        if (ratio < alpha) {
          alpha = ratio;
          i_drop = i;
        }
      }
      for (int i = 0; i < k; ++i) {
        if (!support[i]) continue;
        const double moved = u[i] + alpha * (s[i] - u[i]);
        const bool keep = moved > 0 && i != i_drop;
        u[i] = keep ? moved : 0.0;
        support[i] = keep;
      }
      just_added = false;
    }
  }
  double total = 0;
  for (int i = 0; i < k; ++i) total += u[i];
  if (!(total > 0)) {
    std::fill(u.begin(), u.end(), 0.0);
    u[first] = 1.0;
  }
  clamp_renormalize(u.data(), k);
  std::copy(u.begin(), u.end(), w_out);
}

void solve_one(const double* gram, int k, int max_steps, double* w, double* value,
               std::vector<double>& g) {
  // Symmetrise and scale by the largest diagonal entry.
  double m = 0;
  for (int i = 0; i < k; ++i) m = std::max(m, gram[i * k + i]);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) g[i * k + j] = 0.5 * (gram[i * k + j] + gram[j * k + i]);
  if (!(m > 0)) {
    for (int i = 0; i < k; ++i) w[i] = 1.0 / k;
  } else {
    const double inv = 1.0 / m;
    for (int i = 0; i < k * k; ++i) g[i] *= inv;
    if (k == 1) {
      w[0] = 1.0;
    } else if (k == 2) {
      const double denom = g[0] + g[3] - 2.0 * g[1];  // |g1 - g2|^2
      // Degenerate or (rounding) concave along the segment: the smaller vertex wins.
      double w1 = g[0] < g[3] ? 1.0 : (g[3] < g[0] ? 0.0 : 0.5);
      if (denom > kPivotTol) w1 = std::min(std::max((g[3] - g[1]) / denom, 0.0), 1.0);
      w[0] = w1;
      w[1] = 1.0 - w1;
    } else if (k <= kEnumMaxK) {
      FaceSearch search;
      search.g = g.data();
      search.k = k;
      search.visit(0, 0, 0.0);
      std::copy(search.best_w, search.best_w + k, w);  // singletons always qualify
    } else {
      solve_active_set(g.data(), k, max_steps, w);
    }
  }
  // value = w^T G w with the symmetrised, unscaled G.
  double v = 0;
  for (int i = 0; i < k; ++i) {
    double acc = 0;
    for (int j = 0; j < k; ++j) acc += 0.5 * (gram[i * k + j] + gram[j * k + i]) * w[j];
    v += w[i] * acc;
  }
  *value = v;
}

std::tuple<at::Tensor, at::Tensor> min_norm(const at::Tensor& gram, int64_t max_steps) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2),
              "min_norm: gram must be [B, K, K], got ", gram.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kDouble && gram.is_contiguous() && gram.is_cpu(),
              "min_norm: gram must be a contiguous float64 CPU tensor");
  TORCH_CHECK(gram.size(1) >= 1, "min_norm: K must be >= 1");
  const int64_t b = gram.size(0);
  const int k = static_cast<int>(gram.size(1));
  auto weights = at::empty({b, k}, gram.options());
  auto value = at::empty({b}, gram.options());
  const double* gp = gram.data_ptr<double>();
  double* wp = weights.data_ptr<double>();
  double* vp = value.data_ptr<double>();
  const int steps = static_cast<int>(std::min<int64_t>(max_steps, 1 << 30));
#pragma omp parallel if (b >= 512)
  {
    std::vector<double> scratch(static_cast<size_t>(k) * k);
#pragma omp for schedule(dynamic, 256)
    for (int64_t p = 0; p < b; ++p) {
      solve_one(gp + p * k * k, k, steps, wp + p * k, vp + p, scratch);
    }
  }
  return {weights, value};
}

}  // namespace
}  // namespace unlearnopt

TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m) {
  m.def("min_norm_batched(Tensor gram, int max_steps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CPU, m) {
  m.impl("min_norm_batched", &unlearnopt::min_norm);
}
