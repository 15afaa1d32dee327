// RVQ of every backend against naive references: greedy encode equals brute force level by level,
// beam search is never worse than greedy, decode, fitting quality, streaming update, and buffers
// of the wrong size. On the CPU backend the encode tests run once per distance kernel (generic,
// AVX2, AVX-512); RvqCpuKernels compares those kernels directly and is CPU-only.
#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/rvq_distance.h"
#include "kernels/registry.h"
#include "tests/kernels/backend_test.h"

namespace mapl {
namespace {

std::vector<float> DecayingGaussian(int64_t n, int dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> x(n * dim);
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < dim; ++j) x[i * dim + j] = g(rng) * std::exp(-j / 16.f);
  return x;
}

double Dist2(const float* a, const float* b, int dim) {
  double s = 0;
  for (int j = 0; j < dim; ++j) s += (double(a[j]) - b[j]) * (double(a[j]) - b[j]);
  return s;
}

double Err(const std::vector<float>& x, const std::vector<float>& y) {
  double e = 0, t = 0;
  for (size_t i = 0; i < x.size(); ++i) e += (x[i] - y[i]) * (x[i] - y[i]), t += x[i] * x[i];
  return e / t;
}

}  // namespace

namespace {

// A backend, and for the CPU backend which of its nearest-centroid kernels to force.
struct RvqCase {
  std::string backend;
  cpu::DistanceKernel kernel = cpu::DistanceKernel::kAuto;
};

// Test names and ctest output show the case's name instead of its bytes.
std::string RvqCaseName(const RvqCase& c) {
  if (c.backend != "cpu") return c.backend;
  return c.backend + "_" + cpu::DistanceKernelName(c.kernel);
}
void PrintTo(const RvqCase& c, std::ostream* os) { *os << RvqCaseName(c); }

// Every registered backend; the CPU backend once per distance kernel.
std::vector<RvqCase> RvqCases() {
  std::vector<RvqCase> cases;
  for (const std::string& name : BackendNames()) {
    if (name != "cpu") {
      cases.push_back({name});
      continue;
    }
    for (cpu::DistanceKernel k : {cpu::DistanceKernel::kGeneric, cpu::DistanceKernel::kAvx2,
                                  cpu::DistanceKernel::kAvx512}) {
      cases.push_back({name, k});
    }
  }
  return cases;
}

class RvqTest : public ::testing::TestWithParam<RvqCase> {
 protected:
  void SetUp() override {
    const RvqCase& c = GetParam();
    if (c.kernel > cpu::BestDistanceKernel()) GTEST_SKIP() << "this CPU lacks the kernel";
    absl::StatusOr<std::unique_ptr<Backend>> be = MakeBackend(c.backend);
    if (be.status().code() == absl::StatusCode::kUnavailable) {
      GTEST_SKIP() << "backend " << c.backend << " cannot run here: " << be.status();
    }
    ASSERT_TRUE(be.ok()) << be.status();
    be_ = *std::move(be);
    old_ = cpu::SetDistanceKernelForTesting(c.kernel);
  }
  void TearDown() override { cpu::SetDistanceKernelForTesting(old_); }
  std::unique_ptr<const Backend> be_;
  cpu::DistanceKernel old_ = cpu::DistanceKernel::kAuto;
};

TEST_P(RvqTest, GreedyEncodeEqualsBruteForceLevelByLevel) {
  const int dim = 24, n = 1000;  // dim not a multiple of 16; n not a multiple of the tile
  std::vector<float> x = DecayingGaussian(n, dim, 1);
  RvqFitOptions opt;
  opt.levels = 3;
  opt.codebook_size = 200;  // not a multiple of 64: exercises padding
  opt.kmeans_iterations = 4;
  auto cb = be_->RvqFit(ConstTensor::F32(x.data(), n, dim), opt);
  ASSERT_TRUE(cb.ok()) << cb.status();
  std::vector<uint8_t> codes(n * opt.levels);
  ASSERT_TRUE(
      be_->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 1, absl::MakeSpan(codes), {}).ok());
  int64_t exact = 0;
  for (int i = 0; i < n; ++i) {
    std::vector<double> r(x.begin() + i * dim, x.begin() + (i + 1) * dim);
    for (int l = 0; l < opt.levels; ++l) {
      std::vector<float> rf(r.begin(), r.end());
      int arg = 0;
      double bestd = 1e300;
      for (int c = 0; c < opt.codebook_size; ++c) {
        const double d = Dist2(rf.data(), cb->level(l).data() + c * dim, dim);
        if (d < bestd) bestd = d, arg = c;
      }
      const int got = codes[i * opt.levels + l];
      const double got_d = Dist2(rf.data(), cb->level(l).data() + got * dim, dim);
      // The chosen centroid is the nearest one; an index may differ only on an exact tie up to
      // fp32 rounding of the distance.
      EXPECT_LE(got_d, bestd + 1e-5 * (1 + bestd)) << "row " << i << " level " << l;
      exact += (got == arg);
      for (int j = 0; j < dim; ++j) r[j] -= cb->level(l)[got * dim + j];
    }
  }
  EXPECT_GE(exact, n * opt.levels - 2);
}

