// The anchor ops that run on the device: AnchorLookup and LiftWithAnchor (a gather of P[t] and
// cuBLAS SGEMMs) and AdamStep (one kernel after a check of every element), with the validation
// and errors of kernels/cpu/anchors.cc. AnchorGrad is a host op (the table in cuda_backend.cc).
#include <climits>
#include <cmath>
#include <vector>

#include "common/status_macros.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/kernels.h"
#include "kernels/validation.h"

namespace mapl {
namespace {

// Token ids: one per row, each in [0, V); copied to the host for the check when on the device.
absl::StatusOr<const int32_t*> DeviceTokens(cuda::Lane& lane, int device, int slot,
                                            absl::Span<const int32_t> tokens, int64_t n,
                                            int64_t vocab, const char* rows_of) {
  MAPL_RETURN_IF_ERROR(CheckTokenCount(tokens, n, rows_of));
  MAPL_ASSIGN_OR_RETURN(std::vector<int32_t> host, cuda::HostCopy(lane, device, tokens, "tokens"));
  MAPL_RETURN_IF_ERROR(CheckTokenValues(host, vocab));
  MAPL_ASSIGN_OR_RETURN(const void* d,
                        cuda::DeviceInput(lane, device, slot, tokens.data(),
                                          tokens.size() * sizeof(int32_t), "tokens"));
  return static_cast<const int32_t*>(d);
}

}  // namespace

absl::StatusOr<CudaBackend::DeviceAnchor> CudaBackend::FactorAnchorOnDevice(
    cuda::Lane& lane, const LowRankAnchor& a, int64_t n, const ConstTensor& u, const float* u_d,
    const char* what, int first_slot) const {
  MAPL_RETURN_IF_ERROR(CheckAnchorAgainstU(a, u, what));
  MAPL_ASSIGN_OR_RETURN(const int32_t* tokens,
                        DeviceTokens(lane, device_, first_slot, a.tokens, n, a.p.rows, what));
  DeviceAnchor f;
  f.tokens = tokens;
  f.r = a.p.cols;
  const int64_t d = u.rows, k = u.cols;
  MAPL_ASSIGN_OR_RETURN(const void* p, cuda::DeviceInput(lane, device_, first_slot + 1, a.p.data,
                                                         size_t(a.p.size()) * sizeof(float), "p"));
  MAPL_ASSIGN_OR_RETURN(const void* q, cuda::DeviceInput(lane, device_, first_slot + 2, a.q.data,
                                                         size_t(a.q.size()) * sizeof(float), "q"));
  f.q = static_cast<const float*>(q);
  MAPL_ASSIGN_OR_RETURN(void* pt, lane.slots[first_slot + 3].Reserve(size_t(n * f.r) * 4));
  MAPL_RETURN_IF_ERROR(
      cuda::CudaStatus(cuda::LaunchGatherRows(static_cast<const float*>(p), f.r, tokens, n,
                                              static_cast<float*>(pt), lane.stream),
                       "LaunchGatherRows"));
  f.pt = static_cast<const float*>(pt);
  MAPL_ASSIGN_OR_RETURN(void* qu, lane.slots[first_slot + 4].Reserve(size_t(f.r * k) * 4));
  f.qu = static_cast<const float*>(qu);
  if (f.r > 0 && k > 0) {
    if (d > 0) {
      MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane.blas, false, false, int(f.r), int(k), int(d),
                                                1.f, f.q, u_d, 0.f, static_cast<float*>(qu)));
    } else {
      MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(qu, 0, size_t(f.r * k) * 4, lane.stream));
    }
  }
  return f;
}

