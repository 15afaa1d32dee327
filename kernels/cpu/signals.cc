// The learning signals of docs/METHOD.md section 2: the upstream and downstream gradients with
// respect to U (the anchors' own gradients are with the anchors, kernels/cpu/anchors.cc). The d x
// k signals accumulate over the microbatches of a step, so each is formed in scratch and checked
// for finiteness before it is added: one bad microbatch does not spoil the step's sum.
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/validation.h"

namespace mapl {

absl::Status CpuBackend::GradUp(const ConstTensor& h, const ConstTensor& gzq, const Tensor& g_up,
                                bool accumulate) const {
  MAPL_RETURN_IF_ERROR(CheckGradUpArgs(h, gzq, g_up));
  const int n = static_cast<int>(h.rows);
  const int d = static_cast<int>(h.cols);
  const int k = static_cast<int>(gzq.cols);

  std::vector<float> result(static_cast<size_t>(d) * k, 0.f);
  if (n > 0 && d > 0 && k > 0) {
    F32View hv(h);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, k, n, 1.f, hv.data(), d, gzq.f32(), k,
                0.f, result.data(), k);
  }
  return CommitFinite(result, g_up, accumulate, "g_up");
}

absl::Status CpuBackend::GradDown(const ConstTensor& g, const ConstTensor& gu,
                                  const ConstTensor& zq, const ConstTensor& u,
                                  const LowRankAnchor* a, const Tensor& g_down,
                                  bool accumulate) const {
  MAPL_RETURN_IF_ERROR(CheckGradDownArgs(g, gu, zq, u, g_down));
  const int n = static_cast<int>(g.rows);
  const int d = static_cast<int>(g.cols);
  const int k = static_cast<int>(u.cols);
  cpu::AnchorFactors f;
  if (a != nullptr) {
    MAPL_ASSIGN_OR_RETURN(f, cpu::FactorAnchor(*a, n, u, "a"));
  }
  const int r = static_cast<int>(f.r);

  std::vector<float> result(static_cast<size_t>(d) * k, 0.f);
  if (n > 0 && d > 0 && k > 0) {
    F32View gv(g);
    // g^T zq - a^T (g U) - g^T (a U) = g^T (zq - P[t] (Q U)) - Q^T (P[t]^T gu): one GEMM of
    // n x d x k; the anchor's terms go through its rank r.
    std::vector<float> coef(zq.f32(), zq.f32() + static_cast<size_t>(n) * k);
    if (r > 0) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, r, -1.f, f.pt.data(), r,
                  f.qu.data(), k, 1.f, coef.data(), k);
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, k, n, 1.f, gv.data(), d, coef.data(), k,
                0.f, result.data(), k);
    if (r > 0) {
      std::vector<float> ptgu(static_cast<size_t>(r) * k);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, k, n, 1.f, f.pt.data(), r, gu.f32(),
                  k, 0.f, ptgu.data(), k);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, k, r, -1.f, a->q.f32(), d,
                  ptgu.data(), k, 1.f, result.data(), k);
    }
  }
  return CommitFinite(result, g_down, accumulate, "g_down");
}

}  // namespace mapl
