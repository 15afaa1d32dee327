// Tests for codec health (server/codec_health.h): each accumulator on data whose answer is known,
// then the gauges as the engines and the boundary worker report them in BoundaryStats.
#include "server/codec_health.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "server/boundary_worker.h"
#include "server/engine.h"
#include "server/projector.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_server.h"
#include "tests/server/engine_pair.h"
#include "tests/server/transport/peer_test_util.h"

namespace mapl {
namespace {

using testing_internal::Config;
using testing_internal::Pair;
using testing_internal::Stream;

// Coordinate vector `axis` made orthogonal to the columns of u (d, k) by Gram-Schmidt, of unit
// norm.
std::vector<double> UnitOrthogonalTo(const std::vector<float>& u, int64_t d, int64_t k,
                                     int64_t axis) {
  std::vector<double> e(d, 0.0);
  e[axis] = 1.0;
  for (int64_t j = 0; j < k; ++j) {
    double dot = 0;
    for (int64_t i = 0; i < d; ++i) dot += e[i] * u[i * k + j];
    for (int64_t i = 0; i < d; ++i) e[i] -= dot * u[i * k + j];
  }
  double norm = 0;
  for (double x : e) norm += x * x;
  for (double& x : e) x /= std::sqrt(norm);
  return e;
}

std::vector<float> Gaussian(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> v(count);
  for (float& x : v) x = normal(rng);
  return v;
}

// a (n, d) times b (d, k), in double, the naive way: the reference the engines' BLAS is held to.
std::vector<double> MatMul(const float* a, const float* b, int64_t n, int64_t d, int64_t k) {
  std::vector<double> out(n * k, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = 0; p < d; ++p) {
      const double x = a[i * d + p];
      for (int64_t j = 0; j < k; ++j) out[i * k + j] += x * b[p * k + j];
    }
  }
  return out;
}

double Sum2(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return s;
}

// ---- the sums ----

TEST(SquaredNormTest, F32AndBf16) {
  const std::vector<float> v = {3.f, -4.f, 0.5f, 0.f};
  EXPECT_DOUBLE_EQ(SquaredNorm(ConstTensor::F32(v.data(), 2, 2)), 25.25);
  std::vector<bf16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = FloatToBf16(v[i]);  // all exact in bf16
  EXPECT_DOUBLE_EQ(SquaredNorm(ConstTensor::BF16(b.data(), 1, 4)), 25.25);
  const std::vector<float> w = {1.f, -4.f, 2.5f, 2.f};
  EXPECT_DOUBLE_EQ(SquaredDistance(v.data(), w.data(), 4), 4.0 + 0.0 + 4.0 + 4.0);
}

TEST(ProjectionHealthTest, KnownSums) {
  ProjectionHealth p;
  EXPECT_EQ(p.Finish().relative_error, 0.0);  // nothing yet: zeros, not NaN
  EXPECT_EQ(p.Finish().code_relative_error, 0.0);
  // Two microbatches: |x|^2 = 4, |y|^2 = 3, |y - yq|^2 = 1 in all.
  p.AddSums(1.0, 0.5, 0.25, 10);
  p.AddSums(3.0, 2.5, 0.75, 20);
  const ProjectionHealth::Summary s = p.Finish();
  EXPECT_EQ(s.rows, 30);
  EXPECT_DOUBLE_EQ(s.relative_error, std::sqrt((4.0 - 3.0 + 1.0) / 4.0));
  EXPECT_DOUBLE_EQ(s.subspace_energy_share, 0.75);
  EXPECT_DOUBLE_EQ(s.outside_energy_share, 0.25);
  EXPECT_DOUBLE_EQ(s.code_relative_error, std::sqrt(1.0 / 3.0));
  p.Reset();
  EXPECT_EQ(p.Finish().rows, 0);
  EXPECT_EQ(p.Finish().subspace_energy_share, 0.0);
}

// h = c U^T lies in span(U): z = h U = c, and with zq = z nothing is lost. Adding a component
// outside the span and an error to the code moves each figure by what was added.
TEST(ProjectionHealthTest, ExactlyRepresentableHasNoErrorAndOutsideEnergyIsMeasured) {
  constexpr int64_t kN = 40, kD = 96, kK = 8;
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  const std::vector<float> u = SeededOrthonormal(kD, kK, 5);
  const std::vector<float> c = Gaussian(kN * kK, 1);
  std::vector<float> h(kN * kD), z(kN * kK);
  ASSERT_TRUE(backend
                  ->Lift(ConstTensor::F32(c.data(), kN, kK), ConstTensor::F32(u.data(), kD, kK),
                         Tensor::F32(h.data(), kN, kD))
                  .ok());
  ASSERT_TRUE(backend
                  ->Project(ConstTensor::F32(h.data(), kN, kD), ConstTensor::F32(u.data(), kD, kK),
                            Tensor::F32(z.data(), kN, kK))
                  .ok());
  ProjectionHealth p;
  p.Add(ConstTensor::F32(h.data(), kN, kD), z.data(), z.data(), kK);
  ProjectionHealth::Summary s = p.Finish();
  EXPECT_LT(s.relative_error, 1e-3);
  EXPECT_NEAR(s.subspace_energy_share, 1.0, 1e-5);
  EXPECT_LT(s.outside_energy_share, 1e-5);
  EXPECT_EQ(s.code_relative_error, 0.0);

  // Row i gets w_i = a_i e, with e of unit norm orthogonal to U (Gram-Schmidt of a coordinate
  // vector); zq = 2 z doubles the code error to exactly |z|.
  const std::vector<double> e = UnitOrthogonalTo(u, kD, kK, 0);
  double h2 = 0, outside = 0;
  for (int64_t r = 0; r < kN; ++r) {
    const double a = 0.5 + r % 3;
    outside += a * a;
    for (int64_t i = 0; i < kD; ++i) h[r * kD + i] += static_cast<float>(a * e[i]);
  }
  for (float x : h) h2 += double{x} * x;
  std::vector<float> zq(z.size());
  for (size_t i = 0; i < z.size(); ++i) zq[i] = 2.f * z[i];
  p.Reset();
  p.Add(ConstTensor::F32(h.data(), kN, kD), z.data(), zq.data(), kK);
  s = p.Finish();
  EXPECT_NEAR(s.outside_energy_share, outside / h2, 1e-4);
  EXPECT_NEAR(s.subspace_energy_share, 1.0 - outside / h2, 1e-4);
  EXPECT_NEAR(s.code_relative_error, 1.0, 1e-6);
  // |h - zq U^T|^2 = outside + |z|^2.
  EXPECT_NEAR(s.relative_error, std::sqrt((outside + (h2 - outside)) / h2), 1e-4);
}

// ---- code usage ----

TEST(CodeUsageTest, UniformAndSingleCode) {
  CodeUsage usage(/*levels=*/2, /*codebook_size=*/256);
  EXPECT_EQ(usage.Finish().rows, 0);
  EXPECT_TRUE(usage.Finish().dead_share.empty());
  // Level 0 uses every code twice, level 1 always code 7.
  std::vector<uint8_t> codes;
  for (int r = 0; r < 512; ++r) {
    codes.push_back(static_cast<uint8_t>(r % 256));
    codes.push_back(7);
  }
  usage.Add(codes);
  const CodeUsage::Summary s = usage.Finish();
  EXPECT_EQ(s.rows, 512);
  ASSERT_EQ(s.dead_share.size(), 2u);
  EXPECT_DOUBLE_EQ(s.dead_share[0], 0.0);
  EXPECT_NEAR(s.perplexity[0], 256.0, 1e-9);
  EXPECT_DOUBLE_EQ(s.dead_share[1], 255.0 / 256.0);
  EXPECT_NEAR(s.perplexity[1], 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(s.worst_dead_share, 255.0 / 256.0);
  EXPECT_NEAR(s.lowest_perplexity, 1.0, 1e-12);
  usage.Reset();
  EXPECT_EQ(usage.Finish().rows, 0);
}

TEST(CodeUsageTest, TwoCodesUnevenly) {
  CodeUsage usage(1, 4);
  usage.Add(std::vector<uint8_t>{0, 0, 0, 1});  // p = (3/4, 1/4)
  const CodeUsage::Summary s = usage.Finish();
  EXPECT_DOUBLE_EQ(s.dead_share[0], 0.5);
  EXPECT_NEAR(s.perplexity[0], std::exp(-(0.75 * std::log(0.75) + 0.25 * std::log(0.25))), 1e-12);
}

// 16 well-separated clusters, K = 256 centroids fitted and encoded by the backend: at most 16
// codes can be used (identical rows get identical codes), each by a sixteenth of the rows.
TEST(CodeUsageTest, SixteenClustersLeaveMostOfK256Dead) {
  constexpr int kDim = 8, kClusters = 16, kRows = 2048;
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  const std::vector<float> centers = Gaussian(kClusters * kDim, 3);
  std::vector<float> x(kRows * kDim);
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kDim; ++j) x[r * kDim + j] = 10.f * centers[(r % kClusters) * kDim + j];
  }
  RvqFitOptions fit;
  fit.levels = 1;
  absl::StatusOr<RvqCodebooks> cb = backend->RvqFit(ConstTensor::F32(x.data(), kRows, kDim), fit);
  ASSERT_TRUE(cb.ok()) << cb.status();
  std::vector<uint8_t> codes(kRows);
  ASSERT_TRUE(
      backend->RvqEncode(*cb, ConstTensor::F32(x.data(), kRows, kDim), 1, absl::MakeSpan(codes), {})
          .ok());
  CodeUsage usage(1, kMaxCodebookSize);
  usage.Add(codes);
  const CodeUsage::Summary s = usage.Finish();
  EXPECT_GE(s.worst_dead_share, 0.9);
  EXPECT_NEAR(s.lowest_perplexity, 16.0, 0.5);
}

