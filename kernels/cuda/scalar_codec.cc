// Int8 and int4 on the device (kernels/cuda/elementwise.cu), with the validation and errors of
// kernels/cpu/scalar_codec.cc (kernels/validation.h): shapes and sizes first, then the input's
// finiteness (on the device), and a decoder's scales on the host (n floats, copied over when they
// are device memory).
#include <vector>

#include "common/status_macros.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/kernels.h"
#include "kernels/validation.h"

namespace mapl {

absl::Status CudaBackend::Quantize(const ConstTensor& x, bool int4, void* q, size_t q_bytes,
                                   absl::Span<float> scales) const {
  if (x.rows == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  MAPL_ASSIGN_OR_RETURN(
      const void* xd,
      cuda::DeviceInput(*lane, device_, 0, x.data, size_t(x.size()) * DTypeSize(x.dtype), "x"));
  // NaN would make the scale NaN and Inf divides to NaN: refuse both, as the CPU backend does.
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(*lane, xd, x, "x"));
  MAPL_ASSIGN_OR_RETURN(cuda::DeviceOutput qd,
                        cuda::PrepareOutput(*lane, device_, 1, q, q_bytes, "q"));
  MAPL_ASSIGN_OR_RETURN(cuda::DeviceOutput sd,
                        cuda::PrepareOutput(*lane, device_, 2, scales.data(),
                                            scales.size() * sizeof(float), "scales"));
  MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
      cuda::LaunchQuantizeRows(xd, x.dtype == DType::kBF16, x.rows, x.cols, int4, qd.device,
                               static_cast<float*>(sd.device), lane->stream),
      "LaunchQuantizeRows"));
  MAPL_RETURN_IF_ERROR(cuda::FinishOutput(*lane, qd));
  return cuda::FinishOutput(*lane, sd);
}

absl::Status CudaBackend::Dequantize(const void* q, size_t q_bytes, bool int4,
                                     absl::Span<const float> scales, const Tensor& out) const {
  if (out.rows == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  MAPL_ASSIGN_OR_RETURN(std::vector<float> host_scales,
                        cuda::HostCopy(*lane, device_, scales, "scales"));
  MAPL_RETURN_IF_ERROR(CheckScales(host_scales));
  MAPL_ASSIGN_OR_RETURN(const void* qd, cuda::DeviceInput(*lane, device_, 0, q, q_bytes, "q"));
  MAPL_ASSIGN_OR_RETURN(const void* sd, cuda::DeviceInput(*lane, device_, 1, scales.data(),
                                                          scales.size() * sizeof(float), "scales"));
  MAPL_ASSIGN_OR_RETURN(float* of, cuda::F32Target(*lane, device_, 2, out, "out"));
  MAPL_RETURN_IF_ERROR(
      cuda::CudaStatus(cuda::LaunchDequantizeRows(qd, int4, static_cast<const float*>(sd), out.rows,
                                                  out.cols, of, lane->stream),
                       "LaunchDequantizeRows"));
  return cuda::StoreF32(*lane, device_, 3, of, out, "out");
}

absl::Status CudaBackend::Int8Encode(const ConstTensor& x, absl::Span<int8_t> q,
                                     absl::Span<float> scales) const {
  MAPL_RETURN_IF_ERROR(CheckScalarCodecArgs(x, "x", /*int4=*/false, q.data(), q.size(), scales));
  return Quantize(x, /*int4=*/false, q.data(), q.size(), scales);
}

absl::Status CudaBackend::Int8Decode(absl::Span<const int8_t> q, absl::Span<const float> scales,
                                     const Tensor& out) const {
  MAPL_RETURN_IF_ERROR(
      CheckScalarCodecArgs(out, "out", /*int4=*/false, q.data(), q.size(), scales));
  return Dequantize(q.data(), q.size(), /*int4=*/false, scales, out);
}

absl::Status CudaBackend::Int4Encode(const ConstTensor& x, absl::Span<uint8_t> q,
                                     absl::Span<float> scales) const {
  MAPL_RETURN_IF_ERROR(CheckScalarCodecArgs(x, "x", /*int4=*/true, q.data(), q.size(), scales));
  return Quantize(x, /*int4=*/true, q.data(), q.size(), scales);
}

absl::Status CudaBackend::Int4Decode(absl::Span<const uint8_t> q, absl::Span<const float> scales,
                                     const Tensor& out) const {
  MAPL_RETURN_IF_ERROR(CheckScalarCodecArgs(out, "out", /*int4=*/true, q.data(), q.size(), scales));
  return Dequantize(q.data(), q.size(), /*int4=*/true, scales, out);
}

}  // namespace mapl
