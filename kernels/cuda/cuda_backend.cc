// The CUDA backend: its factory, and the ops that run on the host.
//
// Where each op runs:
//
//   op               where                 notes
//   Project          device                SGEMM (cuBLAS), fp32 accumulation; bf16 in/out
//   Lift             device                SGEMM (cuBLAS), fp32 accumulation; bf16 in/out
//   Int8Encode       device                bit-exact with the CPU backend
//   Int8Decode       device                bit-exact with the CPU backend
//   Int4Encode       device                bit-exact with the CPU backend
//   Int4Decode       device                bit-exact with the CPU backend
//   RvqEncode        device (beam 1)       fused nearest centroid, one launch per level
//                    host (CPU backend)    beam > 1: the server never uses it
//   RvqDecode        device                bit-exact with the CPU backend
//   RvqFit           host (CPU backend)    called once per codebook, before training streams
//   RvqUpdate        device + host         assignment and batch statistics on the device; the
//                                          EMA and re-seeding on the host, the CPU's own code
//   LiftWithAnchor   device                gather of P[t] + SGEMMs (anchors.cc)
//   AnchorLookup     device                gather of P[t] + SGEMM (anchors.cc)
//   AnchorGrad       device                SGEMMs + a scatter-add (atomics) into a checked copy
//   AdamStep         device                a check of every element, then one kernel (anchors.cc)
//   GradUp           device                SGEMM + commit-if-finite on the device (signals.cc)
//   GradDown         device                SGEMMs + commit-if-finite on the device (signals.cc)
//   Msign            host (CPU backend)
//   Retract          host (CPU backend)
//   SpelStep         host (CPU backend)
//
// A host op takes device-memory operands too: HostOperands copies them to the host, runs the CPU
// backend, and copies what it wrote back only when it succeeded, so the CPU backend's validation,
// errors and commit-only-if-finite semantics hold unchanged. Such an op costs a round trip over
// PCIe for every device operand.
#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <deque>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cuda/module.h"

namespace mapl {
namespace {

using cuda::CudaStatus;
using cuda::Memory;

// Host views of a host op's operands: device memory is copied to the host, and outputs that
// were device memory are copied back by CopyBack.
class HostOperands {
 public:
  explicit HostOperands(int device) : device_(device) {}

  absl::StatusOr<ConstTensor> In(const ConstTensor& t, const char* what) {
    MAPL_ASSIGN_OR_RETURN(const void* p, InBytes(t.data, Bytes(t), what));
    return ConstTensor{p, t.rows, t.cols, t.dtype};
  }
  // An operand the op writes (and may read: accumulation, in-place updates).
  absl::StatusOr<Tensor> Out(const Tensor& t, const char* what) {
    MAPL_ASSIGN_OR_RETURN(void* p, OutBytes(t.data, Bytes(t), what));
    return Tensor{p, t.rows, t.cols, t.dtype};
  }
  // Call once the op succeeded: a failed op leaves the caller's device memory untouched.
  absl::Status CopyBack() {
    if (back_.empty()) return absl::OkStatus();
    MAPL_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    for (const Back& b : back_) {
      MAPL_RETURN_IF_ERROR(CudaStatus(cudaMemcpy(b.device, b.host, b.bytes, cudaMemcpyHostToDevice),
                                      "cudaMemcpy (host op result to the device)"));
    }
    // cudaMemcpy from pageable memory may return before its DMA reaches the device; the caller
    // may read the result from any stream (ours are non-blocking), so wait for it here.
    return CudaStatus(cudaStreamSynchronize(cudaStreamLegacy),
                      "cudaStreamSynchronize (host op results)");
  }

 private:
  struct Back {
    void* device;
    const void* host;
    size_t bytes;
  };

  static size_t Bytes(const ConstTensor& t) {
    // Shapes are checked by the CPU backend afterwards; a negative one copies nothing here.
    return t.rows > 0 && t.cols > 0 ? static_cast<size_t>(t.size()) * DTypeSize(t.dtype) : 0;
  }

  // The host copy of `bytes` at device address p, or null when p is host memory.
  absl::StatusOr<void*> HostCopy(const void* p, size_t bytes, const char* what) {
    if (p == nullptr || bytes == 0) return nullptr;
    MAPL_ASSIGN_OR_RETURN(Memory mem, cuda::Classify(p, device_, what));
    if (mem == Memory::kHost) return nullptr;
    MAPL_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    std::vector<char>& buf = buffers_.emplace_back(bytes);
    MAPL_RETURN_IF_ERROR(CudaStatus(cudaMemcpy(buf.data(), p, bytes, cudaMemcpyDeviceToHost),
                                    absl::StrCat("cudaMemcpy (", what, " to the host)")));
    return static_cast<void*>(buf.data());
  }
  absl::StatusOr<const void*> InBytes(const void* p, size_t bytes, const char* what) {
    MAPL_ASSIGN_OR_RETURN(void* copy, HostCopy(p, bytes, what));
    return copy != nullptr ? copy : p;
  }
  absl::StatusOr<void*> OutBytes(void* p, size_t bytes, const char* what) {
    MAPL_ASSIGN_OR_RETURN(void* copy, HostCopy(p, bytes, what));
    if (copy == nullptr) return p;
    back_.push_back({p, copy, bytes});
    return copy;
  }