// ---- subspace drift ----

TEST(SubspaceDriftTest, SameRotatedHalfAndOrthogonal) {
  constexpr int64_t kD = 64, kK = 8;
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  const std::vector<float> u = SeededOrthonormal(kD, kK, 9);
  const ConstTensor ut = ConstTensor::F32(u.data(), kD, kK);
  absl::StatusOr<double> d = SubspaceDrift(*backend, ut, ut);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_LT(*d, 1e-3);

  // U R with R a rotation in the (0, 1) column plane: other basis, same subspace.
  std::vector<float> rotated = u;
  const double a = 0.7;
  for (int64_t i = 0; i < kD; ++i) {
    rotated[i * kK + 0] = static_cast<float>(std::cos(a) * u[i * kK] - std::sin(a) * u[i * kK + 1]);
    rotated[i * kK + 1] = static_cast<float>(std::sin(a) * u[i * kK] + std::cos(a) * u[i * kK + 1]);
  }
  d = SubspaceDrift(*backend, ut, ConstTensor::F32(rotated.data(), kD, kK));
  ASSERT_TRUE(d.ok());
  EXPECT_LT(*d, 1e-3);

  // Coordinate subspaces: columns e_0..e_7 against e_8..e_15 (orthogonal), and against
  // e_4..e_11 (half shared: |U^T V|_F^2 = 4, drift sqrt(1 - 4/8)).
  auto coordinates = [&](int64_t first) {
    std::vector<float> m(kD * kK, 0.f);
    for (int64_t j = 0; j < kK; ++j) m[(first + j) * kK + j] = 1.f;
    return m;
  };
  const std::vector<float> e0 = coordinates(0), e8 = coordinates(8), e4 = coordinates(4);
  d = SubspaceDrift(*backend, ConstTensor::F32(e0.data(), kD, kK),
                    ConstTensor::F32(e8.data(), kD, kK));
  ASSERT_TRUE(d.ok());
  EXPECT_DOUBLE_EQ(*d, 1.0);
  d = SubspaceDrift(*backend, ConstTensor::F32(e0.data(), kD, kK),
                    ConstTensor::F32(e4.data(), kD, kK));
  ASSERT_TRUE(d.ok());
  EXPECT_NEAR(*d, std::sqrt(0.5), 1e-7);

  // A small drift, measured without cancellation: column 0 tilts by 1e-3 rad towards e_63's part
  // orthogonal to U (1 - |U^T V|^2 / k in float would read ~1e-4 for identical matrices).
  const std::vector<double> e = UnitOrthogonalTo(u, kD, kK, kD - 1);
  const double theta = 1e-3;
  std::vector<float> tilted = u;
  for (int64_t i = 0; i < kD; ++i) {
    tilted[i * kK] = static_cast<float>(std::cos(theta) * u[i * kK] + std::sin(theta) * e[i]);
  }
  d = SubspaceDrift(*backend, ut, ConstTensor::F32(tilted.data(), kD, kK));
  ASSERT_TRUE(d.ok());
  EXPECT_NEAR(*d, std::sin(theta) / std::sqrt(double{kK}), 2e-6);

  // Shapes that differ are the caller's error.
  EXPECT_EQ(SubspaceDrift(*backend, ut, ConstTensor::F32(u.data(), kD, kK - 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- link goodput ----

TEST(LinkGoodputTest, CountsBusyTimeOnly) {
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  LinkGoodput g;
  EXPECT_FALSE(g.EndStep(t0, 0).goodput.has_value());  // never busy
  // 1000 bytes acknowledged within 1 s, then 3000 bytes in 1 s, with idle time around them.
  g.Handed(t0, 600);
  g.Handed(t0 + absl::Milliseconds(200), 400);
  EXPECT_TRUE(g.busy());
  g.Drained(t0 + absl::Seconds(1));
  EXPECT_FALSE(g.busy());
  g.Drained(t0 + absl::Seconds(2));  // already idle: no-op
  g.Handed(t0 + absl::Seconds(5), 3000);
  g.Drained(t0 + absl::Seconds(6));
  LinkGoodput::Step s = g.EndStep(t0 + absl::Seconds(20), 0);
  EXPECT_EQ(s.bytes_handed, 4000);
  ASSERT_TRUE(s.goodput.has_value());
  EXPECT_DOUBLE_EQ(*s.goodput, 4000.0 / 2.0);

  // A busy period across the end of a step: 4000 handed, 2000 still queued after 1 s.
  g.Handed(t0 + absl::Seconds(30), 4000);
  s = g.EndStep(t0 + absl::Seconds(31), 2000);
  EXPECT_EQ(s.bytes_handed, 4000);
  ASSERT_TRUE(s.goodput.has_value());
  EXPECT_DOUBLE_EQ(*s.goodput, 2000.0);
  EXPECT_TRUE(g.busy());
  // The rest drains 0.5 s into the next step, which hands nothing. Half a second is under the
  // window: the step before joins it (4000 bytes in 1.5 s).
  g.Drained(t0 + absl::Seconds(31) + absl::Milliseconds(500));
  s = g.EndStep(t0 + absl::Seconds(40), 0);
  EXPECT_EQ(s.bytes_handed, 0);
  ASSERT_TRUE(s.goodput.has_value());
  EXPECT_DOUBLE_EQ(*s.goodput, 4000.0 / 1.5);
  // An idle step changes nothing; a fast step of 2 s fills the window alone.
  s = g.EndStep(t0 + absl::Seconds(50), 0);
  ASSERT_TRUE(s.goodput.has_value());
  EXPECT_DOUBLE_EQ(*s.goodput, 4000.0 / 1.5);
  g.Handed(t0 + absl::Seconds(60), 50000);
  g.Drained(t0 + absl::Seconds(62));
  s = g.EndStep(t0 + absl::Seconds(70), 0);
  EXPECT_DOUBLE_EQ(*s.goodput, 25000.0);
}

// The wait for the last acknowledgement is not link time: 3 bursts of 1000 bytes, each acked
// 10 ms after it was handed over with an ack latency of 6 ms, took 3 x 4 ms; a burst within the
// latency takes none (its bytes still count); a step of such bursts alone measures nothing.
TEST(LinkGoodputTest, TheAckLatencyIsNotBusyTime) {
  const absl::Time t0 = absl::FromUnixSeconds(1000);
  const absl::Duration latency = absl::Milliseconds(6);
  LinkGoodput g;
  for (int i = 0; i < 3; ++i) {
    const absl::Time at = t0 + absl::Milliseconds(100 * i);
    g.Handed(at, 1000);
    g.Drained(at + absl::Milliseconds(10), latency);
  }
  g.Handed(t0 + absl::Seconds(1), 500);
  g.Drained(t0 + absl::Seconds(1) + absl::Milliseconds(5), latency);
  LinkGoodput::Step s = g.EndStep(t0 + absl::Seconds(2), 0);
  ASSERT_TRUE(s.goodput.has_value());
  EXPECT_NEAR(*s.goodput, 3500.0 / 0.012, 1e-6);

  LinkGoodput fast;
  fast.Handed(t0, 100);
  fast.Drained(t0 + absl::Milliseconds(5), latency);
  s = fast.EndStep(t0 + absl::Seconds(1), 0);
  EXPECT_EQ(s.bytes_handed, 100);
  EXPECT_FALSE(s.goodput.has_value());
}

// ---- the engines' gauges ----

// A microbatch through a FIXED pair by hand, h_hat and dh kept: the reference for the gauges.
struct Exchange {
  std::vector<float> h_hat, dh;
};

Exchange RunMicrobatch(Pair& pair, uint64_t step, uint32_t mb, const std::vector<float>& h,
                       const std::vector<float>& g, int64_t n) {
  const int64_t d = Stream::kD;
  Exchange x;
  std::vector<int32_t> tokens(n, 1);
  auto out = pair.up().EncodeForward(step, mb, ConstTensor::F32(h.data(), n, d), tokens.data());
  EXPECT_TRUE(out.ok()) << out.status();
  if (!out.ok()) return x;
  std::vector<v1::Frame> frames;
  EXPECT_TRUE(pair.ToDownstream(*out, &frames).ok());
  EXPECT_EQ(frames.size(), 1u);
  x.h_hat.resize(n * d);
  EXPECT_TRUE(pair.down().DecodeForward(frames.at(0), Tensor::F32(x.h_hat.data(), n, d)).ok());
  auto back = pair.down().EncodeBackward(step, mb, ConstTensor::F32(g.data(), n, d));
  EXPECT_TRUE(back.ok()) << back.status();
  if (!back.ok()) return x;
  x.dh.resize(n * d);
  EXPECT_TRUE(pair.up().DecodeBackward(back->frame(), Tensor::F32(x.dh.data(), n, d)).ok());
  return x;
}

// FIXED with int8 both ways (U is the seeded one, f32): the forward gauges equal the error of
// what the downstream decodes, the backward ones what the upstream decodes, computed here from
// the decoded tensors with a naive GEMM.
TEST(EngineHealthTest, GaugesMatchWhatThePeerDecodes) {
  v1::BoundaryConfig config = Config(v1::ROLE_UPSTREAM, v1::METHOD_FIXED, v1::CODEC_INT8);
  config.set_backward_codec(v1::CODEC_INT8);
  Pair pair(config);
  const int64_t d = Stream::kD, k = 32, n = 128;
  const std::vector<float> u = SeededOrthonormal(d, k, config.seed());
  Stream stream(3);
  double h2 = 0, err2 = 0, z2 = 0, code2 = 0, g2 = 0, gz2 = 0, gcode2 = 0;
  for (uint32_t mb = 0; mb < 3; ++mb) {
    std::vector<float> h;
    std::vector<int32_t> tokens;
    stream.Next(n, &h, &tokens);
    const std::vector<float> g = Gaussian(n * d, 100 + mb);
    const Exchange x = RunMicrobatch(pair, 1, mb, h, g, n);
    ASSERT_FALSE(x.dh.empty());
    for (int64_t i = 0; i < n * d; ++i) {
      h2 += double{h[i]} * h[i];
      err2 += (double{h[i]} - x.h_hat[i]) * (double{h[i]} - x.h_hat[i]);
      g2 += double{g[i]} * g[i];
    }
    // FIXED: h_hat = zq U^T, so zq = h_hat U; likewise gzq = dh U.
    const std::vector<double> z = MatMul(h.data(), u.data(), n, d, k);
    const std::vector<double> zq = MatMul(x.h_hat.data(), u.data(), n, d, k);
    const std::vector<double> gz = MatMul(g.data(), u.data(), n, d, k);
    const std::vector<double> gzq = MatMul(x.dh.data(), u.data(), n, d, k);
    z2 += Sum2(z);
    gz2 += Sum2(gz);
    for (int64_t i = 0; i < n * k; ++i) {
      code2 += (z[i] - zq[i]) * (z[i] - zq[i]);
      gcode2 += (gz[i] - gzq[i]) * (gz[i] - gzq[i]);
    }
  }
  ASSERT_TRUE(pair.CloseStep(1).ok());
  const v1::BoundaryStats up = pair.up().stats(), down = pair.down().stats();
  EXPECT_NEAR(up.forward_relative_error(), std::sqrt(err2 / h2), 1e-3 * std::sqrt(err2 / h2));
  EXPECT_NEAR(up.forward_subspace_energy_share(), z2 / h2, 1e-4);
  EXPECT_NEAR(up.forward_code_relative_error(), std::sqrt(code2 / z2), 1e-3);
  EXPECT_NEAR(down.gradient_outside_energy_share(), (g2 - gz2) / g2, 1e-4);
  EXPECT_NEAR(down.backward_code_relative_error(), std::sqrt(gcode2 / gz2), 1e-3);
  // The stream's signal lies in a rank-32 subspace that the seeded U does not track; an N(0, 1)
  // gradient has k/d = 1/16 of its energy in span(U); int8 keeps a few tenths of a percent.
  EXPECT_GT(up.forward_relative_error(), 0.5);
  EXPECT_NEAR(down.gradient_outside_energy_share(), 1.0 - 1.0 / 16, 0.02);
  EXPECT_GT(up.forward_code_relative_error(), 1e-4);
  EXPECT_LT(up.forward_code_relative_error(), 0.02);
  EXPECT_LT(down.backward_code_relative_error(), 0.02);
  // Each side reports its own direction only; FIXED publishes no new U.
  EXPECT_EQ(up.gradient_outside_energy_share(), 0.0);
  EXPECT_EQ(down.forward_relative_error(), 0.0);
  EXPECT_EQ(up.subspace_drift(), 0.0);
  EXPECT_EQ(up.rvq_perplexity(), 0.0);
}

// A rank-k h inside span(U) arrives with only the bf16 rounding of its codes; a full-rank one in
// the next step loses all but k/d of its energy. The gauges describe each step on its own.
TEST(EngineHealthTest, RankKActivationInsideUHasNoProjectionError) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_FIXED, v1::CODEC_BF16));
  const int64_t d = Stream::kD, k = 32, n = 64;
  const std::vector<float> u = SeededOrthonormal(d, k, 1234);
  std::unique_ptr<Backend> backend = MakeCpuBackend();
  for (uint32_t mb = 0; mb < 4; ++mb) {
    const std::vector<float> c = Gaussian(n * k, 7 + mb);
    std::vector<float> h(n * d);
    ASSERT_TRUE(backend
                    ->Lift(ConstTensor::F32(c.data(), n, k), ConstTensor::F32(u.data(), d, k),
                           Tensor::F32(h.data(), n, d))
                    .ok());
    RunMicrobatch(pair, 1, mb, h, Gaussian(n * d, 50 + mb), n);
  }
  ASSERT_TRUE(pair.CloseStep(1).ok());
  v1::BoundaryStats up = pair.up().stats();
  EXPECT_LT(up.forward_relative_error(), 0.005);  // bf16 keeps 8 bits: ~0.1 % relative
  EXPECT_GT(up.forward_subspace_energy_share(), 0.9999);
  EXPECT_NEAR(up.forward_code_relative_error(), up.forward_relative_error(), 1e-4);

  for (uint32_t mb = 0; mb < 4; ++mb) {
    RunMicrobatch(pair, 2, mb, Gaussian(n * d, 20 + mb), Gaussian(n * d, 60 + mb), n);
  }
  ASSERT_TRUE(pair.CloseStep(2).ok());
  up = pair.up().stats();
  EXPECT_NEAR(up.forward_subspace_energy_share(), 1.0 / 16, 0.015);
  EXPECT_NEAR(up.forward_relative_error(), std::sqrt(1.0 - 1.0 / 16), 0.01);
}

// RVQ fitted on activations that take 16 distinct values uses about 16 of the 256 codes of a
// level (identical rows get identical codes, up to the ulps of the projection's GEMM); Gaussian
// activations spread over the codebook. The first step travels as bf16 (the
// codebooks are fitted at its end), so it has no code usage yet.
TEST(EngineHealthTest, RvqOnClusteredDataShowsDeadCodes) {
  const int64_t d = Stream::kD, n = 256;
  for (bool clustered : {true, false}) {
    SCOPED_TRACE(clustered ? "16 clusters" : "Gaussian");
    v1::BoundaryConfig config = Config(v1::ROLE_UPSTREAM, v1::METHOD_FIXED, v1::CODEC_RVQ);
    config.set_rvq_levels(2);
    Pair pair(config);
    const std::vector<float> prototypes = Gaussian(16 * d, 11);
    uint64_t seed = 1000;
    for (uint64_t step = 1; step <= 2; ++step) {
      for (uint32_t mb = 0; mb < 4; ++mb) {
        std::vector<float> h = Gaussian(n * d, ++seed);
        if (clustered) {
          for (int64_t r = 0; r < n; ++r) {
            std::copy_n(prototypes.begin() + (r % 16) * d, d, h.begin() + r * d);
          }
        }
        RunMicrobatch(pair, step, mb, h, Gaussian(n * d, ++seed), n);
      }
      ASSERT_TRUE(pair.CloseStep(step).ok());
      const v1::BoundaryStats up = pair.up().stats();
      if (step == 1) {
        EXPECT_EQ(up.rvq_perplexity(), 0.0);
        EXPECT_EQ(up.rvq_perplexity_per_level_size(), 0);
        continue;
      }
      ASSERT_EQ(up.rvq_dead_code_share_per_level_size(), 2);
      ASSERT_EQ(up.rvq_perplexity_per_level_size(), 2);
      EXPECT_EQ(up.rvq_dead_code_share(),
                std::max(up.rvq_dead_code_share_per_level(0), up.rvq_dead_code_share_per_level(1)));
      EXPECT_EQ(up.rvq_perplexity(),
                std::min(up.rvq_perplexity_per_level(0), up.rvq_perplexity_per_level(1)));
      if (clustered) {
        EXPECT_GE(up.rvq_dead_code_share_per_level(0), 0.9);
        EXPECT_GE(up.rvq_dead_code_share_per_level(1), 0.9);
        EXPECT_NEAR(up.rvq_perplexity_per_level(0), 16.0, 1.0);
      } else {
        // Fitted on 4 rows a centroid, a third of them sit where fresh rows rarely fall (measured:
        // 0.36 dead, perplexity 114); far from the clustered case either way.
        EXPECT_LT(up.rvq_dead_code_share(), 0.5);
        EXPECT_GT(up.rvq_perplexity(), 80.0);
      }
    }
  }
}

// The step that fits the codebooks publishes them (a new version) with U unchanged: drift 0, and
// its dictionary bytes; the downstream applies that delta before its next step. MAPL moves U a
// little each step.
TEST(EngineHealthTest, DriftAndDictionaryBytesOfTheStep) {
  const int64_t d = Stream::kD, n = 256;
  {
    Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_FIXED, v1::CODEC_RVQ));
    Stream stream(5);
    for (uint64_t step = 1; step <= 2; ++step) {
      const uint64_t sent_before = pair.up().stats().dictionary_bytes_sent();
      for (uint32_t mb = 0; mb < 4; ++mb) {
        std::vector<float> h;
        std::vector<int32_t> tokens;
        stream.Next(n, &h, &tokens);
        RunMicrobatch(pair, step, mb, h, Gaussian(n * d, step * 10 + mb), n);
      }
      ASSERT_TRUE(pair.CloseStep(step).ok());
      const v1::BoundaryStats up = pair.up().stats(), down = pair.down().stats();
      EXPECT_EQ(up.dictionary_bytes_last_step(), up.dictionary_bytes_sent() - sent_before);
      EXPECT_EQ(up.subspace_drift(), 0.0);
      if (step == 1) {
        EXPECT_GT(up.dictionary_bytes_last_step(), 256u * 32 * 4);  // a level's centroids at least
        EXPECT_EQ(down.dictionary_bytes_last_step(), 0u);  // the delta arrives after its Step
        EXPECT_GT(up.dictionary_version(), 0u);
      } else {
        EXPECT_EQ(down.dictionary_bytes_last_step(),
                  down.dictionary_bytes_received() - up.dictionary_bytes_last_step());
      }
    }
  }
  {
    Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
    Stream stream(6);
    std::vector<float> h;
    std::vector<int32_t> tokens;
    double err2 = 0, norm2 = 0;
    for (uint64_t step = 1; step <= 3; ++step) {
      for (uint32_t mb = 0; mb < 2; ++mb) {
        stream.Next(n, &h, &tokens);
        ASSERT_TRUE(pair.Microbatch(step, mb, h, tokens, &err2, &norm2).ok());
      }
      ASSERT_TRUE(pair.CloseStep(step).ok());
    }
    const v1::BoundaryStats up = pair.up().stats();
    EXPECT_GT(up.subspace_drift(), 1e-4);
    EXPECT_LT(up.subspace_drift(), 0.5);
    EXPECT_GT(up.forward_relative_error(), 0.0);
  }
}

