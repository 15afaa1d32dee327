#include "server/codebook_learner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/state_store.h"

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

bool CodebookLearner::Save(v1::CodebookState* out) const {
  if (!learner_.has_value()) return false;
  const RvqCodebooks& cb = learner_->codebooks;
  out->set_levels(cb.levels);
  out->set_codebook_size(cb.codebook_size);
  out->set_dim(cb.dim);
  out->set_gain_shape(cb.gain_shape);
  SaveFloats(cb.centroids, out->mutable_centroids());
  SaveFloats(learner_->counts, out->mutable_counts());
  SaveFloats(learner_->sums, out->mutable_sums());
  out->set_rng_state(learner_->rng_state);
  return true;
}

absl::Status CodebookLearner::Restore(const v1::CodebookState& state) {
  if (state.levels() != static_cast<int32_t>(levels_) || state.dim() != k_ ||
      state.codebook_size() != kMaxCodebookSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "codebooks: ", state.levels(), " levels of ", state.codebook_size(), " x ", state.dim(),
        ", this config has ", levels_, " levels of ", kMaxCodebookSize, " x ", k_));
  }
  RvqLearner learner;
  learner.codebooks.levels = state.levels();
  learner.codebooks.codebook_size = state.codebook_size();
  learner.codebooks.dim = state.dim();
  learner.codebooks.gain_shape = state.gain_shape();
  const size_t centroids = size_t{levels_} * kMaxCodebookSize;
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.centroids(), centroids * k_, "codebook centroids",
                                     &learner.codebooks.centroids));
  MAPL_RETURN_IF_ERROR(
      RestoreFloats(state.counts(), centroids, "codebook counts", &learner.counts));
  MAPL_RETURN_IF_ERROR(RestoreFloats(state.sums(), centroids * k_, "codebook sums", &learner.sums));
  MAPL_RETURN_IF_ERROR(learner.codebooks.Validate());
  learner.rng_state = state.rng_state();
  learner_ = std::move(learner);
  rows_.clear();
  return absl::OkStatus();
}

}  // namespace mapl
