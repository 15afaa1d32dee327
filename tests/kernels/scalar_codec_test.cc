// Tests of every backend's per-token int8 codec (kernels/cpu/scalar_codec.cc on the CPU): codes
// against a naive double-precision reference, the round-trip bound, bf16 edges, untrusted input,
// and buffers of the wrong size.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
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

namespace mapl {
namespace {

class ScalarCodecTest : public BackendTest {};

// Rows of very different magnitudes, one of them all zero and one with a single non-zero.
std::vector<float> TestRows(std::mt19937& rng, int n, int k) {
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(n) * k);
  for (int i = 0; i < n; ++i) {
    const float mag = std::pow(10.f, static_cast<float>(i % 9) - 4.f);
    for (int j = 0; j < k; ++j) x[i * k + j] = mag * dist(rng);
  }
  std::fill(x.begin() + 2 * k, x.begin() + 3 * k, 0.f);
  std::fill(x.begin() + 3 * k, x.begin() + 4 * k, 0.f);
  x[3 * k + 5] = -2.5f;
  return x;
}

TEST_P(ScalarCodecTest, EncodeMatchesReferenceAndRoundTripsWithinHalfScale) {
  std::mt19937 rng(1);
  const int n = 37, k = 24;
  const std::vector<float> x = TestRows(rng, n, k);
  std::vector<int8_t> q(x.size());
  std::vector<float> scales(n), out(x.size());
  ASSERT_TRUE(
      be_->Int8Encode(ConstTensor::F32(x.data(), n, k), absl::MakeSpan(q), absl::MakeSpan(scales))
          .ok());
  ASSERT_TRUE(be_->Int8Decode(q, scales, Tensor::F32(out.data(), n, k)).ok());

  for (int i = 0; i < n; ++i) {
    double max_abs = 0.0;
    for (int j = 0; j < k; ++j) max_abs = std::max(max_abs, std::fabs(double{x[i * k + j]}));
    // The scale is max|x| / 127 rounded up to a bfloat16 value: at most one bf16 step (2^-7
    // relative) above, never below, and exactly representable in bf16.
    const double scale_ref = scales[i];
    EXPECT_GE(scales[i], static_cast<float>(max_abs / 127.0)) << "row " << i;
    EXPECT_LE(scales[i], max_abs / 127.0 * (1 + 1.0 / 128) * (1 + 1e-6)) << "row " << i;
    EXPECT_EQ(Bf16ToFloat(FloatToBf16(scales[i])), scales[i]) << "row " << i;
    for (int j = 0; j < k; ++j) {
      const double xv = x[i * k + j];
      if (scale_ref == 0.0) {
        EXPECT_EQ(q[i * k + j], 0);
        EXPECT_EQ(out[i * k + j], 0.f);
        continue;
      }
      // The nearest code (ties may go either way by a rounding of the division).
      const double exact = xv / scale_ref;
      EXPECT_LE(std::fabs(q[i * k + j] - exact), 0.5 + 1e-4) << "(" << i << ", " << j << ")";
      EXPECT_LE(std::fabs(out[i * k + j] - xv), scales[i] / 2 * (1 + 1e-5))
          << "(" << i << ", " << j << ")";
      if (std::fabs(xv) == max_abs) {
        EXPECT_GE(std::abs(q[i * k + j]), 126);  // 127 / (1 + 2^-7) rounds to 126 at worst
      }
    }
  }
  EXPECT_EQ(scales[2], 0.f);  // the zero row
  EXPECT_LE(q[3 * k + 5], -126);
}

TEST_P(ScalarCodecTest, ExtremeMagnitudes) {
  const int k = 4;
  // FLT_MAX does not overflow; subnormals too small for a non-zero scale give codes 0, not Inf.
  const std::vector<float> x = {FLT_MAX, -FLT_MAX / 2, 1.f, 0.f,      // large
                                1e-44f,  -1e-45f,      0.f, 1e-45f,   // scale underflows to 0
                                1e-38f,  -5e-39f,      0.f, 2e-39f};  // subnormal, scale non-zero
  const int n = 3;
  std::vector<int8_t> q(x.size());
  std::vector<float> scales(n), out(x.size());
  ASSERT_TRUE(
      be_->Int8Encode(ConstTensor::F32(x.data(), n, k), absl::MakeSpan(q), absl::MakeSpan(scales))
          .ok());
  ASSERT_TRUE(be_->Int8Decode(q, scales, Tensor::F32(out.data(), n, k)).ok());
  EXPECT_GE(q[0], 126);
  EXPECT_NEAR(q[1], -64, 1);
  EXPECT_TRUE(std::isfinite(out[0]));  // q * scale may round past FLT_MAX: clamped, not Inf
  EXPECT_EQ(scales[1], 0.f);
  for (int j = 0; j < k; ++j) {
    EXPECT_EQ(q[k + j], 0);
    EXPECT_EQ(out[k + j], 0.f);
  }
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_TRUE(std::isfinite(out[i])) << i;
    if (i / k == 1) continue;
    // A subnormal scale has fewer significant bits, but q * scale stays exact there.
    EXPECT_LE(std::fabs(double{out[i]} - x[i]), scales[i / k] / 2.0 * (1 + 1e-5)) << i;
  }
}

