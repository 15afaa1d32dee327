// The CPU implementation of mapl::Backend: GEMMs through CBLAS (OpenBLAS), small dense
// factorizations through LAPACK, and a hand-vectorised fused distance + argmin kernel for RVQ
// encoding (kernels/cpu/rvq_distance.cc). One .cc file per group of ops.
#ifndef MAPL_KERNELS_CPU_CPU_BACKEND_H_
#define MAPL_KERNELS_CPU_CPU_BACKEND_H_

#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "kernels/backend.h"

namespace mapl {

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }

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
};

// Shared by the ops that take a LowRankAnchor (kernels/cpu/anchors.cc).
namespace cpu {

// The anchor's factors for n tokens and the projector u (d, k): pt = P[t] (n, r) and
// qu = Q U (r, k). Checks p, q (r, d), the n token ids and u's shape against them; `what` names
// the anchor in errors.
struct AnchorFactors {
  int64_t r = 0;
  std::vector<float> pt;  // (n, r)
  std::vector<float> qu;  // (r, k)
};
absl::StatusOr<AnchorFactors> FactorAnchor(const LowRankAnchor& a, int64_t n, const ConstTensor& u,
                                           const char* what);

// The k x k half of a polar retraction pass (kernels/cpu/spel.cc), shared with the CUDA backend,
// which forms y^T y and applies the result on the device: from the Gram matrix g = y^T y (k, k,
// row-major double; overwritten) of a tall y, inv_sqrt (k, k) = (y^T y)^(-1/2) by LAPACK's
// symmetric eigensolver, and *gram_ratio = lambda_min / lambda_max. INVALID_ARGUMENT naming `what`
// when y is rank-deficient to float precision (a condition number above 1e6).
absl::Status GramInverseSqrt(double* g, int k, const char* what, double* inv_sqrt,
                             double* gram_ratio);
// Below this Gram eigenvalue ratio (a condition number above 1e3) the Gram route loses
// orthonormality, about cond^2 * eps of it, and the polar retraction runs a second pass on the
// (by then nearly orthonormal) result, which brings it back to rounding level.
inline constexpr double kRefineGramRatio = 1e-6;

// One level of RvqUpdate once the batch is assigned (kernels/cpu/rvq.cc), shared with the CUDA
// backend so that both update and re-seed alike, random draws included: the EMA of the level's
// counts and sums, then each centroid recomputed, or re-seeded when dead from a residual row of
// the batch drawn with `rng`. batch_counts (K) and batch_sums (K, dim) are the batch's
// statistics; residual_row(i, dst) writes row i of the level's residual (before the chosen
// centroids are subtracted) to dst, dim floats. Returns how many centroids were re-seeded, or
// residual_row's error.
absl::StatusOr<int64_t> ApplyRvqBatchStats(
    RvqLearner& next, int level, int64_t n, const std::vector<int64_t>& batch_counts,
    const std::vector<double>& batch_sums,
    const std::function<absl::Status(int64_t, float*)>& residual_row, std::mt19937_64& rng,
    const RvqUpdateOptions& options);

}  // namespace cpu
}  // namespace mapl

#endif  // MAPL_KERNELS_CPU_CPU_BACKEND_H_
