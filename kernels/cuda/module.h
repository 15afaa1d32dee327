// The entry points of the CUDA backend's module, libmapl_cuda.so, shared by the module
// (cuda_backend.cc) and the loader in mapl_kernels (loader.cc). Both sides are built from the
// same tree in the same build: the ABI string stops a stale module (another mapl version, or
// an older build installed elsewhere) from being used.
#ifndef MAPL_KERNELS_CUDA_MODULE_H_
#define MAPL_KERNELS_CUDA_MODULE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/cuda_ipc.h"

// Bump the trailing number when the entry points or anything they pass changes.
#define MAPL_CUDA_MODULE_ABI "mapl-cuda-module/" MAPL_VERSION_STRING "/2"

extern "C" {
// The module's MAPL_CUDA_MODULE_ABI.
using MaplCudaModuleAbiFn = const char* (*)();
// *out = a new CUDA backend, or why there is none (UNAVAILABLE without a usable device).
using MaplCudaCreateBackendFn = void (*)(absl::StatusOr<std::unique_ptr<mapl::Backend>>* out);
// *out = new CUDA IPC buffers for a validated request (kernels/cuda_ipc.h), or why there are none.
using MaplCudaCreateIpcBuffersFn =
    void (*)(const mapl::CudaIpcRequest* request,
             absl::StatusOr<std::unique_ptr<mapl::CudaIpcBuffers>>* out);
}

#define MAPL_CUDA_MODULE_ABI_SYMBOL "mapl_cuda_module_abi"
#define MAPL_CUDA_CREATE_BACKEND_SYMBOL "mapl_cuda_create_backend"
#define MAPL_CUDA_CREATE_IPC_BUFFERS_SYMBOL "mapl_cuda_create_ipc_buffers"

#endif  // MAPL_KERNELS_CUDA_MODULE_H_
