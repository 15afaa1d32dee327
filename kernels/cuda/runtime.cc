// CUDA errors, lanes and operands of the CUDA backend (kernels/cuda/runtime.h).
#include "kernels/cuda/runtime.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/status_macros.h"
#include "kernels/cuda/kernels.h"

namespace mapl::cuda {

absl::Status CudaStatus(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  const std::string msg =
      absl::StrCat(what, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(msg);
    case cudaErrorInsufficientDriver:
    case cudaErrorNoDevice:
    case cudaErrorInitializationError:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

absl::StatusOr<int> DeviceFromEnvironment(absl::string_view who) {
  int device = 0;
  if (const char* env = std::getenv("MAPL_CUDA_DEVICE"); env != nullptr && *env != '\0') {
    if (!absl::SimpleAtoi(env, &device) || device < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MAPL_CUDA_DEVICE=\"", env, "\" is not a device index; set it to 0, 1, ... or unset it"));
    }
  }
  int count = 0;
  if (absl::Status s = CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount"); !s.ok()) {
    return absl::UnavailableError(absl::StrCat(who, " has no usable device here: ", s.message()));
  }
  if (count == 0)
    return absl::UnavailableError(absl::StrCat(who, " has no device here: no CUDA device"));
  if (device >= count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MAPL_CUDA_DEVICE=", device, " but this machine has ", count, " CUDA device(s)"));
  }
  return device;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) cudaFree(ptr_);
}

absl::StatusOr<void*> DeviceBuffer::Reserve(size_t bytes) {
  if (bytes <= bytes_ && ptr_ != nullptr) return ptr_;
  if (ptr_ != nullptr) {
    MAPL_CUDA_RETURN_IF_ERROR(cudaFree(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
  }
  // At least 256 bytes, so that an empty operand still has a valid, aligned address.
  const size_t want = std::max<size_t>(bytes, 256);
  MAPL_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr_, want));
  bytes_ = want;
  return ptr_;
}

LaneLease::~LaneLease() {
  if (lane_ != nullptr) pool_->Release(lane_);
}

LanePool::~LanePool() {
  // The backend is being destroyed: no lease is outstanding (a lease lives inside one call).
  if (cudaSetDevice(device_) != cudaSuccess) return;
  absl::MutexLock lock(&mu_);
  for (std::unique_ptr<Lane>& lane : lanes_) DestroyLane(lane.get());
}

void LanePool::DestroyLane(Lane* lane) {
  if (lane->blas != nullptr) blas_->destroy(lane->blas);
  if (lane->stream != nullptr) cudaStreamDestroy(lane->stream);
  if (lane->pinned != nullptr) cudaFreeHost(lane->pinned);
  if (lane->error_word != nullptr) cudaFree(lane->error_word);
  lane->blas = nullptr;
  lane->stream = nullptr;
  lane->pinned = nullptr;
  lane->error_word = nullptr;
}