TEST_P(ScalarCodecTest, Bf16InputAndOutput) {
  std::mt19937 rng(2);
  const int n = 9, k = 16;
  const std::vector<float> x = TestRows(rng, n, k);
  std::vector<bf16_t> xb(x.size());
  FloatToBf16(x.data(), xb.data(), x.size());
  std::vector<float> xr(x.size());  // what the bf16 tensor holds
  Bf16ToFloat(xb.data(), xr.data(), x.size());

  std::vector<int8_t> q_b(x.size()), q_f(x.size());
  std::vector<float> s_b(n), s_f(n);
  ASSERT_TRUE(
      be_->Int8Encode(ConstTensor::BF16(xb.data(), n, k), absl::MakeSpan(q_b), absl::MakeSpan(s_b))
          .ok());
  ASSERT_TRUE(
      be_->Int8Encode(ConstTensor::F32(xr.data(), n, k), absl::MakeSpan(q_f), absl::MakeSpan(s_f))
          .ok());
  EXPECT_EQ(q_b, q_f);
  EXPECT_EQ(s_b, s_f);

  std::vector<bf16_t> out_b(x.size());
  std::vector<float> out_f(x.size());
  ASSERT_TRUE(be_->Int8Decode(q_b, s_b, Tensor::BF16(out_b.data(), n, k)).ok());
  ASSERT_TRUE(be_->Int8Decode(q_b, s_b, Tensor::F32(out_f.data(), n, k)).ok());
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(out_b[i], FloatToBf16(out_f[i])) << i;
    // bf16 adds at most half a bf16 ulp (2^-9 relative) to the int8 bound.
    EXPECT_LE(std::fabs(Bf16ToFloat(out_b[i]) - xr[i]),
              s_b[i / k] / 2 * (1 + 1e-5) + std::fabs(out_f[i]) * 0x1p-8)
        << i;
  }
}

TEST_P(ScalarCodecTest, EmptyIsFine) {
  float scale = -1.f;
  EXPECT_TRUE(be_->Int8Encode(ConstTensor::F32(nullptr, 0, 8), {}, {}).ok());
  EXPECT_TRUE(be_->Int8Decode({}, {}, Tensor::F32(nullptr, 0, 8)).ok());
  // k == 0: one scale per token and no codes.
  EXPECT_TRUE(be_->Int8Encode(ConstTensor::F32(nullptr, 1, 0), {}, absl::MakeSpan(&scale, 1)).ok());
  EXPECT_EQ(scale, 0.f);
}

TEST_P(ScalarCodecTest, EncodeRejectsBadInput) {
  const int n = 3, k = 5;
  std::vector<float> x(n * k, 1.f), scales(n, 9.f);
  std::vector<int8_t> q(n * k, 9);
  x[1 * k + 3] = std::nanf("");
  absl::Status s =
      be_->Int8Encode(ConstTensor::F32(x.data(), n, k), absl::MakeSpan(q), absl::MakeSpan(scales));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("(1, 3)"), std::string::npos) << s;
  x[1 * k + 3] = -INFINITY;
  EXPECT_EQ(
      be_->Int8Encode(ConstTensor::F32(x.data(), n, k), absl::MakeSpan(q), absl::MakeSpan(scales))
          .code(),
      absl::StatusCode::kInvalidArgument);
  for (int8_t v : q) EXPECT_EQ(v, 9);  // nothing written
  for (float v : scales) EXPECT_EQ(v, 9.f);

  x[1 * k + 3] = 1.f;
  // Missing outputs: empty spans, or null data for a non-empty span.
  EXPECT_EQ(be_->Int8Encode(ConstTensor::F32(x.data(), n, k), {}, absl::MakeSpan(scales)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->Int8Encode(ConstTensor::F32(x.data(), n, k), absl::MakeSpan(q), {}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->Int8Encode(ConstTensor::F32(x.data(), n, k), absl::Span<int8_t>(nullptr, n * k),
                            absl::MakeSpan(scales))
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      be_->Int8Encode(ConstTensor::F32(x.data(), -1, k), absl::MakeSpan(q), absl::MakeSpan(scales))
          .code(),
      absl::StatusCode::kInvalidArgument);
  s = be_->Int8Encode(ConstTensor::F32(nullptr, n, k), absl::MakeSpan(q), absl::MakeSpan(scales));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("x"), std::string::npos) << s;
}

