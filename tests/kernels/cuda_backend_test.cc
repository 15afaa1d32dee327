// The CUDA backend against the CPU backend on the same inputs, at the sizes the server runs
// (n = 4096 tokens, d = 4096, k = 256, L = 4 levels of K = 256, V = 32000, r = 16), with a
// bound per op: the int8 and int4 codecs and RVQ decoding bit for bit; GEMMs within 1e-5 sqrt of
// the inner dimension, relative (Frobenius); at least 99.9 % of the RVQ codes equal, every row
// that differs a near tie at the level where the two diverge; the SPEL ops (Msign, Retract,
// SpelStep) within the bounds argued above their tests. Device pointers must give what host
// pointers give, from several threads at once. ctest label gpu: skips, naming the CUDA error, where
// there is no usable device.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/registry.h"
#include "tests/kernels/reference.h"

namespace mapl {
namespace {

constexpr int kN = 4096, kD = 4096, kK = 256, kLevels = 4, kCodebook = 256;

// A device copy of a host vector, freed on destruction.
template <typename T>
class DeviceVector {
 public:
  explicit DeviceVector(const std::vector<T>& host) : size_(host.size()) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(1, size_ * sizeof(T))), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
    // From pageable memory cudaMemcpy may return before the DMA lands, and the backend's streams
    // do not wait for the legacy stream: the data must be on the device before an op reads it.
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;
  ~DeviceVector() { cudaFree(ptr_); }
  T* data() const { return static_cast<T*>(ptr_); }
  absl::Span<T> span() const { return absl::Span<T>(data(), size_); }
  std::vector<T> ToHost() const {
    std::vector<T> out(size_);
    EXPECT_EQ(cudaMemcpy(out.data(), ptr_, size_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_;
};

std::vector<bf16_t> ToBf16(const std::vector<float>& v) {
  std::vector<bf16_t> out(v.size());
  FloatToBf16(v.data(), out.data(), v.size());
  return out;
}

// ||a - b|| / ||b||, in double.
template <typename T>
double RelFrobenius(const std::vector<T>& a, const std::vector<T>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double x, y;
    if constexpr (std::is_same_v<T, bf16_t>) {
      x = Bf16ToFloat(a[i]);
      y = Bf16ToFloat(b[i]);
    } else {
      x = a[i];
      y = b[i];
    }
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> be = MakeBackend("cuda");
    if (be.status().code() == absl::StatusCode::kUnavailable) {
      GTEST_SKIP() << "no usable CUDA device here: " << be.status();
    }
    ASSERT_TRUE(be.ok()) << be.status();
    cuda_ = *std::move(be);
    cpu_ = MakeCpuBackend();
  }

  std::unique_ptr<const Backend> cuda_;
  std::unique_ptr<const Backend> cpu_;
};

const double kGemmBound = 1e-5 * std::sqrt(double(kD));

TEST_F(CudaBackendTest, ProjectAndLiftMatchTheCpuF32AndBf16) {
  std::mt19937 rng(1);
  const std::vector<float> h = reference::Gaussian(rng, size_t(kN) * kD);
  const std::vector<float> u = reference::Gaussian(rng, size_t(kD) * kK, 1.f / 64.f);
  // f32 in, f32 out.
  std::vector<float> z_cpu(size_t(kN) * kK), z_gpu(size_t(kN) * kK);
  ASSERT_TRUE(cpu_->Project(ConstTensor::F32(h.data(), kN, kD), ConstTensor::F32(u.data(), kD, kK),
                            Tensor::F32(z_cpu.data(), kN, kK))
                  .ok());
  ASSERT_TRUE(cuda_
                  ->Project(ConstTensor::F32(h.data(), kN, kD), ConstTensor::F32(u.data(), kD, kK),
                            Tensor::F32(z_gpu.data(), kN, kK))
                  .ok());
  EXPECT_LE(RelFrobenius(z_gpu, z_cpu), kGemmBound);
  // bf16 in, bf16 out (the wire's dtype).
  const std::vector<bf16_t> hb = ToBf16(h);
  std::vector<bf16_t> zb_cpu(size_t(kN) * kK), zb_gpu(size_t(kN) * kK);
  ASSERT_TRUE(cpu_->Project(ConstTensor::BF16(hb.data(), kN, kD),
                            ConstTensor::F32(u.data(), kD, kK), Tensor::BF16(zb_cpu.data(), kN, kK))
                  .ok());
  ASSERT_TRUE(cuda_
                  ->Project(ConstTensor::BF16(hb.data(), kN, kD),
                            ConstTensor::F32(u.data(), kD, kK), Tensor::BF16(zb_gpu.data(), kN, kK))
                  .ok());
  // bf16 rounding of results that differ in the last fp32 bits can differ by one bf16 ulp.
  EXPECT_LE(RelFrobenius(zb_gpu, zb_cpu), kGemmBound + 4e-3);
  // Lift back, f32 and bf16.
  std::vector<float> h_cpu(size_t(kN) * kD), h_gpu(size_t(kN) * kD);
  ASSERT_TRUE(cpu_->Lift(ConstTensor::F32(z_cpu.data(), kN, kK), ConstTensor::F32(u.data(), kD, kK),
                         Tensor::F32(h_cpu.data(), kN, kD))
                  .ok());
  ASSERT_TRUE(cuda_
                  ->Lift(ConstTensor::F32(z_cpu.data(), kN, kK), ConstTensor::F32(u.data(), kD, kK),
                         Tensor::F32(h_gpu.data(), kN, kD))
                  .ok());
  EXPECT_LE(RelFrobenius(h_gpu, h_cpu), kGemmBound);
  std::vector<bf16_t> hb_cpu(size_t(kN) * kD), hb_gpu(size_t(kN) * kD);
  ASSERT_TRUE(cpu_->Lift(ConstTensor::BF16(zb_cpu.data(), kN, kK),
                         ConstTensor::F32(u.data(), kD, kK), Tensor::BF16(hb_cpu.data(), kN, kD))
                  .ok());
  ASSERT_TRUE(cuda_
                  ->Lift(ConstTensor::BF16(zb_cpu.data(), kN, kK),
                         ConstTensor::F32(u.data(), kD, kK), Tensor::BF16(hb_gpu.data(), kN, kD))
                  .ok());
  EXPECT_LE(RelFrobenius(hb_gpu, hb_cpu), kGemmBound + 4e-3);
}

// Rows that exercise the codecs' edges: all zeros, tiny subnormals (the scale underflows), huge
// values near FLT_MAX, and exact halves (rintf's ties to even).
std::vector<float> CodecInput(int n, int k) {
  std::mt19937 rng(2);
  std::vector<float> x = reference::Gaussian(rng, size_t(n) * k);
  for (int j = 0; j < k; ++j) {
    x[0 * k + j] = 0.f;
    x[1 * k + j] = (j % 3) * 1e-45f;
    x[2 * k + j] = (j % 2 ? -1.f : 1.f) * 3.3e38f;
    x[3 * k + j] = 0.5f * static_cast<float>(j % 15) - 3.5f;
  }
  return x;
}

TEST_F(CudaBackendTest, Int8AndInt4AreBitExactWithTheCpu) {
  for (int k : {kK, 255}) {
    const std::vector<float> x = CodecInput(kN, k);
    const std::vector<bf16_t> xb = ToBf16(x);
    for (bool bf16 : {false, true}) {
      SCOPED_TRACE(testing::Message() << "k " << k << (bf16 ? " bf16" : " f32"));
      const ConstTensor in =
          bf16 ? ConstTensor::BF16(xb.data(), kN, k) : ConstTensor::F32(x.data(), kN, k);
      std::vector<int8_t> q8_cpu(size_t(kN) * k), q8_gpu(size_t(kN) * k);
      std::vector<float> s_cpu(kN), s_gpu(kN);
      ASSERT_TRUE(cpu_->Int8Encode(in, absl::MakeSpan(q8_cpu), absl::MakeSpan(s_cpu)).ok());
      ASSERT_TRUE(cuda_->Int8Encode(in, absl::MakeSpan(q8_gpu), absl::MakeSpan(s_gpu)).ok());
      EXPECT_EQ(q8_gpu, q8_cpu);
      EXPECT_EQ(0, std::memcmp(s_gpu.data(), s_cpu.data(), kN * sizeof(float)));
      for (bool out_bf16 : {false, true}) {
        std::vector<float> o_cpu(size_t(kN) * k), o_gpu(size_t(kN) * k);
        auto out = [&](std::vector<float>& o) {
          return out_bf16 ? Tensor::BF16(reinterpret_cast<bf16_t*>(o.data()), kN, k)
                          : Tensor::F32(o.data(), kN, k);
        };
        ASSERT_TRUE(cpu_->Int8Decode(q8_cpu, s_cpu, out(o_cpu)).ok());
        ASSERT_TRUE(cuda_->Int8Decode(q8_cpu, s_cpu, out(o_gpu)).ok());
        EXPECT_EQ(0, std::memcmp(o_gpu.data(), o_cpu.data(), o_cpu.size() * sizeof(float)));
      }
      const size_t row_bytes = (k + 1) / 2;
      std::vector<uint8_t> q4_cpu(kN * row_bytes), q4_gpu(kN * row_bytes);
      ASSERT_TRUE(cpu_->Int4Encode(in, absl::MakeSpan(q4_cpu), absl::MakeSpan(s_cpu)).ok());
      ASSERT_TRUE(cuda_->Int4Encode(in, absl::MakeSpan(q4_gpu), absl::MakeSpan(s_gpu)).ok());
      EXPECT_EQ(q4_gpu, q4_cpu);
      EXPECT_EQ(0, std::memcmp(s_gpu.data(), s_cpu.data(), kN * sizeof(float)));
      std::vector<float> o_cpu(size_t(kN) * k), o_gpu(size_t(kN) * k);
      ASSERT_TRUE(cpu_->Int4Decode(q4_cpu, s_cpu, Tensor::F32(o_cpu.data(), kN, k)).ok());
      ASSERT_TRUE(cuda_->Int4Decode(q4_cpu, s_cpu, Tensor::F32(o_gpu.data(), kN, k)).ok());
      EXPECT_EQ(0, std::memcmp(o_gpu.data(), o_cpu.data(), o_cpu.size() * sizeof(float)));
    }
  }
}

TEST_F(CudaBackendTest, ErrorsMatchTheCpu) {
  std::vector<float> x = CodecInput(64, 32);
  x[3 * 32 + 7] = std::nanf("");
  std::vector<int8_t> q(64 * 32);
  std::vector<float> s(64);
  const absl::Status want =
      cpu_->Int8Encode(ConstTensor::F32(x.data(), 64, 32), absl::MakeSpan(q), absl::MakeSpan(s));
  const absl::Status got =
      cuda_->Int8Encode(ConstTensor::F32(x.data(), 64, 32), absl::MakeSpan(q), absl::MakeSpan(s));
  EXPECT_EQ(got, want);
  DeviceVector<float> xd(x);
  EXPECT_EQ(
      cuda_->Int8Encode(ConstTensor::F32(xd.data(), 64, 32), absl::MakeSpan(q), absl::MakeSpan(s)),
      want);
  std::vector<float> bad_scales(64, 1.f);
  bad_scales[9] = -1.f;
  std::vector<float> out(64 * 32);
  EXPECT_EQ(cuda_->Int8Decode(q, bad_scales, Tensor::F32(out.data(), 64, 32)),
            cpu_->Int8Decode(q, bad_scales, Tensor::F32(out.data(), 64, 32)));
}

// A codebook fitted (on the CPU) to data with a decaying spectrum, like projected activations.
RvqCodebooks FitCodebooks(const Backend& cpu, const std::vector<float>& x, bool gain_shape) {
  RvqFitOptions opt;
  opt.levels = kLevels;
  opt.codebook_size = kCodebook;
  opt.gain_shape = gain_shape;
  opt.kmeans_iterations = 4;
  opt.refine_passes = 0;
  absl::StatusOr<RvqCodebooks> cb = cpu.RvqFit(ConstTensor::F32(x.data(), kN, kK), opt);
  EXPECT_TRUE(cb.ok()) << cb.status();
  return cb.ok() ? *std::move(cb) : RvqCodebooks{};
}

std::vector<float> DecayingRows(int n, int dim, int seed) {
  std::mt19937 rng(seed);
  std::vector<float> x = reference::Gaussian(rng, size_t(n) * dim);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < dim; ++j) x[size_t(i) * dim + j] *= 1.f / std::sqrt(1.f + j);
  }
  return x;
}

TEST_F(CudaBackendTest, RvqEncodeAgreesUpToNearTiesAndDecodeIsBitExact) {
  for (bool gain_shape : {false, true}) {
    SCOPED_TRACE(gain_shape ? "gain-shape" : "plain");
    const std::vector<float> x = DecayingRows(kN, kK, 3);
    const RvqCodebooks cb = FitCodebooks(*cpu_, x, gain_shape);
    ASSERT_EQ(cb.levels, kLevels);
    std::vector<uint8_t> c_cpu(size_t(kN) * kLevels), c_gpu(size_t(kN) * kLevels);
    std::vector<float> n_cpu(gain_shape ? kN : 0), n_gpu(gain_shape ? kN : 0);
    const ConstTensor in = ConstTensor::F32(x.data(), kN, kK);
    ASSERT_TRUE(cpu_->RvqEncode(cb, in, 1, absl::MakeSpan(c_cpu), absl::MakeSpan(n_cpu)).ok());
    ASSERT_TRUE(cuda_->RvqEncode(cb, in, 1, absl::MakeSpan(c_gpu), absl::MakeSpan(n_gpu)).ok());
    for (int i = 0; i < (gain_shape ? kN : 0); ++i) {
      EXPECT_NEAR(n_gpu[i], n_cpu[i], 1e-6 * n_cpu[i]) << "row " << i;
    }
    int differ = 0;  // codes, not rows: a row that parts at level l may differ after it too
    for (size_t c = 0; c < c_cpu.size(); ++c) differ += c_cpu[c] != c_gpu[c];
    for (int i = 0; i < kN; ++i) {
      // Walk the common prefix; where the codes part, both centroids must be (nearly) as close
      // to the residual.
      std::vector<double> r(kK);
      const double scale = gain_shape && n_cpu[i] > 0 ? 1.0 / n_cpu[i] : 1.0;
      for (int j = 0; j < kK; ++j) r[j] = x[size_t(i) * kK + j] * scale;
      for (int l = 0; l < kLevels; ++l) {
        const uint8_t a = c_cpu[i * kLevels + l], b = c_gpu[i * kLevels + l];
        const float* ca = cb.level(l).data() + size_t(a) * kK;
        const float* cbv = cb.level(l).data() + size_t(b) * kK;
        if (a != b) {
          double da = 0, db = 0, rr = 0;
          for (int j = 0; j < kK; ++j) {
            da += (r[j] - ca[j]) * (r[j] - ca[j]);
            db += (r[j] - cbv[j]) * (r[j] - cbv[j]);
            rr += r[j] * r[j];
          }
          EXPECT_NEAR(da, db, 1e-4 * rr + 1e-9) << "row " << i << " level " << l;
          break;
        }
        for (int j = 0; j < kK; ++j) r[j] -= ca[j];
      }
    }
    EXPECT_LE(differ, kN * kLevels / 1000) << differ << " of " << kN * kLevels << " codes differ";
    // Decoding the same codes: bit for bit, f32 and bf16.
    std::vector<float> y_cpu(size_t(kN) * kK), y_gpu(size_t(kN) * kK);
    ASSERT_TRUE(cpu_->RvqDecode(cb, c_cpu, n_cpu, Tensor::F32(y_cpu.data(), kN, kK)).ok());
    ASSERT_TRUE(cuda_->RvqDecode(cb, c_cpu, n_cpu, Tensor::F32(y_gpu.data(), kN, kK)).ok());
    EXPECT_EQ(0, std::memcmp(y_gpu.data(), y_cpu.data(), y_cpu.size() * sizeof(float)));
    std::vector<bf16_t> yb_cpu(size_t(kN) * kK), yb_gpu(size_t(kN) * kK);
    ASSERT_TRUE(cpu_->RvqDecode(cb, c_cpu, n_cpu, Tensor::BF16(yb_cpu.data(), kN, kK)).ok());
    ASSERT_TRUE(cuda_->RvqDecode(cb, c_cpu, n_cpu, Tensor::BF16(yb_gpu.data(), kN, kK)).ok());
    EXPECT_EQ(yb_gpu, yb_cpu);
    // An out-of-range code is refused with the CPU's words.
    std::vector<uint8_t> bad = c_cpu;
    RvqCodebooks small = cb;
    small.codebook_size = 128;
    small.centroids.resize(size_t(kLevels) * 128 * kK);
    bad[5 * kLevels + 2] = 200;
    EXPECT_EQ(cuda_->RvqDecode(small, bad, n_cpu, Tensor::F32(y_gpu.data(), kN, kK)),
              cpu_->RvqDecode(small, bad, n_cpu, Tensor::F32(y_cpu.data(), kN, kK)));
  }
}

// Sizes off every tile of the kernels: n not a multiple of the RVQ kernel's 128 rows or of the
// codecs' 8 rows a block, dim not a multiple of its 32-float chunks, K below its 32-centroid tile,
// an odd k for int4. The sizes above are all multiples, so a tail bug would pass them.
TEST_F(CudaBackendTest, OddSizesMatchTheCpu) {
  const int n = 1000, dim = 100, levels = 3, max_differ = 3;
  for (bool gain_shape : {false, true}) {
    SCOPED_TRACE(gain_shape ? "gain-shape" : "plain");
    const std::vector<float> x = DecayingRows(n, dim, 12);
    RvqFitOptions opt;
    opt.levels = levels;
    opt.codebook_size = 20;
    opt.gain_shape = gain_shape;
    opt.kmeans_iterations = 4;
    opt.refine_passes = 0;
    const absl::StatusOr<RvqCodebooks> cb = cpu_->RvqFit(ConstTensor::F32(x.data(), n, dim), opt);
    ASSERT_TRUE(cb.ok()) << cb.status();
    std::vector<uint8_t> c_cpu(size_t(n) * levels), c_gpu(size_t(n) * levels);
    std::vector<float> n_cpu(gain_shape ? n : 0), n_gpu(gain_shape ? n : 0);
    const ConstTensor in = ConstTensor::F32(x.data(), n, dim);
    ASSERT_TRUE(cpu_->RvqEncode(*cb, in, 1, absl::MakeSpan(c_cpu), absl::MakeSpan(n_cpu)).ok());
    ASSERT_TRUE(cuda_->RvqEncode(*cb, in, 1, absl::MakeSpan(c_gpu), absl::MakeSpan(n_gpu)).ok());
    for (int i = 0; i < (gain_shape ? n : 0); ++i) {
      EXPECT_NEAR(n_gpu[i], n_cpu[i], 1e-6 * n_cpu[i]) << "row " << i;
    }
    int differ = 0;
    for (size_t c = 0; c < c_cpu.size(); ++c) differ += c_cpu[c] != c_gpu[c];
    // With 20 centroids a level, near ties are rare: a few codes at most.
    EXPECT_LE(differ, max_differ) << differ << " of " << c_cpu.size() << " codes differ";
    std::vector<float> y_cpu(size_t(n) * dim), y_gpu(size_t(n) * dim);
    ASSERT_TRUE(cpu_->RvqDecode(*cb, c_cpu, n_cpu, Tensor::F32(y_cpu.data(), n, dim)).ok());
    ASSERT_TRUE(cuda_->RvqDecode(*cb, c_cpu, n_cpu, Tensor::F32(y_gpu.data(), n, dim)).ok());
    EXPECT_EQ(0, std::memcmp(y_gpu.data(), y_cpu.data(), y_cpu.size() * sizeof(float)));
  }
  const int rows = 13, k = 37;
  const std::vector<float> x = CodecInput(rows, k);
  std::vector<int8_t> q8_cpu(size_t(rows) * k), q8_gpu(size_t(rows) * k);
  std::vector<float> s_cpu(rows), s_gpu(rows);
  const ConstTensor in = ConstTensor::F32(x.data(), rows, k);
  ASSERT_TRUE(cpu_->Int8Encode(in, absl::MakeSpan(q8_cpu), absl::MakeSpan(s_cpu)).ok());
  ASSERT_TRUE(cuda_->Int8Encode(in, absl::MakeSpan(q8_gpu), absl::MakeSpan(s_gpu)).ok());
  EXPECT_EQ(q8_gpu, q8_cpu);
  EXPECT_EQ(0, std::memcmp(s_gpu.data(), s_cpu.data(), rows * sizeof(float)));
  const size_t row_bytes = (k + 1) / 2;
  std::vector<uint8_t> q4_cpu(rows * row_bytes), q4_gpu(rows * row_bytes);
  ASSERT_TRUE(cpu_->Int4Encode(in, absl::MakeSpan(q4_cpu), absl::MakeSpan(s_cpu)).ok());
  ASSERT_TRUE(cuda_->Int4Encode(in, absl::MakeSpan(q4_gpu), absl::MakeSpan(s_gpu)).ok());
  EXPECT_EQ(q4_gpu, q4_cpu);
  std::vector<float> o_cpu(size_t(rows) * k), o_gpu(size_t(rows) * k);
  ASSERT_TRUE(cpu_->Int4Decode(q4_cpu, s_cpu, Tensor::F32(o_cpu.data(), rows, k)).ok());
  ASSERT_TRUE(cuda_->Int4Decode(q4_cpu, s_cpu, Tensor::F32(o_gpu.data(), rows, k)).ok());
  EXPECT_EQ(0, std::memcmp(o_gpu.data(), o_cpu.data(), o_cpu.size() * sizeof(float)));
}

// The learner's streaming update: the device assigns and gathers the batch statistics, the host
// applies the CPU's own EMA and re-seeding, so both re-seed the same centroids from the same
// random draws; the statistics differ only by summation order (and any near-tie assignment).
TEST_F(CudaBackendTest, RvqUpdateMatchesTheCpu) {
  const std::vector<float> x = DecayingRows(kN, kK, 9);
  const RvqCodebooks cb = FitCodebooks(*cpu_, x, false);
  ASSERT_EQ(cb.levels, kLevels);
  RvqLearner on_cpu = RvqLearner::FromCodebooks(cb, /*seed=*/11);
  RvqLearner on_gpu = on_cpu;
  RvqUpdateOptions opt;
  opt.decay = 0.9f;
  opt.dead_fraction = 0.5f;  // high enough that some centroids are re-seeded
  for (int step = 0; step < 3; ++step) {
    const std::vector<float> batch = DecayingRows(kN, kK, 20 + step);
    const ConstTensor in = ConstTensor::F32(batch.data(), kN, kK);
    absl::StatusOr<RvqUpdateStats> want = cpu_->RvqUpdate(&on_cpu, in, opt);
    absl::StatusOr<RvqUpdateStats> got = cuda_->RvqUpdate(&on_gpu, in, opt);
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->reseeded, want->reseeded) << "step " << step;
    EXPECT_NEAR(got->relative_mse, want->relative_mse, 1e-4 * want->relative_mse);
    EXPECT_EQ(on_gpu.rng_state, on_cpu.rng_state);
    EXPECT_LE(RelFrobenius(on_gpu.codebooks.centroids, on_cpu.codebooks.centroids), 1e-3);
    EXPECT_LE(RelFrobenius(on_gpu.counts, on_cpu.counts), 1e-3);
  }
  // A non-finite batch is refused in the CPU's words and leaves the learner unchanged.
  std::vector<float> bad = DecayingRows(kN, kK, 30);
  bad[7 * kK + 1] = NAN;
  const RvqLearner before = on_gpu;
  EXPECT_EQ(cuda_->RvqUpdate(&on_gpu, ConstTensor::F32(bad.data(), kN, kK), opt).status(),
            cpu_->RvqUpdate(&on_cpu, ConstTensor::F32(bad.data(), kN, kK), opt).status());
  EXPECT_EQ(on_gpu.codebooks.centroids, before.codebooks.centroids);
  EXPECT_EQ(on_gpu.counts, before.counts);
}