absl::StatusOr<std::unique_ptr<Lane>> LanePool::NewLane() {
  auto lane = std::make_unique<Lane>();
  absl::Status s = [&]() -> absl::Status {
    MAPL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&lane->stream, cudaStreamNonBlocking));
    MAPL_RETURN_IF_ERROR(blas_->Check(blas_->create(&lane->blas), "cublasCreate"));
    MAPL_RETURN_IF_ERROR(
        blas_->Check(blas_->set_stream(lane->blas, lane->stream), "cublasSetStream"));
    MAPL_RETURN_IF_ERROR(
        blas_->Check(blas_->set_math_mode(lane->blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode"));
    MAPL_CUDA_RETURN_IF_ERROR(cudaMallocHost(&lane->pinned, Lane::kStagingBytes));
    MAPL_CUDA_RETURN_IF_ERROR(
        cudaMalloc(reinterpret_cast<void**>(&lane->error_word), sizeof(unsigned long long)));
    return absl::OkStatus();
  }();
  if (!s.ok()) {
    DestroyLane(lane.get());
    return s;
  }
  return lane;
}

absl::StatusOr<LaneLease> LanePool::Acquire() {
  MAPL_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  bool create = false;
  {
    absl::MutexLock lock(&mu_);
    auto can_proceed = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !free_.empty() || lanes_.size() < size_t{kMaxLanes};
    };
    mu_.Await(absl::Condition(&can_proceed));
    if (!free_.empty()) {
      Lane* lane = free_.back();
      free_.pop_back();
      return LaneLease(this, lane);
    }
    // Reserve the place now so that concurrent callers cannot create more than kMaxLanes.
    lanes_.push_back(nullptr);
    create = true;
  }
  MAPL_CHECK(create, "LanePool::Acquire: neither a free lane nor room for one");
  absl::StatusOr<std::unique_ptr<Lane>> lane = NewLane();
  absl::MutexLock lock(&mu_);
  auto slot = std::find(lanes_.begin(), lanes_.end(), nullptr);
  MAPL_CHECK(slot != lanes_.end(), "LanePool::Acquire: the reserved place is gone");
  if (!lane.ok()) {
    lanes_.erase(slot);
    return lane.status();
  }
  *slot = *std::move(lane);
  return LaneLease(this, slot->get());
}

void LanePool::Release(Lane* lane) {
  absl::MutexLock lock(&mu_);
  free_.push_back(lane);
}

absl::StatusOr<Memory> Classify(const void* p, int device, const char* what) {
  if (p == nullptr) return Memory::kHost;
  cudaPointerAttributes attr;
  MAPL_RETURN_IF_ERROR(CudaStatus(cudaPointerGetAttributes(&attr, p),
                                  absl::StrCat("cudaPointerGetAttributes(", what, ")")));
  switch (attr.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged:
      if (attr.type == cudaMemoryTypeDevice && attr.device != device) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": device memory of CUDA device ", attr.device,
                         ", but this backend runs on device ", device,
                         " (MAPL_CUDA_DEVICE); pass memory of that device, or host memory"));
      }
      return Memory::kDevice;
    case cudaMemoryTypeHost:
    case cudaMemoryTypeUnregistered:
      return Memory::kHost;
  }
  return absl::InternalError(absl::StrCat(what, ": unknown cudaMemoryType ", int(attr.type)));
}

absl::Status Sync(Lane& lane, const char* what) {
  return CudaStatus(cudaStreamSynchronize(lane.stream),
                    absl::StrCat("cudaStreamSynchronize (", what, ")"));
}

absl::Status Upload(Lane& lane, void* device_dst, const void* host_src, size_t bytes) {
  // The staging buffer is reused chunk after chunk, so each chunk waits for its copy.
  for (size_t off = 0; off < bytes; off += Lane::kStagingBytes) {
    const size_t len = std::min(Lane::kStagingBytes, bytes - off);
    std::memcpy(lane.pinned, static_cast<const char*>(host_src) + off, len);
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(device_dst) + off, lane.pinned,
                                              len, cudaMemcpyHostToDevice, lane.stream));
    MAPL_RETURN_IF_ERROR(Sync(lane, "upload"));
  }
  return absl::OkStatus();
}

absl::Status Download(Lane& lane, void* host_dst, const void* device_src, size_t bytes) {
  for (size_t off = 0; off < bytes; off += Lane::kStagingBytes) {
    const size_t len = std::min(Lane::kStagingBytes, bytes - off);
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lane.pinned,
                                              static_cast<const char*>(device_src) + off, len,
                                              cudaMemcpyDeviceToHost, lane.stream));
    MAPL_RETURN_IF_ERROR(Sync(lane, "download"));
    std::memcpy(static_cast<char*>(host_dst) + off, lane.pinned, len);
  }
  return absl::OkStatus();
}

