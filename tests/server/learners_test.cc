// Tests for the learners an engine is built from: the projector's start and SPEL learner
// (server/projector.h), the anchors (server/anchor_learner.h) and the RVQ codebooks' schedule
// (server/codebook_learner.h). Oracles are the objectives the learners descend, computed here
// directly, and subspaces planted in synthetic data.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "server/anchor_learner.h"
#include "server/codebook_learner.h"
#include "server/config.h"
#include "server/engine.h"
#include "server/projector.h"

namespace mapl {
namespace {

v1::BoundaryConfig MakeConfig(int64_t d, int64_t k) {
  v1::BoundaryConfig c;
  c.set_id(1);
  c.set_role(v1::ROLE_UPSTREAM);
  c.set_d(static_cast<uint32_t>(d));
  c.set_k(static_cast<uint32_t>(k));
  c.set_vocab(50);
  c.set_anchor_rank(4);
  c.set_forward_codec(v1::CODEC_RVQ);
  c.set_rvq_levels(2);
  c.set_seed(9);
  absl::StatusOr<v1::BoundaryConfig> full = BoundaryConfigWithDefaults(c);
  EXPECT_TRUE(full.ok()) << full.status();
  return *full;
}

// h (n, d) = coefficients (n, k) N(0, 1) times a planted orthonormal basis (k, d), plus noise.
std::vector<float> Planted(int64_t n, int64_t d, int64_t k, const std::vector<float>& basis_dk,
                           float noise, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> h(n * d);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<float> c(k);
    for (float& x : c) x = 3.f * normal(rng);
    for (int64_t j = 0; j < d; ++j) {
      double v = 0.0;
      for (int64_t a = 0; a < k; ++a) v += c[a] * basis_dk[j * k + a];
      h[i * d + j] = static_cast<float>(v) + noise * normal(rng);
    }
  }
  return h;
}

// |B^T U|_F^2 / k: 1 when span(U) = span(B), about k/d for unrelated subspaces.
double Overlap(const std::vector<float>& b, const std::vector<float>& u, int64_t d, int64_t k) {
  double s = 0.0;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t c = 0; c < k; ++c) {
      double dot = 0.0;
      for (int64_t j = 0; j < d; ++j) dot += double{b[j * k + a]} * u[j * k + c];
      s += dot * dot;
    }
  }
  return s / k;
}

class LearnersTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> backend_ = *MakeBackend("cpu");
};

TEST_F(LearnersTest, StepLengthWarmsUpLinearlyThenDecaysAsInverseSquareRoot) {
  EXPECT_DOUBLE_EQ(ProjectorLearner::StepLength(0.03, 10, 1), 0.003);
  EXPECT_DOUBLE_EQ(ProjectorLearner::StepLength(0.03, 10, 5), 0.015);
  EXPECT_DOUBLE_EQ(ProjectorLearner::StepLength(0.03, 10, 10), 0.03);
  EXPECT_DOUBLE_EQ(ProjectorLearner::StepLength(0.03, 10, 40), 0.015);
  EXPECT_DOUBLE_EQ(ProjectorLearner::StepLength(0.03, 0, 4), 0.015);  // w = max(warmup, 1)
}

TEST_F(LearnersTest, PrincipalSubspaceFindsThePlantedSubspace) {
  constexpr int64_t d = 48, k = 6, n = 400;
  const std::vector<float> b = SeededOrthonormal(d, k, 77);
  const std::vector<float> h = Planted(n, d, k, b, 0.05f, 1);
  absl::StatusOr<std::vector<float>> u =
      PrincipalSubspace(*backend_, ConstTensor::F32(h.data(), n, d), k, /*seed=*/5);
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_LT(OrthogonalityError(u->data(), d, k), 1e-5);
  EXPECT_GT(Overlap(b, *u, d, k), 0.999);
  // The seeded start alone is far from it.
  EXPECT_LT(Overlap(b, SeededOrthonormal(d, k, 5), d, k), 0.5);
}

// U learns to keep what the reconstruction loss L(U) = |h - h U U^T|^2 / 2 needs: with
// G = dL/dU = -(h^T h U + ...) given as G_up + G_down the way the engines split it, SPEL steps
// raise the captured energy |h U|^2 towards the planted subspace's.
TEST_F(LearnersTest, ProjectorStepsDescendTheReconstructionLoss) {
  constexpr int64_t d = 32, k = 4, n = 256;
  v1::BoundaryConfig c = MakeConfig(d, k);
  c.set_projector_lr(0.1f);
  c.set_projector_warmup_steps(1);
  ProjectorLearner learner(c);
  const std::vector<float> b = SeededOrthonormal(d, k, 1234);
  const std::vector<float> h = Planted(n, d, k, b, 0.01f, 2);
  std::vector<float> u = SeededOrthonormal(d, k, 99);
  auto captured = [&] {
    std::vector<float> z(n * k);
    EXPECT_TRUE(backend_
                    ->Project(ConstTensor::F32(h.data(), n, d), ConstTensor::F32(u.data(), d, k),
                              Tensor::F32(z.data(), n, k))
                    .ok());
    double e = 0.0;
    for (float v : z) e += double{v} * v;
    return e;
  };
  const double start = captured();
  for (int step = 0; step < 60; ++step) {
    // dL/dU for L = -|h U|^2 / 2 is -h^T (h U): upstream's G_up = h^T gzq with gzq = -(h U).
    std::vector<float> z(n * k);
    ASSERT_TRUE(backend_
                    ->Project(ConstTensor::F32(h.data(), n, d), ConstTensor::F32(u.data(), d, k),
                              Tensor::F32(z.data(), n, k))
                    .ok());
    for (float& v : z) v = -v;
    ASSERT_TRUE(learner
                    .AccumulateUp(*backend_, ConstTensor::F32(h.data(), n, d),
                                  ConstTensor::F32(z.data(), n, k))
                    .ok());
    ASSERT_TRUE(learner.Step(*backend_, u.data(), std::vector<float>(d * k, 0.f)));
  }
  EXPECT_EQ(learner.steps(), 60);
  EXPECT_LT(OrthogonalityError(u.data(), d, k), 1e-4);
  EXPECT_GT(captured(), 2.0 * start);
  EXPECT_GT(Overlap(b, u, d, k), 0.95);
}

