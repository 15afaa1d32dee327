// CudaIpcBuffers (kernels/cuda_ipc.h) on the CUDA runtime: device buffers and interprocess
// events exported as IPC handles, a pool of streams for the copies, and a pool of page-locked
// host blocks for the host side of each copy. Part of the CUDA module (libmapl_cuda.so).
//
// Ordering. A Send's copy waits on the trainer's event on one of our streams
// (cudaStreamWaitEvent), so the trainer's stream never waits for us; we then wait for the copy.
// A Recv's copy is followed by cudaEventRecord of the trainer's chosen event, which its stream
// waits on; we return at once. The host block of such a copy is not reused before the copy has
// finished: each block carries a private event recorded after its last copy, waited on when the
// block is next leased.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda_ipc.h"

namespace mapl::cuda {
namespace {

// A page-locked host block and the event recorded after the last device copy that reads it.
struct HostBlock {
  void* data = nullptr;
  size_t bytes = 0;
  cudaEvent_t copied = nullptr;
  bool pending = false;  // `copied` was recorded and may not have completed
  bool wedged = false;   // a copy into it waits on a trainer's event that never completed
};

class IpcBuffers;

class StagedBlock : public CudaIpcBuffers::Staged {
 public:
  StagedBlock(IpcBuffers* owner, std::unique_ptr<HostBlock> block)
      : owner_(owner), block_(std::move(block)) {}
  ~StagedBlock() override;
  void* data() override { return block_->data; }
  HostBlock* block() { return block_.get(); }

 private:
  IpcBuffers* owner_;
  std::unique_ptr<HostBlock> block_;
};

class IpcBuffers : public CudaIpcBuffers {
 public:
  IpcBuffers(int device, std::string uuid, uint64_t buffer_bytes)
      : device_(device), uuid_(std::move(uuid)), buffer_bytes_(buffer_bytes) {}
  IpcBuffers(const IpcBuffers&) = delete;
  IpcBuffers& operator=(const IpcBuffers&) = delete;

  ~IpcBuffers() override {
    // The session is over: no call is in flight (each holds the session), so every stream and
    // block is back in its pool or wedged. Errors cannot be reported from here; the process
    // keeps going.
    if (cudaSetDevice(device_) != cudaSuccess) return;
    absl::MutexLock l(&mu_);
    for (cudaStream_t s : wedged_streams_) {
      if (cudaStreamQuery(s) == cudaErrorNotReady) {
        // A copy still waits on a trainer's event. Freeing device memory synchronizes the
        // device, which would then wait for ever: keep everything of this session instead.
        Log(LogLevel::kError, "CUDA IPC buffers kept after their session",
            {{"reason", "a copy still waits on a trainer's event that never completed"},
             {"device_bytes", absl::StrCat(buffer_bytes_ * buffers_.size())},
             {"action", "restart mapld to free them"}});
        return;
      }
    }
    for (cudaStream_t s : streams_) {
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
    for (std::unique_ptr<HostBlock>& b : blocks_) DestroyBlock(*b);
    for (std::unique_ptr<HostBlock>& b : wedged_blocks_) DestroyBlock(*b);
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    for (void* p : buffers_) cudaFree(p);
  }

  absl::Status Init(uint32_t buffers, uint32_t events) {
    MAPL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    for (uint32_t i = 0; i < buffers; ++i) {
      void* p = nullptr;
      MAPL_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, buffer_bytes_));
      buffers_.push_back(p);
      // Device memory may hold what an earlier session left there: the trainer starts from zeros.
      MAPL_CUDA_RETURN_IF_ERROR(cudaMemset(p, 0, buffer_bytes_));
      cudaIpcMemHandle_t h;
      MAPL_CUDA_RETURN_IF_ERROR(cudaIpcGetMemHandle(&h, p));
      memory_handles_.emplace_back(reinterpret_cast<const char*>(&h), sizeof(h));
    }
    if (events > 0) {
      int ipc_events = 0;
      MAPL_CUDA_RETURN_IF_ERROR(
          cudaDeviceGetAttribute(&ipc_events, cudaDevAttrIpcEventSupport, device_));
      if (ipc_events == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("CUDA device ", device_,
                         " does not support interprocess events (a MIG instance?): attach with "
                         "cuda_events = 0, and synchronize the stream before each Send"));
      }
    }
    for (uint32_t i = 0; i < events; ++i) {
      cudaEvent_t e = nullptr;
      MAPL_CUDA_RETURN_IF_ERROR(
          cudaEventCreateWithFlags(&e, cudaEventInterprocess | cudaEventDisableTiming));
      events_.push_back(e);
      cudaIpcEventHandle_t h;
      MAPL_CUDA_RETURN_IF_ERROR(cudaIpcGetEventHandle(&h, e));
      event_handles_.emplace_back(reinterpret_cast<const char*>(&h), sizeof(h));
    }
    return CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize (zeroing the buffers)");
  }

