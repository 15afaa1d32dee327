// The learning signals of docs/METHOD.md section 2: the upstream and downstream gradients with
// respect to U, and the part of the loss gradient outside span(U) that trains the anchors. The d x
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

namespace mapl {
namespace {}  // namespace

absl::Status CpuBackend::GradUp(const ConstTensor& h, const ConstTensor& gzq, const Tensor& g_up,
                                bool accumulate) const {
  MAPL_RETURN_IF_ERROR(CheckShape(h, "h", -1, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(gzq, "gzq", h.rows, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(g_up, "g_up", h.cols, gzq.cols));
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

absl::Status CpuBackend::GradDown(const ConstTensor& g, const ConstTensor& zq, const ConstTensor& a,
                                  const ConstTensor& u, const Tensor& g_down,
                                  bool accumulate) const {
  MAPL_RETURN_IF_ERROR(CheckShape(g, "g", -1, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(u, "u", g.cols, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(zq, "zq", g.rows, u.cols));
  const bool has_anchor = a.rows != 0;
  if (has_anchor) {
    MAPL_RETURN_IF_ERROR(CheckF32Matrix(a, "a", g.rows, g.cols));
  } else {
    MAPL_RETURN_IF_ERROR(CheckShape(a, "a", 0, -1));
  }
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(g_down, "g_down", g.cols, u.cols));
  const int n = static_cast<int>(g.rows);
  const int d = static_cast<int>(g.cols);
  const int k = static_cast<int>(u.cols);

  std::vector<float> result(static_cast<size_t>(d) * k, 0.f);
  if (n > 0 && d > 0 && k > 0) {
    F32View gv(g);
    if (!has_anchor) {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, k, n, 1.f, gv.data(), d, zq.f32(), k,
                  0.f, result.data(), k);
    } else {
      // g^T zq - a^T (g U) - g^T (a U) = g^T (zq - a U) - a^T (g U): two GEMMs of n x d, not three.
      const size_t nk = static_cast<size_t>(n) * k;
      std::vector<float> gu(nk);
      std::vector<float> zq_minus_au(zq.f32(), zq.f32() + nk);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, d, 1.f, gv.data(), d, u.f32(), k,
                  0.f, gu.data(), k);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, d, -1.f, a.f32(), d, u.f32(), k,
                  1.f, zq_minus_au.data(), k);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, k, n, 1.f, gv.data(), d,
                  zq_minus_au.data(), k, 0.f, result.data(), k);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, k, n, -1.f, a.f32(), d, gu.data(), k,
                  1.f, result.data(), k);
    }
  }
  return CommitFinite(result, g_down, accumulate, "g_down");
}

absl::Status CpuBackend::OrthogonalComplement(const ConstTensor& g, const ConstTensor& u,
                                              const Tensor& g_perp) const {
  MAPL_RETURN_IF_ERROR(CheckShape(g, "g", -1, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(u, "u", g.cols, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(g_perp, "g_perp", g.rows, g.cols));
  const int n = static_cast<int>(g.rows);
  const int d = static_cast<int>(g.cols);
  const int k = static_cast<int>(u.cols);
  if (n == 0 || d == 0) return absl::OkStatus();

  F32View gv(g);
  // g U first, so that g_perp may alias g (in place on an f32 gradient).
  std::vector<float> gu(static_cast<size_t>(n) * k);
  if (k > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, d, 1.f, gv.data(), d, u.f32(), k,
                0.f, gu.data(), k);
  }
  float* out = g_perp.f32();
  if (out != gv.data()) std::memcpy(out, gv.data(), static_cast<size_t>(n) * d * sizeof(float));
  if (k > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, k, -1.f, gu.data(), k, u.f32(), k,
                1.f, out, d);
  }
  return absl::OkStatus();
}

}  // namespace mapl
