#include "server/anchor_learner.h"

#include <algorithm>
#include <random>

#include "common/status_macros.h"
#include "server/state_store.h"

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

void AnchorLearner::Save(v1::AnchorState* out) const {
  SaveFloats(p_, out->mutable_p());
  SaveFloats(q_, out->mutable_q());
  SaveFloats(p_m_, out->mutable_p_m());
  SaveFloats(p_v_, out->mutable_p_v());
  SaveFloats(q_m_, out->mutable_q_m());
  SaveFloats(q_v_, out->mutable_q_v());
  out->set_adam_steps(adam_steps_);
}

absl::Status AnchorLearner::Restore(const v1::AnchorState& state) {
  if (state.adam_steps() < 0) return absl::InvalidArgumentError("anchors: negative adam_steps");
  const size_t np = p_.size(), nq = q_.size();
  std::vector<float> p, q, p_m, p_v, q_m, q_v;
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.p(), np, "anchors P", &p));
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.q(), nq, "anchors Q", &q));
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.p_m(), np, "anchors P first moment", &p_m));
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.p_v(), np, "anchors P second moment", &p_v));
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.q_m(), nq, "anchors Q first moment", &q_m));
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.q_v(), nq, "anchors Q second moment", &q_v));
  p_ = std::move(p);
  q_ = std::move(q);
  p_m_ = std::move(p_m);
  p_v_ = std::move(p_v);
  q_m_ = std::move(q_m);
  q_v_ = std::move(q_v);
  adam_steps_ = state.adam_steps();
  std::fill(dp_.begin(), dp_.end(), 0.f);
  std::fill(dq_.begin(), dq_.end(), 0.f);
  has_grad_ = false;
  return absl::OkStatus();
}

}  // namespace mapl