TEST_P(RvqTest, BeamNeverWorseThanGreedyAndDecodes) {
  const int dim = 16, n = 600;
  std::vector<float> x = DecayingGaussian(n, dim, 2);
  RvqFitOptions opt;
  opt.levels = 4;
  opt.codebook_size = 64;
  auto cb = be_->RvqFit(ConstTensor::F32(x.data(), n, dim), opt);
  ASSERT_TRUE(cb.ok()) << cb.status();
  std::vector<uint8_t> greedy(n * 4), beam(n * 4);
  ASSERT_TRUE(
      be_->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 1, absl::MakeSpan(greedy), {}).ok());
  ASSERT_TRUE(
      be_->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 8, absl::MakeSpan(beam), {}).ok());
  std::vector<float> yg(n * dim), yb(n * dim);
  ASSERT_TRUE(be_->RvqDecode(*cb, greedy, {}, Tensor::F32(yg.data(), n, dim)).ok());
  ASSERT_TRUE(be_->RvqDecode(*cb, beam, {}, Tensor::F32(yb.data(), n, dim)).ok());
  int better = 0;
  for (int i = 0; i < n; ++i) {
    const double eg = Dist2(x.data() + i * dim, yg.data() + i * dim, dim);
    const double eb = Dist2(x.data() + i * dim, yb.data() + i * dim, dim);
    EXPECT_LE(eb, eg + 1e-6) << "row " << i;
    better += eb < eg - 1e-9;
    // Decode is the sum of the chosen centroids.
    for (int j = 0; j < dim; ++j) {
      double s = 0;
      for (int l = 0; l < 4; ++l) s += cb->level(l)[beam[i * 4 + l] * dim + j];
      ASSERT_NEAR(yb[i * dim + j], s, 1e-5);
    }
  }
  EXPECT_GT(better, 0);  // beam search does find better codes on some rows
  EXPECT_LT(Err(x, yb), Err(x, yg));
}

TEST_P(RvqTest, FitReducesErrorWithEveryLevel) {
  const int dim = 32, n = 4096;
  std::vector<float> x = DecayingGaussian(n, dim, 3);
  double prev = 1.0;
  for (int levels = 1; levels <= 4; ++levels) {
    RvqFitOptions opt;
    opt.levels = levels;
    auto cb = be_->RvqFit(ConstTensor::F32(x.data(), n, dim), opt);
    ASSERT_TRUE(cb.ok()) << cb.status();
    std::vector<uint8_t> codes(n * levels);
    std::vector<float> y(n * dim);
    ASSERT_TRUE(
        be_->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 1, absl::MakeSpan(codes), {}).ok());
    ASSERT_TRUE(be_->RvqDecode(*cb, codes, {}, Tensor::F32(y.data(), n, dim)).ok());
    const double e = Err(x, y);
    EXPECT_LT(e, prev * 0.9) << levels << " levels";
    prev = e;
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, RvqTest, ::testing::ValuesIn(RvqCases()),
                         [](const auto& info) { return RvqCaseName(info.param); });