absl::Status CudaBackend::AnchorLookup(const ConstTensor& p, const ConstTensor& q,
                                       absl::Span<const int32_t> tokens, const Tensor& a) const {
  MAPL_RETURN_IF_ERROR(CheckAnchorTables(p, q));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(a, "a", -1, q.cols));
  const int64_t n = a.rows, r = p.cols, d = q.cols;
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0 tokens, 1 p, 2 q, 3 P[t], 4 the f32 result, 5 its host form.
  MAPL_ASSIGN_OR_RETURN(const int32_t* tok,
                        DeviceTokens(*lane, device_, 0, tokens, n, p.rows, "a"));
  if (n == 0 || d == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(float* out, cuda::F32Target(*lane, device_, 4, a, "a"));
  if (r == 0) {
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0, size_t(n * d) * 4, lane->stream));
  } else {
    // One gather and one GEMM, as on the CPU.
    MAPL_ASSIGN_OR_RETURN(const void* pd,
                          cuda::DeviceInput(*lane, device_, 1, p.data, size_t(p.size()) * 4, "p"));
    MAPL_ASSIGN_OR_RETURN(const void* qd,
                          cuda::DeviceInput(*lane, device_, 2, q.data, size_t(q.size()) * 4, "q"));
    MAPL_ASSIGN_OR_RETURN(void* pt, lane->slots[3].Reserve(size_t(n * r) * 4));
    MAPL_RETURN_IF_ERROR(
        cuda::CudaStatus(cuda::LaunchGatherRows(static_cast<const float*>(pd), r, tok, n,
                                                static_cast<float*>(pt), lane->stream),
                         "LaunchGatherRows"));
    MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane->blas, false, false, int(n), int(d), int(r), 1.f,
                                              static_cast<const float*>(pt),
                                              static_cast<const float*>(qd), 0.f, out));
  }
  return cuda::StoreF32(*lane, device_, 5, out, a, "a");
}

absl::Status CudaBackend::LiftWithAnchor(const ConstTensor& zq, const ConstTensor& u,
                                         const LowRankAnchor& a, const Tensor& h) const {
  MAPL_RETURN_IF_ERROR(CheckLiftWithAnchorArgs(zq, u, h));
  const int64_t n = zq.rows, d = u.rows, k = u.cols;
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0/1 u, 2/3 zq's private copy (the coefficients), 4-8 the anchor, 9 the f32 result,
  // 10 its bf16 or host form.
  MAPL_ASSIGN_OR_RETURN(const float* ud, cuda::DeviceF32(*lane, device_, 0, 1, u, "u"));
  MAPL_ASSIGN_OR_RETURN(DeviceAnchor f, FactorAnchorOnDevice(*lane, a, n, u, ud, "a", 4));
  if (n == 0 || d == 0) return absl::OkStatus();
  const int64_t r = f.r;
  // h = (zq - P[t] (Q U)) U^T + P[t] Q: an n x k correction, then n x d x (k + r) of GEMMs.
  MAPL_ASSIGN_OR_RETURN(float* coef,
                        cuda::DeviceF32(*lane, device_, 2, 3, zq, "zq", /*copy=*/true));
  if (r > 0 && k > 0) {
    MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane->blas, false, false, int(n), int(k), int(r),
                                              -1.f, f.pt, f.qu, 1.f, coef));
  }
  MAPL_ASSIGN_OR_RETURN(float* out, cuda::F32Target(*lane, device_, 9, h, "h"));
  // k >= 1: u is tall (CheckTallF32).
  MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane->blas, false, true, int(n), int(d), int(k), 1.f,
                                            coef, ud, 0.f, out));
  if (r > 0) {
    MAPL_RETURN_IF_ERROR(blas_->RowMajorSgemm(lane->blas, false, false, int(n), int(d), int(r), 1.f,
                                              f.pt, f.q, 1.f, out));
  }
  return cuda::StoreF32(*lane, device_, 10, out, h, "h");
}

