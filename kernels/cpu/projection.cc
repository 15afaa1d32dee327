// Projection z = h U and lift h = z U^T on CBLAS sgemm (the anchored lift is with the anchors,
// kernels/cpu/anchors.cc).
// bf16 operands are converted in row blocks so the staging buffer stays cache-sized and the
// GEMM sees fp32 (BLAS has no bf16 GEMM on CPU).
#include <cblas.h>

#include <algorithm>
#include <vector>

#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/validation.h"

namespace mapl {
namespace {

// Rows per staging block for bf16 operands: 256 rows of d = 2048 floats is 2 MiB.
constexpr int64_t kBlockRows = 256;

// c (m x n) = a (m x kk) * b^T or b, all row-major fp32; beta 0 overwrites c.
void Gemm(bool trans_b, int64_t m, int64_t n, int64_t kk, const float* a, const float* b,
          float beta, float* c) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, kk, 1.f, a,
              kk, b, trans_b ? kk : n, beta, c, n);
}

// out (n x cols_out) = in (n x cols_in) * B, processed in row blocks when in or out is bf16.
void BlockedProduct(const ConstTensor& in, bool trans_b, const float* b, int64_t cols_out,
                    const Tensor& out) {
  const int64_t n = in.rows, cols_in = in.cols;
  if (in.dtype == DType::kF32 && out.dtype == DType::kF32) {
    Gemm(trans_b, n, cols_out, cols_in, in.f32(), b, 0.f, out.f32());
    return;
  }
  std::vector<float> in_buf(in.dtype == DType::kF32 ? 0 : kBlockRows * cols_in);
  std::vector<float> out_buf(out.dtype == DType::kF32 ? 0 : kBlockRows * cols_out);
  for (int64_t r0 = 0; r0 < n; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, n - r0);
    const float* a = in.dtype == DType::kF32 ? in.f32() + r0 * cols_in : in_buf.data();
    if (in.dtype != DType::kF32)
      Bf16ToFloat(in.bf16() + r0 * cols_in, in_buf.data(), rows * cols_in);
    float* c = out.dtype == DType::kF32 ? out.f32() + r0 * cols_out : out_buf.data();
    Gemm(trans_b, rows, cols_out, cols_in, a, b, 0.f, c);
    if (out.dtype != DType::kF32) FloatToBf16(c, out.bf16() + r0 * cols_out, rows * cols_out);
  }
}

}  // namespace

absl::Status CpuBackend::Project(const ConstTensor& h, const ConstTensor& u,
                                 const Tensor& z) const {
  MAPL_RETURN_IF_ERROR(CheckProjectArgs(h, u, z));
  BlockedProduct(h, /*trans_b=*/false, u.f32(), u.cols, z);
  return absl::OkStatus();
}

absl::Status CpuBackend::Lift(const ConstTensor& z, const ConstTensor& u, const Tensor& h) const {
  MAPL_RETURN_IF_ERROR(CheckLiftArgs(z, u, h));
  BlockedProduct(z, /*trans_b=*/true, u.f32(), u.rows, h);
  return absl::OkStatus();
}

}  // namespace mapl