// The anchors and learning signals: GEMM bounds against the CPU at V = 32000, r = 16.
TEST_F(CudaBackendTest, SignalsAndAnchorsMatchTheCpu) {
  constexpr int kV = 32000, kR = 16;
  std::mt19937 rng(8);
  const std::vector<float> p = reference::Gaussian(rng, size_t(kV) * kR, 0.1f);
  const std::vector<float> q = reference::Gaussian(rng, size_t(kR) * kD, 0.1f);
  std::vector<int32_t> tokens(kN);
  for (int i = 0; i < kN; ++i) tokens[i] = static_cast<int32_t>((i * 7919) % kV);
  const LowRankAnchor a{ConstTensor::F32(p.data(), kV, kR), ConstTensor::F32(q.data(), kR, kD),
                        tokens};
  const std::vector<float> u = reference::Gaussian(rng, size_t(kD) * kK, 1.f / 64.f);
  const std::vector<float> zq = reference::Gaussian(rng, size_t(kN) * kK);
  const std::vector<bf16_t> g = ToBf16(reference::Gaussian(rng, size_t(kN) * kD));
  const std::vector<float> gu = reference::Gaussian(rng, size_t(kN) * kK);
  const ConstTensor U = ConstTensor::F32(u.data(), kD, kK);

  std::vector<float> a_cpu(size_t(kN) * kD), a_gpu(size_t(kN) * kD);
  ASSERT_TRUE(cpu_->AnchorLookup(a.p, a.q, tokens, Tensor::F32(a_cpu.data(), kN, kD)).ok());
  ASSERT_TRUE(cuda_->AnchorLookup(a.p, a.q, tokens, Tensor::F32(a_gpu.data(), kN, kD)).ok());
  EXPECT_LE(RelFrobenius(a_gpu, a_cpu), kGemmBound);

  std::vector<bf16_t> h_cpu(size_t(kN) * kD), h_gpu(size_t(kN) * kD);
  const ConstTensor Zq = ConstTensor::F32(zq.data(), kN, kK);
  ASSERT_TRUE(cpu_->LiftWithAnchor(Zq, U, a, Tensor::BF16(h_cpu.data(), kN, kD)).ok());
  ASSERT_TRUE(cuda_->LiftWithAnchor(Zq, U, a, Tensor::BF16(h_gpu.data(), kN, kD)).ok());
  EXPECT_LE(RelFrobenius(h_gpu, h_cpu), kGemmBound + 4e-3);

  const ConstTensor G = ConstTensor::BF16(g.data(), kN, kD);
  const ConstTensor Gu = ConstTensor::F32(gu.data(), kN, kK);
  std::vector<float> up_cpu(size_t(kD) * kK, 1.f), up_gpu(size_t(kD) * kK, 1.f);
  ASSERT_TRUE(cpu_->GradUp(G, Zq, Tensor::F32(up_cpu.data(), kD, kK), true).ok());
  ASSERT_TRUE(cuda_->GradUp(G, Zq, Tensor::F32(up_gpu.data(), kD, kK), true).ok());
  EXPECT_LE(RelFrobenius(up_gpu, up_cpu), 1e-5 * std::sqrt(double(kN)));
  for (const LowRankAnchor* anchor : {static_cast<const LowRankAnchor*>(nullptr), &a}) {
    std::vector<float> down_cpu(size_t(kD) * kK), down_gpu(size_t(kD) * kK);
    ASSERT_TRUE(
        cpu_->GradDown(G, Gu, Zq, U, anchor, Tensor::F32(down_cpu.data(), kD, kK), false).ok());
    ASSERT_TRUE(
        cuda_->GradDown(G, Gu, Zq, U, anchor, Tensor::F32(down_gpu.data(), kD, kK), false).ok());
    EXPECT_LE(RelFrobenius(down_gpu, down_cpu), 1e-5 * std::sqrt(double(kN)))
        << (anchor != nullptr ? "with" : "without") << " the anchor";
  }
  // AnchorGrad: GEMMs and a scatter-add whose atomics sum repeated tokens in a varying order.
  std::vector<float> dp_cpu(p.size(), 0.5f), dp_gpu(p.size(), 0.5f), dq_cpu(q.size(), 0.25f),
      dq_gpu(q.size(), 0.25f);
  ASSERT_TRUE(cpu_->AnchorGrad(a.p, a.q, tokens, G, Gu, U, Tensor::F32(dp_cpu.data(), kV, kR),
                               Tensor::F32(dq_cpu.data(), kR, kD))
                  .ok());
  ASSERT_TRUE(cuda_
                  ->AnchorGrad(a.p, a.q, tokens, G, Gu, U, Tensor::F32(dp_gpu.data(), kV, kR),
                               Tensor::F32(dq_gpu.data(), kR, kD))
                  .ok());
  EXPECT_LE(RelFrobenius(dp_gpu, dp_cpu), 1e-5 * std::sqrt(double(kD)));
  EXPECT_LE(RelFrobenius(dq_gpu, dq_cpu), 1e-5 * std::sqrt(double(kN)));
  // A finite but huge gradient row overflows its token's dp row: refused in the CPU's words,
  // dp and dq unchanged.
  std::vector<bf16_t> g_huge = g;
  for (int j = 0; j < kD; ++j) g_huge[size_t(77) * kD + j] = FloatToBf16(3e38f);
  const ConstTensor G_huge = ConstTensor::BF16(g_huge.data(), kN, kD);
  std::vector<float> dp_huge(p.size(), 3.3e38f), dp_huge_cpu(p.size(), 3.3e38f);
  const std::vector<float> dp_huge_before = dp_huge, dq_before = dq_gpu;
  const absl::Status want =
      cpu_->AnchorGrad(a.p, a.q, tokens, G_huge, Gu, U, Tensor::F32(dp_huge_cpu.data(), kV, kR),
                       Tensor::F32(dq_cpu.data(), kR, kD));
  EXPECT_FALSE(want.ok());
  EXPECT_EQ(cuda_->AnchorGrad(a.p, a.q, tokens, G_huge, Gu, U, Tensor::F32(dp_huge.data(), kV, kR),
                              Tensor::F32(dq_gpu.data(), kR, kD)),
            want);
  EXPECT_EQ(dp_huge, dp_huge_before);
  EXPECT_EQ(dq_gpu, dq_before);

  // AdamStep on the anchor table: the CPU's arithmetic, up to FMA contraction.
  std::vector<float> p_cpu = p, p_gpu = p, m_cpu(p.size()), m_gpu(p.size()), v_cpu(p.size()),
                     v_gpu(p.size());
  const std::vector<float> dp = reference::Gaussian(rng, p.size(), 0.01f);
  AdamOptions adam;
  adam.weight_decay = 0.01f;
  for (int64_t step = 1; step <= 3; ++step) {
    adam.step = step;
    ASSERT_TRUE(
        cpu_->AdamStep(Tensor::F32(p_cpu.data(), kV, kR), ConstTensor::F32(dp.data(), kV, kR),
                       Tensor::F32(m_cpu.data(), kV, kR), Tensor::F32(v_cpu.data(), kV, kR), adam)
            .ok());
    ASSERT_TRUE(
        cuda_
            ->AdamStep(Tensor::F32(p_gpu.data(), kV, kR), ConstTensor::F32(dp.data(), kV, kR),
                       Tensor::F32(m_gpu.data(), kV, kR), Tensor::F32(v_gpu.data(), kV, kR), adam)
            .ok());
  }
  EXPECT_LE(RelFrobenius(p_gpu, p_cpu), 1e-6);
  EXPECT_LE(RelFrobenius(m_gpu, m_cpu), 1e-6);
  EXPECT_LE(RelFrobenius(v_gpu, v_cpu), 1e-6);
  std::vector<float> huge = dp;
  huge[5 * kR + 2] = 3e38f;  // finite, but its square overflows v
  const std::vector<float> p_before = p_gpu;
  EXPECT_EQ(
      cuda_->AdamStep(Tensor::F32(p_gpu.data(), kV, kR), ConstTensor::F32(huge.data(), kV, kR),
                      Tensor::F32(m_gpu.data(), kV, kR), Tensor::F32(v_gpu.data(), kV, kR), adam),
      cpu_->AdamStep(Tensor::F32(p_cpu.data(), kV, kR), ConstTensor::F32(huge.data(), kV, kR),
                     Tensor::F32(m_cpu.data(), kV, kR), Tensor::F32(v_cpu.data(), kV, kR), adam));
  EXPECT_EQ(p_gpu, p_before);
  // Errors in the CPU's words: a token out of range, and a non-finite result.
  std::vector<int32_t> bad_tokens = tokens;
  bad_tokens[9] = kV;
  EXPECT_EQ(cuda_->AnchorLookup(a.p, a.q, bad_tokens, Tensor::F32(a_gpu.data(), kN, kD)),
            cpu_->AnchorLookup(a.p, a.q, bad_tokens, Tensor::F32(a_cpu.data(), kN, kD)));
  std::vector<float> nan_zq = zq;
  nan_zq[5 * kK + 3] = NAN;
  const std::vector<float> up_before = up_gpu;
  EXPECT_EQ(cuda_->GradUp(G, ConstTensor::F32(nan_zq.data(), kN, kK),
                          Tensor::F32(up_gpu.data(), kD, kK), true),
            cpu_->GradUp(G, ConstTensor::F32(nan_zq.data(), kN, kK),
                         Tensor::F32(up_cpu.data(), kD, kK), true));
  EXPECT_EQ(up_gpu, up_before);
}