  const std::string& device_uuid() const override { return uuid_; }
  uint64_t buffer_bytes() const override { return buffer_bytes_; }
  const std::vector<std::string>& memory_handles() const override { return memory_handles_; }
  const std::vector<std::string>& event_handles() const override { return event_handles_; }

  absl::StatusOr<std::unique_ptr<Staged>> CopyToHost(uint32_t buffer, uint64_t offset,
                                                     uint64_t bytes, int wait_event,
                                                     absl::Time deadline) override {
    MAPL_RETURN_IF_ERROR(CheckRegion(buffer, offset, bytes, wait_event));
    MAPL_ASSIGN_OR_RETURN(std::unique_ptr<StagedBlock> host, Lease(bytes));
    MAPL_ASSIGN_OR_RETURN(cudaStream_t stream, AcquireStream());
    absl::Status s = absl::OkStatus();
    if (wait_event >= 0) {
      s = CudaStatus(cudaStreamWaitEvent(stream, events_[wait_event], 0),
                     "cudaStreamWaitEvent (the trainer's event)");
    }
    if (s.ok()) {
      s = CudaStatus(cudaMemcpyAsync(host->data(), static_cast<char*>(buffers_[buffer]) + offset,
                                     bytes, cudaMemcpyDeviceToHost, stream),
                     "cudaMemcpyAsync (device buffer to host)");
    }
    if (s.ok()) {
      s = CudaStatus(cudaEventRecord(host->block()->copied, stream), "cudaEventRecord (copy)");
    }
    if (s.ok()) {
      host->block()->pending = true;
      s = WaitUntil(host->block()->copied, deadline);
      if (absl::IsDeadlineExceeded(s)) {
        // The copy may still happen, whenever the trainer's work finishes (or never): neither
        // the stream nor the block may be used again.
        host->block()->wedged = true;
        Wedge(stream);
        return absl::DeadlineExceededError(absl::StrCat(
            "the work the trainer recorded on event ", wait_event + 1,
            " did not finish before the Send's deadline (its timeout_ms, or the daemon's "
            "send_timeout_ms); the tensor was not taken. Record the event right after the "
            "tensor is written, on the stream that writes it"));
      }
      if (s.ok()) host->block()->pending = false;
    }
    if (!s.ok()) cudaStreamSynchronize(stream);  // an error: nothing of ours is left queued
    ReleaseStream(stream);
    if (!s.ok()) return s;
    return std::unique_ptr<Staged>(std::move(host));
  }

  absl::StatusOr<std::unique_ptr<Staged>> StageForDevice(uint64_t bytes) override {
    MAPL_ASSIGN_OR_RETURN(std::unique_ptr<StagedBlock> host, Lease(bytes));
    return std::unique_ptr<Staged>(std::move(host));
  }

