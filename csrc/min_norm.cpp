// Batched min-norm (MGDA) QP on CPU: OpenMP over problems, float64 math.
//
// min_norm(gram [B, K, K] float64 contiguous, int iters) -> (weights [B, K] f64, value [B] f64)
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
//   * K > kEnumMaxK: FISTA with a sort-based simplex projection for `iters` steps, then
//     equality solves on the support (plus the most violated index) that are kept when
//     feasible and better by KKT residual.
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
constexpr int kPolishRounds = 4;    // reference POLISH_ROUNDS
constexpr double kPivotTol = 1e-13; // reference PIVOT_TOL
constexpr double kFeasTol = 1e-10;  // reference FEAS_TOL
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

// Cholesky solve of G'_S w = lam 1 on a support mask (any K); false if singular/infeasible.
bool solve_on_support(const double* g, const std::vector<char>& support, int k,
                      std::vector<double>& w) {
  std::vector<int> idx;
  for (int i = 0; i < k; ++i)
    if (support[i]) idx.push_back(i);
  const int s = static_cast<int>(idx.size());
  if (s == 0) return false;
  std::vector<double> L(static_cast<size_t>(s) * s, 0.0), z(s), u(s);
  double zz = 0;
  for (int a = 0; a < s; ++a) {
    double d = g[idx[a] * k + idx[a]] + 1.0;
    for (int p = 0; p < a; ++p) {
      double acc = g[idx[a] * k + idx[p]] + 1.0;
      for (int q = 0; q < p; ++q) acc -= L[a * s + q] * L[p * s + q];
      L[a * s + p] = acc / L[p * s + p];
      d -= L[a * s + p] * L[a * s + p];
    }
    if (!(d > kPivotTol)) return false;
    L[a * s + a] = std::sqrt(d);
    double acc = 1.0;
    for (int q = 0; q < a; ++q) acc -= L[a * s + q] * z[q];
    z[a] = acc / L[a * s + a];
    zz += z[a] * z[a];
  }
  for (int i = s - 1; i >= 0; --i) {
    double acc = z[i];
    for (int p = i + 1; p < s; ++p) acc -= L[p * s + i] * u[p];
    u[i] = acc / L[i * s + i];
  }
  std::fill(w.begin(), w.end(), 0.0);
  for (int i = 0; i < s; ++i) {
    const double wi = u[i] / zz;
    if (!(wi >= -kFeasTol)) return false;
    w[idx[i]] = wi;
  }
  clamp_renormalize(w.data(), k);
  return true;
}

void project_simplex(const double* x, double* out, int k, std::vector<double>& sorted) {
  sorted.assign(x, x + k);
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  double css = 0, tau = 0;
  for (int j = 0; j < k; ++j) {
    css += sorted[j];
    const double t = (css - 1.0) / (j + 1);
    if (sorted[j] - t > 0) tau = t;
  }
  for (int i = 0; i < k; ++i) out[i] = std::max(x[i] - tau, 0.0);
}

void solve_fista(const double* g, int k, int iters, double* w_out) {
  double trace = 0, rows = 0;
  for (int i = 0; i < k; ++i) {
    trace += g[i * k + i];
    double r = 0;
    for (int j = 0; j < k; ++j) r += std::abs(g[i * k + j]);
    rows = std::max(rows, r);
  }
  const double step = 1.0 / std::max(2.0 * std::min(trace, rows),
                                     std::numeric_limits<double>::min());
  std::vector<double> w(k, 1.0 / k), y(w), wn(k), tmp(k), sorted;
  double t = 1.0;
  for (int it = 0; it < iters; ++it) {
    for (int i = 0; i < k; ++i) {
      double acc = 0;
      for (int j = 0; j < k; ++j) acc += g[i * k + j] * y[j];
      tmp[i] = y[i] - step * 2.0 * acc;
    }
    project_simplex(tmp.data(), wn.data(), k, sorted);
    const double tn = (1.0 + std::sqrt(1.0 + 4.0 * t * t)) / 2.0;
    const double mom = (t - 1.0) / tn;
    for (int i = 0; i < k; ++i) {
      y[i] = wn[i] + mom * (wn[i] - w[i]);
      w[i] = wn[i];
    }
    t = tn;
  }
  double best_r = kkt_residual(g, w.data(), k);
  std::vector<char> support(k);
  for (int i = 0; i < k; ++i) support[i] = w[i] > 0;
  std::vector<double> cand(k);
  for (int round = 0; round < kPolishRounds; ++round) {
    int worst = 0;
    double worst_gw = kInf;
    for (int i = 0; i < k; ++i) {
      double acc = 0;
      for (int j = 0; j < k; ++j) acc += g[i * k + j] * w[j];
      if (acc < worst_gw) {
        worst_gw = acc;
        worst = i;
      }
    }
    support[worst] = 1;
    if (!solve_on_support(g, support, k, cand)) continue;
    const double r = kkt_residual(g, cand.data(), k);
    if (r < best_r) {
      best_r = r;
      w = cand;
    }
    for (int i = 0; i < k; ++i) support[i] = cand[i] > 0;
  }
  std::copy(w.begin(), w.end(), w_out);
}

void solve_one(const double* gram, int k, int iters, double* w, double* value,
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
      solve_fista(g.data(), k, iters, w);
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

std::tuple<at::Tensor, at::Tensor> min_norm(const at::Tensor& gram, int64_t iters) {
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
  const int it = static_cast<int>(iters);
#pragma omp parallel if (b >= 512)
  {
    std::vector<double> scratch(static_cast<size_t>(k) * k);
#pragma omp for schedule(dynamic, 256)
    for (int64_t p = 0; p < b; ++p) {
      solve_one(gp + p * k * k, k, it, wp + p * k, vp + p, scratch);
    }
  }
  return {weights, value};
}

}  // namespace
}  // namespace unlearnopt

TORCH_LIBRARY_FRAGMENT(unlearnopt_native, m) {
  m.def("min_norm_batched(Tensor gram, int iters) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unlearnopt_native, CPU, m) {
  m.impl("min_norm_batched", &unlearnopt::min_norm);
}