absl::StatusOr<const void*> DeviceInput(Lane& lane, int device, int slot, const void* p,
                                        size_t bytes, const char* what) {
  MAPL_ASSIGN_OR_RETURN(Memory mem, Classify(p, device, what));
  if (mem == Memory::kDevice) return p;
  MAPL_ASSIGN_OR_RETURN(void* dst, lane.slots[slot].Reserve(bytes));
  MAPL_RETURN_IF_ERROR(Upload(lane, dst, p, bytes));
  return static_cast<const void*>(dst);
}

absl::StatusOr<float*> DeviceF32(Lane& lane, int device, int raw_slot, int f32_slot,
                                 const ConstTensor& t, const char* what, bool copy) {
  const size_t count = static_cast<size_t>(t.size());
  MAPL_ASSIGN_OR_RETURN(Memory mem, Classify(t.data, device, what));
  if (t.dtype == DType::kF32) {
    if (mem == Memory::kDevice && !copy) return static_cast<float*>(const_cast<void*>(t.data));
    MAPL_ASSIGN_OR_RETURN(void* dst, lane.slots[f32_slot].Reserve(count * sizeof(float)));
    if (mem == Memory::kDevice) {
      MAPL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, t.data, count * sizeof(float),
                                                cudaMemcpyDeviceToDevice, lane.stream));
    } else {
      MAPL_RETURN_IF_ERROR(Upload(lane, dst, t.data, count * sizeof(float)));
    }
    return static_cast<float*>(dst);
  }
  MAPL_ASSIGN_OR_RETURN(const void* raw,
                        DeviceInput(lane, device, raw_slot, t.data, count * sizeof(bf16_t), what));
  MAPL_ASSIGN_OR_RETURN(void* dst, lane.slots[f32_slot].Reserve(count * sizeof(float)));
  MAPL_CUDA_RETURN_IF_ERROR(LaunchBf16ToF32(static_cast<const uint16_t*>(raw),
                                            static_cast<float*>(dst), t.size(), lane.stream));
  return static_cast<float*>(dst);
}

absl::StatusOr<DeviceOutput> PrepareOutput(Lane& lane, int device, int slot, void* p, size_t bytes,
                                           const char* what) {
  MAPL_ASSIGN_OR_RETURN(Memory mem, Classify(p, device, what));
  DeviceOutput out;
  out.bytes = bytes;
  if (mem == Memory::kDevice) {
    out.device = p;
    return out;
  }
  MAPL_ASSIGN_OR_RETURN(out.device, lane.slots[slot].Reserve(bytes));
  out.host = p;
  return out;
}

absl::Status FinishOutput(Lane& lane, const DeviceOutput& out) {
  if (out.host == nullptr) return Sync(lane, "output");
  return Download(lane, out.host, out.device, out.bytes);
}

absl::StatusOr<float*> F32Target(Lane& lane, int device, int slot, const Tensor& t,
                                 const char* what) {
  MAPL_ASSIGN_OR_RETURN(Memory mem, Classify(t.data, device, what));
  if (mem == Memory::kDevice && t.dtype == DType::kF32) return t.f32();
  MAPL_ASSIGN_OR_RETURN(void* p, lane.slots[slot].Reserve(static_cast<size_t>(t.size()) * 4));
  return static_cast<float*>(p);
}

absl::Status StoreF32(Lane& lane, int device, int slot, const float* src, const Tensor& t,
                      const char* what) {
  const size_t count = static_cast<size_t>(t.size());
  MAPL_ASSIGN_OR_RETURN(Memory mem, Classify(t.data, device, what));
  if (t.dtype == DType::kF32) {
    if (mem == Memory::kHost) return Download(lane, t.data, src, count * sizeof(float));
    if (t.data != src) {
      MAPL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(t.data, src, count * sizeof(float),
                                                cudaMemcpyDeviceToDevice, lane.stream));
    }
    return Sync(lane, what);
  }
  MAPL_ASSIGN_OR_RETURN(DeviceOutput out,
                        PrepareOutput(lane, device, slot, t.data, count * sizeof(bf16_t), what));
  MAPL_CUDA_RETURN_IF_ERROR(
      LaunchF32ToBf16(src, static_cast<uint16_t*>(out.device), t.size(), lane.stream));
  return FinishOutput(lane, out);
}

