// Naive reference maths shared by the kernel tests: plain loops in double, no BLAS, so that a
// kernel and its reference never share a code path.
#ifndef MAPL_TESTS_KERNELS_REFERENCE_H_
#define MAPL_TESTS_KERNELS_REFERENCE_H_

#include <algorithm>
#include <cmath>
#include <cstddef>
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
