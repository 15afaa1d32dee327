// SPEL on the Stiefel manifold (docs/METHOD.md section 2): msign by Newton-Schulz iterations on the
// tall d x k matrix, the exact polar retraction through the k x k Gram matrix, and the momentum
// step that combines them. Everything that touches the learner state (U, M) validates first and
// writes last, so a bad gradient leaves the state as it was.
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/validation.h"

// LAPACK symmetric eigensolver (divide and conquer), exported by OpenBLAS. The trailing lengths are
// gfortran's hidden CHARACTER arguments.
extern "C" void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda,
                        double* w, double* work, const int* lwork, int* iwork, const int* liwork,
                        int* info, size_t jobz_len, size_t uplo_len);

namespace mapl {
namespace {

// Below this eigenvalue ratio of the Gram matrix (a condition number above 1e6) a float matrix is
// indistinguishable from a rank-deficient one: its polar factor is not determined by the data.
constexpr double kMinGramRatio = 1e-12;

// out = msign(y) for finite y (d, k), d >= k; out may alias y. msign(0) is 0, as sign(0) is: SPEL
// then simply does not move (a zero gradient with zero momentum).
void NewtonSchulz(const float* y, int d, int k, const MsignOptions& options, float* out) {
  const size_t dk = static_cast<size_t>(d) * k;
  if (dk == 0) return;
  // Frobenius normalisation puts every singular value in (0, 1], inside the cubic iteration's
  // basin (0, sqrt(3)). Summed in double so that large finite inputs cannot overflow.
  double sum_sq = 0.0;
  for (size_t i = 0; i < dk; ++i) sum_sq += static_cast<double>(y[i]) * y[i];
  if (sum_sq == 0.0) {
    std::fill(out, out + dk, 0.f);
    return;
  }
  const double inv_norm = 1.0 / std::sqrt(sum_sq);
  std::vector<float> x(dk), next(dk), a(static_cast<size_t>(k) * k);
  for (size_t i = 0; i < dk; ++i) x[i] = static_cast<float>(y[i] * inv_norm);

  for (int it = 0; it < options.max_iterations; ++it) {
    // a = X^T X (k x k).
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, k, d, 1.f, x.data(), k, x.data(), k,
                0.f, a.data(), k);
    float err = 0.f;
    for (int i = 0; i < k; ++i) {
      for (int j = 0; j < k; ++j) {
        err = std::max(err, std::fabs(a[i * k + j] - (i == j ? 1.f : 0.f)));
      }
    }
    if (err < options.tolerance) break;
    // a <- 1.5 I - 0.5 X^T X;  X <- X a.
    for (float& v : a) v *= -0.5f;
    for (int i = 0; i < k; ++i) a[i * k + i] += 1.5f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, k, k, 1.f, x.data(), k, a.data(), k,
                0.f, next.data(), k);
    std::swap(x, next);
  }
  std::copy(x.begin(), x.end(), out);
}

// One pass of out = y (y^T y)^(-1/2) in double; out must not alias y. Sets *gram_ratio to
// lambda_min / lambda_max of y^T y.
absl::Status PolarPass(const double* y, int d, int k, const char* what, double* out,
                       double* gram_ratio) {
  const size_t kk = static_cast<size_t>(k) * k;
  std::vector<double> g(kk), inv_sqrt(kk);
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, k, d, 1.0, y, k, y, k, 0.0, g.data(), k);
  MAPL_RETURN_IF_ERROR(cpu::GramInverseSqrt(g.data(), k, what, inv_sqrt.data(), gram_ratio));
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, k, k, 1.0, y, k, inv_sqrt.data(), k,
              0.0, out, k);
  return absl::OkStatus();
}

// The exact polar factor of y (d, k), computed in double and rounded into out.
absl::Status Polar(std::vector<double> y, int d, int k, const char* what, float* out) {
  const size_t dk = static_cast<size_t>(d) * k;
  if (dk == 0) return absl::OkStatus();
  std::vector<double> p(dk);
  double ratio = 1.0;
  MAPL_RETURN_IF_ERROR(PolarPass(y.data(), d, k, what, p.data(), &ratio));
  if (ratio < cpu::kRefineGramRatio) {
    std::swap(y, p);
    MAPL_RETURN_IF_ERROR(PolarPass(y.data(), d, k, what, p.data(), &ratio));
  }
  for (size_t i = 0; i < dk; ++i) out[i] = static_cast<float>(p[i]);
  return absl::OkStatus();
}

}  // namespace

