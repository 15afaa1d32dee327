// The CUDA implementation of mapl::Backend, registered as "cuda" (kernels/registry.cc) when the
// build has MAPL_WITH_CUDA, and built as the module libmapl_cuda.so (kernels/cuda/loader.cc). Which
// ops run on the device and which call the CPU backend is the table at the top of cuda_backend.cc.
// Operands may be host memory or device memory of the backend's device (kernels/cuda/runtime.h);
// every op has finished when it returns.
#ifndef MAPL_KERNELS_CUDA_CUDA_BACKEND_H_
#define MAPL_KERNELS_CUDA_CUDA_BACKEND_H_

#include <memory>

#include "kernels/backend.h"
#include "kernels/cuda/cublas_api.h"
#include "kernels/cuda/runtime.h"

namespace mapl {

namespace cuda {
// A backend on CUDA device MAPL_CUDA_DEVICE (default 0), which must have compute capability 9.0
// or above (the build targets sm_90). UNAVAILABLE, naming the CUDA error, when this machine has
// no usable device or no cuBLAS 13; INVALID_ARGUMENT for a malformed MAPL_CUDA_DEVICE. The
// module's entry point (module.h) calls it; elsewhere, MakeBackend("cuda") loads the module.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend();
}  // namespace cuda

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, std::unique_ptr<const cuda::CublasApi> blas);
  const char* name() const override { return "cuda"; }

  absl::Status Project(const ConstTensor& h, const ConstTensor& u, const Tensor& z) const override;
  absl::Status Lift(const ConstTensor& z, const ConstTensor& u, const Tensor& h) const override;
  absl::Status LiftWithAnchor(const ConstTensor& zq, const ConstTensor& u, const LowRankAnchor& a,
                              const Tensor& h) const override;

  absl::StatusOr<RvqCodebooks> RvqFit(const ConstTensor& x,
                                      const RvqFitOptions& options) const override;
  absl::Status RvqEncode(const RvqCodebooks& cb, const ConstTensor& x, int beam,
                         absl::Span<uint8_t> codes, absl::Span<float> norms) const override;
  absl::Status RvqDecode(const RvqCodebooks& cb, absl::Span<const uint8_t> codes,
                         absl::Span<const float> norms, const Tensor& out) const override;
  absl::StatusOr<RvqUpdateStats> RvqUpdate(RvqLearner* learner, const ConstTensor& x,
                                           const RvqUpdateOptions& options) const override;

  absl::Status Int8Encode(const ConstTensor& x, absl::Span<int8_t> q,
                          absl::Span<float> scales) const override;
  absl::Status Int8Decode(absl::Span<const int8_t> q, absl::Span<const float> scales,
                          const Tensor& out) const override;
  absl::Status Int4Encode(const ConstTensor& x, absl::Span<uint8_t> q,
                          absl::Span<float> scales) const override;
  absl::Status Int4Decode(absl::Span<const uint8_t> q, absl::Span<const float> scales,
                          const Tensor& out) const override;

  absl::Status Msign(const ConstTensor& y, const Tensor& out,
                     const MsignOptions& options) const override;
  absl::Status Retract(const Tensor& u) const override;
  absl::Status SpelStep(const Tensor& u, const ConstTensor& grad, const Tensor& momentum,
                        const SpelOptions& options) const override;

  absl::Status AnchorLookup(const ConstTensor& p, const ConstTensor& q,
                            absl::Span<const int32_t> tokens, const Tensor& a) const override;
  absl::Status AnchorGrad(const ConstTensor& p, const ConstTensor& q,
                          absl::Span<const int32_t> tokens, const ConstTensor& g,
                          const ConstTensor& gu, const ConstTensor& u, const Tensor& dp,
                          const Tensor& dq) const override;
  absl::Status AdamStep(const Tensor& param, const ConstTensor& grad, const Tensor& m,
                        const Tensor& v, const AdamOptions& options) const override;

  absl::Status GradUp(const ConstTensor& h, const ConstTensor& gzq, const Tensor& g_up,
                      bool accumulate) const override;
  absl::Status GradDown(const ConstTensor& g, const ConstTensor& gu, const ConstTensor& zq,
                        const ConstTensor& u, const LowRankAnchor* a, const Tensor& g_down,
                        bool accumulate) const override;

 private:
  // out = in * u (trans_u false) or in * u^T, by one SGEMM; shapes already checked.
  absl::Status Product(const ConstTensor& in, const ConstTensor& u, bool trans_u, const Tensor& out,
                       const char* in_name, const char* out_name) const;
  // The anchor's factors on the device for n tokens and the projector u (device copy u_d):
  // pt = P[t] (n, r) and qu = Q U (r, k), with the CPU backend's checks (cpu::FactorAnchor) and
  // errors; `what` names the anchor. Uses scratch slots first_slot .. first_slot + 4.
  struct DeviceAnchor {
    int64_t r = 0;
    const float* pt = nullptr;        // (n, r)
    const float* qu = nullptr;        // (r, k)
    const float* q = nullptr;         // (r, d)
    const int32_t* tokens = nullptr;  // (n), checked to be in [0, V)
  };
  absl::StatusOr<DeviceAnchor> FactorAnchorOnDevice(cuda::Lane& lane, const LowRankAnchor& a,
                                                    int64_t n, const ConstTensor& u,
                                                    const float* u_d, const char* what,
                                                    int first_slot) const;
  // RvqEncode with beam != 1, on the CPU backend (device operands through host copies).
  absl::Status BeamOnHost(const RvqCodebooks& cb, const ConstTensor& x, int beam,
                          absl::Span<uint8_t> codes, absl::Span<float> norms) const;
  // Int8/Int4 encode and decode, shapes already checked.
  absl::Status Quantize(const ConstTensor& x, bool int4, void* q, size_t q_bytes,
                        absl::Span<float> scales) const;
  absl::Status Dequantize(const void* q, size_t q_bytes, bool int4, absl::Span<const float> scales,
                          const Tensor& out) const;

  const int device_;
  const std::unique_ptr<const cuda::CublasApi> blas_;
  const std::unique_ptr<cuda::LanePool> pool_;
  // The ops the table in cuda_backend.cc marks "host (CPU backend)".
  const std::unique_ptr<Backend> cpu_;
};

}  // namespace mapl

#endif  // MAPL_KERNELS_CUDA_CUDA_BACKEND_H_