TEST_F(LearnersTest, ARefusedSpelStepLeavesUUnchanged) {
  constexpr int64_t d = 16, k = 4;
  ProjectorLearner learner(MakeConfig(d, k));
  std::vector<float> u = SeededOrthonormal(d, k, 3);
  const std::vector<float> before = u;
  std::vector<float> g_down(d * k, 0.f);
  g_down[0] = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(learner.Step(*backend_, u.data(), g_down));
  EXPECT_EQ(u, before);
  EXPECT_EQ(learner.steps(), 0);
}

// The anchor of a token moves against the loss gradient it receives: after steps with
// g_perp = a_target-direction, a = P[t] Q for that token lowers <a, g_perp>; other tokens' rows of
// P stay at zero.
TEST_F(LearnersTest, AnchorsStartAtZeroAndDescendTheirGradient) {
  constexpr int64_t d = 16, n = 3;
  const v1::BoundaryConfig c = MakeConfig(d, 4);
  AnchorLearner anchors(c);
  auto lookup = [&](const std::vector<int32_t>& t, std::vector<float>* a) {
    const LowRankAnchor x = anchors.Anchor(t);
    return backend_->AnchorLookup(x.p, x.q, t,
                                  Tensor::F32(a->data(), static_cast<int64_t>(t.size()), d));
  };
  const std::vector<int32_t> tokens = {5, 5, 9};
  std::vector<float> a(n * d, 1.f);
  ASSERT_TRUE(lookup(tokens, &a).ok());
  for (float v : a) EXPECT_EQ(v, 0.f);
  std::vector<float> g(n * d);
  for (int64_t i = 0; i < n * d; ++i) g[i] = (i % d) < 8 ? 1.f : -1.f;
  constexpr int64_t k = 4;
  const std::vector<float> u = SeededOrthonormal(d, k, 1);
  const std::vector<float> gu(n * k, 0.f);
  for (int round = 0; round < 5; ++round) {
    // gu = 0: all of g is outside span(U), g_perp = g.
    ASSERT_TRUE(anchors
                    .AccumulateGrad(*backend_, tokens, ConstTensor::F32(g.data(), n, d),
                                    ConstTensor::F32(gu.data(), n, k),
                                    ConstTensor::F32(u.data(), d, k))
                    .ok());
    ASSERT_TRUE(anchors.Step(*backend_).ok());
  }
  ASSERT_TRUE(lookup(tokens, &a).ok());
  for (int64_t i = 0; i < n; ++i) {
    double dot = 0.0;
    for (int64_t j = 0; j < d; ++j) dot += double{a[i * d + j]} * g[i * d + j];
    EXPECT_LT(dot, 0.0) << "token row " << i;
  }
  const std::vector<int32_t> other = {6};
  std::vector<float> a6(d, 1.f);
  ASSERT_TRUE(lookup(other, &a6).ok());
  for (float v : a6) EXPECT_EQ(v, 0.f);  // P[6] never had a gradient
  // A token id out of range is refused, naming it.
  const std::vector<int32_t> bad = {50};
  EXPECT_EQ(lookup(bad, &a6).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LearnersTest, CodebooksAreFittedOnceEnoughRowsWereSeenThenFollowTheData) {
  constexpr int64_t k = 8;
  const v1::BoundaryConfig c = MakeConfig(64, k);
  CodebookLearner learner(c);
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto batch = [&](int64_t rows) {
    std::vector<float> z(rows * k);
    for (float& x : z) x = normal(rng);
    return z;
  };
  // Below kMinFitRows rows: nothing is fitted, and rows accumulate across steps.
  const int64_t half = CodebookLearner::kMinFitRows / 2;
  std::vector<float> z = batch(half);
  learner.Observe(z.data(), half);
  CodebookLearner::StepResult r = learner.Step(*backend_);
  EXPECT_FALSE(learner.fitted());
  EXPECT_FALSE(r.fitted_now);
  learner.Observe(z.data(), half);
  z = batch(half);
  learner.Observe(z.data(), half);
  r = learner.Step(*backend_);
  EXPECT_TRUE(r.fitted_now);
  EXPECT_TRUE(learner.fitted());
  ASSERT_EQ(learner.centroids().size(), size_t(c.rvq_levels()) * 256 * k);
  // Then one streaming update a step: on data from the same distribution the error settles.
  std::vector<double> mse;
  for (int step = 0; step < 8; ++step) {
    z = batch(4096);
    learner.Observe(z.data(), 4096);
    r = learner.Step(*backend_);
    ASSERT_TRUE(r.updated);
    EXPECT_FALSE(r.skipped);
    mse.push_back(r.relative_mse);
  }
  EXPECT_GT(mse.front(), 0.0);
  EXPECT_LT(mse.back(), 1.0);
  // A step without rows changes nothing.
  r = learner.Step(*backend_);
  EXPECT_FALSE(r.updated);
}

}  // namespace
}  // namespace mapl