absl::Status CudaBackend::AnchorGrad(const ConstTensor& p, const ConstTensor& q,
                                     absl::Span<const int32_t> tokens, const ConstTensor& g,
                                     const ConstTensor& gu, const ConstTensor& u, const Tensor& dp,
                                     const Tensor& dq) const {
  // The CPU backend's checks, in its order and words (kernels/validation.h).
  MAPL_RETURN_IF_ERROR(CheckAnchorGradArgs(p, q, g, gu, u, dp, dq));
  const int64_t n = g.rows;
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0/1 u, 2-6 the anchor, 7/8 g, 9 gu, 10 g_perp Q^T, 11 the new dp, 12 the touched
  // rows, 13 the new dq, 14 P[t]^T gu, 15 a device copy of a host dq.
  MAPL_ASSIGN_OR_RETURN(const float* ud, cuda::DeviceF32(*lane, device_, 0, 1, u, "u"));
  MAPL_ASSIGN_OR_RETURN(DeviceAnchor f,
                        FactorAnchorOnDevice(*lane, {p, q, tokens}, n, u, ud, "anchor", 2));
  // dp and dq accumulate over microbatches: one bad microbatch must not spoil the others.
  MAPL_ASSIGN_OR_RETURN(const float* gd, cuda::DeviceF32(*lane, device_, 7, 8, g, "g"));
  MAPL_RETURN_IF_ERROR(
      cuda::CheckFiniteOnDevice(*lane, gd, ConstTensor{gd, g.rows, g.cols, DType::kF32}, "g"));
  MAPL_ASSIGN_OR_RETURN(const float* gud, cuda::DeviceF32(*lane, device_, 9, 9, gu, "gu"));
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(*lane, gud, gu, "gu"));
  const int r = static_cast<int>(f.r), d = static_cast<int>(q.cols), k = static_cast<int>(u.cols);
  const int ni = static_cast<int>(n);
  if (n == 0 || r == 0 || d == 0) return absl::OkStatus();

  // g_perp Q^T = g Q^T - gu (Q U)^T: an n x d x r GEMM and an n x k x r one.
  MAPL_ASSIGN_OR_RETURN(void* gq_v, lane->slots[10].Reserve(size_t(n) * r * 4));
  float* gq = static_cast<float*>(gq_v);
  MAPL_RETURN_IF_ERROR(
      blas_->RowMajorSgemm(lane->blas, false, true, ni, r, d, 1.f, gd, f.q, 0.f, gq));
  MAPL_RETURN_IF_ERROR(
      blas_->RowMajorSgemm(lane->blas, false, true, ni, r, k, -1.f, gud, f.qu, 1.f, gq));
  // dp[t_i] += (g_perp Q^T)_i, a scatter-add into a copy of dp; the rows it touched are checked
  // before anything is written, so an overflow reaches neither dp nor dq.
  MAPL_ASSIGN_OR_RETURN(float* dp_new,
                        cuda::DeviceF32(*lane, device_, 11, 11, dp, "dp", /*copy=*/true));
  MAPL_ASSIGN_OR_RETURN(void* touched, lane->slots[12].Reserve(size_t(p.rows)));
  MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(touched, 0, size_t(p.rows), lane->stream));
  MAPL_RETURN_IF_ERROR(
      cuda::CudaStatus(cuda::LaunchScatterAddRows(gq, n, r, f.tokens, dp_new,
                                                  static_cast<uint8_t*>(touched), lane->stream),
                       "LaunchScatterAddRows"));
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(lane->error_word, 0xff, sizeof(unsigned long long), lane->stream));
  MAPL_RETURN_IF_ERROR(
      cuda::CudaStatus(cuda::LaunchFirstBadTouchedRow(dp_new, static_cast<const uint8_t*>(touched),
                                                      p.rows, r, lane->error_word, lane->stream),
                       "LaunchFirstBadTouchedRow"));
  unsigned long long first = 0;
  MAPL_RETURN_IF_ERROR(cuda::Download(*lane, &first, lane->error_word, sizeof(first)));
  if (first != ULLONG_MAX) {
    return AnchorGradOverflowError(static_cast<int64_t>(first));
  }
  // dq += P[t]^T g_perp = P[t]^T g - (P[t]^T gu) U^T, into scratch first for the same reason.
  MAPL_ASSIGN_OR_RETURN(void* dq_v, lane->slots[13].Reserve(size_t(r) * d * 4));
  float* dq_new = static_cast<float*>(dq_v);
  MAPL_RETURN_IF_ERROR(
      blas_->RowMajorSgemm(lane->blas, true, false, r, d, ni, 1.f, f.pt, gd, 0.f, dq_new));
  MAPL_ASSIGN_OR_RETURN(void* ptgu_v, lane->slots[14].Reserve(size_t(r) * k * 4));
  float* ptgu = static_cast<float*>(ptgu_v);
  MAPL_RETURN_IF_ERROR(
      blas_->RowMajorSgemm(lane->blas, true, false, r, k, ni, 1.f, f.pt, gud, 0.f, ptgu));
  MAPL_RETURN_IF_ERROR(
      blas_->RowMajorSgemm(lane->blas, false, true, r, d, k, -1.f, ptgu, ud, 1.f, dq_new));
  MAPL_RETURN_IF_ERROR(
      cuda::CommitFiniteOnDevice(*lane, device_, 15, dq_new, dq, /*accumulate=*/true, "dq"));
  // dp last: every row not touched is the copy of itself.
  return cuda::StoreF32(*lane, device_, 11, dp_new, dp, "dp");
}

