// The learning signals GradUp and GradDown on the device: cuBLAS SGEMMs into scratch, then
// commit-if-finite (accumulation included) on the device, with the validation and errors of
// kernels/cpu/signals.cc. The GEMM sequence is the CPU's, so results differ only by summation
// order.
#include "common/status_macros.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/kernels.h"
#include "kernels/validation.h"

namespace mapl {

absl::Status CudaBackend::GradUp(const ConstTensor& h, const ConstTensor& gzq, const Tensor& g_up,
                                 bool accumulate) const {
  MAPL_RETURN_IF_ERROR(CheckGradUpArgs(h, gzq, g_up));
  const int n = static_cast<int>(h.rows), d = static_cast<int>(h.cols);
  const int k = static_cast<int>(gzq.cols);
  if (int64_t{d} * k == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0/1 h, 2/3 gzq, 4 the result, 5 a device copy of a host g_up.
  MAPL_ASSIGN_OR_RETURN(void* result, lane->slots[4].Reserve(size_t(d) * k * 4));
  float* res = static_cast<float*>(result);
  if (n > 0) {
    MAPL_ASSIGN_OR_RETURN(const float* hd, cuda::DeviceF32(*lane, device_, 0, 1, h, "h"));
    MAPL_ASSIGN_OR_RETURN(const float* gd, cuda::DeviceF32(*lane, device_, 2, 3, gzq, "gzq"));
    // g_up = h^T gzq.
    MAPL_RETURN_IF_ERROR(
        blas_->RowMajorSgemm(lane->blas, true, false, d, k, n, 1.f, hd, gd, 0.f, res));
  } else {
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(res, 0, size_t(d) * k * 4, lane->stream));
  }
  return cuda::CommitFiniteOnDevice(*lane, device_, 5, res, g_up, accumulate, "g_up");
}

absl::Status CudaBackend::GradDown(const ConstTensor& g, const ConstTensor& gu,
                                   const ConstTensor& zq, const ConstTensor& u,
                                   const LowRankAnchor* a, const Tensor& g_down,
                                   bool accumulate) const {
  MAPL_RETURN_IF_ERROR(CheckGradDownArgs(g, gu, zq, u, g_down));
  const int n = static_cast<int>(g.rows), d = static_cast<int>(g.cols);
  const int k = static_cast<int>(u.cols);
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0/1 u, 2-6 the anchor, 7/8 g, 9 gu, 10/11 zq's private copy (the coefficients),
  // 12 the result, 13 P[t]^T gu, 14 a device copy of a host g_down.
  MAPL_ASSIGN_OR_RETURN(const float* ud, cuda::DeviceF32(*lane, device_, 0, 1, u, "u"));
  DeviceAnchor f;
  if (a != nullptr) {
    MAPL_ASSIGN_OR_RETURN(f, FactorAnchorOnDevice(*lane, *a, n, u, ud, "a", 2));
  }
  const int r = static_cast<int>(f.r);
  if (int64_t{d} * k == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(void* result, lane->slots[12].Reserve(size_t(d) * k * 4));
  float* res = static_cast<float*>(result);
  if (n > 0) {
    MAPL_ASSIGN_OR_RETURN(const float* gd, cuda::DeviceF32(*lane, device_, 7, 8, g, "g"));
    MAPL_ASSIGN_OR_RETURN(const float* gud, cuda::DeviceF32(*lane, device_, 9, 9, gu, "gu"));
    // g^T zq - a^T (g U) - g^T (a U) = g^T (zq - P[t] (Q U)) - Q^T (P[t]^T gu): one GEMM of
    // n x d x k; the anchor's terms go through its rank r.
    MAPL_ASSIGN_OR_RETURN(float* coef,
                          cuda::DeviceF32(*lane, device_, 10, 11, zq, "zq", /*copy=*/true));
    if (r > 0) {
      MAPL_RETURN_IF_ERROR(
          blas_->RowMajorSgemm(lane->blas, false, false, n, k, r, -1.f, f.pt, f.qu, 1.f, coef));
    }
    MAPL_RETURN_IF_ERROR(
        blas_->RowMajorSgemm(lane->blas, true, false, d, k, n, 1.f, gd, coef, 0.f, res));
    if (r > 0) {
      MAPL_ASSIGN_OR_RETURN(void* ptgu, lane->slots[13].Reserve(size_t(r) * k * 4));
      MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane->blas, true, false, r, k, n, 1.f, f.pt, gud,
                                                0.f, static_cast<float*>(ptgu)));
      MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane->blas, true, false, d, k, r, -1.f, f.q,
                                                static_cast<const float*>(ptgu), 1.f, res));
    }
  } else {
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(res, 0, size_t(d) * k * 4, lane->stream));
  }
  return cuda::CommitFiniteOnDevice(*lane, device_, 14, res, g_down, accumulate, "g_down");
}

}  // namespace mapl
