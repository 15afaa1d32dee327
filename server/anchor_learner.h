// The downstream's per-token anchors a = P[t] Q (docs/METHOD.md section 2): the tables, their
// gradients accumulated over a step's microbatches, and the Adam step that learns them.
//
//   AnchorLearner anchors(config);                            // METHOD_MAPL, downstream
//   MAPL_RETURN_IF_ERROR(anchors.Lookup(backend, tokens, a)); // a = P[t] Q
//   MAPL_RETURN_IF_ERROR(anchors.AccumulateGrad(backend, tokens, g_perp));
//   MAPL_RETURN_IF_ERROR(anchors.Step(backend));              // at the optimizer step
#ifndef MAPL_SERVER_ANCHOR_LEARNER_H_
#define MAPL_SERVER_ANCHOR_LEARNER_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kernels/backend.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"

namespace mapl {

class AnchorLearner {
 public:
  // P (vocab, r) starts at zero and Q (r, d) small and seeded, so the anchor starts at exactly 0.
  explicit AnchorLearner(const v1::BoundaryConfig& config);

  // a = P[t] Q.  tokens: a.rows ids in [0, vocab); a: (n, d) f32.
  absl::Status Lookup(const Backend& backend, const std::vector<int32_t>& tokens,
                      const Tensor& a) const;
  // dP[t_i] += g_perp_i Q^T;  dQ += sum_i P[t_i]^T g_perp_i.  g_perp: (n, d) f32.
  absl::Status AccumulateGrad(const Backend& backend, const std::vector<int32_t>& tokens,
                              const ConstTensor& g_perp);
  // One Adam step on P and Q when gradients were accumulated since the last Step; clears them.
  absl::Status Step(const Backend& backend);

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