  absl::Status CopyToDevice(std::unique_ptr<Staged> staged, uint64_t bytes, uint32_t buffer,
                            uint64_t offset, int record_event) override {
    MAPL_RETURN_IF_ERROR(CheckRegion(buffer, offset, bytes, record_event));
    auto* host = static_cast<StagedBlock*>(staged.get());
    if (bytes > host->block()->bytes) {
      return absl::InternalError(
          absl::StrCat("CopyToDevice: ", bytes, " bytes from a block of ", host->block()->bytes));
    }
    MAPL_ASSIGN_OR_RETURN(cudaStream_t stream, AcquireStream());
    absl::Status s =
        CudaStatus(cudaMemcpyAsync(static_cast<char*>(buffers_[buffer]) + offset, host->data(),
                                   bytes, cudaMemcpyHostToDevice, stream),
                   "cudaMemcpyAsync (host to device buffer)");
    if (s.ok() && record_event >= 0) {
      s = CudaStatus(cudaEventRecord(events_[record_event], stream),
                     "cudaEventRecord (the trainer's event)");
      // The block goes back to the pool now; its next lease waits for this copy.
      if (s.ok()) {
        s = CudaStatus(cudaEventRecord(host->block()->copied, stream),
                       "cudaEventRecord (host block)");
        host->block()->pending = s.ok();
      }
    } else if (s.ok()) {
      s = CudaStatus(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    }
    if (!s.ok()) {
      // The copy may still read the block: wait for the stream before the block is reused.
      cudaStreamSynchronize(stream);
    }
    ReleaseStream(stream);
    return s;
  }

  // A block of at least `bytes` page-locked bytes whose earlier copies are done.
  absl::StatusOr<std::unique_ptr<StagedBlock>> Lease(uint64_t bytes) {
    std::unique_ptr<HostBlock> block;
    {
      absl::MutexLock l(&mu_);
      // The smallest free block that is big enough, else the biggest (grown below).
      size_t pick = blocks_.size();
      auto better = [bytes](const HostBlock& a, const HostBlock& b) {  // a better than b?
        const bool a_fits = a.bytes >= bytes, b_fits = b.bytes >= bytes;
        if (a_fits != b_fits) return a_fits;
        return a_fits ? a.bytes < b.bytes : a.bytes > b.bytes;
      };
      for (size_t i = 0; i < blocks_.size(); ++i) {
        if (pick == blocks_.size() || better(*blocks_[i], *blocks_[pick])) pick = i;
      }
      if (pick < blocks_.size()) {
        block = std::move(blocks_[pick]);
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(pick));
      }
    }
    MAPL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    if (block == nullptr) {
      block = std::make_unique<HostBlock>();
      absl::Status s = CudaStatus(cudaEventCreateWithFlags(&block->copied, cudaEventDisableTiming),
                                  "cudaEventCreateWithFlags");
      if (!s.ok()) return s;
    }
    if (block->pending) {
      absl::Status s = CudaStatus(cudaEventSynchronize(block->copied),
                                  "cudaEventSynchronize (an earlier copy to the device)");
      if (!s.ok()) {
        Return(std::move(block));
        return s;
      }
      block->pending = false;
    }
    if (block->bytes < bytes) {
      if (block->data != nullptr) {
        cudaFreeHost(block->data);
        block->data = nullptr;
        block->bytes = 0;
      }
      absl::Status s = CudaStatus(cudaMallocHost(&block->data, bytes), "cudaMallocHost");
      if (!s.ok()) {
        Return(std::move(block));
        return s;
      }
      block->bytes = bytes;
    }
    return std::make_unique<StagedBlock>(this, std::move(block));
  }

  void Return(std::unique_ptr<HostBlock> block) {
    absl::MutexLock l(&mu_);
    (block->wedged ? wedged_blocks_ : blocks_).push_back(std::move(block));
  }

