// Tests of every backend's anchor ops (kernels/cpu/anchors.cc on the CPU) against naive
// double-precision references: lookup, accumulating gradients with repeated tokens, and AdamW; and
// that bad token ids, token lists of the wrong length, or bad gradients are refused before any
// learner state is written.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/registry.h"
#include "kernels/tensor.h"
#include "tests/kernels/backend_test.h"
#include "tests/kernels/reference.h"

namespace mapl {
namespace {

using reference::AB;
using reference::AtB;
using reference::Gaussian;
using reference::MaxRelDiff;

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class AnchorsTest : public BackendTest {
 protected:
  // Repeats token 3 several times, and leaves most of the vocabulary unused.
  void SetUp() override {
    BackendTest::SetUp();
    if (!BackendReady()) return;
    std::mt19937 rng(1);
    p_ = Gaussian(rng, static_cast<size_t>(kV) * kR);
    q_ = Gaussian(rng, static_cast<size_t>(kR) * kD, 0.1f);
    std::uniform_int_distribution<int32_t> tok(0, kV / 2);
    tokens_.resize(kN);
    for (int32_t& t : tokens_) t = tok(rng);
    tokens_[0] = tokens_[7] = tokens_[8] = tokens_[kN - 1] = 3;
    tokens_[1] = kV - 1;
    const std::vector<double> u = reference::RandomOrthonormal(rng, kD, kK);
    u_.assign(u.begin(), u.end());
  }

  // g U, as the engine hands it to AnchorGrad.
  std::vector<float> Gu(const std::vector<float>& g) const {
    const std::vector<double> gu = AB({g.begin(), g.end()}, {u_.begin(), u_.end()}, kN, kD, kK);
    return {gu.begin(), gu.end()};
  }
  // g_perp = g - gu U^T, the gradient the anchors learn from, in double.
  std::vector<double> Perp(const std::vector<float>& g, const std::vector<float>& gu) const {
    std::vector<double> r(g.begin(), g.end());
    for (int i = 0; i < kN; ++i) {
      for (int j = 0; j < kD; ++j) {
        for (int c = 0; c < kK; ++c) r[i * kD + j] -= double{gu[i * kK + c]} * u_[j * kK + c];
      }
    }
    return r;
  }
  absl::Status Grad(absl::Span<const int32_t> tokens, const std::vector<float>& g,
                    const std::vector<float>& gu, std::vector<float>* dp, std::vector<float>* dq,
                    int64_t dq_rows = kR) const {
    return be_->AnchorGrad(ConstTensor::F32(p_.data(), kV, kR), ConstTensor::F32(q_.data(), kR, kD),
                           tokens, ConstTensor::F32(g.data(), kN, kD),
                           ConstTensor::F32(gu.data(), kN, kK), ConstTensor::F32(u_.data(), kD, kK),
                           Tensor::F32(dp->data(), kV, kR), Tensor::F32(dq->data(), dq_rows, kD));
  }

  static constexpr int kV = 50, kR = 8, kD = 32, kN = 40, kK = 4;
  std::vector<float> p_, q_, u_;
  std::vector<int32_t> tokens_;
};

TEST_P(AnchorsTest, LookupMatchesReference) {
  std::vector<float> a(static_cast<size_t>(kN) * kD, 123.f);
  ASSERT_TRUE(be_->AnchorLookup(ConstTensor::F32(p_.data(), kV, kR),
                                ConstTensor::F32(q_.data(), kR, kD), tokens_,
                                Tensor::F32(a.data(), kN, kD))
                  .ok());
  std::vector<double> ref(a.size(), 0.0);
  for (int i = 0; i < kN; ++i) {
    for (int j = 0; j < kD; ++j) {
      for (int e = 0; e < kR; ++e) {
        ref[i * kD + j] += double{p_[tokens_[i] * kR + e]} * q_[e * kD + j];
      }
    }
  }
  EXPECT_LE(MaxRelDiff(a, ref), 1e-6);
}

TEST_P(AnchorsTest, LookupOfZeroTableIsZero) {
  // The initialization P = 0 makes every anchor start at zero.
  std::vector<float> p(static_cast<size_t>(kV) * kR, 0.f), a(static_cast<size_t>(kN) * kD, 1.f);
  ASSERT_TRUE(be_->AnchorLookup(ConstTensor::F32(p.data(), kV, kR),
                                ConstTensor::F32(q_.data(), kR, kD), tokens_,
                                Tensor::F32(a.data(), kN, kD))
                  .ok());
  for (float v : a) EXPECT_EQ(v, 0.f);
}

TEST_P(AnchorsTest, LookupRejectsBadTokensAndShapes) {
  std::vector<float> a(static_cast<size_t>(kN) * kD, 5.f);
  const std::vector<float> a0 = a;
  auto lookup = [&](absl::Span<const int32_t> t, int64_t q_rows, int64_t a_cols) {
    return be_->AnchorLookup(ConstTensor::F32(p_.data(), kV, kR),
                             ConstTensor::F32(q_.data(), q_rows, kD), t,
                             Tensor::F32(a.data(), kN, a_cols));
  };
  for (int32_t bad : {kV, -1, 1 << 30}) {
    std::vector<int32_t> t = tokens_;
    t[5] = bad;
    const absl::Status s = lookup(t, kR, kD);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("tokens[5] = " + std::to_string(bad)), std::string::npos) << s;
    EXPECT_TRUE(SameBits(a, a0));
  }
  EXPECT_EQ(lookup({}, kR, kD).code(), absl::StatusCode::kInvalidArgument);
  absl::Status s = lookup(tokens_, kR + 1, kD);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("q"), std::string::npos) << s;
  EXPECT_EQ(
      be_->AnchorLookup(ConstTensor::F32(p_.data(), kV, kR), ConstTensor::F32(q_.data(), kR, kD),
                        tokens_, Tensor::F32(a.data(), kN, kD - 1))
          .code(),
      absl::StatusCode::kInvalidArgument);
  std::vector<bf16_t> pb(p_.size());
  EXPECT_EQ(
      be_->AnchorLookup(ConstTensor::BF16(pb.data(), kV, kR), ConstTensor::F32(q_.data(), kR, kD),
                        tokens_, Tensor::F32(a.data(), kN, kD))
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(SameBits(a, a0));
}

TEST_P(AnchorsTest, GradAccumulatesWithScatterAdd) {
  std::mt19937 rng(2);
  const std::vector<float> g = Gaussian(rng, static_cast<size_t>(kN) * kD);
  // Start from non-zero accumulators: the op adds, it does not overwrite.
  std::vector<float> dp = Gaussian(rng, p_.size()), dq = Gaussian(rng, q_.size());
  std::vector<double> dp_ref(dp.begin(), dp.end()), dq_ref(dq.begin(), dq.end());
  const std::vector<float> dp0 = dp;
  const std::vector<float> gu = Gu(g);
  const std::vector<double> g_perp = Perp(g, gu);
  for (int rep = 0; rep < 2; ++rep) {  // two microbatches
    ASSERT_TRUE(Grad(tokens_, g, gu, &dp, &dq).ok());
    for (int i = 0; i < kN; ++i) {
      const int t = tokens_[i];
      for (int e = 0; e < kR; ++e) {
        for (int j = 0; j < kD; ++j) {
          dp_ref[t * kR + e] += g_perp[i * kD + j] * q_[e * kD + j];
          dq_ref[e * kD + j] += double{p_[t * kR + e]} * g_perp[i * kD + j];
        }
      }
    }
  }
  // fp32 sums of up to 2 x 40 products of O(1) terms: a few 1e-6 of the terms' magnitude.
  EXPECT_LE(MaxRelDiff(dp, dp_ref), 1e-5);
  EXPECT_LE(MaxRelDiff(dq, dq_ref), 1e-5);
  // Rows of tokens that did not occur are left exactly as they were.
  for (int t = kV / 2 + 1; t < kV - 1; ++t) {
    for (int e = 0; e < kR; ++e) EXPECT_EQ(dp[t * kR + e], dp0[t * kR + e]);
  }
}

TEST_P(AnchorsTest, GradRejectsBadInputAndLeavesAccumulators) {
  std::mt19937 rng(3);
  std::vector<float> g = Gaussian(rng, static_cast<size_t>(kN) * kD);
  std::vector<float> dp = Gaussian(rng, p_.size()), dq = Gaussian(rng, q_.size());
  const std::vector<float> dp0 = dp, dq0 = dq;
  const std::vector<float> gu = Gu(g);
  auto grad = [&](absl::Span<const int32_t> t, const std::vector<float>& gp, int64_t dq_rows) {
    return Grad(t, gp, gu, &dp, &dq, dq_rows);
  };
  std::vector<int32_t> t = tokens_;
  t[kN - 1] = kV;
  absl::Status s = grad(t, g, kR);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tokens[39] = 50"), std::string::npos) << s;

  g[4 * kD + 6] = std::nanf("");
  s = grad(tokens_, g, kR);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("g:"), std::string::npos) << s;
  g[4 * kD + 6] = 0.f;

