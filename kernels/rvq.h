// State of a residual vector quantizer (RVQ): the codebooks a decoder needs, and the streaming
// learner state (EMA counts and sums) its owner keeps. The math lives behind mapl::Backend.
//
//   mapl::RvqFitOptions opt;
//   opt.levels = 4;
//   MAPL_ASSIGN_OR_RETURN(mapl::RvqCodebooks cb, backend.RvqFit(x, opt));
//   std::vector<uint8_t> codes(n * cb.levels);
//   MAPL_RETURN_IF_ERROR(backend.RvqEncode(cb, x, /*beam=*/1, absl::MakeSpan(codes), {}));
#ifndef MAPL_KERNELS_RVQ_H_
#define MAPL_KERNELS_RVQ_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "common/check.h"

namespace mapl {

// One byte per level per token on the wire, so at most 256 centroids a level.
inline constexpr int kMaxCodebookSize = 256;
inline constexpr int kMaxRvqLevels = 16;
inline constexpr int kMaxRvqDim = 65536;
inline constexpr int kMaxRvqBeam = 256;

struct RvqCodebooks {
  int32_t levels = 0;
  int32_t codebook_size = kMaxCodebookSize;  // K
  int32_t dim = 0;
  // Gain-shape mode: each vector's L2 norm travels separately (one float a token) and the
  // codebooks quantize the unit-norm direction.
  bool gain_shape = false;
  // centroids: (levels * K, dim), row-major; level l's codebook is rows [l*K, (l+1)*K).
  std::vector<float> centroids;

  // Level l's codebook, (K, dim). Callers validate the codebooks first, so a level out of range or
  // a short centroid vector is a bug.
  absl::Span<const float> level(int l) const {
    return absl::MakeConstSpan(centroids).subspan(LevelOffset(l), LevelSize());
  }
  absl::Span<float> level(int l) {
    return absl::MakeSpan(centroids).subspan(LevelOffset(l), LevelSize());
  }
  // INVALID_ARGUMENT unless levels, codebook_size and dim are in range (check this before
  // allocating centroids from untrusted sizes).
  absl::Status ValidateShape() const;
  // ValidateShape, and INVALID_ARGUMENT unless centroids has the right size and is finite.
  absl::Status Validate() const;

 private:
  size_t LevelSize() const { return size_t(codebook_size) * dim; }
  size_t LevelOffset(int l) const {
    MAPL_CHECK(l >= 0 && l < levels && centroids.size() >= (size_t(l) + 1) * LevelSize(),
               "RvqCodebooks::level: level out of range or centroids not sized; Validate() first");
    return size_t(l) * LevelSize();
  }
};

struct RvqFitOptions {
  int32_t levels = 4;
  int32_t codebook_size = kMaxCodebookSize;
  bool gain_shape = false;
  int32_t kmeans_iterations = 20;
  // Alternating refinement passes after the level-by-level k-means: each level's centroids are
  // re-estimated against the residual left by all other levels (lowers the total error).
  int32_t refine_passes = 2;
  uint64_t seed = 0;
};

// Owner-side learner: full-precision codebooks plus exponential moving averages of each
// centroid's assignment count and assigned-residual sum (VQ-VAE style streaming k-means).
struct RvqLearner {
  RvqCodebooks codebooks;
  std::vector<float> counts;  // (levels, K)
  std::vector<float> sums;    // (levels * K, dim)
  uint64_t rng_state = 0;

  // A learner that starts from `cb` with each centroid weighted as `prior_count` points.
  static RvqLearner FromCodebooks(const RvqCodebooks& cb, uint64_t seed, float prior_count = 1.f);
};

struct RvqUpdateOptions {
  float decay = 0.99f;
  // A centroid whose EMA count falls below dead_fraction * (mean count of its level) is dead
  // and is re-seeded from a residual of the current batch.
  float dead_fraction = 0.01f;
};

struct RvqUpdateStats {
  int64_t reseeded = 0;       // dead centroids re-seeded in this step
  double relative_mse = 0.0;  // |x - decode(encode(x))|^2 / |x|^2 before the update
};

}  // namespace mapl

#endif  // MAPL_KERNELS_RVQ_H_
