// RVQ on the device: greedy (beam 1) encoding with the fused level kernel of rvq.cu, decoding,
// and the learner's streaming update. Beam search (beam > 1) calls the CPU backend: the server
// only ever encodes with beam 1, and its candidate bookkeeping is host work. RvqFit is a host op
// too (cuda_backend.cc). Validation and errors are those of kernels/cpu/rvq.cc.
#include <random>
#include <vector>

#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/kernels.h"
#include "kernels/validation.h"

namespace mapl {
namespace {

// ||c||^2 / 2 of every centroid of every level, (L * K), summed in double as the CPU's
// PrepareLevel does, so both backends compare the same scores up to the dot products' rounding.
std::vector<float> HalfNorms(const RvqCodebooks& cb) {
  const int64_t rows = int64_t{cb.levels} * cb.codebook_size;
  std::vector<float> half(rows);
  for (int64_t c = 0; c < rows; ++c) {
    double norm = 0;
    const float* v = cb.centroids.data() + c * cb.dim;
    for (int32_t j = 0; j < cb.dim; ++j) norm += double(v[j]) * v[j];
    half[c] = static_cast<float>(0.5 * norm);
  }
  return half;
}

}  // namespace

absl::Status CudaBackend::BeamOnHost(const RvqCodebooks& cb, const ConstTensor& x, int beam,
                                     absl::Span<uint8_t> codes, absl::Span<float> norms) const {
  MAPL_ASSIGN_OR_RETURN(cuda::Memory xm, cuda::Classify(x.data, device_, "x"));
  MAPL_ASSIGN_OR_RETURN(cuda::Memory cm, cuda::Classify(codes.data(), device_, "codes"));
  MAPL_ASSIGN_OR_RETURN(cuda::Memory nm, cuda::Classify(norms.data(), device_, "norms"));
  if (xm == cuda::Memory::kHost && cm == cuda::Memory::kHost && nm == cuda::Memory::kHost) {
    return cpu_->RvqEncode(cb, x, beam, codes, norms);
  }
  // Device operands go through host copies; the outputs are copied back only on success.
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  const bool sized = x.rows >= 0 && x.cols >= 0;
  std::vector<char> xh(sized ? size_t(x.size()) * DTypeSize(x.dtype) : 0);
  MAPL_RETURN_IF_ERROR(cuda::CopyToHost(*lane, device_, x.data, xh.size(), xh.data(), "x"));
  std::vector<uint8_t> ch(codes.size());
  std::vector<float> nh(norms.size());
  MAPL_RETURN_IF_ERROR(cpu_->RvqEncode(cb, ConstTensor{xh.data(), x.rows, x.cols, x.dtype}, beam,
                                       absl::MakeSpan(ch), absl::MakeSpan(nh)));
  MAPL_ASSIGN_OR_RETURN(cuda::DeviceOutput cd,
                        cuda::PrepareOutput(*lane, device_, 0, codes.data(), ch.size(), "codes"));
  MAPL_ASSIGN_OR_RETURN(
      cuda::DeviceOutput nd,
      cuda::PrepareOutput(*lane, device_, 1, norms.data(), nh.size() * sizeof(float), "norms"));
  MAPL_RETURN_IF_ERROR(cuda::Upload(*lane, cd.device, ch.data(), ch.size()));
  MAPL_RETURN_IF_ERROR(cuda::Upload(*lane, nd.device, nh.data(), nh.size() * sizeof(float)));
  MAPL_RETURN_IF_ERROR(cuda::FinishOutput(*lane, cd));
  return cuda::FinishOutput(*lane, nd);
}

absl::Status CudaBackend::RvqEncode(const RvqCodebooks& cb, const ConstTensor& x, int beam,
                                    absl::Span<uint8_t> codes, absl::Span<float> norms) const {
  if (beam != 1) {
    // Beam search, and a beam out of range, are the CPU backend's (the table in
    // cuda_backend.cc), which validates in its own order.
    return BeamOnHost(cb, x, beam, codes, norms);
  }
  // The CPU backend's checks in its order: the codebooks, x's shape, x's finiteness (on the
  // device, below), then the sizes of codes and norms.
  MAPL_RETURN_IF_ERROR(CheckRvqInput(cb, x));
  const int64_t n = x.rows, dim = cb.dim, k = cb.codebook_size, nl = cb.levels;
  if (n == 0) return CheckRvqCodesAndNorms(cb, n, codes, norms, "x");
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0/1 x (raw; the f32 residual, always a private copy, as it is consumed), 2 the
  // centroids, 3 their half norms, 4 the norms, 5 the codes.
  MAPL_ASSIGN_OR_RETURN(float* residual,
                        cuda::DeviceF32(*lane, device_, 0, 1, x, "x", /*copy=*/true));
  // The fp32 copy holds exactly x's values, so it names the same element as CheckFinite on x.
  MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(
      *lane, residual, ConstTensor{residual, x.rows, x.cols, DType::kF32}, "x"));
  MAPL_RETURN_IF_ERROR(CheckRvqCodesAndNorms(cb, n, codes, norms, "x"));
  MAPL_ASSIGN_OR_RETURN(void* centroids, lane->slots[2].Reserve(cb.centroids.size() * 4));
  MAPL_RETURN_IF_ERROR(
      cuda::Upload(*lane, centroids, cb.centroids.data(), cb.centroids.size() * 4));
  const std::vector<float> half = HalfNorms(cb);
  MAPL_ASSIGN_OR_RETURN(void* half_d, lane->slots[3].Reserve(half.size() * 4));
  MAPL_RETURN_IF_ERROR(cuda::Upload(*lane, half_d, half.data(), half.size() * 4));
  cuda::DeviceOutput nd;
  if (cb.gain_shape) {
    MAPL_ASSIGN_OR_RETURN(nd, cuda::PrepareOutput(*lane, device_, 4, norms.data(),
                                                  norms.size() * sizeof(float), "norms"));
    MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
        cuda::LaunchNormalizeRows(residual, n, dim, static_cast<float*>(nd.device), lane->stream),
        "LaunchNormalizeRows"));
  }
  MAPL_ASSIGN_OR_RETURN(cuda::DeviceOutput cd, cuda::PrepareOutput(*lane, device_, 5, codes.data(),
                                                                   codes.size(), "codes"));
  for (int64_t l = 0; l < nl; ++l) {
    MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
        cuda::LaunchRvqLevel(residual, n, cb.dim,
                             static_cast<const float*>(centroids) + l * k * dim,
                             static_cast<const float*>(half_d) + l * k, cb.codebook_size,
                             static_cast<uint8_t*>(cd.device) + l, cb.levels,
                             /*subtract=*/true, lane->stream),
        "LaunchRvqLevel"));
  }
  MAPL_RETURN_IF_ERROR(cuda::FinishOutput(*lane, cd));
  if (cb.gain_shape) MAPL_RETURN_IF_ERROR(cuda::FinishOutput(*lane, nd));
  return absl::OkStatus();
}