// CPU-only: the CPU backend's own nearest-centroid kernels, compared directly. Every fused kernel
// picks the same centroid as the generic one (up to near-ties), for every remainder-tile size, and
// breaks exact ties towards the smaller index, padding included.
TEST(RvqCpuKernels, FusedAndGenericAgree) {
  const int dim = 64, k = 200;  // 200: the last 64-block is partly padding
  std::vector<float> c = DecayingGaussian(k, dim, 5);
  // Exact ties: centroid 190 (in the padded block) duplicates centroid 3, 199 duplicates 150.
  std::copy(c.begin() + 3 * dim, c.begin() + 4 * dim, c.begin() + 190 * dim);
  std::copy(c.begin() + 150 * dim, c.begin() + 151 * dim, c.begin() + 199 * dim);
  cpu::PreparedLevel lv = cpu::PrepareLevel(c.data(), k, dim);
  auto old = cpu::SetDistanceKernelForTesting(cpu::DistanceKernel::kGeneric);
  for (int n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 997}) {
    std::vector<float> x = DecayingGaussian(n, dim, 4 + n);
    // Rows that sit exactly on a duplicated centroid must resolve to the smaller index.
    std::copy(c.begin() + 190 * dim, c.begin() + 191 * dim, x.begin());
    if (n > 1) std::copy(c.begin() + 199 * dim, c.begin() + 200 * dim, x.begin() + dim);
    std::vector<int32_t> a(n), b(n);
    std::vector<float> sa(n), sb(n);
    cpu::SetDistanceKernelForTesting(cpu::DistanceKernel::kGeneric);
    cpu::NearestCentroids(x.data(), n, lv, a.data(), sa.data());
    EXPECT_EQ(a[0], 3) << "generic, n=" << n;
    if (n > 1) {
      EXPECT_EQ(a[1], 150) << "generic, n=" << n;
    }
    for (auto kernel : {cpu::DistanceKernel::kAvx2, cpu::DistanceKernel::kAvx512}) {
      if (kernel > cpu::BestDistanceKernel()) continue;  // not on this CPU
      cpu::SetDistanceKernelForTesting(kernel);
      cpu::NearestCentroids(x.data(), n, lv, b.data(), sb.data());
      const char* name = cpu::DistanceKernelName(kernel);
      EXPECT_EQ(b[0], 3) << name << ", n=" << n;
      if (n > 1) {
        EXPECT_EQ(b[1], 150) << name << ", n=" << n;
      }
      for (int i = 0; i < n; ++i) {
        ASSERT_NEAR(sa[i], sb[i], 1e-4 * (1 + std::fabs(sa[i]))) << name << " row " << i;
        if (a[i] != b[i]) {
          // Only a near-tie may pick another index: its exact score must equal the best's.
          const double da = Dist2(x.data() + i * dim, c.data() + a[i] * dim, dim);
          const double db = Dist2(x.data() + i * dim, c.data() + b[i] * dim, dim);
          EXPECT_NEAR(da, db, 1e-4 * (1 + da)) << name << " row " << i;
        }
      }
    }
  }
  cpu::SetDistanceKernelForTesting(old);
}

// The rest runs over every backend with its default kernels.
class RvqBackendTest : public BackendTest {};

TEST_P(RvqBackendTest, RejectsOversizedRequestsBeforeAllocating) {
  const Backend* be = be_.get();
  std::vector<float> x = DecayingGaussian(300, 8, 9);
  RvqFitOptions opt;
  opt.levels = 2;
  opt.codebook_size = 16;
  auto cb = be->RvqFit(ConstTensor::F32(x.data(), 300, 8), opt);
  ASSERT_TRUE(cb.ok());
  std::vector<uint8_t> codes(300 * 2);
  EXPECT_EQ(be->RvqEncode(*cb, ConstTensor::F32(x.data(), 300, 8), kMaxRvqBeam + 1,
                          absl::MakeSpan(codes), {})
                .code(),
            absl::StatusCode::kInvalidArgument);
  opt.levels = 1 << 20;  // would be gigabytes of centroids
  EXPECT_EQ(be->RvqFit(ConstTensor::F32(x.data(), 300, 8), opt).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A shape whose element count overflows int64 is rejected, not read through a null pointer.
  EXPECT_EQ(be->RvqEncode(*cb, ConstTensor::F32(nullptr, int64_t{1} << 62, 8), 1,
                          absl::MakeSpan(codes), {})
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(RvqBackendTest, UpdateNeverPoisonsTheLearner) {
  const Backend* be = be_.get();
  std::vector<float> x = DecayingGaussian(512, 8, 10);
  RvqFitOptions opt;
  opt.levels = 2;
  opt.codebook_size = 16;
  auto cb = be->RvqFit(ConstTensor::F32(x.data(), 512, 8), opt);
  ASSERT_TRUE(cb.ok());
  RvqLearner learner = RvqLearner::FromCodebooks(*cb, 1);
  const std::vector<float> before = learner.codebooks.centroids;
  // Finite but huge: the EMA sums overflow float.
  std::vector<float> huge(512 * 8, 3e38f);
  auto st = be->RvqUpdate(&learner, ConstTensor::F32(huge.data(), 512, 8), RvqUpdateOptions{});
  EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(learner.codebooks.centroids, before);
  EXPECT_TRUE(be->RvqUpdate(&learner, ConstTensor::F32(x.data(), 512, 8), RvqUpdateOptions{}).ok());
}

TEST_P(RvqBackendTest, GainShapeRoundTripAndBf16) {
  const Backend* be = be_.get();
  const int dim = 16, n = 512;
  std::vector<float> x = DecayingGaussian(n, dim, 6);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < dim; ++j) x[i * dim + j] *= 1.f + (i % 7);  // varied norms
  RvqFitOptions opt;
  opt.levels = 2;
  opt.codebook_size = 64;
  opt.gain_shape = true;
  auto cb = be->RvqFit(ConstTensor::F32(x.data(), n, dim), opt);
  ASSERT_TRUE(cb.ok()) << cb.status();
  std::vector<uint8_t> codes(n * 2);
  std::vector<float> norms(n), y(n * dim);
  EXPECT_FALSE(
      be->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 1, absl::MakeSpan(codes), {}).ok());
  ASSERT_TRUE(be->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 1, absl::MakeSpan(codes),
                            absl::MakeSpan(norms))
                  .ok());
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(norms[i], std::sqrt(Dist2(x.data() + i * dim, std::vector<float>(dim).data(), dim)),
                1e-3 * norms[i]);
  }
  ASSERT_TRUE(be->RvqDecode(*cb, codes, norms, Tensor::F32(y.data(), n, dim)).ok());
  EXPECT_LT(Err(x, y), 0.5);
  // bf16 input and output.
  std::vector<bf16_t> xb(n * dim), yb(n * dim);
  FloatToBf16(x.data(), xb.data(), xb.size());
  ASSERT_TRUE(be->RvqEncode(*cb, ConstTensor::BF16(xb.data(), n, dim), 1, absl::MakeSpan(codes),
                            absl::MakeSpan(norms))
                  .ok());
  ASSERT_TRUE(be->RvqDecode(*cb, codes, norms, Tensor::BF16(yb.data(), n, dim)).ok());
  std::vector<float> y2(n * dim);
  Bf16ToFloat(yb.data(), y2.data(), y2.size());
  EXPECT_LT(Err(x, y2), 0.5);
}