// ---- SPEL: Msign, Retract, SpelStep ----
//
// Newton-Schulz runs the same iteration on both backends, fp32 GEMMs on cuBLAS and on OpenBLAS, so
// the results differ by rounding, and by where the two stop when the test max |X^T X - I| <
// tolerance lands on either side of it. The bounds, relative Frobenius:
//
//   - A fixed count (tolerance 0, the default 40 iterations): rounding only. The iteration pulls
//     the singular values onto 1 but leaves a rotation of the singular vectors where it is, so the
//     rounding of each X <- X a (about 1e-7 relative: near convergence a is I to 1e-6, and each
//     output element is one product plus small ones) adds up as a random walk, sqrt(40) * 1e-7 =
//     6e-7, on top of the first iterations' SGEMM rounding (inner dimension d: 1e-7 * sqrt(d) =
//     6e-6 at most for d = 4096, times the input's condition number, under 2 here, and the
//     iteration damps all but the rotational part of it). A host model of cuBLAS's rounding
//     (every output one sequential chain of fp32 FMAs over the inner dimension, as an SGEMM
//     thread without split-K accumulates) against OpenBLAS on these inputs gave 6e-7 (4096 x
//     256) and 4e-7 (1000 x 97), and stopped at the same iteration at the default tolerance.
//     kMsignBound = 2e-5 is about twice the worst case above and 30 times the model: a bound
//     from estimates, not from a device run (there was none where this was written).
//   - The default tolerance: in exact arithmetic Newton-Schulz keeps the singular vectors, so
//     both results are Q S W^T with the same Q and W and their own S, and ||S - I||_F <=
//     ||S^2 - I||_F = ||X^T X - I||_F. So ||X_gpu - X_cpu||_F <= ||X_gpu^T X_gpu - I||_F +
//     ||X_cpu^T X_cpu - I||_F, plus the rounding above: a bound measured from the two results,
//     whichever iteration each stopped at.
//
// The polar retraction is in double on both (DGEMM and the same host eigensolver): the results
// are the same doubles to about cond^2 * 1e-16 before their rounding to float, so they agree to
// within an ulp or so: kRetractBound = 1e-6 (ulp: 6e-8 relative) for a well-conditioned u, and
// 1e-5 for a condition number of 1e4, where the Gram route's first pass differs by about
// cond^2 * sqrt(d) * 1e-16 = 3e-7 before the second pass cleans it up.
constexpr double kMsignBound = 2e-5;
constexpr double kRetractBound = 1e-6;
constexpr double kIllConditionedRetractBound = 1e-5;

