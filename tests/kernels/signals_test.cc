// Tests of every backend's learning signals (kernels/cpu/signals.cc on the CPU) against naive
// double-precision references (the anchor formed as an n x d matrix there, never in the backend),
// that G_down is the gradient of the decoder's reconstruction with respect to U, and that bad
// input never reaches the accumulated signals.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

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

constexpr int kN = 37, kD = 48, kK = 6;

// An orthonormal (d, k) matrix by Gram-Schmidt in double, rounded to fp32.
std::vector<float> Orthonormal(std::mt19937& rng, int d, int k) {
  const std::vector<double> u = reference::RandomOrthonormal(rng, d, k);
  return {u.begin(), u.end()};
}

std::vector<double> D(const std::vector<float>& v) { return {v.begin(), v.end()}; }

std::vector<float> RoundTripBf16(const std::vector<float>& v, std::vector<bf16_t>* bits) {
  bits->resize(v.size());
  FloatToBf16(v.data(), bits->data(), v.size());
  std::vector<float> r(v.size());
  Bf16ToFloat(bits->data(), r.data(), v.size());
  return r;
}

// G_down = g^T zq - a^T (g U) - g^T (a U), exactly as docs/METHOD.md section 2.3 writes it.
std::vector<double> GradDownRef(const std::vector<float>& g, const std::vector<float>& zq,
                                const std::vector<float>* a, const std::vector<float>& u) {
  std::vector<double> r = AtB(D(g), D(zq), kN, kD, kK);
  if (a != nullptr) {
    const std::vector<double> t1 = AtB(D(*a), AB(D(g), D(u), kN, kD, kK), kN, kD, kK);
    const std::vector<double> t2 = AtB(D(g), AB(D(*a), D(u), kN, kD, kK), kN, kD, kK);
    for (size_t i = 0; i < r.size(); ++i) r[i] -= t1[i] + t2[i];
  }
  return r;
}

class SignalsTest : public BackendTest {
 protected:
  void SetUp() override {
    BackendTest::SetUp();
    if (!BackendReady()) return;
    std::mt19937 rng(1);
    h_ = Gaussian(rng, static_cast<size_t>(kN) * kD);
    g_ = Gaussian(rng, static_cast<size_t>(kN) * kD);
    zq_ = Gaussian(rng, static_cast<size_t>(kN) * kK);
    gzq_ = Gaussian(rng, static_cast<size_t>(kN) * kK);
    u_ = Orthonormal(rng, kD, kK);
    // The anchor a = P[t] Q, with repeated tokens; a_ is it formed, for the references.
    p_ = Gaussian(rng, static_cast<size_t>(kV) * kR, 0.5f);
    q_ = Gaussian(rng, static_cast<size_t>(kR) * kD, 0.5f);
    for (int i = 0; i < kN; ++i) tokens_.push_back((i * 5) % (kV - 2));
    std::vector<double> pt;
    for (int32_t t : tokens_) pt.insert(pt.end(), p_.begin() + t * kR, p_.begin() + (t + 1) * kR);
    const std::vector<double> a = AB(pt, D(q_), kN, kR, kD);
    a_.assign(a.begin(), a.end());
  }

  // g U as the engine computes it for the backward frame.
  std::vector<float> Gu(const std::vector<float>& g) const {
    const std::vector<double> gu = AB(D(g), D(u_), kN, kD, kK);
    return {gu.begin(), gu.end()};
  }
  LowRankAnchor Anchor() const {
    return {ConstTensor::F32(p_.data(), kV, kR), ConstTensor::F32(q_.data(), kR, kD), tokens_};
  }
  absl::Status Down(const ConstTensor& g, const std::vector<float>& gu, const LowRankAnchor* a,
                    std::vector<float>* out, bool accumulate) const {
    return be_->GradDown(g, ConstTensor::F32(gu.data(), kN, kK),
                         ConstTensor::F32(zq_.data(), kN, kK), ConstTensor::F32(u_.data(), kD, kK),
                         a, Tensor::F32(out->data(), kD, kK), accumulate);
  }

  static constexpr int kV = 11, kR = 3;
  std::vector<float> h_, g_, a_, zq_, gzq_, u_, p_, q_;
  std::vector<int32_t> tokens_;
};