TEST_P(RvqBackendTest, StreamingUpdateLearnsAndReseedsDeadCentroids) {
  const Backend* be = be_.get();
  const int dim = 16, n = 2048;
  // Start from codebooks fitted on a different distribution (shifted far away): most centroids
  // are dead on the new stream and must be re-seeded, and the error must fall.
  std::vector<float> old = DecayingGaussian(n, dim, 7);
  for (float& v : old) v += 5.f;
  RvqFitOptions opt;
  opt.levels = 2;
  opt.codebook_size = 64;
  auto cb = be->RvqFit(ConstTensor::F32(old.data(), n, dim), opt);
  ASSERT_TRUE(cb.ok());
  RvqLearner learner = RvqLearner::FromCodebooks(*cb, /*seed=*/1);
  RvqUpdateOptions up;
  up.decay = 0.9f;
  double first = 0, last = 0;
  int64_t reseeded = 0;
  for (int step = 0; step < 60; ++step) {
    std::vector<float> x = DecayingGaussian(n, dim, 100 + step);
    auto st = be->RvqUpdate(&learner, ConstTensor::F32(x.data(), n, dim), up);
    ASSERT_TRUE(st.ok()) << st.status();
    if (step == 0) first = st->relative_mse;
    last = st->relative_mse;
    reseeded += st->reseeded;
  }
  EXPECT_GT(reseeded, 0);
  EXPECT_LT(last, first * 0.5);
  EXPECT_LT(last, 0.6);
  ASSERT_TRUE(learner.codebooks.Validate().ok());
}

TEST_P(RvqBackendTest, RejectsBadInput) {
  const Backend* be = be_.get();
  const int dim = 8, n = 300;
  std::vector<float> x = DecayingGaussian(n, dim, 8);
  RvqFitOptions opt;
  opt.levels = 2;
  opt.codebook_size = 16;
  auto cb = be->RvqFit(ConstTensor::F32(x.data(), n, dim), opt);
  ASSERT_TRUE(cb.ok());
  std::vector<uint8_t> codes(n * 2);
  // Wrong dim.
  auto s =
      be->RvqEncode(*cb, ConstTensor::F32(x.data(), n * 2, dim / 2), 1, absl::MakeSpan(codes), {});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("x"), std::string::npos);
  // NaN.
  x[17] = std::nanf("");
  s = be->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 1, absl::MakeSpan(codes), {});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("non-finite"), std::string::npos);
  // Code out of range.
  codes.assign(n * 2, 0);
  codes[5] = 16;
  std::vector<float> y(n * dim);
  s = be->RvqDecode(*cb, codes, {}, Tensor::F32(y.data(), n, dim));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("out of range"), std::string::npos);
  // Too few rows to fit, bad levels, bad beam.
  opt.codebook_size = 256;
  EXPECT_EQ(be->RvqFit(ConstTensor::F32(x.data(), 100, dim), opt).status().code(),
            absl::StatusCode::kInvalidArgument);
  opt.levels = 0;
  EXPECT_FALSE(be->RvqFit(ConstTensor::F32(x.data(), n, dim), opt).ok());
  x[17] = 0;
  EXPECT_FALSE(
      be->RvqEncode(*cb, ConstTensor::F32(x.data(), n, dim), 0, absl::MakeSpan(codes), {}).ok());
}

