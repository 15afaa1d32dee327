// Tests of every backend's SPEL ops (kernels/cpu/spel.cc on the CPU) against naive double-precision
// references, plus the properties SPEL is for: U stays on the Stiefel manifold over many steps, and
// maximising tr(U^T S U) finds S's top-k eigen-subspace. The exact polar factors the references
// need come from matrices built from known factors (y = Q S W^T has polar factor Q W^T) or from a
// one-sided Jacobi SVD, never from the kernel's own route (Gram matrix and an eigensolver).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
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
using reference::ABt;
using reference::AtB;
using reference::Gaussian;
using reference::JacobiSvd;
using reference::PolarFactor;
using reference::RandomOrthonormal;

constexpr double kPi = 3.14159265358979323846;

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// max |U^T U - I|, in double.
double OrthoError(const std::vector<float>& u, int d, int k) {
  const std::vector<double> g = AtB(ToDouble(u), ToDouble(u), d, k, k);
  double err = 0.0;
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) err = std::max(err, std::fabs(g[i * k + j] - (i == j ? 1.0 : 0.0)));
  }
  return err;
}

template <typename A, typename B>
double MaxAbsDiff(const A& a, const B& b) {
  double err = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  }
  return err;
}

// A random point on the Stiefel manifold (d, k).
std::vector<float> RandomStiefel(std::mt19937& rng, int d, int k) {
  const std::vector<double> q = RandomOrthonormal(rng, d, k);
  return {q.begin(), q.end()};
}

// y = Q diag(s) W^T (d, k) from orthonormal Q (d, k), s > 0 and orthogonal W (k, k): its exact
// polar factor is Q W^T by construction.
struct KnownPolar {
  std::vector<double> y;
  std::vector<double> polar;
};
KnownPolar WithKnownPolar(std::mt19937& rng, int d, int k, const std::vector<double>& s) {
  const std::vector<double> q = RandomOrthonormal(rng, d, k);
  const std::vector<double> w = RandomOrthonormal(rng, k, k);
  std::vector<double> qs = q;
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < k; ++j) qs[i * k + j] *= s[j];
  }
  return {ABt(qs, w, d, k, k), ABt(q, w, d, k, k)};
}

// The largest principal angle (radians) between span(u) and span(e), both orthonormal (d, k):
// asin of the spectral norm of (I - e e^T) u, accurate for small angles.
double LargestPrincipalAngle(const std::vector<double>& u, const std::vector<double>& e, int d,
                             int k) {
  std::vector<double> resid = u;
  const std::vector<double> proj = AB(e, AtB(e, u, d, k, k), d, k, k);
  for (size_t i = 0; i < resid.size(); ++i) resid[i] -= proj[i];
  return std::asin(std::min(1.0, JacobiSvd(resid, d, k).s[0]));
}

// The oracle itself: on a matrix built from known factors, the Jacobi SVD finds the known singular
// values and polar factor, and its factors rebuild the matrix, all to double rounding.
TEST(SpelReference, JacobiSvdRecoversKnownFactors) {
  std::mt19937 rng(11);
  const int d = 40, k = 7;
  std::vector<double> s(k);
  for (int j = 0; j < k; ++j) s[j] = 0.5 + j;  // ascending, so the SVD must sort them
  const KnownPolar known = WithKnownPolar(rng, d, k, s);
  const reference::Svd svd = JacobiSvd(known.y, d, k);
  for (int j = 0; j < k; ++j) EXPECT_NEAR(svd.s[j], s[k - 1 - j], 1e-12) << j;
  std::vector<double> us = svd.u;
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < k; ++j) us[i * k + j] *= svd.s[j];
  }
  EXPECT_LE(MaxAbsDiff(ABt(us, svd.v, d, k, k), known.y), 1e-12);
  EXPECT_LE(MaxAbsDiff(PolarFactor(known.y, d, k), known.polar), 1e-12);
}

class SpelTest : public BackendTest {};