TEST(EngineHealthTest, DenseLeavesTheCodecGaugesAtZero) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_DENSE, v1::CODEC_UNSPECIFIED));
  const int64_t n = 32, d = Stream::kD;
  RunMicrobatch(pair, 1, 0, Gaussian(n * d, 1), Gaussian(n * d, 2), n);
  ASSERT_TRUE(pair.CloseStep(1).ok());
  const v1::BoundaryStats up = pair.up().stats(), down = pair.down().stats();
  EXPECT_EQ(up.forward_relative_error(), 0.0);
  EXPECT_EQ(up.forward_subspace_energy_share(), 0.0);
  EXPECT_EQ(down.gradient_outside_energy_share(), 0.0);
  EXPECT_EQ(up.dictionary_bytes_last_step(), 0u);
}

// ---- the worker's compute and link seconds ----

// Two workers of a METHOD_DENSE boundary (d = 512) over a loopback link whose upstream sends at
// `rate` bytes a second; the upstream worker takes `up_options`.
struct CappedWorkers {
  static constexpr int64_t kD = 512;
  CappedWorkers(double rate, const WorkerOptions& up_options) : backend(MakeCpuBackend()) {
    namespace tp = testing_peer;
    auto config = [](v1::Role role) {
      v1::BoundaryConfig c;
      c.set_id(tp::kBoundary);
      c.set_role(role);
      c.set_d(kD);
      c.set_k(32);
      c.set_method(v1::METHOD_DENSE);
      c.set_vocab(100);
      return c;
    };
    up = std::make_unique<BoundaryWorker>(
        Engine::Create(config(v1::ROLE_UPSTREAM), backend.get()).value(), up_options,
        CodecTimers{});
    down = std::make_unique<BoundaryWorker>(
        Engine::Create(config(v1::ROLE_DOWNSTREAM), backend.get()).value(), WorkerOptions{},
        CodecTimers{});
    PeerLinkOptions dialer = tp::DialerSide();
    dialer.send_rate_bytes_per_second = rate;
    BoundaryWorker* u = up.get();
    BoundaryWorker* w = down.get();
    link = tp::Connect([w](v1::PeerMessage m) { w->OnPeerMessage(std::move(m)); },
                       [u](v1::PeerMessage m) { u->OnPeerMessage(std::move(m)); }, tp::ServerSide(),
                       dialer);
    up->Start(link.up.get());
    down->Start(link.down);
  }

