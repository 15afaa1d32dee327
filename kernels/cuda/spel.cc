// Msign, Retract and SpelStep on the device, computed as kernels/cpu/spel.cc computes them, with
// its validation and errors (kernels/validation.h):
//
//   - Newton-Schulz: the two GEMMs of each iteration on cuBLAS SGEMM (fp32 accumulation, no
//     TF32); the Frobenius normalisation (summed in double), the stopping test max |X^T X - I| <
//     tolerance and the coefficient step 1.5 I - 0.5 X^T X in kernels/cuda/spel.cu. The test is
//     read back every iteration, a synchronization each, so that both backends stop alike.
//   - The polar retraction in double: y^T y and y (y^T y)^(-1/2) on cuBLAS DGEMM; the k x k
//     eigenproblem between them on the host, with the CPU backend's own code
//     (cpu::GramInverseSqrt, LAPACK dsyevd), k x k doubles over PCIe each way. A second pass for
//     a condition number above 1e3, as on the CPU.
//   - SpelStep: the momentum, sym(U^T M) and the tangent projection on the device, then the two
//     above.
//
// Results differ from the CPU's by summation order only (and the number of Newton-Schulz
// iterations where the two land on either side of the tolerance). Learner state (u, momentum) is
// written last, once everything has succeeded: a NaN or Inf, an overflowing momentum or a
// rank-deficient matrix leaves it as it was.
#include <cuda_runtime_api.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/kernels.h"
#include "kernels/validation.h"

namespace mapl {
namespace {

using cuda::CudaStatus;
using cuda::Lane;

// `count` values of T in scratch slot `slot`.
template <typename T>
absl::StatusOr<T*> Scratch(Lane& lane, int slot, size_t count) {
  MAPL_ASSIGN_OR_RETURN(void* p, lane.slots[slot].Reserve(count * sizeof(T)));
  return static_cast<T*>(p);
}

// msign(y) for finite device y (d, k), d >= k, as NewtonSchulz of kernels/cpu/spel.cc; the result
// is in one of the scratch slots first_slot .. first_slot + 3, which it uses. y is only read, and
// only before anything is written, so the caller may write the result over it.
absl::StatusOr<float*> NewtonSchulz(Lane& lane, const cuda::CublasApi& blas, const float* y, int d,
                                    int k, const MsignOptions& options, int first_slot) {
  const size_t dk = static_cast<size_t>(d) * k, kk = static_cast<size_t>(k) * k;
  MAPL_ASSIGN_OR_RETURN(float* x, Scratch<float>(lane, first_slot, dk));
  MAPL_ASSIGN_OR_RETURN(float* next, Scratch<float>(lane, first_slot + 1, dk));
  MAPL_ASSIGN_OR_RETURN(float* a, Scratch<float>(lane, first_slot + 2, kk));
  MAPL_ASSIGN_OR_RETURN(double* sum_d, Scratch<double>(lane, first_slot + 3, 1));
  // The Frobenius normalisation, in double; in a fixed order, so a call gives the same bits
  // whatever memory its operands are in.
  MAPL_RETURN_IF_ERROR(CudaStatus(
      cuda::LaunchSumSquaresDeterministic(y, static_cast<int64_t>(dk), sum_d, lane.stream),
      "LaunchSumSquaresDeterministic"));
  double sum_sq = 0.0;
  MAPL_RETURN_IF_ERROR(cuda::Download(lane, &sum_sq, sum_d, sizeof(sum_sq)));
  if (sum_sq == 0.0) {  // msign(0) = 0
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(x, 0, dk * sizeof(float), lane.stream));
    return x;
  }
  const double inv_norm = 1.0 / std::sqrt(sum_sq);
  MAPL_RETURN_IF_ERROR(
      CudaStatus(cuda::LaunchScaleToF32(y, inv_norm, static_cast<int64_t>(dk), x, lane.stream),
                 "LaunchScaleToF32"));

  for (int it = 0; it < options.max_iterations; ++it) {
    // a = X^T X (k x k).
    MAPL_RETURN_IF_ERROR(blas.RowMajorSgemm(lane.blas, true, false, k, k, d, 1.f, x, x, 0.f, a));
    // err = max |a - I|, and a <- 1.5 I - 0.5 a (unused when the iteration stops here).
    MAPL_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(lane.error_word, 0, sizeof(unsigned long long), lane.stream));
    MAPL_RETURN_IF_ERROR(
        CudaStatus(cuda::LaunchNewtonSchulzStep(a, k, lane.error_word, lane.stream),
                   "LaunchNewtonSchulzStep"));
    unsigned long long bits = 0;
    MAPL_RETURN_IF_ERROR(cuda::Download(lane, &bits, lane.error_word, sizeof(bits)));
    const uint32_t err_bits = static_cast<uint32_t>(bits);
    float err = 0.f;
    std::memcpy(&err, &err_bits, sizeof(err));
    if (err < options.tolerance) break;
    // X <- X a.
    MAPL_RETURN_IF_ERROR(
        blas.RowMajorSgemm(lane.blas, false, false, d, k, k, 1.f, x, a, 0.f, next));
    std::swap(x, next);
  }
  return x;
}