TEST_P(SignalsTest, GradUpMatchesReferenceAndAccumulates) {
  const std::vector<double> ref = AtB(D(h_), D(gzq_), kN, kD, kK);
  // accumulate = false overwrites whatever was there, NaN included.
  std::vector<float> out(static_cast<size_t>(kD) * kK, std::nanf(""));
  ASSERT_TRUE(be_->GradUp(ConstTensor::F32(h_.data(), kN, kD),
                          ConstTensor::F32(gzq_.data(), kN, kK), Tensor::F32(out.data(), kD, kK),
                          false)
                  .ok());
  EXPECT_LE(MaxRelDiff(out, ref), 2e-6);
  ASSERT_TRUE(be_->GradUp(ConstTensor::F32(h_.data(), kN, kD),
                          ConstTensor::F32(gzq_.data(), kN, kK), Tensor::F32(out.data(), kD, kK),
                          true)
                  .ok());
  std::vector<double> twice = ref;
  for (double& v : twice) v *= 2;
  EXPECT_LE(MaxRelDiff(out, twice), 4e-6);

  // bf16 activations: the same as the f32 op on the bf16 values.
  std::vector<bf16_t> hb;
  const std::vector<float> hr = RoundTripBf16(h_, &hb);
  ASSERT_TRUE(be_->GradUp(ConstTensor::BF16(hb.data(), kN, kD),
                          ConstTensor::F32(gzq_.data(), kN, kK), Tensor::F32(out.data(), kD, kK),
                          false)
                  .ok());
  EXPECT_LE(MaxRelDiff(out, AtB(D(hr), D(gzq_), kN, kD, kK)), 2e-6);

  // No tokens: zero, or unchanged when accumulating.
  ASSERT_TRUE(be_->GradUp(ConstTensor::F32(nullptr, 0, kD), ConstTensor::F32(nullptr, 0, kK),
                          Tensor::F32(out.data(), kD, kK), false)
                  .ok());
  for (float v : out) EXPECT_EQ(v, 0.f);
}

TEST_P(SignalsTest, GradDownMatchesReference) {
  std::vector<float> out(static_cast<size_t>(kD) * kK, std::nanf(""));
  const LowRankAnchor anchor = Anchor();
  const std::vector<float> gu = Gu(g_);
  // With an anchor.
  ASSERT_TRUE(Down(ConstTensor::F32(g_.data(), kN, kD), gu, &anchor, &out, false).ok());
  const std::vector<double> ref = GradDownRef(g_, zq_, &a_, u_);
  EXPECT_LE(MaxRelDiff(out, ref), 4e-6);
  // Accumulating the no-anchor signal on top of it.
  ASSERT_TRUE(Down(ConstTensor::F32(g_.data(), kN, kD), gu, nullptr, &out, true).ok());
  std::vector<double> sum = GradDownRef(g_, zq_, nullptr, u_);
  for (size_t i = 0; i < sum.size(); ++i) sum[i] += ref[i];
  EXPECT_LE(MaxRelDiff(out, sum), 4e-6);

  // bf16 loss gradient.
  std::vector<bf16_t> gb;
  const std::vector<float> gr = RoundTripBf16(g_, &gb);
  ASSERT_TRUE(Down(ConstTensor::BF16(gb.data(), kN, kD), Gu(gr), &anchor, &out, false).ok());
  EXPECT_LE(MaxRelDiff(out, GradDownRef(gr, zq_, &a_, u_)), 4e-6);
}

// G_down is d/dU of <g, h_hat(U)> with h_hat = zq U^T + a - (a U) U^T (zq, a, g held fixed). That
// function is quadratic in U, so a central difference gives the directional derivative exactly.
TEST_P(SignalsTest, GradDownIsTheGradientOfTheReconstruction) {
  std::vector<float> out(static_cast<size_t>(kD) * kK);
  const LowRankAnchor anchor = Anchor();
  ASSERT_TRUE(Down(ConstTensor::F32(g_.data(), kN, kD), Gu(g_), &anchor, &out, false).ok());
  auto f = [&](const std::vector<double>& u) {
    std::vector<double> ut(u.size());
    for (int i = 0; i < kD; ++i) {
      for (int j = 0; j < kK; ++j) ut[j * kD + i] = u[i * kK + j];
    }
    const std::vector<double> zu = AB(D(zq_), ut, kN, kK, kD);
    const std::vector<double> auu = AB(AB(D(a_), u, kN, kD, kK), ut, kN, kK, kD);
    double acc = 0.0;
    for (size_t i = 0; i < zu.size(); ++i) acc += g_[i] * (zu[i] + a_[i] - auu[i]);
    return acc;
  };
  std::mt19937 rng(2);
  for (int trial = 0; trial < 3; ++trial) {
    const std::vector<float> e = Gaussian(rng, out.size());
    const double t = 1e-3;
    std::vector<double> up = D(u_), um = D(u_);
    for (size_t i = 0; i < up.size(); ++i) {
      up[i] += t * e[i];
      um[i] -= t * e[i];
    }
    const double fd = (f(up) - f(um)) / (2 * t);
    double analytic = 0.0, scale = 0.0;
    for (size_t i = 0; i < out.size(); ++i) {
      analytic += double{out[i]} * e[i];
      scale += std::fabs(double{out[i]} * e[i]);
    }
    EXPECT_NEAR(analytic, fd, 1e-5 * scale) << "trial " << trial;
  }
}