absl::Status CudaBackend::RvqDecode(const RvqCodebooks& cb, absl::Span<const uint8_t> codes,
                                    absl::Span<const float> norms, const Tensor& out) const {
  MAPL_RETURN_IF_ERROR(CheckRvqDecodeArgs(cb, codes, norms, out));
  const int64_t n = out.rows;
  if (n == 0) return absl::OkStatus();
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Codes and norms come from the wire: validated on the host (n * L bytes and n floats).
  MAPL_ASSIGN_OR_RETURN(std::vector<uint8_t> host_codes,
                        cuda::HostCopy(*lane, device_, codes, "codes"));
  MAPL_RETURN_IF_ERROR(CheckRvqCodeValues(cb, host_codes));
  if (cb.gain_shape) {
    MAPL_ASSIGN_OR_RETURN(std::vector<float> host_norms,
                          cuda::HostCopy(*lane, device_, norms, "norms"));
    MAPL_RETURN_IF_ERROR(CheckRvqNormValues(host_norms));
  }
  // Slots: 0 the centroids, 1 the codes, 2 the norms, 3 the f32 result, 4 its bf16 or host form.
  MAPL_ASSIGN_OR_RETURN(void* centroids, lane->slots[0].Reserve(cb.centroids.size() * 4));
  MAPL_RETURN_IF_ERROR(
      cuda::Upload(*lane, centroids, cb.centroids.data(), cb.centroids.size() * 4));
  MAPL_ASSIGN_OR_RETURN(const void* codes_d,
                        cuda::DeviceInput(*lane, device_, 1, codes.data(), codes.size(), "codes"));
  const void* norms_d = nullptr;
  if (cb.gain_shape) {
    MAPL_ASSIGN_OR_RETURN(norms_d, cuda::DeviceInput(*lane, device_, 2, norms.data(),
                                                     norms.size() * sizeof(float), "norms"));
  }
  MAPL_ASSIGN_OR_RETURN(float* of, cuda::F32Target(*lane, device_, 3, out, "out"));
  MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
      cuda::LaunchRvqDecode(static_cast<const float*>(centroids), cb.levels, cb.codebook_size,
                            cb.dim, static_cast<const uint8_t*>(codes_d),
                            static_cast<const float*>(norms_d), n, of, lane->stream),
      "LaunchRvqDecode"));
  return cuda::StoreF32(*lane, device_, 4, of, out, "out");
}

