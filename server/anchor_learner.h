// The downstream's per-token anchors a = P[t] Q (docs/METHOD.md section 2): the tables, their
// gradients accumulated over a step's microbatches, and the Adam step that learns them.
//
//   AnchorLearner anchors(config);                     // METHOD_MAPL, downstream
//   backend.LiftWithAnchor(zq, u, anchors.Anchor(tokens), h_hat);   // a = P[t] Q, never formed
//   MAPL_RETURN_IF_ERROR(anchors.AccumulateGrad(backend, tokens, g, gu, u));
//   MAPL_RETURN_IF_ERROR(anchors.Step(backend));       // at the optimizer step
#ifndef MAPL_SERVER_ANCHOR_LEARNER_H_
#define MAPL_SERVER_ANCHOR_LEARNER_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/backend.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/state.pb.h"

namespace mapl {

class AnchorLearner {
 public:
  // P (vocab, r) starts at zero and Q (r, d) small and seeded, so the anchor starts at exactly 0.
  explicit AnchorLearner(const v1::BoundaryConfig& config);

  // The anchor a = P[t] Q of `tokens` (ids in [0, vocab)), as its factors. It borrows `tokens`
  // and this learner's tables: use it before the next Step().
  LowRankAnchor Anchor(absl::Span<const int32_t> tokens) const { return {p(), q(), tokens}; }
  // With g_perp = g - gu U^T (never formed): dP[t_i] += g_perp_i Q^T; dQ += sum_i P[t_i]^T
  // g_perp_i.  g: (n, d) f32/bf16; gu: (n, k) f32 = g U; u: (d, k).
  absl::Status AccumulateGrad(const Backend& backend, absl::Span<const int32_t> tokens,
                              const ConstTensor& g, const ConstTensor& gu, const ConstTensor& u);
  // One Adam step on P and Q when gradients were accumulated since the last Step; clears them.
  absl::Status Step(const Backend& backend);

  // P, Q and their Adam moments for a checkpoint (a step's unfinished gradients are not kept).
  // Restore: INVALID_ARGUMENT for tables of another shape or with non-finite values, the
  // learner unchanged then.
  void Save(v1::AnchorState* out) const;
  absl::Status Restore(const v1::AnchorState& state);

 private:
  ConstTensor p() const { return ConstTensor::F32(p_.data(), vocab_, rank_); }
  ConstTensor q() const { return ConstTensor::F32(q_.data(), rank_, d_); }

  const int64_t vocab_;
  const int64_t rank_;
  const int64_t d_;
  const float lr_;
  // P, Q, their gradients since the last Step() and their Adam moments.
  std::vector<float> p_, q_, dp_, dq_, p_m_, p_v_, q_m_, q_v_;
  int64_t adam_steps_ = 0;
  bool has_grad_ = false;
};

}  // namespace mapl

#endif  // MAPL_SERVER_ANCHOR_LEARNER_H_
