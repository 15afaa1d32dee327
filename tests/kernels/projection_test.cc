// Projection, lift and the anchored reconstruction of every backend against naive double-precision
// loops, in fp32 and bf16, plus the shape checks.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/registry.h"
#include "tests/kernels/backend_test.h"

namespace mapl {
namespace {

std::vector<float> Random(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> v(n);
  for (float& x : v) x = g(rng);
  return v;
}

// c (m x n) = a (m x kk) b (kk x n), or b^T when b is (n x kk).
std::vector<double> Naive(const std::vector<float>& a, const std::vector<float>& b, int m, int n,
                          int kk, bool trans_b) {
  std::vector<double> c(size_t(m) * n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int t = 0; t < kk; ++t)
        s += double(a[i * kk + t]) * (trans_b ? b[j * kk + t] : b[t * n + j]);
      c[size_t(i) * n + j] = s;
    }
  return c;
}

class ProjectionTest : public BackendTest {
 protected:
  const int n_ = 37, d_ = 96, k_ = 12;
  std::vector<float> h_ = Random(n_ * d_, 1), u_ = Random(d_ * k_, 2);
};

TEST_P(ProjectionTest, ProjectAndLiftMatchNaive) {
  std::vector<float> z(n_ * k_), h(n_ * d_);
  ASSERT_TRUE(be_->Project(ConstTensor::F32(h_.data(), n_, d_), ConstTensor::F32(u_.data(), d_, k_),
                           Tensor::F32(z.data(), n_, k_))
                  .ok());
  std::vector<double> want = Naive(h_, u_, n_, k_, d_, false);
  for (size_t i = 0; i < z.size(); ++i) EXPECT_NEAR(z[i], want[i], 1e-4 * (1 + std::fabs(want[i])));
  ASSERT_TRUE(be_->Lift(ConstTensor::F32(z.data(), n_, k_), ConstTensor::F32(u_.data(), d_, k_),
                        Tensor::F32(h.data(), n_, d_))
                  .ok());
  want = Naive(z, u_, n_, d_, k_, true);
  for (size_t i = 0; i < h.size(); ++i) EXPECT_NEAR(h[i], want[i], 1e-4 * (1 + std::fabs(want[i])));
}

TEST_P(ProjectionTest, Bf16InAndOut) {
  // 300 rows: more than one staging block.
  const int n = 300;
  std::vector<float> hf = Random(n * d_, 3);
  std::vector<bf16_t> hb(n * d_), zb(n * k_);
  FloatToBf16(hf.data(), hb.data(), hb.size());
  std::vector<float> hr(n * d_);
  Bf16ToFloat(hb.data(), hr.data(), hr.size());
  ASSERT_TRUE(be_->Project(ConstTensor::BF16(hb.data(), n, d_), ConstTensor::F32(u_.data(), d_, k_),
                           Tensor::BF16(zb.data(), n, k_))
                  .ok());
  std::vector<double> want = Naive(hr, u_, n, k_, d_, false);
  for (size_t i = 0; i < zb.size(); ++i) {
    EXPECT_NEAR(Bf16ToFloat(zb[i]), want[i], 8e-3 * (1 + std::fabs(want[i])));  // bf16 rounding
  }
}

// An anchor table pair and token ids (repeated, and not all of the vocabulary) for n_ rows.
struct AnchorData {
  static constexpr int kV = 20, kR = 5;
  std::vector<float> p, q;
  std::vector<int32_t> tokens;
  std::vector<float> a;  // P[t] Q, (n, d), for the reference
  LowRankAnchor anchor(int d) const {
    return {ConstTensor::F32(p.data(), kV, kR), ConstTensor::F32(q.data(), kR, d), tokens};
  }
};

AnchorData MakeAnchor(int n, int d, uint64_t seed) {
  AnchorData x;
  x.p = Random(AnchorData::kV * AnchorData::kR, seed);
  x.q = Random(AnchorData::kR * d, seed + 1);
  for (int i = 0; i < n; ++i) x.tokens.push_back((i * 7) % (AnchorData::kV - 3));
  std::vector<float> pt;
  for (int32_t t : x.tokens) {
    pt.insert(pt.end(), x.p.begin() + t * AnchorData::kR, x.p.begin() + (t + 1) * AnchorData::kR);
  }
  const std::vector<double> a = Naive(pt, x.q, n, d, AnchorData::kR, false);
  x.a.assign(a.begin(), a.end());
  return x;
}

TEST_P(ProjectionTest, LiftWithAnchorMatchesFormula) {
  std::vector<float> zq = Random(n_ * k_, 4), h(n_ * d_);
  const AnchorData x = MakeAnchor(n_, d_, 5);
  ASSERT_TRUE(be_->LiftWithAnchor(ConstTensor::F32(zq.data(), n_, k_),
                                  ConstTensor::F32(u_.data(), d_, k_), x.anchor(d_),
                                  Tensor::F32(h.data(), n_, d_))
                  .ok());
  // h = zq U^T + a - (a U) U^T
  std::vector<double> lift = Naive(zq, u_, n_, d_, k_, true);
  std::vector<double> au = Naive(x.a, u_, n_, k_, d_, false);
  std::vector<float> auf(au.begin(), au.end());
  std::vector<double> auut = Naive(auf, u_, n_, d_, k_, true);
  for (size_t i = 0; i < h.size(); ++i) {
    const double want = lift[i] + x.a[i] - auut[i];
    EXPECT_NEAR(h[i], want, 1e-3 * (1 + std::fabs(want)));
  }
}

TEST_P(ProjectionTest, LiftToBf16AndAnchoredLiftToBf16) {
  std::vector<float> z = Random(n_ * k_, 6);
  std::vector<bf16_t> hb(n_ * d_);
  ASSERT_TRUE(be_->Lift(ConstTensor::F32(z.data(), n_, k_), ConstTensor::F32(u_.data(), d_, k_),
                        Tensor::BF16(hb.data(), n_, d_))
                  .ok());
  std::vector<double> want = Naive(z, u_, n_, d_, k_, true);
  for (size_t i = 0; i < hb.size(); ++i) {
    EXPECT_NEAR(Bf16ToFloat(hb[i]), want[i], 8e-3 * (1 + std::fabs(want[i])));
  }
  // The anchored lift into bf16 is the f32 one rounded.
  const AnchorData x = MakeAnchor(n_, d_, 7);
  std::vector<float> h(n_ * d_);
  ASSERT_TRUE(be_->LiftWithAnchor(ConstTensor::F32(z.data(), n_, k_),
                                  ConstTensor::F32(u_.data(), d_, k_), x.anchor(d_),
                                  Tensor::F32(h.data(), n_, d_))
                  .ok());
  ASSERT_TRUE(be_->LiftWithAnchor(ConstTensor::F32(z.data(), n_, k_),
                                  ConstTensor::F32(u_.data(), d_, k_), x.anchor(d_),
                                  Tensor::BF16(hb.data(), n_, d_))
                  .ok());
  for (size_t i = 0; i < hb.size(); ++i) EXPECT_EQ(hb[i], FloatToBf16(h[i])) << i;
  // A bad anchor is refused, naming what is wrong.
  std::vector<int32_t> bad = x.tokens;
  bad[3] = AnchorData::kV;
  LowRankAnchor a = x.anchor(d_);
  a.tokens = bad;
  absl::Status s =
      be_->LiftWithAnchor(ConstTensor::F32(z.data(), n_, k_), ConstTensor::F32(u_.data(), d_, k_),
                          a, Tensor::F32(h.data(), n_, d_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("tokens[3]"), std::string::npos) << s;
  a = x.anchor(d_ - 1);
  s = be_->LiftWithAnchor(ConstTensor::F32(z.data(), n_, k_), ConstTensor::F32(u_.data(), d_, k_),
                          a, Tensor::F32(h.data(), n_, d_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(ProjectionTest, RejectsBadShapesWithNamedArgument) {
  std::vector<float> z(n_ * k_);
  absl::Status s = be_->Project(ConstTensor::F32(h_.data(), n_, d_ - 1),
                                ConstTensor::F32(u_.data(), d_, k_), Tensor::F32(z.data(), n_, k_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("h:"), std::string::npos) << s;
  s = be_->Project(ConstTensor::F32(h_.data(), n_, d_), ConstTensor::F32(u_.data(), d_, k_),
                   Tensor::F32(z.data(), n_ + 1, k_));
  EXPECT_NE(std::string(s.message()).find("z:"), std::string::npos) << s;
  // Wide U (k > d) and a bf16 U are rejected.
  s = be_->Project(ConstTensor::F32(h_.data(), n_, k_), ConstTensor::F32(u_.data(), k_, d_),
                   Tensor::F32(z.data(), n_, d_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  std::vector<bf16_t> ub(d_ * k_);
  s = be_->Lift(ConstTensor::F32(z.data(), n_, k_), ConstTensor::BF16(ub.data(), d_, k_),
                Tensor::F32(h_.data(), n_, d_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  // Null data for a non-empty tensor.
  s = be_->Project(ConstTensor::F32(nullptr, n_, d_), ConstTensor::F32(u_.data(), d_, k_),
                   Tensor::F32(z.data(), n_, k_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  // k = 0 (nothing to project onto) and shapes whose size overflows are rejected.
  s = be_->Lift(ConstTensor::F32(z.data(), n_, 0), ConstTensor::F32(u_.data(), d_, 0),
                Tensor::F32(h_.data(), n_, d_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = be_->Project(ConstTensor::F32(nullptr, int64_t{1} << 62, d_),
                   ConstTensor::F32(u_.data(), d_, k_), Tensor::F32(nullptr, int64_t{1} << 62, k_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  // Zero rows are fine.
  EXPECT_TRUE(be_->Project(ConstTensor::F32(h_.data(), 0, d_), ConstTensor::F32(u_.data(), d_, k_),
                           Tensor::F32(z.data(), 0, k_))
                  .ok());
}

INSTANTIATE_TEST_SUITE_P(Backends, ProjectionTest, ::testing::ValuesIn(BackendNames()),
                         BackendTestName);

}  // namespace
}  // namespace mapl