absl::Status cpu::GramInverseSqrt(double* g, int k, const char* what, double* inv_sqrt,
                                  double* gram_ratio) {
  std::vector<double> w(k);
  // g is symmetric, so row- and column-major agree; on exit its column j (row j of the row-major
  // array) is the eigenvector of w[j], ascending.
  const int lwork = 1 + 6 * k + 2 * k * k;
  const int liwork = 3 + 5 * k;
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  int info = 0;
  dsyevd_("V", "U", &k, g, &k, w.data(), work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1);
  if (info != 0) {
    return absl::InternalError(absl::StrCat(what, ": dsyevd failed, info = ", info));
  }
  const double lambda_max = w[k - 1];
  const double lambda_min = w[0];
  if (!(lambda_max > 0.0) || !(lambda_min > lambda_max * kMinGramRatio)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": rank-deficient (Gram eigenvalues ",
                                                   lambda_min, " .. ", lambda_max, ")"));
  }
  *gram_ratio = lambda_min / lambda_max;

  // (y^T y)^(-1/2) = V diag(lambda^-1/2) V^T = Z^T Z with row j of Z = lambda_j^(-1/4) v_j^T.
  for (int j = 0; j < k; ++j) {
    const double s = 1.0 / std::sqrt(std::sqrt(w[j]));
    for (int i = 0; i < k; ++i) g[static_cast<size_t>(j) * k + i] *= s;
  }
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, k, k, 1.0, g, k, g, k, 0.0, inv_sqrt, k);
  return absl::OkStatus();
}

absl::Status CpuBackend::Msign(const ConstTensor& y, const Tensor& out,
                               const MsignOptions& options) const {
  MAPL_RETURN_IF_ERROR(CheckMsignArgs(y, out, options));
  MAPL_RETURN_IF_ERROR(CheckFinite(y, "y"));
  NewtonSchulz(y.f32(), static_cast<int>(y.rows), static_cast<int>(y.cols), options, out.f32());
  return absl::OkStatus();
}

absl::Status CpuBackend::Retract(const Tensor& u) const {
  MAPL_RETURN_IF_ERROR(CheckSpelMatrix(u, "u"));
  MAPL_RETURN_IF_ERROR(CheckFinite(u, "u"));
  const float* uf = u.f32();
  std::vector<double> y(uf, uf + u.size());
  return Polar(std::move(y), static_cast<int>(u.rows), static_cast<int>(u.cols), "u", u.f32());
}

absl::Status CpuBackend::SpelStep(const Tensor& u, const ConstTensor& grad, const Tensor& momentum,
                                  const SpelOptions& options) const {
  MAPL_RETURN_IF_ERROR(CheckSpelStepArgs(u, grad, momentum, options));
  MAPL_RETURN_IF_ERROR(CheckFinite(grad, "grad"));
  MAPL_RETURN_IF_ERROR(CheckFinite(u, "u"));
  MAPL_RETURN_IF_ERROR(CheckFinite(momentum, "momentum"));

  const int d = static_cast<int>(u.rows);
  const int k = static_cast<int>(u.cols);
  const size_t dk = static_cast<size_t>(d) * k;
  if (dk == 0) return absl::OkStatus();
  const float* uf = u.f32();
  const float* gf = grad.f32();
  const float* mf = momentum.f32();

  // The new momentum goes to scratch: it is committed only once the whole step has succeeded.
  std::vector<float> m_new(dk);
  for (size_t i = 0; i < dk; ++i) m_new[i] = options.beta * mf[i] + gf[i];
  for (size_t i = 0; i < dk; ++i) {
    if (!std::isfinite(m_new[i])) {
      return MomentumOverflowError(static_cast<int64_t>(i), k);
    }
  }

  // xi = M - U sym(U^T M): the projection onto the tangent space at U.
  std::vector<float> s(static_cast<size_t>(k) * k);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, k, d, 1.f, uf, k, m_new.data(), k, 0.f,
              s.data(), k);
  for (int i = 0; i < k; ++i) {
    for (int j = i; j < k; ++j) {
      const float v = 0.5f * (s[i * k + j] + s[j * k + i]);
      s[i * k + j] = v;
      s[j * k + i] = v;
    }
  }
  std::vector<float> xi(m_new);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, k, k, -1.f, uf, k, s.data(), k, 1.f,
              xi.data(), k);

  // D = msign(xi), in place.
  NewtonSchulz(xi.data(), d, k, options.msign, xi.data());

  // U <- polar(U - lr D), in double so that orthonormality does not drift over many steps. G is
  // the loss gradient dL/dU = G_up + G_down (docs/METHOD.md section 2), so the step descends it.
  std::vector<double> y(dk);
  for (size_t i = 0; i < dk; ++i) {
    y[i] = static_cast<double>(uf[i]) - static_cast<double>(options.lr) * xi[i];
  }
  std::vector<float> u_new(dk);
  MAPL_RETURN_IF_ERROR(Polar(std::move(y), d, k, "u - lr * msign(xi)", u_new.data()));

  std::copy(u_new.begin(), u_new.end(), u.f32());
  std::copy(m_new.begin(), m_new.end(), momentum.f32());
  return absl::OkStatus();
}

}  // namespace mapl
