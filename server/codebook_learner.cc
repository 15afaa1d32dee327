#include "server/codebook_learner.h"

#include <algorithm>

namespace mapl {
namespace {

// Salt that keeps the codebooks' seeded stream independent of the boundary's others.
constexpr uint64_t kSaltRvq = 0x3d9b72e8a64c105full;

}  // namespace

CodebookLearner::CodebookLearner(const v1::BoundaryConfig& config)
    : k_(config.k()),
      levels_(config.rvq_levels()),
      decay_(config.rvq_decay()),
      seed_(config.seed() ^ kSaltRvq) {}

void CodebookLearner::Observe(const float* z, int64_t rows) {
  const int64_t room = kMaxRowsPerStep - static_cast<int64_t>(rows_.size()) / k_;
  const int64_t take = std::min(rows, std::max<int64_t>(room, 0));
  rows_.insert(rows_.end(), z, z + take * k_);
}

CodebookLearner::StepResult CodebookLearner::Step(const Backend& backend, bool refit) {
  StepResult result;
  const int64_t rows = static_cast<int64_t>(rows_.size()) / k_;
  const ConstTensor x = ConstTensor::F32(rows_.data(), rows, k_);
  if (!learner_.has_value() || (refit && rows >= kMinFitRows)) {
    if (rows < kMinFitRows) return result;  // keep collecting
    RvqFitOptions options;
    options.levels = static_cast<int32_t>(levels_);
    options.seed = seed_;
    absl::StatusOr<RvqCodebooks> cb = backend.RvqFit(x, options);
    if (cb.ok()) {
      learner_ = RvqLearner::FromCodebooks(*cb, seed_);
      result.fitted_now = true;
    } else {
      result.skipped = true;
    }
  } else if (rows > 0) {
    RvqUpdateOptions options;
    options.decay = decay_;
    // Atomic too: the learner is unchanged on error.
    absl::StatusOr<RvqUpdateStats> update = backend.RvqUpdate(&*learner_, x, options);
    if (update.ok()) {
      result.updated = true;
      result.relative_mse = update->relative_mse;
    } else {
      result.skipped = true;
    }
  }
  rows_.clear();
  return result;
}

}  // namespace mapl