TEST_P(SpelTest, MsignMatchesExactPolarAndIsOrthonormal) {
  std::mt19937 rng(1);
  struct Case {
    int d, k;
    float scale;
  };
  for (const Case& c : {Case{64, 8, 1.f}, Case{128, 16, 1e3f}, Case{256, 32, 1e-3f}}) {
    SCOPED_TRACE(testing::Message() << "d=" << c.d << " k=" << c.k << " scale=" << c.scale);
    // Gaussian with d >= 4k: condition number about 3, well inside Newton-Schulz's comfort zone.
    const std::vector<float> y = Gaussian(rng, static_cast<size_t>(c.d) * c.k, c.scale);
    std::vector<float> out(y.size());
    MsignOptions tight;
    tight.tolerance = 2e-6f;
    ASSERT_TRUE(
        be_->Msign(ConstTensor::F32(y.data(), c.d, c.k), Tensor::F32(out.data(), c.d, c.k), tight)
            .ok());
    // The exact polar factor of the fp32 input the backend sees, by Jacobi SVD.
    const std::vector<double> ref = PolarFactor(ToDouble(y), c.d, c.k);
    EXPECT_LE(MaxAbsDiff(out, ref), 5e-7);
    EXPECT_LE(OrthoError(out, c.d, c.k), 1e-6);
    std::printf("[ info ] msign d=%d k=%d: max |X - polar| %.3g, max |X^T X - I| %.3g\n", c.d, c.k,
                MaxAbsDiff(out, ref), OrthoError(out, c.d, c.k));

    // The default tolerance bounds max |X^T X - I|, hence the singular values' error by about half.
    ASSERT_TRUE(be_->Msign(ConstTensor::F32(y.data(), c.d, c.k), Tensor::F32(out.data(), c.d, c.k),
                           MsignOptions{})
                    .ok());
    EXPECT_LE(OrthoError(out, c.d, c.k), 1e-4);
    EXPECT_LE(MaxAbsDiff(out, ref), 1e-4);
  }
}

TEST_P(SpelTest, MsignSquareAndInPlace) {
  std::mt19937 rng(2);
  const int d = 16, k = 16;
  // A square matrix with singular values in [1, 10]: Q1 diag(s) Q2^T, whose polar factor is the
  // known Q1 Q2^T (up to the fp32 rounding of y, about cond(y) * 2^-24).
  std::vector<double> s(k);
  for (int j = 0; j < k; ++j) s[j] = 1.0 + 9.0 * j / (k - 1);
  const KnownPolar known = WithKnownPolar(rng, d, k, s);
  std::vector<float> y(known.y.begin(), known.y.end());
  const std::vector<double>& ref = known.polar;
  MsignOptions tight;
  tight.tolerance = 2e-6f;
  // out aliases y.
  ASSERT_TRUE(
      be_->Msign(ConstTensor::F32(y.data(), d, k), Tensor::F32(y.data(), d, k), tight).ok());
  EXPECT_LE(MaxAbsDiff(y, ref), 1e-6);  // measured 2e-7 on the CPU backend
  EXPECT_LE(OrthoError(y, d, k), 4e-6);
  std::printf("[ info ] msign square: max |X - Q1 Q2^T| %.3g\n", MaxAbsDiff(y, ref));
}

TEST_P(SpelTest, MsignOfZeroIsZero) {
  std::vector<float> y(24, 0.f), out(24, 7.f);
  ASSERT_TRUE(be_->Msign(ConstTensor::F32(y.data(), 8, 3), Tensor::F32(out.data(), 8, 3), {}).ok());
  for (float v : out) EXPECT_EQ(v, 0.f);
}