 private:
  absl::Status CheckRegion(uint32_t buffer, uint64_t offset, uint64_t bytes, int event) const {
    // The daemon checked the caller's reference; failing here is a bug on our side.
    if (buffer >= buffers_.size() || offset > buffer_bytes_ || bytes > buffer_bytes_ - offset ||
        event >= static_cast<int>(events_.size())) {
      return absl::InternalError(absl::StrCat("CUDA IPC region out of range: buffer ", buffer,
                                              " offset ", offset, " bytes ", bytes, " event ",
                                              event));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<cudaStream_t> AcquireStream() {
    MAPL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    {
      absl::MutexLock l(&mu_);
      if (!free_streams_.empty()) {
        cudaStream_t s = free_streams_.back();
        free_streams_.pop_back();
        return s;
      }
    }
    cudaStream_t s = nullptr;
    MAPL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    absl::MutexLock l(&mu_);
    streams_.push_back(s);
    return s;
  }

  // Polls `done` until it completes (OK), fails, or `deadline` passes (DEADLINE_EXCEEDED). Not
  // cudaEventSynchronize: a trainer's event may never complete (its process died mid-step), and
  // a poll also leaves the core free while the trainer's work runs. The first 50 us spin, which
  // is what a copy of a small tensor takes; then the pauses grow to 1 ms.
  static absl::Status WaitUntil(cudaEvent_t done, absl::Time deadline) {
    const absl::Time spin_until = absl::Now() + absl::Microseconds(50);
    absl::Duration pause = absl::Microseconds(20);
    for (;;) {
      const cudaError_t err = cudaEventQuery(done);
      if (err == cudaSuccess) return absl::OkStatus();
      if (err != cudaErrorNotReady) return CudaStatus(err, "cudaEventQuery (copy)");
      const absl::Time now = absl::Now();
      if (now >= deadline) return absl::DeadlineExceededError("copy not done");
      if (now >= spin_until) {
        absl::SleepFor(pause);
        pause = std::min(pause * 2, absl::Milliseconds(1));
      }
    }
  }

  void Wedge(cudaStream_t s) {
    absl::MutexLock l(&mu_);
    wedged_streams_.push_back(s);
  }

  void ReleaseStream(cudaStream_t s) {
    absl::MutexLock l(&mu_);
    free_streams_.push_back(s);
  }

  static void DestroyBlock(HostBlock& b) {
    if (b.copied != nullptr) {
      cudaEventSynchronize(b.copied);
      cudaEventDestroy(b.copied);
    }
    if (b.data != nullptr) cudaFreeHost(b.data);
  }

  const int device_;
  const std::string uuid_;
  const uint64_t buffer_bytes_;
  std::vector<void*> buffers_;
  std::vector<cudaEvent_t> events_;
  std::vector<std::string> memory_handles_;
  std::vector<std::string> event_handles_;

  absl::Mutex mu_;
  std::vector<cudaStream_t> streams_ ABSL_GUARDED_BY(mu_);  // all made, for the destructor
  std::vector<cudaStream_t> free_streams_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<HostBlock>> blocks_ ABSL_GUARDED_BY(mu_);  // free blocks
  // Streams and blocks of copies that waited on a trainer's event past their deadline: never
  // reused, and freed with the session only if their copy has finished by then.
  std::vector<cudaStream_t> wedged_streams_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<HostBlock>> wedged_blocks_ ABSL_GUARDED_BY(mu_);
};

StagedBlock::~StagedBlock() { owner_->Return(std::move(block_)); }

// The device `uuid` names, or MAPL_CUDA_DEVICE's when it is empty (that variable plays no part
// when the trainer names its device).
absl::StatusOr<int> FindDevice(const std::string& uuid) {
  if (uuid.empty()) return DeviceFromEnvironment("CUDA IPC");
  if (uuid.size() != 16) return absl::InvalidArgumentError("cuda_device_uuid: not 16 bytes");
  int count = 0;
  if (absl::Status s = CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount"); !s.ok()) {
    return absl::UnavailableError(
        absl::StrCat("CUDA IPC has no usable device here: ", s.message()));
  }
  if (count == 0) return absl::UnavailableError("CUDA IPC has no device here: no CUDA device");
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop;
    MAPL_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, d));
    if (std::memcmp(prop.uuid.bytes, uuid.data(), 16) == 0) return d;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "cuda_device_uuid names none of the ", count,
      " CUDA devices this mapld sees; run it where the trainer's GPU is visible (check "
      "CUDA_VISIBLE_DEVICES of both)"));
}

absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> CreateIpcBuffers(const CudaIpcRequest& request) {
  // OpenCudaIpcBuffers validated the request (kernels/cuda_ipc.cc, outside this module).
  MAPL_ASSIGN_OR_RETURN(const int device, FindDevice(request.device_uuid));
  cudaDeviceProp prop;
  MAPL_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  auto ipc = std::make_unique<IpcBuffers>(
      device, std::string(reinterpret_cast<const char*>(prop.uuid.bytes), 16),
      request.buffer_bytes);
  MAPL_RETURN_IF_ERROR(ipc->Init(request.buffers, request.events));
  return std::unique_ptr<CudaIpcBuffers>(std::move(ipc));
}

}  // namespace
}  // namespace mapl::cuda

extern "C" __attribute__((visibility("default"))) void mapl_cuda_create_ipc_buffers(
    const mapl::CudaIpcRequest* request,
    absl::StatusOr<std::unique_ptr<mapl::CudaIpcBuffers>>* out) {
  *out = mapl::cuda::CreateIpcBuffers(*request);
}
