#include "kernels/cuda_ipc.h"

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace mapl {

#ifdef MAPL_WITH_CUDA
// kernels/cuda/loader.cc: asks the CUDA module for the buffers; UNAVAILABLE when the module or
// a usable device is missing.
absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> CreateCudaIpcBuffersFromModule(
    const CudaIpcRequest& request);
#endif

absl::Status ValidateCudaIpcRequest(const CudaIpcRequest& r) {
  if (r.buffers == 0 || r.buffers > kMaxCudaIpcBuffers) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda_buffers: ", r.buffers, "; ask for 1 to ", kMaxCudaIpcBuffers));
  }
  if (r.buffer_bytes == 0 || r.buffer_bytes > kMaxCudaIpcBufferBytes) {
    return absl::InvalidArgumentError(absl::StrCat("cuda_buffer_bytes: ", r.buffer_bytes,
                                                   "; ask for 1 to ", kMaxCudaIpcBufferBytes,
                                                   " (64 GiB) bytes per buffer"));
  }
  if (r.events > kMaxCudaIpcEvents) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda_events: ", r.events, "; ask for at most ", kMaxCudaIpcEvents));
  }
  if (!r.device_uuid.empty() && r.device_uuid.size() != 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda_device_uuid: ", r.device_uuid.size(),
                     " bytes; a CUDA device UUID has 16 (cuDeviceGetUuid), or leave it empty"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> OpenCudaIpcBuffers(const CudaIpcRequest& request) {
  MAPL_RETURN_IF_ERROR(ValidateCudaIpcRequest(request));
#ifdef MAPL_WITH_CUDA
  absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> made = CreateCudaIpcBuffersFromModule(request);
  if (!made.ok() && absl::IsUnavailable(made.status())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "this mapld cannot use CUDA: ", made.status().message(),
        "; run it on the trainer's GPU machine with the NVIDIA driver, or send host tensors"));
  }
  return made;
#else
  return absl::FailedPreconditionError(
      "this mapld was built without CUDA (MAPL_WITH_CUDA=OFF), so it cannot share device "
      "memory; use a build made where nvcc is installed, or send host tensors");
#endif
}

}  // namespace mapl