TEST_P(SpelTest, MsignRejectsBadInput) {
  std::vector<float> y(32, 1.f), out(32);
  std::vector<bf16_t> yb(32);
  const MsignOptions opt;
  // d < k.
  EXPECT_EQ(be_->Msign(ConstTensor::F32(y.data(), 4, 8), Tensor::F32(out.data(), 4, 8), opt).code(),
            absl::StatusCode::kInvalidArgument);
  // Wrong output shape, named.
  absl::Status s = be_->Msign(ConstTensor::F32(y.data(), 8, 4), Tensor::F32(out.data(), 4, 8), opt);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("out"), std::string::npos) << s;
  // bf16 is not part of Msign's contract.
  EXPECT_EQ(
      be_->Msign(ConstTensor::BF16(yb.data(), 8, 4), Tensor::F32(out.data(), 8, 4), opt).code(),
      absl::StatusCode::kInvalidArgument);
  // Null data.
  EXPECT_EQ(be_->Msign(ConstTensor::F32(nullptr, 8, 4), Tensor::F32(out.data(), 8, 4), opt).code(),
            absl::StatusCode::kInvalidArgument);
  // Non-finite input names the position.
  y[5] = std::nanf("");
  s = be_->Msign(ConstTensor::F32(y.data(), 8, 4), Tensor::F32(out.data(), 8, 4), opt);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("(1, 1)"), std::string::npos) << s;
  y[5] = INFINITY;
  EXPECT_EQ(be_->Msign(ConstTensor::F32(y.data(), 8, 4), Tensor::F32(out.data(), 8, 4), opt).code(),
            absl::StatusCode::kInvalidArgument);
  y[5] = 1.f;
  MsignOptions bad;
  bad.max_iterations = -1;
  EXPECT_EQ(be_->Msign(ConstTensor::F32(y.data(), 8, 4), Tensor::F32(out.data(), 8, 4), bad).code(),
            absl::StatusCode::kInvalidArgument);
  bad = MsignOptions{};
  bad.tolerance = std::nanf("");
  EXPECT_EQ(be_->Msign(ConstTensor::F32(y.data(), 8, 4), Tensor::F32(out.data(), 8, 4), bad).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(SpelTest, RetractMatchesExactPolar) {
  std::mt19937 rng(3);
  const int d = 96, k = 12;
  // u = Q diag(s) W^T with singular values spread over [2, 10]: its polar factor is Q W^T.
  std::vector<double> s(k);
  for (int j = 0; j < k; ++j) s[j] = 2.0 + 8.0 * j / (k - 1);
  const KnownPolar known = WithKnownPolar(rng, d, k, s);
  std::vector<float> u(known.y.begin(), known.y.end());
  ASSERT_TRUE(be_->Retract(Tensor::F32(u.data(), d, k)).ok());
  EXPECT_LE(MaxAbsDiff(u, known.polar), 2e-7);  // measured 2e-8 on the CPU backend
  EXPECT_LE(OrthoError(u, d, k), 1e-6);
  std::printf("[ info ] retract: max |U - Q W^T| %.3g\n", MaxAbsDiff(u, known.polar));
  // Retracting a point already on the manifold leaves it there.
  const std::vector<float> before = u;
  ASSERT_TRUE(be_->Retract(Tensor::F32(u.data(), d, k)).ok());
  EXPECT_LE(MaxAbsDiff(u, before), 1e-6);
}

TEST_P(SpelTest, RetractIllConditionedStaysOrthonormal) {
  std::mt19937 rng(4);
  const int d = 64, k = 8;
  // Singular values from 1 down to 1e-4 (condition number 1e4): the Gram route alone would lose
  // about cond^2 * eps of orthonormality.
  std::vector<float> q = RandomStiefel(rng, d, k);
  std::vector<float> u(q.size());
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < k; ++j) u[i * k + j] = q[i * k + j] * std::pow(10.f, -4.f * j / (k - 1));
  }
  ASSERT_TRUE(be_->Retract(Tensor::F32(u.data(), d, k)).ok());
  EXPECT_LE(OrthoError(u, d, k), 1e-6);
  // The polar factor of Q diag(s) is Q.
  EXPECT_LE(MaxAbsDiff(u, q), 1e-5);
}

