// Internal to the CUDA backend: cuBLAS, loaded at run time with dlopen("libcublas.so.13"), so that
// nothing in mapl links against it: mapld, the Python module and the Debian package run (and the
// package installs) on machines without CUDA, and a device machine uses the cuBLAS of its own
// image. Only the few entry points the backend calls are resolved.
//
// The math mode stays CUBLAS_DEFAULT_MATH: no TF32, so SGEMMs match the CPU's fp32 GEMMs within
// summation-order rounding, and DGEMMs are native FP64 (cuBLAS's fixed-point FP64 emulation is a
// math mode of its own, never set here).
#ifndef MAPL_KERNELS_CUDA_CUBLAS_API_H_
#define MAPL_KERNELS_CUDA_CUBLAS_API_H_

#include <cublas_api.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mapl::cuda {

class CublasApi {
 public:
  // UNAVAILABLE, naming dlerror(), when libcublas.so.13 cannot be loaded or lacks a symbol.
  static absl::StatusOr<std::unique_ptr<const CublasApi>> Load();

  // OK for CUBLAS_STATUS_SUCCESS, else INTERNAL naming `what` and cuBLAS's own description.
  absl::Status Check(cublasStatus_t s, absl::string_view what) const;

  // Row-major single-precision GEMM on device matrices: c (m, n) = alpha op(a) op(b) + beta c,
  // op(a) (m, kk) being a, or a^T when trans_a (a is then (kk, m)); op(b) (kk, n) likewise. The
  // one place the transpose trick lives: cuBLAS is column-major, and a row-major X is the
  // column-major X^T with the same leading dimension, so it computes c^T = op(b)^T op(a)^T.
  absl::Status RowMajorSgemm(cublasHandle_t handle, bool trans_a, bool trans_b, int m, int n,
                             int kk, float alpha, const float* a, const float* b, float beta,
                             float* c) const;
  // The same in double (the polar retraction, kernels/cuda/spel.cc).
  absl::Status RowMajorDgemm(cublasHandle_t handle, bool trans_a, bool trans_b, int m, int n,
                             int kk, double alpha, const double* a, const double* b, double beta,
                             double* c) const;

  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  decltype(&cublasSgemm_v2) sgemm = nullptr;
  decltype(&cublasDgemm_v2) dgemm = nullptr;
  decltype(&cublasGetStatusString) status_string = nullptr;

 private:
  CublasApi() = default;
};

}  // namespace mapl::cuda

#endif  // MAPL_KERNELS_CUDA_CUBLAS_API_H_