// ||X^T X - I||_F in double.
double GramDeviation(const std::vector<float>& x, int d, int k) {
  std::vector<double> g(size_t(k) * k, 0.0);
  for (int r = 0; r < d; ++r) {
    const float* row = x.data() + size_t(r) * k;
    for (int i = 0; i < k; ++i) {
      const double xi = row[i];
      for (int j = i; j < k; ++j) g[size_t(i) * k + j] += xi * row[j];
    }
  }
  double sum = 0.0;
  for (int i = 0; i < k; ++i) {
    for (int j = i; j < k; ++j) {
      const double e = g[size_t(i) * k + j] - (i == j ? 1.0 : 0.0);
      sum += (i == j ? 1.0 : 2.0) * e * e;
    }
  }
  return std::sqrt(sum);
}

double FrobeniusNorm(const std::vector<float>& x) {
  double sum = 0.0;
  for (float v : x) sum += double{v} * v;
  return std::sqrt(sum);
}

// A point on the Stiefel manifold (d, k): the CPU's retraction of a Gaussian matrix.
std::vector<float> StiefelPoint(const Backend& cpu, std::mt19937& rng, int d, int k) {
  std::vector<float> u = reference::Gaussian(rng, size_t(d) * k);
  EXPECT_TRUE(cpu.Retract(Tensor::F32(u.data(), d, k)).ok());
  return u;
}

