// cuBLAS through dlopen (kernels/cuda/cublas_api.h).
#include "kernels/cuda/cublas_api.h"

#include <dlfcn.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace mapl::cuda {
namespace {

// The soname of the cuBLAS major version the backend was compiled against (cublas_api.h).
constexpr char kCublasSoname[] = "libcublas.so.13";

template <typename Fn>
absl::Status Resolve(void* lib, const char* symbol, Fn* out) {
  dlerror();
  void* p = dlsym(lib, symbol);
  if (p == nullptr) {
    const char* err = dlerror();
    return absl::UnavailableError(absl::StrCat(kCublasSoname, " has no symbol ", symbol, ": ",
                                               err != nullptr ? err : "null"));
  }
  *out = reinterpret_cast<Fn>(p);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<const CublasApi>> CublasApi::Load() {
  // The handle is never closed: the backend's cuBLAS handles may outlive any one backend object,
  // and unloading cuBLAS while a handle exists is undefined.
  void* lib = dlopen(kCublasSoname, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    return absl::UnavailableError(absl::StrCat(
        "cannot load cuBLAS (", kCublasSoname, "): ", err != nullptr ? err : "unknown error",
        "; install cuBLAS 13 (the CUDA 13 toolkit or pip's nvidia-cublas) and put its lib "
        "folder on LD_LIBRARY_PATH"));
  }
  std::unique_ptr<CublasApi> api(new CublasApi());
  absl::Status s;
  s.Update(Resolve(lib, "cublasCreate_v2", &api->create));
  s.Update(Resolve(lib, "cublasDestroy_v2", &api->destroy));
  s.Update(Resolve(lib, "cublasSetStream_v2", &api->set_stream));
  s.Update(Resolve(lib, "cublasSetMathMode", &api->set_math_mode));
  s.Update(Resolve(lib, "cublasSgemm_v2", &api->sgemm));
  s.Update(Resolve(lib, "cublasDgemm_v2", &api->dgemm));
  s.Update(Resolve(lib, "cublasGetStatusString", &api->status_string));
  if (!s.ok()) return s;
  return std::unique_ptr<const CublasApi>(std::move(api));
}

absl::Status CublasApi::Check(cublasStatus_t s, absl::string_view what) const {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const char* text = status_string != nullptr ? status_string(s) : nullptr;
  return absl::InternalError(absl::StrCat(what, " failed: cuBLAS status ", static_cast<int>(s),
                                          " (", text != nullptr ? text : "unknown", ")"));
}

absl::Status CublasApi::RowMajorSgemm(cublasHandle_t handle, bool trans_a, bool trans_b, int m,
                                      int n, int kk, float alpha, const float* a, const float* b,
                                      float beta, float* c) const {
  if (m == 0 || n == 0) return absl::OkStatus();
  // Column-major: c^T (n, m) = op(b)^T (n, kk) op(a)^T (kk, m). Row-major b (kk, n) is the
  // column-major b^T with ld n, which is op(b)^T as it stands; row-major b (n, kk) (trans_b) is
  // the column-major b^T with ld kk, to be transposed. a likewise, with m for n. Leading
  // dimensions must be >= 1 even when kk is 0 (then c = beta c).
  const int ld_b = std::max(1, trans_b ? kk : n), ld_a = std::max(1, trans_a ? m : kk);
  return Check(
      sgemm(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m,
            kk, &alpha, b, ld_b, a, ld_a, &beta, c, n),
      "cublasSgemm");
}

absl::Status CublasApi::RowMajorDgemm(cublasHandle_t handle, bool trans_a, bool trans_b, int m,
                                      int n, int kk, double alpha, const double* a, const double* b,
                                      double beta, double* c) const {
  if (m == 0 || n == 0) return absl::OkStatus();
  // As RowMajorSgemm.
  const int ld_b = std::max(1, trans_b ? kk : n), ld_a = std::max(1, trans_a ? m : kk);
  return Check(
      dgemm(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m,
            kk, &alpha, b, ld_b, a, ld_a, &beta, c, n),
      "cublasDgemm");
}

}  // namespace mapl::cuda
