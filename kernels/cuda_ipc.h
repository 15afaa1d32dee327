// Device memory a GPU trainer shares with its sidecar through CUDA IPC: buffers and events the
// daemon allocates on the trainer's device, hands out as IPC handles (AttachEvent.cuda), and
// copies tensors out of and into on its own streams, ordered against the trainer's stream by the
// shared events, so neither process blocks on the other's stream.
//
//   CudaIpcRequest want{/*buffers=*/4, /*buffer_bytes=*/256 << 20, /*events=*/64, uuid};
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<CudaIpcBuffers> ipc, OpenCudaIpcBuffers(want));
//   // hand ipc->memory_handles() and ipc->event_handles() to the trainer; later, for a Send:
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<CudaIpcBuffers::Staged> host,
//                         ipc->CopyToHost(buffer, offset, bytes, /*wait_event=*/3, deadline));
//   // host->data() holds the tensor until `host` is destroyed.
//   // For a Recv: fill StageForDevice(bytes)->data(), then CopyToDevice(..., record_event).
//
// The implementation is in the CUDA module (kernels/cuda/ipc.cc, loaded with dlopen like the
// CUDA backend), so nothing that links mapl_kernels links CUDA. Without MAPL_WITH_CUDA, or where
// the module or a device is missing, OpenCudaIpcBuffers says so.
#ifndef MAPL_KERNELS_CUDA_IPC_H_
#define MAPL_KERNELS_CUDA_IPC_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace mapl {

struct CudaIpcRequest {
  uint32_t buffers = 0;
  uint64_t buffer_bytes = 0;
  uint32_t events = 0;
  // 16 bytes naming the device (cudaDeviceProp::uuid); empty: MAPL_CUDA_DEVICE, default 0.
  std::string device_uuid;
};

// Limits on one request (local.proto's AttachRequest states them).
inline constexpr uint32_t kMaxCudaIpcBuffers = 64;
inline constexpr uint32_t kMaxCudaIpcEvents = 1024;
inline constexpr uint64_t kMaxCudaIpcBufferBytes = uint64_t{64} << 30;

// INVALID_ARGUMENT, in the words of AttachRequest's fields, for a request out of the limits.
absl::Status ValidateCudaIpcRequest(const CudaIpcRequest& request);

class CudaIpcBuffers {
 public:
  // Page-locked host memory held for one call; returned to the pool when destroyed.
  class Staged {
   public:
    virtual ~Staged() = default;
    virtual void* data() = 0;
  };

  virtual ~CudaIpcBuffers() = default;

  virtual const std::string& device_uuid() const = 0;  // 16 bytes
  virtual uint64_t buffer_bytes() const = 0;
  virtual const std::vector<std::string>& memory_handles() const = 0;  // 64 bytes each
  virtual const std::vector<std::string>& event_handles() const = 0;   // 64 bytes each

  // The `bytes` bytes at `offset` of buffer `buffer`, copied to host memory once the work the
  // trainer recorded on event `wait_event` has finished (-1: no event; the trainer has
  // synchronized). Blocks the calling thread until the copy is done, or until `deadline`:
  // DEADLINE_EXCEEDED when the trainer's work has not finished by then (nothing was taken). The
  // trainer's stream never waits. The caller has checked the region and the event index.
  virtual absl::StatusOr<std::unique_ptr<Staged>> CopyToHost(uint32_t buffer, uint64_t offset,
                                                             uint64_t bytes, int wait_event,
                                                             absl::Time deadline) = 0;
  // Host memory for `bytes` bytes that CopyToDevice will copy to the device.
  virtual absl::StatusOr<std::unique_ptr<Staged>> StageForDevice(uint64_t bytes) = 0;
  // Copies the first `bytes` of `staged` to `offset` of buffer `buffer`. With `record_event` >= 0
  // it records that event after the copy and returns without waiting for the copy (the trainer's
  // stream waits on the event); with -1 it returns once the copy is done.
  virtual absl::Status CopyToDevice(std::unique_ptr<Staged> staged, uint64_t bytes, uint32_t buffer,
                                    uint64_t offset, int record_event) = 0;
};

// New buffers and events on the requested device, zeroed. INVALID_ARGUMENT for a request out
// of the limits or a device UUID that names no device here; RESOURCE_EXHAUSTED when the device
// memory runs out; FAILED_PRECONDITION when this process cannot use CUDA (built without it, no
// module, no driver or device), saying why.
absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> OpenCudaIpcBuffers(const CudaIpcRequest& request);

}  // namespace mapl

#endif  // MAPL_KERNELS_CUDA_IPC_H_