struct SpelShape {
  int d, k;
};
// The projector's shape at the server's sizes, and one off every tile (odd d and k).
constexpr SpelShape kSpelShapes[] = {{kD, kK}, {1000, 97}};

TEST_F(CudaBackendTest, MsignMatchesTheCpu) {
  std::mt19937 rng(40);
  for (const SpelShape& s : kSpelShapes) {
    // Gaussian, scaled far from 1: the normalisation is part of what is compared.
    const std::vector<float> y = reference::Gaussian(rng, size_t(s.d) * s.k, 1e3f);
    const ConstTensor in = ConstTensor::F32(y.data(), s.d, s.k);
    std::vector<float> x_cpu(y.size()), x_gpu(y.size());
    MsignOptions fixed;
    fixed.tolerance = 0.f;  // every one of the 40 iterations
    for (const MsignOptions& opt : {fixed, MsignOptions{}}) {
      SCOPED_TRACE(testing::Message()
                   << "d " << s.d << " k " << s.k << " tolerance " << opt.tolerance);
      ASSERT_TRUE(cpu_->Msign(in, Tensor::F32(x_cpu.data(), s.d, s.k), opt).ok());
      ASSERT_TRUE(cuda_->Msign(in, Tensor::F32(x_gpu.data(), s.d, s.k), opt).ok());
      const double dev_cpu = GramDeviation(x_cpu, s.d, s.k);
      const double dev_gpu = GramDeviation(x_gpu, s.d, s.k);
      const double rel = RelFrobenius(x_gpu, x_cpu);
      std::printf(
          "[ info ] msign d=%d k=%d tol=%g: |X_gpu - X_cpu| / |X_cpu| %.3g, "
          "|X^T X - I|_F cpu %.3g gpu %.3g\n",
          s.d, s.k, opt.tolerance, rel, dev_cpu, dev_gpu);
      if (opt.tolerance == 0.f) {
        EXPECT_LE(rel, kMsignBound);
      } else {
        EXPECT_LE(rel, (dev_cpu + dev_gpu) / FrobeniusNorm(x_cpu) + kMsignBound);
      }
      // The GPU's result is as orthonormal as the CPU's: at the fp32 floor for the fixed count,
      // under the tolerance's reach (max |entry| < 1e-4, so the Frobenius norm < k * 1e-4)
      // otherwise.
      EXPECT_LE(dev_gpu, opt.tolerance == 0.f ? 2 * dev_cpu + 1e-5 : s.k * 1e-4);
    }
  }
  // msign(0) = 0, from an output full of something else.
  std::vector<float> zero(size_t(1000) * 97, 0.f), out(zero.size(), 7.f);
  ASSERT_TRUE(cuda_
                  ->Msign(ConstTensor::F32(zero.data(), 1000, 97),
                          Tensor::F32(out.data(), 1000, 97), MsignOptions{})
                  .ok());
  EXPECT_EQ(out, zero);
}