TEST_P(ScalarCodecTest, DecodeRejectsCorruptScales) {
  const int n = 3, k = 4;
  std::vector<int8_t> q(n * k, -128);  // -128 is never produced, but must decode safely
  std::vector<float> out(n * k, 7.f);
  std::vector<float> scales = {1.f, 0.5f, 2.f};
  ASSERT_TRUE(be_->Int8Decode(q, scales, Tensor::F32(out.data(), n, k)).ok());
  EXPECT_EQ(out[0], -128.f);
  for (float bad : {std::nanf(""), INFINITY, -1.f}) {
    scales[2] = bad;
    std::fill(out.begin(), out.end(), 7.f);
    const absl::Status s = be_->Int8Decode(q, scales, Tensor::F32(out.data(), n, k));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("row 2"), std::string::npos) << s;
    for (float v : out) EXPECT_EQ(v, 7.f);
  }
  scales[2] = 1.f;
  EXPECT_EQ(be_->Int8Decode({}, scales, Tensor::F32(out.data(), n, k)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->Int8Decode(q, {}, Tensor::F32(out.data(), n, k)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(be_->Int8Decode(q, scales, Tensor::F32(nullptr, n, k)).code(),
            absl::StatusCode::kInvalidArgument);
}

// q must hold exactly n * k codes and scales exactly n values: one element short or over is an
// INVALID_ARGUMENT naming the buffer, and nothing is written.
TEST_P(ScalarCodecTest, WrongSpanSizeIsInvalidArgument) {
  std::mt19937 rng(3);
  const int n = 6, k = 10;
  const std::vector<float> x = TestRows(rng, n, k);
  std::vector<int8_t> q(n * k + 1, 9);
  std::vector<float> scales(n + 1, 9.f);
  const ConstTensor xt = ConstTensor::F32(x.data(), n, k);
  auto expect_invalid = [](const absl::Status& s, const std::string& name) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(s.message().rfind(name + ": expected ", 0), 0u) << s;
  };
  for (int delta : {-1, 1}) {
    SCOPED_TRACE(testing::Message() << "delta " << delta);
    expect_invalid(be_->Int8Encode(xt, absl::MakeSpan(q.data(), n * k + delta),
                                   absl::MakeSpan(scales.data(), n)),
                   "q");
    expect_invalid(be_->Int8Encode(xt, absl::MakeSpan(q.data(), n * k),
                                   absl::MakeSpan(scales.data(), n + delta)),
                   "scales");
  }
  for (int8_t v : q) EXPECT_EQ(v, 9);
  for (float v : scales) EXPECT_EQ(v, 9.f);

  ASSERT_TRUE(
      be_->Int8Encode(xt, absl::MakeSpan(q.data(), n * k), absl::MakeSpan(scales.data(), n)).ok());
  std::vector<float> out(n * k, 7.f);
  for (int delta : {-1, 1}) {
    SCOPED_TRACE(testing::Message() << "delta " << delta);
    expect_invalid(
        be_->Int8Decode(absl::MakeConstSpan(q.data(), n * k + delta),
                        absl::MakeConstSpan(scales.data(), n), Tensor::F32(out.data(), n, k)),
        "q");
    expect_invalid(be_->Int8Decode(absl::MakeConstSpan(q.data(), n * k),
                                   absl::MakeConstSpan(scales.data(), n + delta),
                                   Tensor::F32(out.data(), n, k)),
                   "scales");
  }
  for (float v : out) EXPECT_EQ(v, 7.f);
}

INSTANTIATE_TEST_SUITE_P(Backends, ScalarCodecTest, ::testing::ValuesIn(BackendNames()),
                         BackendTestName);

}  // namespace
}  // namespace mapl