  std::unique_ptr<Backend> backend;
  testing_peer::Pair link;  // declared before the workers: they stop before it goes
  std::unique_ptr<BoundaryWorker> up, down;
};

// Dense frames of 64 KiB each over a link capped at 1 MB/s: the goodput is the cap (not the
// average over the idle second between the steps), the link takes ~65 ms a microbatch and the
// codec a small fraction of that.
TEST(WorkerHealthTest, LinkSecondsFollowTheRateCap) {
  namespace tp = testing_peer;
  constexpr int64_t kD = CappedWorkers::kD, kN = 64, kMicrobatches = 6;
  constexpr double kRate = 1e6;
  CappedWorkers workers(kRate, WorkerOptions{});
  std::unique_ptr<BoundaryWorker>& up = workers.up;
  std::unique_ptr<BoundaryWorker>& down = workers.down;
  tp::Pair& link = workers.link;

  const std::vector<float> h = Gaussian(kN * kD, 1);
  for (uint64_t step = 1; step <= 2; ++step) {
    if (step == 2) absl::SleepFor(absl::Seconds(1));  // idle: must not dilute the goodput
    for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
      ASSERT_TRUE(up->Send(step, mb, ConstTensor::F32(h.data(), kN, kD), nullptr, false).ok());
    }
    // Step 1 closes once its frames are delivered; step 2 right away, most of it still queued
    // behind the cap (its window then reaches back into step 1).
    if (step == 1) {
      ASSERT_TRUE(up->Flush(absl::Now() + tp::kWait));
      ASSERT_TRUE(link.up->Drain(tp::kWait).ok());
    }
    v1::BoundaryStats s;
    ASSERT_TRUE(up->Step(step, absl::Now() + tp::kWait, tp::kWait, &s).ok());
    SCOPED_TRACE(absl::StrCat("step ", step));
    EXPECT_GT(s.wire_goodput_bytes_per_second(), 0.4 * kRate);
    EXPECT_LT(s.wire_goodput_bytes_per_second(), 2.5 * kRate);
    const double frame_bytes = kN * kD * 2;
    EXPECT_NEAR(s.wire_seconds_per_microbatch(), frame_bytes / s.wire_goodput_bytes_per_second(),
                0.05 * frame_bytes / s.wire_goodput_bytes_per_second());
    EXPECT_GT(s.compute_seconds_per_microbatch(), 0.0);
    EXPECT_LT(s.compute_seconds_per_microbatch(), s.wire_seconds_per_microbatch());
    EXPECT_EQ(s.wire_seconds_per_microbatch(), up->stats().wire_seconds_per_microbatch());
  }
  // The worker's default ack delay is the peer link's.
  EXPECT_EQ(WorkerOptions{}.peer_ack_delay, PeerLinkOptions{}.ack_delay);

  // Everything arrives; the downstream decodes every frame.
  ASSERT_TRUE(link.up->Drain(tp::kWait).ok());
  const absl::Time deadline = absl::Now() + tp::kWait;
  while (down->stats().frames_received() < 2 * kMicrobatches && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_EQ(down->stats().frames_received(), 2u * kMicrobatches);
  v1::BoundaryStats s;
  ASSERT_TRUE(down->Step(2, absl::Now() + tp::kWait, tp::kWait, &s).ok());
  EXPECT_GT(s.compute_seconds_per_microbatch(), 0.0);  // decode time of the frames it got
  EXPECT_EQ(s.wire_seconds_per_microbatch(), 0.0);     // it sent nothing

  up->Stop(absl::Now());
  down->Stop(absl::Now());
  link.up->Close();
  link.server->Shutdown();
}

