// RvqCodebooks validation and RvqLearner construction (backend-independent state).
#include "kernels/rvq.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace mapl {

absl::Status RvqCodebooks::ValidateShape() const {
  if (levels < 1 || levels > kMaxRvqLevels) {
    return absl::InvalidArgumentError(
        absl::StrCat("rvq: levels must be in [1, ", kMaxRvqLevels, "], got ", levels));
  }
  if (codebook_size < 1 || codebook_size > kMaxCodebookSize) {
    return absl::InvalidArgumentError(absl::StrCat("rvq: codebook_size must be in [1, ",
                                                   kMaxCodebookSize, "], got ", codebook_size));
  }
  if (dim < 1 || dim > kMaxRvqDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("rvq: dim must be in [1, ", kMaxRvqDim, "], got ", dim));
  }
  return absl::OkStatus();
}

absl::Status RvqCodebooks::Validate() const {
  absl::Status shape = ValidateShape();
  if (!shape.ok()) return shape;
  const size_t want = size_t(levels) * codebook_size * dim;
  if (centroids.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("rvq: expected ", want, " centroid values (",
                                                   levels, " x ", codebook_size, " x ", dim,
                                                   "), got ", centroids.size()));
  }
  for (size_t i = 0; i < centroids.size(); ++i) {
    if (!std::isfinite(centroids[i])) {
      return absl::InvalidArgumentError(absl::StrCat("rvq: non-finite centroid value at level ",
                                                     i / (size_t(codebook_size) * dim),
                                                     ", centroid ", (i / dim) % codebook_size));
    }
  }
  return absl::OkStatus();
}

RvqLearner RvqLearner::FromCodebooks(const RvqCodebooks& cb, uint64_t seed, float prior_count) {
  RvqLearner learner;
  learner.codebooks = cb;
  learner.counts.assign(size_t(cb.levels) * cb.codebook_size, prior_count);
  learner.sums.resize(cb.centroids.size());
  for (size_t i = 0; i < cb.centroids.size(); ++i) learner.sums[i] = cb.centroids[i] * prior_count;
  learner.rng_state = seed;
  return learner;
}

}  // namespace mapl