absl::StatusOr<RvqUpdateStats> CudaBackend::RvqUpdate(RvqLearner* learner, const ConstTensor& x,
                                                      const RvqUpdateOptions& options) const {
  // The CPU backend's checks in its order: the learner, the codebooks, x's shape and finiteness
  // (on the device), the learner's statistics, the options.
  if (learner == nullptr) return absl::InvalidArgumentError("rvq update: learner is null");
  MAPL_RETURN_IF_ERROR(CheckRvqInput(learner->codebooks, x));
  RvqUpdateStats stats;
  const int64_t n = x.rows;
  MAPL_ASSIGN_OR_RETURN(cuda::LaneLease lane, pool_->Acquire());
  // Slots: 0/1 x (raw; the f32 residual, a private copy), 2 the norms (discarded), 3 the sums of
  // squares, 4 the centroids, 5 their half norms, 6 the codes of a level, 7 the batch counts,
  // 8 the batch sums.
  float* residual = nullptr;
  if (n > 0) {
    MAPL_ASSIGN_OR_RETURN(residual, cuda::DeviceF32(*lane, device_, 0, 1, x, "x", /*copy=*/true));
    MAPL_RETURN_IF_ERROR(cuda::CheckFiniteOnDevice(
        *lane, residual, ConstTensor{residual, x.rows, x.cols, DType::kF32}, "x"));
  }
  // Work on a copy and commit only a finite result, as the CPU backend does.
  RvqLearner next = *learner;
  RvqCodebooks& cb = next.codebooks;
  const int64_t dim = cb.dim, k = cb.codebook_size, nl = cb.levels;
  MAPL_RETURN_IF_ERROR(CheckRvqLearnerAndOptions(next, options));
  if (n == 0) return stats;
  if (cb.gain_shape) {
    MAPL_ASSIGN_OR_RETURN(void* norms, lane->slots[2].Reserve(size_t(n) * 4));
    MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
        cuda::LaunchNormalizeRows(residual, n, dim, static_cast<float*>(norms), lane->stream),
        "LaunchNormalizeRows"));
  }
  MAPL_ASSIGN_OR_RETURN(void* sq, lane->slots[3].Reserve(sizeof(double)));
  double* sum_sq = static_cast<double*>(sq);
  auto sum_of_squares = [&]() -> absl::StatusOr<double> {
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(sum_sq, 0, sizeof(double), lane->stream));
    MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
        cuda::LaunchSumSquares(residual, n * dim, sum_sq, lane->stream), "LaunchSumSquares"));
    double v = 0;
    MAPL_RETURN_IF_ERROR(cuda::Download(*lane, &v, sum_sq, sizeof(double)));
    return v;
  };
  MAPL_ASSIGN_OR_RETURN(const double total, sum_of_squares());

  // Every level assigns with the codebooks as they were before this update (the CPU's
  // PrepareAll before its loop), so they are uploaded once.
  MAPL_ASSIGN_OR_RETURN(void* centroids, lane->slots[4].Reserve(cb.centroids.size() * 4));
  MAPL_RETURN_IF_ERROR(
      cuda::Upload(*lane, centroids, cb.centroids.data(), cb.centroids.size() * 4));
  const std::vector<float> half = HalfNorms(cb);
  MAPL_ASSIGN_OR_RETURN(void* half_d, lane->slots[5].Reserve(half.size() * 4));
  MAPL_RETURN_IF_ERROR(cuda::Upload(*lane, half_d, half.data(), half.size() * 4));
  MAPL_ASSIGN_OR_RETURN(void* codes, lane->slots[6].Reserve(size_t(n)));
  MAPL_ASSIGN_OR_RETURN(void* counts_d, lane->slots[7].Reserve(size_t(k) * 8));
  MAPL_ASSIGN_OR_RETURN(void* sums_d, lane->slots[8].Reserve(size_t(k) * dim * 8));
  std::vector<unsigned long long> raw_counts(k);
  std::vector<int64_t> batch_counts(k);
  std::vector<double> batch_sums(size_t(k) * dim);
  std::mt19937_64 rng(next.rng_state);
  for (int64_t l = 0; l < nl; ++l) {
    const float* level = static_cast<const float*>(centroids) + l * k * dim;
    // Assign with the level as it was, gather this level's statistics, update on the host, then
    // subtract.
    MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
        cuda::LaunchRvqLevel(residual, n, cb.dim, level, static_cast<const float*>(half_d) + l * k,
                             cb.codebook_size, static_cast<uint8_t*>(codes), 1,
                             /*subtract=*/false, lane->stream),
        "LaunchRvqLevel"));
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(counts_d, 0, size_t(k) * 8, lane->stream));
    MAPL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(sums_d, 0, size_t(k) * dim * 8, lane->stream));
    MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
        cuda::LaunchRvqBatchStats(residual, n, cb.dim, static_cast<const uint8_t*>(codes),
                                  static_cast<unsigned long long*>(counts_d),
                                  static_cast<double*>(sums_d), lane->stream),
        "LaunchRvqBatchStats"));
    MAPL_RETURN_IF_ERROR(cuda::Download(*lane, raw_counts.data(), counts_d, size_t(k) * 8));
    MAPL_RETURN_IF_ERROR(cuda::Download(*lane, batch_sums.data(), sums_d, size_t(k) * dim * 8));
    for (int64_t c = 0; c < k; ++c) batch_counts[c] = static_cast<int64_t>(raw_counts[c]);
    // The EMA and the re-seeding are the CPU backend's own code, so the random draws match; a
    // re-seed reads its residual row back from the device.
    cuda::Lane& ln = *lane;
    MAPL_ASSIGN_OR_RETURN(const int64_t reseeded,
                          cpu::ApplyRvqBatchStats(
                              next, static_cast<int>(l), n, batch_counts, batch_sums,
                              [&](int64_t i, float* dst) {
                                return cuda::Download(ln, dst, residual + i * dim, size_t(dim) * 4);
                              },
                              rng, options));
    stats.reseeded += reseeded;
    MAPL_RETURN_IF_ERROR(cuda::CudaStatus(
        cuda::LaunchSubtractCentroids(residual, n, cb.dim, level,
                                      static_cast<const uint8_t*>(codes), lane->stream),
        "LaunchSubtractCentroids"));
  }
  next.rng_state = rng();
  MAPL_RETURN_IF_ERROR(CheckRvqUpdateFinite(next));
  MAPL_ASSIGN_OR_RETURN(const double left, sum_of_squares());
  *learner = std::move(next);
  stats.relative_mse = total > 0 ? left / total : 0.0;
  return stats;
}

}  // namespace mapl
