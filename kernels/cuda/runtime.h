// Internal to the CUDA backend: CUDA errors as statuses, the pool of lanes that makes a const
// backend safe to call from several threads, and operands that may be host or device memory.
//
// A lane is a stream, a cuBLAS handle, grow-only device scratch and a pinned staging buffer. An
// op leases one for its duration (at most kMaxLanes exist; more callers wait), runs everything on
// its stream, and synchronizes before it returns, so results are visible to the caller whatever
// stream or thread it uses next.
//
// Tensors are untagged pointers (kernels/tensor.h). cudaPointerGetAttributes classifies each one:
// device and managed memory of the backend's device are used in place; host memory (pageable or
// pinned) is copied in through the lane's staging buffer, and outputs copied back.
#ifndef MAPL_KERNELS_CUDA_RUNTIME_H_
#define MAPL_KERNELS_CUDA_RUNTIME_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kernels/cuda/cublas_api.h"
#include "kernels/tensor.h"

namespace mapl::cuda {

// OK for cudaSuccess; otherwise an error naming `what` (the call) and CUDA's name and text for
// `err`: RESOURCE_EXHAUSTED for out-of-memory, UNAVAILABLE for "no usable device" errors
// (no driver, driver too old, no device, initialization failed), INTERNAL for the rest.
absl::Status CudaStatus(cudaError_t err, absl::string_view what);

#define MAPL_CUDA_RETURN_IF_ERROR(call) \
  MAPL_RETURN_IF_ERROR(::mapl::cuda::CudaStatus((call), #call))

// The device MAPL_CUDA_DEVICE names (default 0): INVALID_ARGUMENT when it is malformed or past
// the devices there are, UNAVAILABLE (saying `who` has no usable device) when there is none.
absl::StatusOr<int> DeviceFromEnvironment(absl::string_view who);

// A grow-only device allocation: Reserve keeps the old block when it is big enough; growing
// frees it first (its contents are not kept).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();
  absl::StatusOr<void*> Reserve(size_t bytes);

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct Lane {
  // Scratch slots: each op gives every temporary its own slot number, so the buffers of one op
  // never alias.
  static constexpr int kSlots = 16;
  // Host <-> device copies of host memory go through this many pinned bytes at a time.
  static constexpr size_t kStagingBytes = size_t{32} << 20;

  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  DeviceBuffer slots[kSlots];
  void* pinned = nullptr;                    // kStagingBytes of page-locked host memory
  unsigned long long* error_word = nullptr;  // 8 device bytes for first-bad-index checks
};

class LanePool;

// A lane held for one op; returns it to the pool when destroyed.
class LaneLease {
 public:
  LaneLease(LanePool* pool, Lane* lane) : pool_(pool), lane_(lane) {}
  LaneLease(LaneLease&& other) noexcept : pool_(other.pool_), lane_(other.lane_) {
    other.lane_ = nullptr;
  }
  LaneLease(const LaneLease&) = delete;
  LaneLease& operator=(const LaneLease&) = delete;
  ~LaneLease();
  Lane& operator*() const { return *lane_; }
  Lane* operator->() const { return lane_; }

 private:
  LanePool* pool_;
  Lane* lane_;
};

class LanePool {
 public:
  static constexpr int kMaxLanes = 8;

  LanePool(int device, const CublasApi* blas) : device_(device), blas_(blas) {}
  LanePool(const LanePool&) = delete;
  LanePool& operator=(const LanePool&) = delete;
  ~LanePool();

  // Makes the pool's device current on the calling thread (the runtime's current device is per
  // thread), then hands out a free lane, creating one while fewer than kMaxLanes exist and
  // waiting otherwise.
  absl::StatusOr<LaneLease> Acquire();
  int device() const { return device_; }
  const CublasApi& blas() const { return *blas_; }

 private:
  friend class LaneLease;
  void Release(Lane* lane);
  absl::StatusOr<std::unique_ptr<Lane>> NewLane();
  void DestroyLane(Lane* lane);

  const int device_;
  const CublasApi* const blas_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Lane>> lanes_ ABSL_GUARDED_BY(mu_);
  std::vector<Lane*> free_ ABSL_GUARDED_BY(mu_);
};

// Where a caller's pointer lives, for the backend's device.
enum class Memory { kHost, kDevice };
// kDevice for device or managed memory of `device`; kHost for host memory (null included);
// INVALID_ARGUMENT, naming `what`, for memory of another device.
absl::StatusOr<Memory> Classify(const void* p, int device, const char* what);

// Copies between the caller's host memory and the device on the lane's stream, through its
// pinned staging buffer; both wait for the copy to finish.
absl::Status Upload(Lane& lane, void* device_dst, const void* host_src, size_t bytes);
absl::Status Download(Lane& lane, void* host_dst, const void* device_src, size_t bytes);

// An input of `bytes` bytes on the device: `p` itself when it is device memory, else a copy in
// scratch slot `slot`.
absl::StatusOr<const void*> DeviceInput(Lane& lane, int device, int slot, const void* p,
                                        size_t bytes, const char* what);

// An input tensor as device fp32: in place when it is f32 device memory; otherwise uploaded to
// `raw_slot` (host memory) and, if bf16, converted into `f32_slot`. `copy` forces a private
// copy (in `f32_slot`) for callers that modify it.
absl::StatusOr<float*> DeviceF32(Lane& lane, int device, int raw_slot, int f32_slot,
                                 const ConstTensor& t, const char* what, bool copy = false);

// A tensor or buffer the op writes: `device` is where the kernels write (the caller's memory, or
// scratch for host memory); Finish copies scratch back to the caller's host memory.
struct DeviceOutput {
  void* device = nullptr;
  void* host = nullptr;  // null when the caller's memory is on the device
  size_t bytes = 0;
};
absl::StatusOr<DeviceOutput> PrepareOutput(Lane& lane, int device, int slot, void* p, size_t bytes,
                                           const char* what);
absl::Status FinishOutput(Lane& lane, const DeviceOutput& out);

// Where an op computes an fp32 result destined for tensor `t`: t's own memory when it is f32
// device memory, else scratch slot `slot` (then StoreF32 moves it into t).
absl::StatusOr<float*> F32Target(Lane& lane, int device, int slot, const Tensor& t,
                                 const char* what);

// Writes fp32 device `src` (t.size() floats) into the output tensor `t` in its dtype: copies or
// converts into t's device memory, or into scratch `slot` then to host memory. Waits for it.
absl::Status StoreF32(Lane& lane, int device, int slot, const float* src, const Tensor& t,
                      const char* what);

// INVALID_ARGUMENT naming the first NaN or Inf of device tensor `t` (data at `device_data`), in
// the words of mapl::CheckFinite: "<what>: non-finite value nan at (row, col)".
absl::Status CheckFiniteOnDevice(Lane& lane, const void* device_data, const ConstTensor& t,
                                 const char* what);

// out = result (accumulate: out += result, as CommitFinite adds) unless a value would be NaN or
// Inf: then INVALID_ARGUMENT in CommitFinite's words and `out` is left unchanged. result is
// device scratch of out.size() floats (it is modified); out is f32, host or device memory;
// `slot` holds a device copy of a host `out` when accumulating.
absl::Status CommitFiniteOnDevice(Lane& lane, int device, int slot, float* result,
                                  const Tensor& out, bool accumulate, const char* what);

// Waits for the lane's stream; the error names `what`.
absl::Status Sync(Lane& lane, const char* what);

// A host copy of a small span (codes, scales, norms, token ids), whatever memory it is in: the
// backend validates such spans on the host, as the CPU backend does.
absl::Status CopyToHost(Lane& lane, int device, const void* p, size_t bytes, void* dst,
                        const char* what);
template <typename T>
absl::StatusOr<std::vector<T>> HostCopy(Lane& lane, int device, absl::Span<const T> s,
                                        const char* what) {
  std::vector<T> out(s.size());
  absl::Status st = CopyToHost(lane, device, s.data(), s.size() * sizeof(T), out.data(), what);
  if (!st.ok()) return st;
  return out;
}

}  // namespace mapl::cuda

#endif  // MAPL_KERNELS_CUDA_RUNTIME_H_