// The exact polar factor of device y (d, k) in double, as Polar of kernels/cpu/spel.cc, rounded to
// float into device `out` (d, k). y and p are device scratch of d * k doubles, both overwritten;
// uses scratch slots first_slot and first_slot + 1. Nothing is written to `out` unless every pass
// succeeded, so `out` may be the caller's state. `what` names y in errors.
absl::Status Polar(Lane& lane, const cuda::CublasApi& blas, double* y, double* p, int d, int k,
                   const char* what, int first_slot, float* out) {
  const size_t kk = static_cast<size_t>(k) * k;
  MAPL_ASSIGN_OR_RETURN(double* g_d, Scratch<double>(lane, first_slot, kk));
  MAPL_ASSIGN_OR_RETURN(double* inv_sqrt_d, Scratch<double>(lane, first_slot + 1, kk));
  std::vector<double> g(kk), inv_sqrt(kk);
  double ratio = 1.0;
  // One pass: dst = src (src^T src)^(-1/2).
  auto pass = [&](const double* src, double* dst) -> absl::Status {
    MAPL_RETURN_IF_ERROR(
        blas.RowMajorDgemm(lane.blas, true, false, k, k, d, 1.0, src, src, 0.0, g_d));
    MAPL_RETURN_IF_ERROR(cuda::Download(lane, g.data(), g_d, kk * sizeof(double)));
    MAPL_RETURN_IF_ERROR(cpu::GramInverseSqrt(g.data(), k, what, inv_sqrt.data(), &ratio));
    MAPL_RETURN_IF_ERROR(cuda::Upload(lane, inv_sqrt_d, inv_sqrt.data(), kk * sizeof(double)));
    return blas.RowMajorDgemm(lane.blas, false, false, d, k, k, 1.0, src, inv_sqrt_d, 0.0, dst);
  };
  MAPL_RETURN_IF_ERROR(pass(y, p));
  const double* result = p;
  if (ratio < cpu::kRefineGramRatio) {
    MAPL_RETURN_IF_ERROR(pass(p, y));
    result = y;
  }
  return CudaStatus(cuda::LaunchF64ToF32(result, out, static_cast<int64_t>(d) * k, lane.stream),
                    "LaunchF64ToF32");
}

}  // namespace

absl::Status CudaBackend::Msign(const ConstTensor& y, const Tensor& out,
                                const MsignOptions& options) const {
  MAPL_RETURN_IF_ERROR(CheckMsignArgs(y, out, options));
  const int d = static_cast<int>(y.rows), k = static_cast<int>(y.cols);
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0 a host y's copy, 1-4 Newton-Schulz, 5 (unused: out is f32, stored as it is).
  MAPL_ASSIGN_OR_RETURN(const float* yd, cuda::DeviceF32(*lane, device_, 0, 0, y, "y"));
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(*lane, yd, y, "y"));
  MAPL_ASSIGN_OR_RETURN(float* x, NewtonSchulz(*lane, *blas_, yd, d, k, options, 1));
  return cuda::StoreF32(*lane, device_, 5, x, out, "out");
}

absl::Status CudaBackend::Retract(const Tensor& u) const {
  MAPL_RETURN_IF_ERROR(CheckSpelMatrix(u, "u"));
  const int d = static_cast<int>(u.rows), k = static_cast<int>(u.cols);
  const size_t dk = static_cast<size_t>(d) * k;
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0 a host u's copy, 1/2 the polar factor's double buffers, 3/4 the Gram matrix and its
  // inverse square root, 5 the result for a host u, 6 (unused: u is f32).
  MAPL_ASSIGN_OR_RETURN(const float* ud, cuda::DeviceF32(*lane, device_, 0, 0, u, "u"));
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(*lane, ud, u, "u"));
  MAPL_ASSIGN_OR_RETURN(double* y, Scratch<double>(*lane, 1, dk));
  MAPL_ASSIGN_OR_RETURN(double* p, Scratch<double>(*lane, 2, dk));
  MAPL_RETURN_IF_ERROR(CudaStatus(
      cuda::LaunchF32ToF64(ud, y, static_cast<int64_t>(dk), lane->stream), "LaunchF32ToF64"));
  // A device u is the target itself: y holds its copy, and Polar writes it only on success.
  MAPL_ASSIGN_OR_RETURN(float* target, cuda::F32Target(*lane, device_, 5, u, "u"));
  MAPL_RETURN_IF_ERROR(Polar(*lane, *blas_, y, p, d, k, "u", 3, target));
  return cuda::StoreF32(*lane, device_, 6, target, u, "u");
}