// The encoder's bound on the transport's queue is time on the link once the goodput is measured,
// capped by max_transport_queue_bytes, which alone bounds it before.
TEST(WorkerHealthTest, TransportQueueLimitIsSecondsOfGoodputCappedInBytes) {
  WorkerOptions o;
  o.max_transport_queue_bytes = 1 << 20;
  o.max_transport_queue_time = absl::Seconds(4);
  EXPECT_EQ(BoundaryWorker::TransportQueueLimit(o, 0.0), 1 << 20);
  EXPECT_EQ(BoundaryWorker::TransportQueueLimit(o, 1000.0), 4000);
  EXPECT_EQ(BoundaryWorker::TransportQueueLimit(o, 1e9), 1 << 20);
  EXPECT_EQ(BoundaryWorker::TransportQueueLimit(o, 1e-6), 1);  // always room for one frame
  // The default: 256 MiB is 107 s at 20 Mbit/s; 4 s of it is 10 MB.
  EXPECT_EQ(BoundaryWorker::TransportQueueLimit(WorkerOptions{}, 2.5e6), 10'000'000);
}

// Over a link capped at 1 MB/s, once the goodput is measured the encoder keeps about
// max_transport_queue_time of it in the transport (200 KB here), not max_transport_queue_bytes.
TEST(WorkerHealthTest, EncoderKeepsTheTransportQueueWithinItsTime) {
  namespace tp = testing_peer;
  constexpr int64_t kD = CappedWorkers::kD, kN = 64;
  constexpr double kRate = 1e6;
  constexpr int64_t kFrameBytes = kN * kD * 2;  // dense bf16
  WorkerOptions options;
  options.max_transport_queue_time = absl::Milliseconds(200);
  CappedWorkers workers(kRate, options);
  std::unique_ptr<BoundaryWorker>& up = workers.up;
  std::unique_ptr<BoundaryWorker>& down = workers.down;
  tp::Pair& link = workers.link;
  EXPECT_EQ(up->stats().transport_queue_limit_bytes(), options.max_transport_queue_bytes);

  const std::vector<float> h = Gaussian(kN * kD, 1);
  for (uint32_t mb = 0; mb < 6; ++mb) {
    ASSERT_TRUE(up->Send(1, mb, ConstTensor::F32(h.data(), kN, kD), nullptr, false).ok());
  }
  ASSERT_TRUE(up->Flush(absl::Now() + tp::kWait));
  ASSERT_TRUE(link.up->Drain(tp::kWait).ok());
  v1::BoundaryStats s;
  ASSERT_TRUE(up->Step(1, absl::Now() + tp::kWait, tp::kWait, &s).ok());
  ASSERT_GT(s.wire_goodput_bytes_per_second(), 0.4 * kRate);
  ASSERT_LT(s.wire_goodput_bytes_per_second(), 2.5 * kRate);
  const int64_t limit =
      BoundaryWorker::TransportQueueLimit(options, s.wire_goodput_bytes_per_second());
  EXPECT_EQ(s.transport_queue_limit_bytes(), static_cast<uint64_t>(limit));

  // 12 frames, 786 KB: with the byte cap alone all of them would wait in the transport at once.
  int64_t most = 0;
  for (uint32_t mb = 0; mb < 12; ++mb) {
    ASSERT_TRUE(up->Send(2, mb, ConstTensor::F32(h.data(), kN, kD), nullptr, false).ok());
    most = std::max<int64_t>(most, link.up->stats().queued_bytes());
  }
  while (!up->Flush(absl::Now() + absl::Milliseconds(10))) {
    most = std::max<int64_t>(most, link.up->stats().queued_bytes());
  }
  EXPECT_GT(most, kFrameBytes);
  // The limit, plus the frame handed over when the queue went below it (and message headers).
  EXPECT_LT(most, limit + kFrameBytes + 4096);

  up->Stop(absl::Now());
  down->Stop(absl::Now());
  link.up->Close();
  link.server->Shutdown();
}

}  // namespace
}  // namespace mapl
