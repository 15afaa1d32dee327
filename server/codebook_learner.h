// The upstream's RVQ codebooks for forward codes (CODEC_RVQ, docs/METHOD.md section 2): when
// they are first fitted and how they follow the traffic after. Projected rows are collected each
// step; once kMinFitRows rows have been seen the codebooks are fitted by k-means, level by level,
// and every later step takes one streaming k-means update (EMA decay rvq_decay) on that step's
// rows. Until the fit, forward frames travel as CODEC_BF16.
#ifndef MAPL_SERVER_CODEBOOK_LEARNER_H_
#define MAPL_SERVER_CODEBOOK_LEARNER_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "kernels/backend.h"
#include "kernels/rvq.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/state.pb.h"

namespace mapl {

class CodebookLearner {
 public:
  // Rows needed for the first fit: 4 per centroid.
  static constexpr int64_t kMinFitRows = 4 * kMaxCodebookSize;
  // Projected rows kept per step for the fit or the update.
  static constexpr int64_t kMaxRowsPerStep = 16384;

  explicit CodebookLearner(const v1::BoundaryConfig& config);

  bool fitted() const { return learner_.has_value(); }
  // Keeps up to kMaxRowsPerStep of this step's projected rows z (rows, k).
  void Observe(const float* z, int64_t rows);

  struct StepResult {
    bool fitted_now = false;    // the first fit happened in this step
    bool skipped = false;       // the backend refused the fit or update (learner unchanged)
    bool updated = false;       // a streaming update ran
    double relative_mse = 0.0;  // of that update
  };
  // Fits (once enough rows were seen) or updates on the rows observed since the last Step. With
  // `refit`, fitted codebooks are fitted anew on those rows (when there are enough of them)
  // instead of updated: the streaming update follows slow drift, a refit a distribution that
  // moved away (early in training).
  StepResult Step(const Backend& backend, bool refit = false);
  // The centroids, levels x kMaxCodebookSize x k, once fitted.
  const std::vector<float>& centroids() const { return learner_->codebooks.centroids; }

  // The fitted learner (codebooks, streaming statistics) for a checkpoint; false before the first
  // fit (nothing to keep: the rows of a step are not kept). Restore: INVALID_ARGUMENT for a state
  // that does not fit this config or holds non-finite values, the learner unchanged then.
  bool Save(v1::CodebookState* out) const;
  absl::Status Restore(const v1::CodebookState& state);

 private:
  const int64_t k_;
  const uint32_t levels_;
  const float decay_;
  const uint64_t seed_;
  std::vector<float> rows_;  // k floats each
  std::optional<RvqLearner> learner_;
};

}  // namespace mapl

#endif  // MAPL_SERVER_CODEBOOK_LEARNER_H_
