#include "server/anchor_learner.h"

#include <algorithm>
#include <random>

#include "common/status_macros.h"

namespace mapl {
namespace {

// Q starts small, P at zero: the anchor a = P[t] Q starts at exactly zero.
constexpr float kAnchorQInitStd = 0.02f;
// Salt that keeps the anchors' seeded stream independent of the boundary's others.
constexpr uint64_t kSaltAnchors = 0x0a7c4e9d31b25f60ull;

}  // namespace

AnchorLearner::AnchorLearner(const v1::BoundaryConfig& config)
    : vocab_(config.vocab()), rank_(config.anchor_rank()), d_(config.d()), lr_(config.anchor_lr()) {
  p_.assign(vocab_ * rank_, 0.f);
  dp_ = p_m_ = p_v_ = p_;
  q_.resize(rank_ * d_);
  std::mt19937_64 rng(config.seed() ^ kSaltAnchors);
  std::normal_distribution<float> normal(0.f, kAnchorQInitStd);
  for (float& x : q_) x = normal(rng);
  dq_.assign(rank_ * d_, 0.f);
  q_m_ = q_v_ = dq_;
}

absl::Status AnchorLearner::AccumulateGrad(const Backend& backend, absl::Span<const int32_t> tokens,
                                           const ConstTensor& g, const ConstTensor& gu,
                                           const ConstTensor& u) {
  // Validates before it accumulates.
  MAPL_RETURN_IF_ERROR(backend.AnchorGrad(p(), q(), tokens, g, gu, u,
                                          Tensor::F32(dp_.data(), vocab_, rank_),
                                          Tensor::F32(dq_.data(), rank_, d_)));
  has_grad_ = true;
  return absl::OkStatus();
}

absl::Status AnchorLearner::Step(const Backend& backend) {
  if (has_grad_) {
    AdamOptions options;
    options.lr = lr_;
    options.step = adam_steps_ + 1;
    MAPL_RETURN_IF_ERROR(backend.AdamStep(
        Tensor::F32(p_.data(), vocab_, rank_), ConstTensor::F32(dp_.data(), vocab_, rank_),
        Tensor::F32(p_m_.data(), vocab_, rank_), Tensor::F32(p_v_.data(), vocab_, rank_), options));
    MAPL_RETURN_IF_ERROR(backend.AdamStep(
        Tensor::F32(q_.data(), rank_, d_), ConstTensor::F32(dq_.data(), rank_, d_),
        Tensor::F32(q_m_.data(), rank_, d_), Tensor::F32(q_v_.data(), rank_, d_), options));
    ++adam_steps_;
  }
  std::fill(dp_.begin(), dp_.end(), 0.f);
  std::fill(dq_.begin(), dq_.end(), 0.f);
  has_grad_ = false;
  return absl::OkStatus();
}

}  // namespace mapl
