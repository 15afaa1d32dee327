// Tests for the role engines (server/upstream_engine.h, server/downstream_engine.h), the
// acceptance scenario of the product: a learned projection with anchors (MAPL) recovers synthetic
// activations that a fixed random projection cannot, with bf16 and with RVQ codes.
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/server/engine_pair.h"

namespace mapl {
namespace {

using testing_internal::Config;
using testing_internal::Curve;
using testing_internal::Pair;
using testing_internal::RunScenario;
using testing_internal::Stream;

// ---- acceptance scenario ----

TEST(EngineAcceptance, MaplLearnsWhatFixedCannot) {
  const Curve mapl =
      RunScenario(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16), 200, "mapl bf16");
  ASSERT_EQ(mapl.error.size(), 200u);
  EXPECT_LT(mapl.error.back(), 0.05);

  const Curve fixed =
      RunScenario(Config(v1::ROLE_UPSTREAM, v1::METHOD_FIXED, v1::CODEC_BF16), 200, "fixed bf16");
  ASSERT_EQ(fixed.error.size(), 200u);
  EXPECT_GT(fixed.error.back(), 0.3);

  // The learners on a quarter of each microbatch's rows (64 of 256) learn the subspace too.
  v1::BoundaryConfig sampled = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16);
  sampled.set_learner_rows(64);
  const Curve quarter = RunScenario(sampled, 200, "mapl bf16, learner rows 64");
  ASSERT_EQ(quarter.error.size(), 200u);
  EXPECT_LT(quarter.error.back(), 0.05);
}

TEST(EngineAcceptance, MaplWithRvq) {
  // RVQ sends 4 bytes a token for a 32-dim z (1 bit a dimension), so its own code error bounds
  // the reconstruction error from below. The bounds here are not read off a run: each MAPL run
  // is compared with the fixed projection under the same codec and the same stream (paired),
  // and the codebooks must learn.
  // At this toy scale (1024 tokens a step) the default budget of 25% of the payload is about
  // 1.5 KB a step, ~11 rows of U or centroids, so from a random U the published copy lags the
  // learner; PCA init (the right start for a model that is already trained, docs/METHOD.md
  // section 2.4) needs little U traffic.
  constexpr int kSteps = 150;
  const Curve fixed =
      RunScenario(Config(v1::ROLE_UPSTREAM, v1::METHOD_FIXED, v1::CODEC_RVQ), kSteps, "fixed rvq");
  ASSERT_EQ(fixed.error.size(), size_t{kSteps});

  v1::BoundaryConfig config = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_RVQ);
  config.set_projector_init(v1::PROJECTOR_INIT_PCA);
  const Curve pca = RunScenario(config, kSteps, "mapl rvq pca");
  ASSERT_EQ(pca.error.size(), size_t{kSteps});
  const Curve random = RunScenario(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_RVQ),
                                   kSteps, "mapl rvq random");
  ASSERT_EQ(random.error.size(), size_t{kSteps});

  // MAPL learns what the fixed projection cannot also under RVQ codes, from either start.
  EXPECT_LT(pca.error.back(), fixed.error.back() - 0.1);
  EXPECT_LT(random.error.back(), fixed.error.back());
  // Starting from the data's principal subspace is better than from a random U.
  EXPECT_LT(pca.error.back(), random.error.back());
  // The streaming k-means update learns: where the projected rows' distribution settles (a
  // fixed U, or U started at the principal subspace) the codebooks' relative MSE falls from its
  // first update to the last. (From a random U it rises while U moves away from noise
  // directions towards the signal's, so it is not asserted there.)
  for (const Curve* c : {&fixed, &pca}) {
    ASSERT_GE(c->rvq_mse.size(), 2u);
    EXPECT_GT(c->rvq_mse.front(), 0.0);
    EXPECT_LT(c->rvq_mse.back(), 0.95 * c->rvq_mse.front());
  }
}

}  // namespace
}  // namespace mapl
