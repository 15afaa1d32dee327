// Naive reference maths shared by the kernel tests: plain loops in double, no BLAS or LAPACK, so
// that a kernel and its reference never share a code path. Where a kernel factorizes (the polar
// factor of SPEL goes through a Gram matrix and LAPACK's dsyevd, msign through Newton-Schulz), the
// reference uses a different algorithm (one-sided Jacobi rotations, Gram-Schmidt) or a matrix
// built from known factors.
#ifndef MAPL_TESTS_KERNELS_REFERENCE_H_
#define MAPL_TESTS_KERNELS_REFERENCE_H_

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <random>
#include <vector>

namespace mapl::reference {

inline std::vector<float> Gaussian(std::mt19937& rng, size_t count, float stddev = 1.f) {
  std::normal_distribution<float> dist(0.f, stddev);
  std::vector<float> v(count);
  for (float& x : v) x = dist(rng);
  return v;
}

// a^T b for a (rows, ka) and b (rows, kb).
inline std::vector<double> AtB(const std::vector<double>& a, const std::vector<double>& b, int rows,
                               int ka, int kb) {
  std::vector<double> c(static_cast<size_t>(ka) * kb, 0.0);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < ka; ++i) {
      for (int j = 0; j < kb; ++j) c[i * kb + j] += a[r * ka + i] * b[r * kb + j];
    }
  }
  return c;
}

// a b for a (rows, inner) and b (inner, cols).
inline std::vector<double> AB(const std::vector<double>& a, const std::vector<double>& b, int rows,
                              int inner, int cols) {
  std::vector<double> c(static_cast<size_t>(rows) * cols, 0.0);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < inner; ++i) {
      for (int j = 0; j < cols; ++j) c[r * cols + j] += a[r * inner + i] * b[i * cols + j];
    }
  }
  return c;
}

// a b^T for a (rows, inner) and b (cols, inner).
inline std::vector<double> ABt(const std::vector<double>& a, const std::vector<double>& b, int rows,
                               int inner, int cols) {
  std::vector<double> c(static_cast<size_t>(rows) * cols, 0.0);
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < cols; ++j) {
      double s = 0.0;
      for (int i = 0; i < inner; ++i) s += a[r * inner + i] * b[j * inner + i];
      c[r * cols + j] = s;
    }
  }
  return c;
}

// An orthonormal (rows, cols) matrix, rows >= cols: modified Gram-Schmidt in double on a Gaussian
// matrix, run twice so that the columns are orthonormal to double rounding.
inline std::vector<double> RandomOrthonormal(std::mt19937& rng, int rows, int cols) {
  const std::vector<float> g = Gaussian(rng, static_cast<size_t>(rows) * cols);
  std::vector<double> q(g.begin(), g.end());
  for (int j = 0; j < cols; ++j) {
    for (int pass = 0; pass < 2; ++pass) {
      for (int p = 0; p < j; ++p) {
        double dot = 0.0;
        for (int i = 0; i < rows; ++i) dot += q[i * cols + j] * q[i * cols + p];
        for (int i = 0; i < rows; ++i) q[i * cols + j] -= dot * q[i * cols + p];
      }
      double norm = 0.0;
      for (int i = 0; i < rows; ++i) norm += q[i * cols + j] * q[i * cols + j];
      norm = std::sqrt(norm);
      for (int i = 0; i < rows; ++i) q[i * cols + j] /= norm;
    }
  }
  return q;
}

// Thin SVD a = u diag(s) v^T of a (rows, cols), rows >= cols: u (rows, cols), s (cols) descending,
// v (cols, cols).
struct Svd {
  std::vector<double> u, s, v;
};

// One-sided Jacobi (Hestenes): plane rotations of column pairs until every pair is orthogonal;
// the column norms are then the singular values. Accurate to double rounding and free of any
// Gram matrix or eigensolver.
inline Svd JacobiSvd(std::vector<double> a, int rows, int cols) {
  std::vector<double> v(static_cast<size_t>(cols) * cols, 0.0);
  for (int j = 0; j < cols; ++j) v[j * cols + j] = 1.0;
  const double tol = rows * DBL_EPSILON;
  for (int sweep = 0; sweep < 100; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < cols; ++p) {
      for (int q = p + 1; q < cols; ++q) {
        double alpha = 0.0, beta = 0.0, gamma = 0.0;
        for (int i = 0; i < rows; ++i) {
          const double ap = a[i * cols + p], aq = a[i * cols + q];
          alpha += ap * ap;
          beta += aq * aq;
          gamma += ap * aq;
        }
        if (std::fabs(gamma) <= tol * std::sqrt(alpha * beta)) continue;
        rotated = true;
        // The rotation that zeroes the pair's inner product, the smaller of the two angles.
        const double zeta = (beta - alpha) / (2.0 * gamma);
        const double t =
            (zeta >= 0 ? 1.0 : -1.0) / (std::fabs(zeta) + std::sqrt(1.0 + zeta * zeta));
        const double c = 1.0 / std::sqrt(1.0 + t * t), s = c * t;
        for (int i = 0; i < rows; ++i) {
          const double ap = a[i * cols + p], aq = a[i * cols + q];
          a[i * cols + p] = c * ap - s * aq;
          a[i * cols + q] = s * ap + c * aq;
        }
        for (int i = 0; i < cols; ++i) {
          const double vp = v[i * cols + p], vq = v[i * cols + q];
          v[i * cols + p] = c * vp - s * vq;
          v[i * cols + q] = s * vp + c * vq;
        }
      }
    }
    if (!rotated) break;
  }
  std::vector<double> norms(cols);
  for (int j = 0; j < cols; ++j) {
    double ss = 0.0;
    for (int i = 0; i < rows; ++i) ss += a[i * cols + j] * a[i * cols + j];
    norms[j] = std::sqrt(ss);
  }
  std::vector<int> order(cols);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return norms[x] > norms[y]; });
  Svd out;
  out.u.assign(static_cast<size_t>(rows) * cols, 0.0);
  out.s.resize(cols);
  out.v.resize(static_cast<size_t>(cols) * cols);
  for (int j = 0; j < cols; ++j) {
    const int from = order[j];
    out.s[j] = norms[from];
    for (int i = 0; i < rows; ++i) {
      out.u[i * cols + j] = norms[from] > 0 ? a[i * cols + from] / norms[from] : 0.0;
    }
    for (int i = 0; i < cols; ++i) out.v[i * cols + j] = v[i * cols + from];
  }
  return out;
}

// The polar factor u v^T of a full-rank (rows, cols) matrix, rows >= cols, from its Jacobi SVD.
inline std::vector<double> PolarFactor(const std::vector<double>& a, int rows, int cols) {
  const Svd svd = JacobiSvd(a, rows, cols);
  return ABt(svd.u, svd.v, rows, cols, cols);
}

// max |a - b| / (1 + |b|): absolute near zero, relative for large values.
template <typename A, typename B>
double MaxRelDiff(const A& a, const B& b) {
  double err = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double bi = static_cast<double>(b[i]);
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - bi) / (1.0 + std::fabs(bi)));
  }
  return err;
}

}  // namespace mapl::reference

#endif  // MAPL_TESTS_KERNELS_REFERENCE_H_