absl::Status CheckFiniteOnDevice(Lane& lane, const void* device_data, const ConstTensor& t,
                                 const char* what) {
  if (t.size() == 0) return absl::OkStatus();
  // All bytes 0xff is ULLONG_MAX, "none found"; the kernel lowers it to the first bad index.
  const unsigned long long none = ULLONG_MAX;
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(lane.error_word, 0xff, sizeof(unsigned long long), lane.stream));
  MAPL_CUDA_RETURN_IF_ERROR(LaunchFirstNonFinite(device_data, t.dtype == DType::kBF16, t.size(),
                                                 lane.error_word, lane.stream));
  unsigned long long first = 0;
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&first, lane.error_word, sizeof(first), cudaMemcpyDeviceToHost, lane.stream));
  MAPL_RETURN_IF_ERROR(Sync(lane, "finite check"));
  if (first == none) return absl::OkStatus();
  // Read the offending element back, to name it as the CPU backend does.
  const int64_t i = static_cast<int64_t>(first);
  float v = 0.f;
  if (t.dtype == DType::kF32) {
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemcpy(&v, static_cast<const float*>(device_data) + i,
                                         sizeof(float), cudaMemcpyDeviceToHost));
  } else {
    bf16_t b = 0;
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemcpy(&b, static_cast<const bf16_t*>(device_data) + i,
                                         sizeof(bf16_t), cudaMemcpyDeviceToHost));
    v = Bf16ToFloat(b);
  }
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": non-finite value ", v, " at (", i / t.cols, ", ", i % t.cols, ")"));
}

absl::Status CommitFiniteOnDevice(Lane& lane, int device, int slot, float* result,
                                  const Tensor& out, bool accumulate, const char* what) {
  const int64_t count = out.size();
  if (count == 0) return absl::OkStatus();
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  MAPL_ASSIGN_OR_RETURN(Memory mem, Classify(out.data, device, what));
  if (accumulate) {
    MAPL_ASSIGN_OR_RETURN(const void* old, DeviceInput(lane, device, slot, out.data, bytes, what));
    MAPL_CUDA_RETURN_IF_ERROR(
        LaunchAddInPlace(result, static_cast<const float*>(old), count, lane.stream));
  }
  // The CPU's check, on the device: the first non-finite element of the result.
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(lane.error_word, 0xff, sizeof(unsigned long long), lane.stream));
  MAPL_CUDA_RETURN_IF_ERROR(
      LaunchFirstNonFinite(result, /*bf16=*/false, count, lane.error_word, lane.stream));
  unsigned long long first = 0;
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&first, lane.error_word, sizeof(first), cudaMemcpyDeviceToHost, lane.stream));
  MAPL_RETURN_IF_ERROR(Sync(lane, what));
  if (first != ULLONG_MAX) {
    const int64_t i = static_cast<int64_t>(first);
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": non-finite result at (", i / out.cols, ", ", i % out.cols,
                     "); the inputs hold NaN or Inf, or overflow; ", what, " left unchanged"));
  }
  if (mem == Memory::kHost) return Download(lane, out.data, result, bytes);
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out.data, result, bytes, cudaMemcpyDeviceToDevice, lane.stream));
  return Sync(lane, what);
}

absl::Status CopyToHost(Lane& lane, int device, const void* p, size_t bytes, void* dst,
                        const char* what) {
  if (bytes == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(Memory mem, Classify(p, device, what));
  if (mem == Memory::kHost) {
    std::memcpy(dst, p, bytes);
    return absl::OkStatus();
  }
  return Download(lane, dst, p, bytes);
}

}  // namespace mapl::cuda