TEST_F(CudaBackendTest, RetractMatchesTheCpu) {
  std::mt19937 rng(41);
  for (const SpelShape& s : kSpelShapes) {
    SCOPED_TRACE(testing::Message() << "d " << s.d << " k " << s.k);
    // Gaussian: condition number about (sqrt(d) + sqrt(k)) / (sqrt(d) - sqrt(k)) < 2, one pass.
    std::vector<float> u_cpu = reference::Gaussian(rng, size_t(s.d) * s.k);
    std::vector<float> u_gpu = u_cpu;
    ASSERT_TRUE(cpu_->Retract(Tensor::F32(u_cpu.data(), s.d, s.k)).ok());
    ASSERT_TRUE(cuda_->Retract(Tensor::F32(u_gpu.data(), s.d, s.k)).ok());
    EXPECT_LE(RelFrobenius(u_gpu, u_cpu), kRetractBound);
    EXPECT_LE(GramDeviation(u_gpu, s.d, s.k), 1e-5);
    // Singular values from 1 down to 1e-4 (condition number 1e4): the second pass runs.
    const std::vector<float> q = u_cpu;
    std::vector<float> ill(q.size());
    for (int i = 0; i < s.d; ++i) {
      for (int j = 0; j < s.k; ++j) {
        ill[size_t(i) * s.k + j] =
            q[size_t(i) * s.k + j] * std::pow(10.f, -4.f * j / std::max(1, s.k - 1));
      }
    }
    std::vector<float> ill_cpu = ill, ill_gpu = ill;
    ASSERT_TRUE(cpu_->Retract(Tensor::F32(ill_cpu.data(), s.d, s.k)).ok());
    ASSERT_TRUE(cuda_->Retract(Tensor::F32(ill_gpu.data(), s.d, s.k)).ok());
    EXPECT_LE(RelFrobenius(ill_gpu, ill_cpu), kIllConditionedRetractBound);
    EXPECT_LE(GramDeviation(ill_gpu, s.d, s.k), 1e-5);
    std::printf("[ info ] retract d=%d k=%d: |U_gpu - U_cpu| / |U_cpu| %.3g, cond 1e4: %.3g\n", s.d,
                s.k, RelFrobenius(u_gpu, u_cpu), RelFrobenius(ill_gpu, ill_cpu));
  }
}

// SPEL steps from the same state on both backends (the GPU's state is reset to the CPU's before
// each step, so that differences do not compound). The momentum beta M + G is the CPU's FMA: the
// same bits (an ulp, 6e-8 relative, allowed for a CPU build without FMA instructions). U: D =
// msign(xi) differs by the Msign bounds above, and U - lr D by lr times that, which the polar
// factor of a near-orthonormal matrix passes on about unchanged; plus the retraction's rounding.
TEST_F(CudaBackendTest, SpelStepMatchesTheCpu) {
  std::mt19937 rng(42);
  for (const SpelShape& s : kSpelShapes) {
    const int d = s.d, k = s.k;
    const size_t dk = size_t(d) * k;
    std::vector<float> u_cpu = StiefelPoint(*cpu_, rng, d, k);
    std::vector<float> m_cpu = reference::Gaussian(rng, dk, 0.5f);
    SpelOptions fixed;
    fixed.lr = 0.05f;
    fixed.msign.tolerance = 0.f;
    SpelOptions as_server;  // the projector's options: default beta and msign, a warmed-up lr
    as_server.lr = 0.02f;
    for (const SpelOptions& opt : {fixed, as_server}) {
      SCOPED_TRACE(testing::Message()
                   << "d " << d << " k " << k << " msign tolerance " << opt.msign.tolerance);
      // Where the two may stop Newton-Schulz an iteration apart, D's difference is bounded by
      // how far from orthonormal each D is: under 2 k * tolerance in Frobenius norm, relative to
      // |D|_F = sqrt(k) (see above).
      const double d_bound =
          kMsignBound +
          (opt.msign.tolerance > 0 ? 2.0 * k * opt.msign.tolerance / std::sqrt(k) : 0);
      for (int step = 0; step < 3; ++step) {
        const std::vector<float> g = reference::Gaussian(rng, dk);
        std::vector<float> u_gpu = u_cpu, m_gpu = m_cpu;
        ASSERT_TRUE(cpu_->SpelStep(Tensor::F32(u_cpu.data(), d, k),
                                   ConstTensor::F32(g.data(), d, k),
                                   Tensor::F32(m_cpu.data(), d, k), opt)
                        .ok());
        ASSERT_TRUE(cuda_
                        ->SpelStep(Tensor::F32(u_gpu.data(), d, k),
                                   ConstTensor::F32(g.data(), d, k),
                                   Tensor::F32(m_gpu.data(), d, k), opt)
                        .ok());
        EXPECT_LE(RelFrobenius(m_gpu, m_cpu), 6e-8) << "step " << step;
        EXPECT_LE(RelFrobenius(u_gpu, u_cpu), opt.lr * d_bound + kRetractBound) << "step " << step;
        std::printf("[ info ] spel step d=%d k=%d tol=%g: |dU| / |U| %.3g, |dM| / |M| %.3g\n", d, k,
                    opt.msign.tolerance, RelFrobenius(u_gpu, u_cpu), RelFrobenius(m_gpu, m_cpu));
        if (step == 2) {
          EXPECT_LE(GramDeviation(u_gpu, d, k), 1e-5);
        }
      }
    }
  }
}