TEST_P(SpelTest, RetractRejectsRankDeficientAndNonFinite) {
  std::mt19937 rng(5);
  const int d = 32, k = 4;
  std::vector<float> u = Gaussian(rng, static_cast<size_t>(d) * k);
  for (int i = 0; i < d; ++i) u[i * k + 3] = u[i * k + 1];  // duplicate column
  std::vector<float> before = u;
  absl::Status s = be_->Retract(Tensor::F32(u.data(), d, k));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("rank-deficient"), std::string::npos) << s;
  EXPECT_EQ(u, before);  // untouched

  std::vector<float> zero(static_cast<size_t>(d) * k, 0.f);
  EXPECT_EQ(be_->Retract(Tensor::F32(zero.data(), d, k)).code(),
            absl::StatusCode::kInvalidArgument);

  u = Gaussian(rng, static_cast<size_t>(d) * k);
  u[7] = -INFINITY;
  before = u;
  EXPECT_EQ(be_->Retract(Tensor::F32(u.data(), d, k)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(0, std::memcmp(u.data(), before.data(), u.size() * sizeof(float)));

  EXPECT_EQ(be_->Retract(Tensor::F32(u.data(), k, d)).code(), absl::StatusCode::kInvalidArgument);
  std::vector<bf16_t> ub(static_cast<size_t>(d) * k);
  EXPECT_EQ(be_->Retract(Tensor::BF16(ub.data(), d, k)).code(), absl::StatusCode::kInvalidArgument);
}

// One SPEL step exactly as docs/METHOD.md section 2 writes it (U <- msign(U - lr D), descending G),
// in double with exact polar factors (Jacobi SVD).
void SpelStepRef(std::vector<double>& u, const std::vector<double>& g, std::vector<double>& m,
                 int d, int k, double lr, double beta) {
  for (size_t i = 0; i < m.size(); ++i) m[i] = beta * m[i] + g[i];
  const std::vector<double> a = AtB(u, m, d, k, k);
  std::vector<double> sym(a.size());
  for (int i = 0; i < k; ++i) {
    for (int j = 0; j < k; ++j) sym[i * k + j] = 0.5 * (a[i * k + j] + a[j * k + i]);
  }
  const std::vector<double> usym = AB(u, sym, d, k, k);
  std::vector<double> xi(m.size());
  for (size_t i = 0; i < xi.size(); ++i) xi[i] = m[i] - usym[i];
  const std::vector<double> dir = PolarFactor(xi, d, k);
  std::vector<double> y(u.size());
  for (size_t i = 0; i < y.size(); ++i) y[i] = u[i] - lr * dir[i];
  u = PolarFactor(y, d, k);
}

TEST_P(SpelTest, SpelStepMatchesReference) {
  std::mt19937 rng(6);
  const int d = 48, k = 6;
  const size_t dk = static_cast<size_t>(d) * k;
  std::vector<float> u = RandomStiefel(rng, d, k);
  std::vector<float> m(dk, 0.f);
  SpelOptions opt;
  opt.lr = 0.05f;
  opt.beta = 0.9f;
  opt.msign.tolerance = 2e-6f;
  double worst_u = 0.0, worst_m = 0.0;
  for (int step = 0; step < 20; ++step) {
    const std::vector<float> g = Gaussian(rng, dk);
    // The reference starts from the backend's state each step, so errors do not compound.
    std::vector<double> u_ref = ToDouble(u), m_ref = ToDouble(m);
    SpelStepRef(u_ref, ToDouble(g), m_ref, d, k, opt.lr, opt.beta);
    ASSERT_TRUE(be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::F32(g.data(), d, k),
                              Tensor::F32(m.data(), d, k), opt)
                    .ok());
    worst_u = std::max(worst_u, MaxAbsDiff(u, u_ref));
    worst_m = std::max(worst_m, MaxAbsDiff(m, m_ref));
  }
  EXPECT_LE(worst_u, 2e-7);
  EXPECT_LE(worst_m, 2e-6);  // |M| grows to about 10 with beta 0.9: a few fp32 ulps
  std::printf("[ info ] SPEL step vs reference: max |dU| %.3g, max |dM| %.3g\n", worst_u, worst_m);
}