  s = grad(tokens_, g, kR - 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("dq"), std::string::npos) << s;
  EXPECT_EQ(grad({}, g, kR).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(SameBits(dp, dp0));
  EXPECT_TRUE(SameBits(dq, dq0));
}

// AdamW as PyTorch defines it, in double.
void AdamRef(std::vector<double>& p, const std::vector<float>& g, std::vector<double>& m,
             std::vector<double>& v, const AdamOptions& o) {
  const double bc1 = 1.0 - std::pow(double{o.beta1}, o.step);
  const double bc2 = 1.0 - std::pow(double{o.beta2}, o.step);
  for (size_t i = 0; i < p.size(); ++i) {
    p[i] *= 1.0 - double{o.lr} * o.weight_decay;
    m[i] = o.beta1 * m[i] + (1.0 - o.beta1) * g[i];
    v[i] = o.beta2 * v[i] + (1.0 - o.beta2) * double{g[i]} * g[i];
    p[i] -= o.lr / bc1 * m[i] / (std::sqrt(v[i] / bc2) + o.eps);
  }
}

TEST_P(AnchorsTest, AdamStepMatchesReference) {
  std::mt19937 rng(4);
  const int rows = 17, cols = 9;
  const size_t count = static_cast<size_t>(rows) * cols;
  std::vector<float> p = Gaussian(rng, count), m(count, 0.f), v(count, 0.f);
  std::vector<double> p_ref(p.begin(), p.end()), m_ref(count, 0.0), v_ref(count, 0.0);
  AdamOptions opt;
  opt.lr = 1e-2f;
  opt.weight_decay = 0.1f;
  for (int step = 1; step <= 30; ++step) {
    opt.step = step;
    const std::vector<float> g = Gaussian(rng, count, step % 3 == 0 ? 1e-3f : 1.f);
    ASSERT_TRUE(
        be_->AdamStep(Tensor::F32(p.data(), rows, cols), ConstTensor::F32(g.data(), rows, cols),
                      Tensor::F32(m.data(), rows, cols), Tensor::F32(v.data(), rows, cols), opt)
            .ok());
    AdamRef(p_ref, g, m_ref, v_ref, opt);
  }
  EXPECT_LE(MaxRelDiff(p, p_ref), 1e-6);
  EXPECT_LE(MaxRelDiff(m, m_ref), 1e-6);
  EXPECT_LE(MaxRelDiff(v, v_ref), 1e-6);
}

TEST_P(AnchorsTest, AdamFirstStepMovesByLearningRate) {
  // Bias correction makes the first update lr * g / (|g| + eps): about lr * sign(g), whatever the
  // gradient's scale.
  std::mt19937 rng(5);
  const int count = 64;
  std::vector<float> g = Gaussian(rng, count, 1e-3f);
  std::vector<float> p(count, 1.f), m(count, 0.f), v(count, 0.f);
  AdamOptions opt;
  opt.lr = 0.01f;
  ASSERT_TRUE(be_->AdamStep(Tensor::F32(p.data(), 1, count), ConstTensor::F32(g.data(), 1, count),
                            Tensor::F32(m.data(), 1, count), Tensor::F32(v.data(), 1, count), opt)
                  .ok());
  for (int i = 0; i < count; ++i) {
    EXPECT_NEAR(p[i], 1.0 - 0.01 * g[i] / (std::fabs(g[i]) + 1e-8), 2e-7) << i;
  }
}

TEST_P(AnchorsTest, AdamRejectsBadInputAndLeavesState) {
  std::mt19937 rng(6);
  const int rows = 4, cols = 5;
  const size_t count = static_cast<size_t>(rows) * cols;
  std::vector<float> p = Gaussian(rng, count), g = Gaussian(rng, count);
  std::vector<float> m = Gaussian(rng, count), v(count, 0.5f);
  const std::vector<float> p0 = p, m0 = m, v0 = v;
  auto step_cols = [&](const AdamOptions& o, int64_t g_cols) {
    return be_->AdamStep(Tensor::F32(p.data(), rows, cols),
                         ConstTensor::F32(g.data(), rows, g_cols),
                         Tensor::F32(m.data(), rows, cols), Tensor::F32(v.data(), rows, cols), o);
  };
  auto step = [&](const AdamOptions& o) { return step_cols(o, cols); };
  auto expect_untouched = [&] {
    EXPECT_TRUE(SameBits(p, p0));
    EXPECT_TRUE(SameBits(m, m0));
    EXPECT_TRUE(SameBits(v, v0));
  };
  g[2 * cols + 3] = std::nanf("");
  absl::Status s = step(AdamOptions{});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("(2, 3)"), std::string::npos) << s;
  expect_untouched();
  g[2 * cols + 3] = 1e30f;  // finite, but g^2 overflows the second moment
  EXPECT_EQ(step(AdamOptions{}).code(), absl::StatusCode::kInvalidArgument);
  expect_untouched();
  g[2 * cols + 3] = 1.f;