absl::Status CudaBackend::SpelStep(const Tensor& u, const ConstTensor& grad, const Tensor& momentum,
                                   const SpelOptions& options) const {
  MAPL_RETURN_IF_ERROR(CheckSpelStepArgs(u, grad, momentum, options));
  const int d = static_cast<int>(u.rows), k = static_cast<int>(u.cols);
  const size_t dk = static_cast<size_t>(d) * k, kk = static_cast<size_t>(k) * k;
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0 grad, 1 u, 2 momentum (copies of host operands), 3 the new momentum, 4 sym(U^T M),
  // 5 xi, 6-9 Newton-Schulz, 10/11 the polar factor's double buffers, 12/13 the Gram matrix and
  // its inverse square root, 14 the new U for a host u, 15 (unused: u and momentum are f32).
  MAPL_ASSIGN_OR_RETURN(const float* gd, cuda::DeviceF32(*lane, device_, 0, 0, grad, "grad"));
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(*lane, gd, grad, "grad"));
  MAPL_ASSIGN_OR_RETURN(const float* ud, cuda::DeviceF32(*lane, device_, 1, 1, u, "u"));
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(*lane, ud, u, "u"));
  MAPL_ASSIGN_OR_RETURN(const float* md,
                        cuda::DeviceF32(*lane, device_, 2, 2, momentum, "momentum"));
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(*lane, md, momentum, "momentum"));

  // The new momentum goes to scratch: it is committed only once the whole step has succeeded.
  MAPL_ASSIGN_OR_RETURN(float* m_new, Scratch<float>(*lane, 3, dk));
  MAPL_RETURN_IF_ERROR(CudaStatus(
      cuda::LaunchMomentum(md, gd, options.beta, static_cast<int64_t>(dk), m_new, lane->stream),
      "LaunchMomentum"));
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(lane->error_word, 0xff, sizeof(unsigned long long), lane->stream));
  MAPL_RETURN_IF_ERROR(
      CudaStatus(cuda::LaunchFirstNonFinite(m_new, /*bf16=*/false, static_cast<int64_t>(dk),
                                            lane->error_word, lane->stream),
                 "LaunchFirstNonFinite"));
  unsigned long long first = 0;
  MAPL_RETURN_IF_ERROR(cuda::Download(*lane, &first, lane->error_word, sizeof(first)));
  if (first != ULLONG_MAX) return MomentumOverflowError(static_cast<int64_t>(first), k);

  // xi = M - U sym(U^T M): the projection onto the tangent space at U.
  MAPL_ASSIGN_OR_RETURN(float* s, Scratch<float>(*lane, 4, kk));
  MAPL_RETURN_IF_ERROR(
      blas_->RowMajorSgemm(lane->blas, true, false, k, k, d, 1.f, ud, m_new, 0.f, s));
  MAPL_RETURN_IF_ERROR(CudaStatus(cuda::LaunchSymmetrize(s, k, lane->stream), "LaunchSymmetrize"));
  MAPL_ASSIGN_OR_RETURN(float* xi, Scratch<float>(*lane, 5, dk));
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(xi, m_new, dk * sizeof(float), cudaMemcpyDeviceToDevice, lane->stream));
  MAPL_RETURN_IF_ERROR(
      blas_->RowMajorSgemm(lane->blas, false, false, d, k, k, -1.f, ud, s, 1.f, xi));

  // D = msign(xi).
  MAPL_ASSIGN_OR_RETURN(float* dir, NewtonSchulz(*lane, *blas_, xi, d, k, options.msign, 6));

  // U <- polar(U - lr D), in double, as on the CPU.
  MAPL_ASSIGN_OR_RETURN(double* y, Scratch<double>(*lane, 10, dk));
  MAPL_ASSIGN_OR_RETURN(double* p, Scratch<double>(*lane, 11, dk));
  MAPL_RETURN_IF_ERROR(CudaStatus(
      cuda::LaunchRetractionInput(ud, dir, options.lr, static_cast<int64_t>(dk), y, lane->stream),
      "LaunchRetractionInput"));
  // A device u is the target itself: it has been read into y, and Polar writes it only on
  // success.
  MAPL_ASSIGN_OR_RETURN(float* u_new, cuda::F32Target(*lane, device_, 14, u, "u"));
  MAPL_RETURN_IF_ERROR(Polar(*lane, *blas_, y, p, d, k, "u - lr * msign(xi)", 12, u_new));

  // Commit: U, then M.
  MAPL_RETURN_IF_ERROR(cuda::StoreF32(*lane, device_, 15, u_new, u, "u"));
  return cuda::StoreF32(*lane, device_, 15, m_new, momentum, "momentum");
}

}  // namespace mapl
