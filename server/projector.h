// The projector U (d x k, orthonormal columns) of a boundary: how it starts (from a seed, or
// from the principal subspace of the first batch) and how the upstream learns it (SPEL on the
// Stiefel manifold, docs/METHOD.md section 2).
//
//   ProjectorLearner learner(config);                 // METHOD_MAPL, upstream
//   // each backward microbatch: G_up += h^T gzq
//   MAPL_RETURN_IF_ERROR(learner.AccumulateUp(backend, h, gzq));
//   // each step, with the downstream's G_down:
//   learner.Step(backend, u, g_down);                 // one SPEL step of u, in place
#ifndef MAPL_SERVER_PROJECTOR_H_
#define MAPL_SERVER_PROJECTOR_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/state.pb.h"

namespace mapl {

// U from a seed: a d x k matrix with orthonormal columns, computed with portable integer and
// IEEE double arithmetic only (no BLAS, no libm), so that both sides of a boundary build the
// bit-identical U on any x86-64 host without transferring it.
std::vector<float> SeededOrthonormal(int64_t d, int64_t k, uint64_t seed);

// PROJECTOR_INIT_PCA: the top-k principal subspace of h (n, d), by `iterations` subspace
// iterations starting from SeededOrthonormal(d, k, seed).
absl::StatusOr<std::vector<float>> PrincipalSubspace(const Backend& backend, const ConstTensor& h,
                                                     int64_t k, uint64_t seed, int iterations = 40);

// The upstream's SPEL learner of U (METHOD_MAPL): the gradient G_up accumulated over a step's
// backward microbatches, the momentum, and the step-length schedule.
class ProjectorLearner {
 public:
  explicit ProjectorLearner(const v1::BoundaryConfig& config);

  // G_up += h^T gzq.  h: (n, d) f32/bf16; gzq: (n, k) f32.
  absl::Status AccumulateUp(const Backend& backend, const ConstTensor& h, const ConstTensor& gzq);

  // One SPEL step of u (d, k) with G = G_up + g_down (d x k floats), then clears G_up. The step
  // length follows StepLength(). Returns false, with u and the momentum unchanged, when the
  // backend refused the step (e.g. a gradient so large that the momentum overflows): failing the
  // step would only make the daemon retry it forever.
  bool Step(const Backend& backend, float* u, const std::vector<float>& g_down);

  // Drops G_up (a step closed without a SPEL step).
  void ClearGradient();

  // eta_t = lr * min(t / w, sqrt(w / t)), t = 1, 2, ... the SPEL steps taken, w = max(warmup, 1):
  // linear warm-up over w steps, then inverse-square-root decay (SPEL's direction has unit
  // singular values, so eta is a step length on the manifold and must decay for U to settle).
  static double StepLength(double lr, uint32_t warmup, int64_t t);

  int64_t steps() const { return steps_; }
  // The optimizer state (momentum, steps taken) for a checkpoint; G_up is not kept (a step cut
  // short by a restart is not finished). Restore: INVALID_ARGUMENT for a state of another shape
  // or with non-finite values, the learner unchanged then.
  void Save(v1::ProjectorState* out) const;
  absl::Status Restore(const v1::ProjectorState& state);
  double last_lr() const { return last_lr_; }

 private:
  const int64_t d_;
  const int64_t k_;
  const float lr_;
  const float beta_;
  const uint32_t warmup_;
  std::vector<float> momentum_;  // (d, k)
  std::vector<float> g_up_;      // (d, k), summed since the last Step()
  int64_t steps_ = 0;
  double last_lr_ = 0.0;
};

}  // namespace mapl

#endif  // MAPL_SERVER_PROJECTOR_H_