TEST_P(SpelTest, SpelStepWithZeroGradientAndMomentumKeepsU) {
  std::mt19937 rng(7);
  const int d = 32, k = 5;
  std::vector<float> u = RandomStiefel(rng, d, k);
  const std::vector<float> before = u;
  std::vector<float> g(u.size(), 0.f), m(u.size(), 0.f);
  ASSERT_TRUE(be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::F32(g.data(), d, k),
                            Tensor::F32(m.data(), d, k), SpelOptions{})
                  .ok());
  EXPECT_LE(MaxAbsDiff(u, before), 1e-6);
  for (float v : m) EXPECT_EQ(v, 0.f);
}

TEST_P(SpelTest, SpelStepRejectsBadGradientAndLeavesStateUntouched) {
  std::mt19937 rng(8);
  const int d = 32, k = 4;
  const size_t dk = static_cast<size_t>(d) * k;
  std::vector<float> u = RandomStiefel(rng, d, k);
  std::vector<float> m = Gaussian(rng, dk);
  const std::vector<float> u0 = u, m0 = m;
  auto step = [&](const std::vector<float>& g, int rows, int cols, const SpelOptions& opt) {
    return be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::F32(g.data(), rows, cols),
                         Tensor::F32(m.data(), d, k), opt);
  };
  auto expect_untouched = [&] {
    EXPECT_EQ(0, std::memcmp(u.data(), u0.data(), dk * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(m.data(), m0.data(), dk * sizeof(float)));
  };

  std::vector<float> g = Gaussian(rng, dk);
  g[3 * k + 2] = std::nanf("");
  absl::Status s = step(g, d, k, SpelOptions{});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("grad"), std::string::npos) << s;
  EXPECT_NE(s.message().find("(3, 2)"), std::string::npos) << s;
  expect_untouched();

  g[3 * k + 2] = INFINITY;
  EXPECT_EQ(step(g, d, k, SpelOptions{}).code(), absl::StatusCode::kInvalidArgument);
  expect_untouched();

  // Finite, but beta M + G overflows fp32.
  std::fill(g.begin(), g.end(), 3e38f);
  std::vector<float> m_big(dk, 3e38f);
  const std::vector<float> m_big0 = m_big;
  EXPECT_EQ(be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::F32(g.data(), d, k),
                          Tensor::F32(m_big.data(), d, k), SpelOptions{})
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m_big, m_big0);
  expect_untouched();

  g = Gaussian(rng, dk);
  s = step(g, k, d, SpelOptions{});  // transposed shape
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("grad"), std::string::npos) << s;
  std::vector<bf16_t> gb(dk);
  EXPECT_EQ(be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::BF16(gb.data(), d, k),
                          Tensor::F32(m.data(), d, k), SpelOptions{})
                .code(),
            absl::StatusCode::kInvalidArgument);
  s = be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::F32(g.data(), d, k),
                    Tensor::F32(m.data(), d, k - 1), SpelOptions{});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("momentum"), std::string::npos) << s;
  SpelOptions bad;
  bad.lr = -0.1f;
  EXPECT_EQ(step(g, d, k, bad).code(), absl::StatusCode::kInvalidArgument);
  bad = SpelOptions{};
  bad.lr = std::nanf("");
  EXPECT_EQ(step(g, d, k, bad).code(), absl::StatusCode::kInvalidArgument);
  bad = SpelOptions{};
  bad.beta = 1.5f;
  EXPECT_EQ(step(g, d, k, bad).code(), absl::StatusCode::kInvalidArgument);
  expect_untouched();

  // A state that is already poisoned is refused as well, rather than spread.
  m[0] = std::nanf("");
  EXPECT_EQ(step(g, d, k, SpelOptions{}).code(), absl::StatusCode::kInvalidArgument);
}

