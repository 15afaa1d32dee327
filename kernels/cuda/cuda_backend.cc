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
//   Msign            device                Newton-Schulz: SGEMMs + the CPU's normalisation and
//                                          stopping test, read back every iteration (spel.cc)
//   Retract          device + host         polar factor in double: DGEMMs on the device, the
//                                          k x k eigenproblem on the host (the CPU's code)
//   SpelStep         device + host         momentum, tangent projection, Newton-Schulz and the
//                                          retraction as above; u and momentum are written only
//                                          once the step succeeded (spel.cc)
//
// A host op takes device-memory operands too: they are copied to the host, the CPU backend runs,
// and what it wrote is copied back only when it succeeded, so the CPU backend's validation and
// errors hold unchanged. Such an op costs a round trip over PCIe for every device operand.
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

// Host views of a host op's inputs: device memory is copied to the host. (The host ops write no
// tensor: RvqFit returns its codebooks, and RvqEncode's beam search has its own copies, BeamOnHost
// in rvq.cc.)
class HostOperands {
 public:
  explicit HostOperands(int device) : device_(device) {}

  absl::StatusOr<ConstTensor> In(const ConstTensor& t, const char* what) {
    MAPL_ASSIGN_OR_RETURN(const void* p, InBytes(t.data, Bytes(t), what));
    return ConstTensor{p, t.rows, t.cols, t.dtype};
  }

 private:
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

  const int device_;
  std::deque<std::vector<char>> buffers_;  // a deque: growing it keeps earlier copies in place
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

}  // namespace mapl

// The module's entry points (module.h), the only symbols libmapl_cuda.so exports.
extern "C" __attribute__((visibility("default"))) const char* mapl_cuda_module_abi() {
  return MAPL_CUDA_MODULE_ABI;
}

extern "C" __attribute__((visibility("default"))) void mapl_cuda_create_backend(
    absl::StatusOr<std::unique_ptr<mapl::Backend>>* out) {
  *out = mapl::cuda::CreateBackend();
}