// codes must hold exactly n * L bytes; norms exactly n floats with gain-shape codebooks and none
// without. Any other size is an INVALID_ARGUMENT naming the buffer, and nothing is written.
TEST_P(RvqBackendTest, WrongSpanSizeIsInvalidArgument) {
  const int dim = 8, n = 300, nl = 2;
  const std::vector<float> x = DecayingGaussian(n, dim, 11);
  const ConstTensor xt = ConstTensor::F32(x.data(), n, dim);
  RvqFitOptions opt;
  opt.levels = nl;
  opt.codebook_size = 16;
  auto plain = be_->RvqFit(xt, opt);
  ASSERT_TRUE(plain.ok()) << plain.status();
  opt.gain_shape = true;
  auto gain = be_->RvqFit(xt, opt);
  ASSERT_TRUE(gain.ok()) << gain.status();

  auto expect_invalid = [](const absl::Status& s, const std::string& name) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(s.message().rfind(name + ": expected ", 0), 0u) << s;
  };
  std::vector<uint8_t> codes(n * nl + 1, 99);
  std::vector<float> norms(n + 1, -1.f);
  auto codes_of = [&](int size) { return absl::MakeSpan(codes.data(), size); };
  auto norms_of = [&](int size) { return absl::MakeSpan(norms.data(), size); };
  for (int delta : {-1, 1}) {
    SCOPED_TRACE(testing::Message() << "delta " << delta);
    expect_invalid(be_->RvqEncode(*plain, xt, 1, codes_of(n * nl + delta), {}), "codes");
    expect_invalid(be_->RvqEncode(*gain, xt, 1, codes_of(n * nl + delta), norms_of(n)), "codes");
    expect_invalid(be_->RvqEncode(*gain, xt, 1, codes_of(n * nl), norms_of(n + delta)), "norms");
  }
  // Norms given to codebooks that have none: the caller expects values that would never come.
  expect_invalid(be_->RvqEncode(*plain, xt, 1, codes_of(n * nl), norms_of(n)), "norms");
  expect_invalid(be_->RvqEncode(*gain, xt, 4, codes_of(n * nl), {}), "norms");
  // The beam-search path checks the same way.
  expect_invalid(be_->RvqEncode(*plain, xt, 4, codes_of(n * nl - 1), {}), "codes");
  for (uint8_t c : codes) EXPECT_EQ(c, 99);
  for (float v : norms) EXPECT_EQ(v, -1.f);

  ASSERT_TRUE(be_->RvqEncode(*gain, xt, 1, codes_of(n * nl), norms_of(n)).ok());
  std::vector<float> out(n * dim, 7.f);
  const Tensor ot = Tensor::F32(out.data(), n, dim);
  auto ccodes = [&](int size) { return absl::MakeConstSpan(codes.data(), size); };
  auto cnorms = [&](int size) { return absl::MakeConstSpan(norms.data(), size); };
  for (int delta : {-1, 1}) {
    SCOPED_TRACE(testing::Message() << "delta " << delta);
    expect_invalid(be_->RvqDecode(*plain, ccodes(n * nl + delta), {}, ot), "codes");
    expect_invalid(be_->RvqDecode(*gain, ccodes(n * nl + delta), cnorms(n), ot), "codes");
    expect_invalid(be_->RvqDecode(*gain, ccodes(n * nl), cnorms(n + delta), ot), "norms");
  }
  expect_invalid(be_->RvqDecode(*plain, ccodes(n * nl), cnorms(n), ot), "norms");
  expect_invalid(be_->RvqDecode(*gain, ccodes(n * nl), {}, ot), "norms");
  for (float v : out) EXPECT_EQ(v, 7.f);
  EXPECT_TRUE(be_->RvqDecode(*gain, ccodes(n * nl), cnorms(n), ot).ok());
}

INSTANTIATE_TEST_SUITE_P(Backends, RvqBackendTest, ::testing::ValuesIn(BackendNames()),
                         BackendTestName);

}  // namespace
}  // namespace mapl