TEST_P(SignalsTest, RejectBadShapesAndDtypes) {
  std::vector<float> out(static_cast<size_t>(kD) * kK);
  std::vector<bf16_t> ub(u_.size());
  auto expect_invalid = [](const absl::Status& s, const char* name) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(name), std::string::npos) << s;
  };
  expect_invalid(
      be_->GradUp(ConstTensor::F32(h_.data(), kN, kD), ConstTensor::F32(gzq_.data(), kN - 1, kK),
                  Tensor::F32(out.data(), kD, kK), false),
      "gzq");
  expect_invalid(
      be_->GradUp(ConstTensor::F32(h_.data(), kN, kD), ConstTensor::F32(gzq_.data(), kN, kK),
                  Tensor::F32(out.data(), kK, kD), false),
      "g_up");
  const std::vector<float> gu = Gu(g_);
  LowRankAnchor short_tokens = Anchor();
  short_tokens.tokens = absl::MakeConstSpan(tokens_.data(), kN - 1);
  expect_invalid(Down(ConstTensor::F32(g_.data(), kN, kD), gu, &short_tokens, &out, false),
                 "tokens");
  LowRankAnchor wide_q = Anchor();
  wide_q.q = ConstTensor::F32(q_.data(), kR, kD - 1);
  expect_invalid(Down(ConstTensor::F32(g_.data(), kN, kD), gu, &wide_q, &out, false), "q");
  const LowRankAnchor anchor = Anchor();
  expect_invalid(
      be_->GradDown(ConstTensor::F32(g_.data(), kN, kD), ConstTensor::F32(gu.data(), kN, kK),
                    ConstTensor::F32(zq_.data(), kN, kK), ConstTensor::BF16(ub.data(), kD, kK),
                    &anchor, Tensor::F32(out.data(), kD, kK), false),
      "u");
  expect_invalid(
      be_->GradDown(ConstTensor::F32(g_.data(), kN, kD), ConstTensor::F32(gu.data(), kN, kK),
                    ConstTensor::F32(zq_.data(), kN, kK - 1), ConstTensor::F32(u_.data(), kD, kK),
                    &anchor, Tensor::F32(out.data(), kD, kK), false),
      "zq");
  expect_invalid(
      be_->GradDown(ConstTensor::F32(g_.data(), kN, kD), ConstTensor::F32(gu.data(), kN - 1, kK),
                    ConstTensor::F32(zq_.data(), kN, kK), ConstTensor::F32(u_.data(), kD, kK),
                    &anchor, Tensor::F32(out.data(), kD, kK), false),
      "gu");
}

TEST_P(SignalsTest, NonFiniteInputLeavesAccumulatedSignalsUnchanged) {
  std::vector<float> up(static_cast<size_t>(kD) * kK, 1.f), down(up.size(), 2.f);
  std::vector<float> h = h_, g = g_;
  h[5 * kD + 7] = std::nanf("");
  g[9] = INFINITY;
  absl::Status s =
      be_->GradUp(ConstTensor::F32(h.data(), kN, kD), ConstTensor::F32(gzq_.data(), kN, kK),
                  Tensor::F32(up.data(), kD, kK), true);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("g_up"), std::string::npos) << s;
  for (float v : up) EXPECT_EQ(v, 1.f);
  const LowRankAnchor anchor = Anchor();
  s = Down(ConstTensor::F32(g.data(), kN, kD), Gu(g_), &anchor, &down, true);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  for (float v : down) EXPECT_EQ(v, 2.f);
}

INSTANTIATE_TEST_SUITE_P(Backends, SignalsTest, ::testing::ValuesIn(BackendNames()),
                         BackendTestName);

}  // namespace
}  // namespace mapl