  s = step_cols(AdamOptions{}, cols - 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("grad"), std::string::npos) << s;
  AdamOptions bad;
  bad.step = 0;
  EXPECT_EQ(step(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = AdamOptions{};
  bad.beta1 = 1.f;
  EXPECT_EQ(step(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = AdamOptions{};
  bad.beta2 = std::nanf("");
  EXPECT_EQ(step(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = AdamOptions{};
  bad.eps = 0.f;
  EXPECT_EQ(step(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = AdamOptions{};
  bad.lr = INFINITY;
  EXPECT_EQ(step(bad).code(), absl::StatusCode::kInvalidArgument);
  bad = AdamOptions{};
  bad.weight_decay = -1.f;
  EXPECT_EQ(step(bad).code(), absl::StatusCode::kInvalidArgument);
  expect_untouched();
  EXPECT_TRUE(step(AdamOptions{}).ok());
}

// tokens must hold exactly one id per row (of a for the lookup, of g for the gradients): one
// id short or over is an INVALID_ARGUMENT naming tokens, and nothing is written.
TEST_P(AnchorsTest, WrongTokenCountIsInvalidArgument) {
  std::mt19937 rng(7);
  std::vector<int32_t> tokens = tokens_;
  tokens.push_back(2);  // room for kN + 1 ids, all valid
  std::vector<float> a(static_cast<size_t>(kN) * kD, 5.f);
  const std::vector<float> g = Gaussian(rng, static_cast<size_t>(kN) * kD);
  std::vector<float> dp = Gaussian(rng, p_.size()), dq = Gaussian(rng, q_.size());
  const std::vector<float> a0 = a, dp0 = dp, dq0 = dq;
  for (int delta : {-1, 1}) {
    SCOPED_TRACE(testing::Message() << "delta " << delta);
    const absl::Span<const int32_t> t = absl::MakeConstSpan(tokens.data(), kN + delta);
    absl::Status s =
        be_->AnchorLookup(ConstTensor::F32(p_.data(), kV, kR), ConstTensor::F32(q_.data(), kR, kD),
                          t, Tensor::F32(a.data(), kN, kD));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(s.message().rfind("tokens: expected 40 elements", 0), 0u) << s;
    s = Grad(t, g, Gu(g), &dp, &dq);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(s.message().rfind("tokens: expected 40 elements", 0), 0u) << s;
  }
  EXPECT_TRUE(SameBits(a, a0));
  EXPECT_TRUE(SameBits(dp, dp0));
  EXPECT_TRUE(SameBits(dq, dq0));
}

INSTANTIATE_TEST_SUITE_P(Backends, AnchorsTest, ::testing::ValuesIn(BackendNames()),
                         BackendTestName);

}  // namespace
}  // namespace mapl