// Bad input is refused in the CPU's words, and no state moves: host and device operands alike.
TEST_F(CudaBackendTest, SpelOpsRefuseBadInputAndKeepTheState) {
  std::mt19937 rng(43);
  const int d = 1000, k = 97;
  const size_t dk = size_t(d) * k;
  const std::vector<float> u0 = StiefelPoint(*cpu_, rng, d, k);
  const std::vector<float> m0 = reference::Gaussian(rng, dk);
  std::vector<float> g = reference::Gaussian(rng, dk);
  g[5 * k + 3] = NAN;

  // Msign of a NaN.
  std::vector<float> out(dk, 1.f);
  const absl::Status msign_want =
      cpu_->Msign(ConstTensor::F32(g.data(), d, k), Tensor::F32(out.data(), d, k), {});
  EXPECT_FALSE(msign_want.ok());
  EXPECT_EQ(cuda_->Msign(ConstTensor::F32(g.data(), d, k), Tensor::F32(out.data(), d, k), {}),
            msign_want);
  DeviceVector<float> g_d(g), out_d(std::vector<float>(dk, 1.f));
  EXPECT_EQ(cuda_->Msign(ConstTensor::F32(g_d.data(), d, k), Tensor::F32(out_d.data(), d, k), {}),
            msign_want);
  EXPECT_EQ(out_d.ToHost(), std::vector<float>(dk, 1.f));

  // SpelStep with a NaN gradient, a NaN momentum, and a momentum that overflows.
  std::vector<float> m_nan = m0;
  m_nan[dk - 1] = -INFINITY;
  std::vector<float> g_ok = reference::Gaussian(rng, dk);
  std::vector<float> g_huge(dk, 3e38f), m_huge(dk, 3e38f);
  struct Case {
    const char* what;
    const std::vector<float>* g;
    const std::vector<float>* m;
  };
  for (const Case& c : {Case{"nan grad", &g, &m0}, Case{"inf momentum", &g_ok, &m_nan},
                        Case{"momentum overflow", &g_huge, &m_huge}}) {
    SCOPED_TRACE(c.what);
    std::vector<float> u_cpu = u0, m_cpu = *c.m;
    const absl::Status want =
        cpu_->SpelStep(Tensor::F32(u_cpu.data(), d, k), ConstTensor::F32(c.g->data(), d, k),
                       Tensor::F32(m_cpu.data(), d, k), SpelOptions{});
    EXPECT_EQ(want.code(), absl::StatusCode::kInvalidArgument) << want;
    std::vector<float> u_host = u0, m_host = *c.m;
    EXPECT_EQ(cuda_->SpelStep(Tensor::F32(u_host.data(), d, k), ConstTensor::F32(c.g->data(), d, k),
                              Tensor::F32(m_host.data(), d, k), SpelOptions{}),
              want);
    EXPECT_EQ(0, std::memcmp(u_host.data(), u0.data(), dk * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(m_host.data(), c.m->data(), dk * sizeof(float)));
    DeviceVector<float> u_dev(u0), m_dev(*c.m), g_dev(*c.g);
    EXPECT_EQ(cuda_->SpelStep(Tensor::F32(u_dev.data(), d, k), ConstTensor::F32(g_dev.data(), d, k),
                              Tensor::F32(m_dev.data(), d, k), SpelOptions{}),
              want);
    EXPECT_EQ(0, std::memcmp(u_dev.ToHost().data(), u0.data(), dk * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(m_dev.ToHost().data(), c.m->data(), dk * sizeof(float)));
  }

  // Retract of a NaN, and of a rank-deficient matrix (a repeated column): the message names the
  // Gram eigenvalues, which differ in their rounding noise, so only its words are compared.
  std::vector<float> u_nan = u0;
  u_nan[17] = NAN;
  const std::vector<float> nan_before = u_nan;
  std::vector<float> u_nan_cpu = u_nan;
  const absl::Status retract_want = cpu_->Retract(Tensor::F32(u_nan_cpu.data(), d, k));
  EXPECT_EQ(cuda_->Retract(Tensor::F32(u_nan.data(), d, k)), retract_want);
  EXPECT_EQ(0, std::memcmp(u_nan.data(), nan_before.data(), dk * sizeof(float)));
  std::vector<float> deficient = u0;
  for (int i = 0; i < d; ++i) deficient[size_t(i) * k + 40] = deficient[size_t(i) * k + 3];
  DeviceVector<float> deficient_d(deficient);
  for (float* p : {deficient.data(), deficient_d.data()}) {
    const absl::Status s = cuda_->Retract(Tensor::F32(p, d, k));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("u: rank-deficient"), std::string::npos) << s;
  }
  EXPECT_EQ(deficient_d.ToHost(), deficient);
}

// Device memory in and out gives what host memory gives (the same kernels on the same data, and
// reductions in a fixed order: expected to be the same bits), including Msign in place.
TEST_F(CudaBackendTest, SpelOpsOnDevicePointersMatchHostPointers) {
  std::mt19937 rng(44);
  const int d = 1000, k = 97;
  const size_t dk = size_t(d) * k;
  const std::vector<float> y = reference::Gaussian(rng, dk);
  std::vector<float> x_host(dk);
  ASSERT_TRUE(
      cuda_->Msign(ConstTensor::F32(y.data(), d, k), Tensor::F32(x_host.data(), d, k), {}).ok());
  DeviceVector<float> y_d(y), x_d{std::vector<float>(dk)};
  ASSERT_TRUE(
      cuda_->Msign(ConstTensor::F32(y_d.data(), d, k), Tensor::F32(x_d.data(), d, k), {}).ok());
  EXPECT_LE(RelFrobenius(x_d.ToHost(), x_host), 1e-6);
  // In place: out is y.
  ASSERT_TRUE(
      cuda_->Msign(ConstTensor::F32(y_d.data(), d, k), Tensor::F32(y_d.data(), d, k), {}).ok());
  EXPECT_LE(RelFrobenius(y_d.ToHost(), x_host), 1e-6);

  std::vector<float> u_host = reference::Gaussian(rng, dk);
  DeviceVector<float> u_d(u_host);
  ASSERT_TRUE(cuda_->Retract(Tensor::F32(u_host.data(), d, k)).ok());
  ASSERT_TRUE(cuda_->Retract(Tensor::F32(u_d.data(), d, k)).ok());
  EXPECT_LE(RelFrobenius(u_d.ToHost(), u_host), 1e-6);

  // SpelStep with every operand on the device, and with a mix (u and momentum on the device,
  // the gradient on the host, as the server's gradient arrives).
  std::vector<float> m_host = reference::Gaussian(rng, dk);
  const std::vector<float> g = reference::Gaussian(rng, dk);
  DeviceVector<float> u1(u_host), m1(m_host), g1(g), u2(u_host), m2(m_host);
  SpelOptions opt;
  opt.lr = 0.03f;
  ASSERT_TRUE(cuda_
                  ->SpelStep(Tensor::F32(u_host.data(), d, k), ConstTensor::F32(g.data(), d, k),
                             Tensor::F32(m_host.data(), d, k), opt)
                  .ok());
  ASSERT_TRUE(cuda_
                  ->SpelStep(Tensor::F32(u1.data(), d, k), ConstTensor::F32(g1.data(), d, k),
                             Tensor::F32(m1.data(), d, k), opt)
                  .ok());
  ASSERT_TRUE(cuda_
                  ->SpelStep(Tensor::F32(u2.data(), d, k), ConstTensor::F32(g.data(), d, k),
                             Tensor::F32(m2.data(), d, k), opt)
                  .ok());
  for (const DeviceVector<float>* u : {&u1, &u2}) {
    EXPECT_LE(RelFrobenius(u->ToHost(), u_host), 1e-6);
  }
  for (const DeviceVector<float>* m : {&m1, &m2}) EXPECT_EQ(m->ToHost(), m_host);
}

// Device memory in and out gives exactly what host memory gives, device ops and host ops alike.
TEST_F(CudaBackendTest, DevicePointersGiveTheSameResultsAsHostPointers) {
  std::mt19937 rng(4);
  const int n = 512, d = 1024, k = kK;
  const std::vector<bf16_t> hb = ToBf16(reference::Gaussian(rng, size_t(n) * d));
  const std::vector<float> u = reference::Gaussian(rng, size_t(d) * k, 1.f / 32.f);
  std::vector<bf16_t> z_host(size_t(n) * k);
  ASSERT_TRUE(cuda_
                  ->Project(ConstTensor::BF16(hb.data(), n, d), ConstTensor::F32(u.data(), d, k),
                            Tensor::BF16(z_host.data(), n, k))
                  .ok());
  DeviceVector<bf16_t> hb_d(hb), z_d(std::vector<bf16_t>(z_host.size()));
  DeviceVector<float> u_d(u);
  ASSERT_TRUE(cuda_
                  ->Project(ConstTensor::BF16(hb_d.data(), n, d),
                            ConstTensor::F32(u_d.data(), d, k), Tensor::BF16(z_d.data(), n, k))
                  .ok());
  EXPECT_LE(RelFrobenius(z_d.ToHost(), z_host), 1e-6);

  const std::vector<float> x = DecayingRows(kN, kK, 5);
  const RvqCodebooks cb = FitCodebooks(*cpu_, x, false);
  std::vector<uint8_t> codes_host(size_t(kN) * kLevels);
  ASSERT_TRUE(
      cuda_->RvqEncode(cb, ConstTensor::F32(x.data(), kN, kK), 1, absl::MakeSpan(codes_host), {})
          .ok());
  DeviceVector<float> x_d(x);
  DeviceVector<uint8_t> codes_d(std::vector<uint8_t>(codes_host.size()));
  ASSERT_TRUE(
      cuda_->RvqEncode(cb, ConstTensor::F32(x_d.data(), kN, kK), 1, codes_d.span(), {}).ok());
  EXPECT_EQ(codes_d.ToHost(), codes_host);
  DeviceVector<float> y_d(std::vector<float>(x.size()));
  std::vector<float> y_host(x.size());
  ASSERT_TRUE(cuda_->RvqDecode(cb, codes_host, {}, Tensor::F32(y_host.data(), kN, kK)).ok());
  ASSERT_TRUE(cuda_
                  ->RvqDecode(cb, absl::MakeConstSpan(codes_d.data(), codes_host.size()), {},
                              Tensor::F32(y_d.data(), kN, kK))
                  .ok());
  EXPECT_EQ(y_d.ToHost(), y_host);

  std::vector<int8_t> q_host(size_t(kN) * kK);
  std::vector<float> s_host(kN);
  ASSERT_TRUE(cuda_
                  ->Int8Encode(ConstTensor::F32(x.data(), kN, kK), absl::MakeSpan(q_host),
                               absl::MakeSpan(s_host))
                  .ok());
  DeviceVector<int8_t> q_d(std::vector<int8_t>(q_host.size()));
  DeviceVector<float> s_d{std::vector<float>(kN)};
  ASSERT_TRUE(cuda_->Int8Encode(ConstTensor::F32(x_d.data(), kN, kK), q_d.span(), s_d.span()).ok());
  EXPECT_EQ(q_d.ToHost(), q_host);
  EXPECT_EQ(s_d.ToHost(), s_host);

  // A device op with device operands, accumulating: GradUp.
  const std::vector<float> gzq = reference::Gaussian(rng, size_t(n) * k);
  std::vector<float> g_up_host = reference::Gaussian(rng, size_t(d) * k);
  DeviceVector<float> gzq_d(gzq), g_up_d(g_up_host);
  ASSERT_TRUE(cuda_
                  ->GradUp(ConstTensor::BF16(hb.data(), n, d), ConstTensor::F32(gzq.data(), n, k),
                           Tensor::F32(g_up_host.data(), d, k), true)
                  .ok());
  ASSERT_TRUE(cuda_
                  ->GradUp(ConstTensor::BF16(hb_d.data(), n, d),
                           ConstTensor::F32(gzq_d.data(), n, k), Tensor::F32(g_up_d.data(), d, k),
                           true)
                  .ok());
  EXPECT_LE(RelFrobenius(g_up_d.ToHost(), g_up_host), 1e-6);
  // A failing op leaves device state unchanged.
  const std::vector<float> g_up_before = g_up_d.ToHost();
  std::vector<float> nan_gzq = gzq;
  nan_gzq[17] = INFINITY;
  DeviceVector<float> nan_gzq_d(nan_gzq);
  const absl::Status bad =
      cuda_->GradUp(ConstTensor::BF16(hb_d.data(), n, d), ConstTensor::F32(nan_gzq_d.data(), n, k),
                    Tensor::F32(g_up_d.data(), d, k), true);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
  EXPECT_EQ(g_up_d.ToHost(), g_up_before);

  // Retract with device operands: the same kernels on the same data, so the same bits; a failing
  // one (NaN in u) leaves the device memory unchanged.
  std::vector<float> u_host = reference::Gaussian(rng, size_t(d) * k);
  DeviceVector<float> u_dev(u_host);
  ASSERT_TRUE(cuda_->Retract(Tensor::F32(u_host.data(), d, k)).ok());
  ASSERT_TRUE(cuda_->Retract(Tensor::F32(u_dev.data(), d, k)).ok());
  EXPECT_EQ(u_dev.ToHost(), u_host);
  std::vector<float> nan_u = u_host;
  nan_u[3] = NAN;
  DeviceVector<float> nan_u_dev(nan_u);
  EXPECT_FALSE(cuda_->Retract(Tensor::F32(nan_u_dev.data(), d, k)).ok());
  EXPECT_EQ(0, std::memcmp(nan_u_dev.ToHost().data(), nan_u.data(), nan_u.size() * 4));
}

// The backend is const and shared: 8 threads at once get what one thread gets.
TEST_F(CudaBackendTest, SeveralThreadsAtOnce) {
  const int threads = 8, n = 1024;
  const std::vector<float> x = DecayingRows(kN, kK, 6);
  const RvqCodebooks cb = FitCodebooks(*cpu_, x, false);
  std::vector<std::vector<float>> inputs;
  std::vector<std::vector<uint8_t>> want_codes;
  std::vector<std::vector<int8_t>> want_q;
  for (int t = 0; t < threads; ++t) {
    inputs.push_back(DecayingRows(n, kK, 100 + t));
    want_codes.emplace_back(size_t(n) * kLevels);
    want_q.emplace_back(size_t(n) * kK);
    std::vector<float> s(n);
    ASSERT_TRUE(cuda_
                    ->RvqEncode(cb, ConstTensor::F32(inputs[t].data(), n, kK), 1,
                                absl::MakeSpan(want_codes[t]), {})
                    .ok());
    ASSERT_TRUE(cuda_
                    ->Int8Encode(ConstTensor::F32(inputs[t].data(), n, kK),
                                 absl::MakeSpan(want_q[t]), absl::MakeSpan(s))
                    .ok());
  }
  std::vector<int> mismatches(threads, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        std::vector<uint8_t> codes(size_t(n) * kLevels);
        std::vector<int8_t> q(size_t(n) * kK);
        std::vector<float> s(n);
        const ConstTensor in = ConstTensor::F32(inputs[t].data(), n, kK);
        if (!cuda_->RvqEncode(cb, in, 1, absl::MakeSpan(codes), {}).ok() || codes != want_codes[t])
          ++mismatches[t];
        if (!cuda_->Int8Encode(in, absl::MakeSpan(q), absl::MakeSpan(s)).ok() || q != want_q[t])
          ++mismatches[t];
      }
    });
  }
  for (std::thread& th : pool) th.join();
  for (int t = 0; t < threads; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

}  // namespace
}  // namespace mapl