  const int device_;
  std::deque<std::vector<char>> buffers_;  // a deque: growing it keeps earlier copies in place
  std::vector<Back> back_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> cuda::CreateBackend() {
  MAPL_ASSIGN_OR_RETURN(const int device, cuda::DeviceFromEnvironment("the CUDA backend"));
  cudaDeviceProp prop;
  if (absl::Status s =
          CudaStatus(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
      !s.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the CUDA backend cannot use device ", device, ": ", s.message()));
  }
  if (prop.major < 9) {
    return absl::UnavailableError(absl::StrCat(
        "CUDA device ", device, " (", prop.name, ") has compute capability ", prop.major, ".",
        prop.minor, "; this mapl is built for sm_90 (Hopper) and later"));
  }
  // Creates the device's primary context now, so that a broken device fails here, not in an op.
  if (absl::Status s = CudaStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) {
    return absl::UnavailableError(s.message());
  }
  if (absl::Status s = CudaStatus(cudaFree(nullptr), "cudaFree(nullptr) (context creation)");
      !s.ok()) {
    return absl::UnavailableError(s.message());
  }
  MAPL_ASSIGN_OR_RETURN(std::unique_ptr<const cuda::CublasApi> blas, cuda::CublasApi::Load());
  return std::make_unique<CudaBackend>(device, std::move(blas));
}

CudaBackend::CudaBackend(int device, std::unique_ptr<const cuda::CublasApi> blas)
    : device_(device),
      blas_(std::move(blas)),
      pool_(std::make_unique<cuda::LanePool>(device, blas_.get())),
      cpu_(MakeCpuBackend()) {}

// ---- host (CPU backend) ops: see the table above ----

absl::StatusOr<RvqCodebooks> CudaBackend::RvqFit(const ConstTensor& x,
                                                 const RvqFitOptions& options) const {
  HostOperands ops(device_);
  MAPL_ASSIGN_OR_RETURN(ConstTensor x_h, ops.In(x, "x"));
  return cpu_->RvqFit(x_h, options);
}

absl::Status CudaBackend::Msign(const ConstTensor& y, const Tensor& out,
                                const MsignOptions& options) const {
  HostOperands ops(device_);
  MAPL_ASSIGN_OR_RETURN(ConstTensor y_h, ops.In(y, "y"));
  MAPL_ASSIGN_OR_RETURN(Tensor out_h, ops.Out(out, "out"));
  MAPL_RETURN_IF_ERROR(cpu_->Msign(y_h, out_h, options));
  return ops.CopyBack();
}

absl::Status CudaBackend::Retract(const Tensor& u) const {
  HostOperands ops(device_);
  MAPL_ASSIGN_OR_RETURN(Tensor u_h, ops.Out(u, "u"));
  MAPL_RETURN_IF_ERROR(cpu_->Retract(u_h));
  return ops.CopyBack();
}

absl::Status CudaBackend::SpelStep(const Tensor& u, const ConstTensor& grad, const Tensor& momentum,
                                   const SpelOptions& options) const {
  HostOperands ops(device_);
  MAPL_ASSIGN_OR_RETURN(Tensor u_h, ops.Out(u, "u"));
  MAPL_ASSIGN_OR_RETURN(ConstTensor grad_h, ops.In(grad, "grad"));
  MAPL_ASSIGN_OR_RETURN(Tensor momentum_h, ops.Out(momentum, "momentum"));
  MAPL_RETURN_IF_ERROR(cpu_->SpelStep(u_h, grad_h, momentum_h, options));
  return ops.CopyBack();
}

}  // namespace mapl

// The module's entry points (module.h), the only symbols libmapl_cuda.so exports.
extern "C" __attribute__((visibility("default"))) const char* mapl_cuda_module_abi() {
  return MAPL_CUDA_MODULE_ABI;
}

extern "C" __attribute__((visibility("default"))) void mapl_cuda_create_backend(
    absl::StatusOr<std::unique_ptr<mapl::Backend>>* out) {
  *out = mapl::cuda::CreateBackend();
}