absl::Status CudaBackend::AdamStep(const Tensor& param, const ConstTensor& grad, const Tensor& m,
                                   const Tensor& v, const AdamOptions& options) const {
  // The CPU backend's checks, in its order and words (kernels/validation.h).
  MAPL_RETURN_IF_ERROR(CheckAdamArgs(param, grad, m, v, options));
  const int64_t count = param.size();
  if (count == 0) return absl::OkStatus();
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0 grad, 1 param, 2 m, 3 v (device copies of host memory; device memory in place).
  MAPL_ASSIGN_OR_RETURN(const void* g,
                        cuda::DeviceInput(*lane, device_, 0, grad.data, bytes, "grad"));
  cuda::DeviceOutput state[3];
  const Tensor* tensors[3] = {&param, &m, &v};
  const char* names[3] = {"param", "m", "v"};
  for (int i = 0; i < 3; ++i) {
    MAPL_ASSIGN_OR_RETURN(
        state[i], cuda::PrepareOutput(*lane, device_, 1 + i, tensors[i]->data, bytes, names[i]));
    if (state[i].host != nullptr) {
      MAPL_RETURN_IF_ERROR(cuda::Upload(*lane, state[i].device, state[i].host, bytes));
    }
  }
  const float* gd = static_cast<const float*>(g);
  float* vd = static_cast<float*>(state[2].device);
  // A finite but huge gradient would overflow v to Inf and freeze that parameter for good, so
  // every element is checked before anything is written, as on the CPU.
  MAPL_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(lane->error_word, 0xff, sizeof(unsigned long long), lane->stream));
  MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
      cuda::LaunchAdamCheck(gd, vd, options.beta2, count, lane->error_word, lane->stream),
      "LaunchAdamCheck"));
  unsigned long long first = 0;
  MAPL_RETURN_IF_ERROR(cuda::Download(*lane, &first, lane->error_word, sizeof(first)));
  if (first != ULLONG_MAX) {
    const int64_t i = static_cast<int64_t>(first);
    float gi = 0.f;
    MAPL_RETURN_IF_ERROR(cuda::Download(*lane, &gi, gd + i, sizeof(float)));
    return AdamGradError(gi, i, param.cols);
  }
  // PyTorch's AdamW, with the CPU's constants computed the same way.
  const double bc1 = 1.0 - std::pow(static_cast<double>(options.beta1), options.step);
  const double bc2 = 1.0 - std::pow(static_cast<double>(options.beta2), options.step);
  const float step_size = static_cast<float>(options.lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float decay = 1.f - options.lr * options.weight_decay;
  MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
      cuda::LaunchAdamStep(
          static_cast<float*>(state[0].device), gd, static_cast<float*>(state[1].device), vd, count,
          options.beta1, options.beta2, step_size, inv_sqrt_bc2, options.eps, decay, lane->stream),
      "LaunchAdamStep"));
  for (const cuda::DeviceOutput& o : state) MAPL_RETURN_IF_ERROR(cuda::FinishOutput(*lane, o));
  return absl::OkStatus();
}

}  // namespace mapl