// Acceptance: 10,000 fp32 steps on random gradients keep max |U^T U - I| <= 1e-5.
TEST_P(SpelTest, StaysOrthonormalOverTenThousandRandomSteps) {
  std::mt19937 rng(9);
  const int d = 128, k = 16;
  const size_t dk = static_cast<size_t>(d) * k;
  std::vector<float> u = RandomStiefel(rng, d, k);
  std::vector<float> m(dk, 0.f);
  SpelOptions opt;
  opt.lr = 0.05f;
  opt.beta = 0.9f;
  std::vector<float> g(dk);
  std::normal_distribution<float> dist(0.f, 1.f);
  double worst = 0.0;
  for (int step = 1; step <= 10000; ++step) {
    for (float& x : g) x = dist(rng);
    ASSERT_TRUE(be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::F32(g.data(), d, k),
                              Tensor::F32(m.data(), d, k), opt)
                    .ok())
        << "step " << step;
    if (step % 500 == 0) {
      const double err = OrthoError(u, d, k);
      worst = std::max(worst, err);
      ASSERT_LE(err, 1e-5) << "step " << step;
    }
  }
  const double final_err = OrthoError(u, d, k);
  EXPECT_LE(final_err, 1e-5);
  std::printf("[ info ] max |U^T U - I| after 10000 steps: %.3g (worst checked: %.3g)\n", final_err,
              worst);
}

// Acceptance: maximising tr(U^T S U), i.e. descending L = -tr(U^T S U) with G = -2 S U, converges
// to the top-k eigen-subspace of S.
TEST_P(SpelTest, FindsTopEigenSubspace) {
  std::mt19937 rng(10);
  const int d = 64, k = 8;
  // S = Q diag(lambda) Q^T with the top k eigenvalues in [2, 3] and the rest in [0, 1].
  const std::vector<double> q = RandomOrthonormal(rng, d, d);
  std::vector<double> lambda(d);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  for (int i = 0; i < d; ++i) lambda[i] = (i < k ? 2.0 : 0.0) + uni(rng);
  std::vector<double> s(static_cast<size_t>(d) * d, 0.0);
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < d; ++j) {
      for (int e = 0; e < d; ++e) s[i * d + j] += q[i * d + e] * lambda[e] * q[j * d + e];
    }
  }
  // The reference subspace, from S itself rather than from the construction. S is symmetric
  // positive semi-definite, so its SVD is its eigendecomposition, singular values descending.
  const reference::Svd eig = JacobiSvd(s, d, d);
  std::vector<double> top(static_cast<size_t>(d) * k);
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < k; ++j) top[i * k + j] = eig.u[i * d + j];
  }
  ASSERT_GT(eig.s[k - 1], eig.s[k] + 0.5);  // the gap

  std::vector<float> u = RandomStiefel(rng, d, k);
  const double start_angle = LargestPrincipalAngle(ToDouble(u), top, d, k);
  std::vector<float> m(u.size(), 0.f), g(u.size());
  std::vector<float> sf(s.begin(), s.end());
  SpelOptions opt;
  opt.beta = 0.9f;
  // SPEL's steps have length lr whatever the gradient's size, so lr must decay for U to settle.
  const int steps = 2000;
  for (int step = 0; step < steps; ++step) {
    opt.lr = 0.05f * std::pow(0.997f, static_cast<float>(step));
    for (int i = 0; i < d; ++i) {
      for (int j = 0; j < k; ++j) {
        double acc = 0.0;
        for (int e = 0; e < d; ++e) acc += static_cast<double>(sf[i * d + e]) * u[e * k + j];
        g[i * k + j] = static_cast<float>(-2.0 * acc);
      }
    }
    ASSERT_TRUE(be_->SpelStep(Tensor::F32(u.data(), d, k), ConstTensor::F32(g.data(), d, k),
                              Tensor::F32(m.data(), d, k), opt)
                    .ok());
  }
  const double angle_deg = LargestPrincipalAngle(ToDouble(u), top, d, k) * 180.0 / kPi;
  std::printf("[ info ] largest principal angle: start %.2f deg, after %d steps %.4g deg\n",
              start_angle * 180.0 / kPi, steps, angle_deg);
  EXPECT_GT(start_angle * 180.0 / kPi, 45.0);
  EXPECT_LT(angle_deg, 1.0);
  EXPECT_LE(OrthoError(u, d, k), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Backends, SpelTest, ::testing::ValuesIn(BackendNames()), BackendTestName);

}  // namespace
}  // namespace mapl
