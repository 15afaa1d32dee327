// Project and Lift on the device: one cuBLAS SGEMM each (fp32 accumulation, no TF32), bf16
// operands converted to fp32 on the device first, as the CPU backend converts them on the host.
#include "common/status_macros.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/validation.h"

namespace mapl {

absl::Status CudaBackend::Product(const ConstTensor& in, const ConstTensor& u, bool trans_u,
                                  const Tensor& out, const char* in_name,
                                  const char* out_name) const {
  if (out.size() == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0/1 the input (raw, f32), 2/3 u, 4 the f32 result, 5 its bf16 or host form.
  MAPL_ASSIGN_OR_RETURN(const float* a, cuda::DeviceF32(*lane, device_, 0, 1, in, in_name));
  MAPL_ASSIGN_OR_RETURN(const float* b, cuda::DeviceF32(*lane, device_, 2, 3, u, "u"));
  MAPL_ASSIGN_OR_RETURN(float* c, cuda::F32Target(*lane, device_, 4, out, out_name));
  MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane->blas, /*trans_a=*/false, trans_u,
                                            static_cast<int>(out.rows), static_cast<int>(out.cols),
                                            static_cast<int>(in.cols), 1.f, a, b, 0.f, c));
  return cuda::StoreF32(*lane, device_, 5, c, out, out_name);
}

absl::Status CudaBackend::Project(const ConstTensor& h, const ConstTensor& u,
                                  const Tensor& z) const {
  // The CPU backend's checks (kernels/validation.h).
  MAPL_RETURN_IF_ERROR(CheckProjectArgs(h, u, z));
  return Product(h, u, /*trans_u=*/false, z, "h", "z");
}

absl::Status CudaBackend::Lift(const ConstTensor& z, const ConstTensor& u, const Tensor& h) const {
  MAPL_RETURN_IF_ERROR(CheckLiftArgs(z, u, h));
  return Product(z, u, /*trans_u=*/true, h, "z", "h");
}

}  // namespace mapl
