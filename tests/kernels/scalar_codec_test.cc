// Tests of every backend's per-token int8 and int4 codecs (kernels/cpu/scalar_codec.cc on the
// CPU): codes against a naive double-precision reference, the round-trip bound, bf16 edges, the
// int4 packing, untrusted input, and buffers of the wrong size.
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

// ---- int4 ----

// Code j of row i of an int4 buffer with row_bytes bytes a row: nibble j % 2 (low first) of byte
// j / 2, as 4-bit two's complement.
int Int4Code(const std::vector<uint8_t>& q, int64_t row_bytes, int64_t i, int64_t j) {
  const int nibble = (q[i * row_bytes + j / 2] >> (4 * (j % 2))) & 0x0f;
  return nibble >= 8 ? nibble - 16 : nibble;
}

// Even and odd k (an odd row ends in a padding nibble): codes are the nearest in [-7, 7] to
// x / scale with scale = max|x| / 7 rounded up to bf16, the decoder gives exactly code * scale,
// within scale / 2 of x, and zero rows code to zero.
TEST_P(ScalarCodecTest, Int4EncodeMatchesReferenceAndRoundTripsWithinHalfScale) {
  for (int k : {24, 23, 1}) {
    SCOPED_TRACE(testing::Message() << "k " << k);
    std::mt19937 rng(4);
    const int n = 37;
    const int64_t row_bytes = (k + 1) / 2;
    std::vector<float> x;
    if (k >= 6) {
      x = TestRows(rng, n, k);
    } else {  // TestRows needs k >= 6: the first k values of each of its rows
      const std::vector<float> wide = TestRows(rng, n, 6);
      for (int i = 0; i < n; ++i) x.insert(x.end(), wide.begin() + i * 6, wide.begin() + i * 6 + k);
    }
    std::vector<uint8_t> q(n * row_bytes, 0xaa);
    std::vector<float> scales(n), out(x.size());
    ASSERT_TRUE(
        be_->Int4Encode(ConstTensor::F32(x.data(), n, k), absl::MakeSpan(q), absl::MakeSpan(scales))
            .ok());
    ASSERT_TRUE(be_->Int4Decode(q, scales, Tensor::F32(out.data(), n, k)).ok());
    int zero_rows = 0;
    for (int i = 0; i < n; ++i) {
      double max_abs = 0.0;
      for (int j = 0; j < k; ++j) max_abs = std::max(max_abs, std::fabs(double{x[i * k + j]}));
      EXPECT_GE(scales[i], static_cast<float>(max_abs / 7.0)) << "row " << i;
      EXPECT_LE(scales[i], max_abs / 7.0 * (1 + 1.0 / 128) * (1 + 1e-6)) << "row " << i;
      EXPECT_EQ(Bf16ToFloat(FloatToBf16(scales[i])), scales[i]) << "row " << i;
      if (k % 2 == 1) {
        EXPECT_EQ(q[i * row_bytes + row_bytes - 1] >> 4, 0) << "padding, row " << i;
      }
      if (max_abs == 0.0) ++zero_rows;
      for (int j = 0; j < k; ++j) {
        const int code = Int4Code(q, row_bytes, i, j);
        const double xv = x[i * k + j];
        EXPECT_GE(code, -7);
        EXPECT_LE(code, 7);
        EXPECT_EQ(out[i * k + j], static_cast<float>(code) * scales[i]) << i << ", " << j;
        if (scales[i] == 0.f) {
          EXPECT_EQ(code, 0);
          continue;
        }
        EXPECT_LE(std::fabs(code - xv / scales[i]), 0.5 + 1e-4) << i << ", " << j;
        EXPECT_LE(std::fabs(out[i * k + j] - xv), scales[i] / 2 * (1 + 1e-5)) << i << ", " << j;
        if (std::fabs(xv) == max_abs) {
          EXPECT_EQ(std::abs(code), 7);  // 7 / (1 + 2^-7) still rounds to 7
        }
      }
    }
    EXPECT_GE(zero_rows, 1);
  }
}

// Values on a scale's grid (code * scale, the largest |code| 7, scale a bf16 value) come back
// bit for bit, through every one of the 15 codes.
TEST_P(ScalarCodecTest, Int4DecodesTheEncodersValuesExactly) {
  const int k = 15, n = 4;
  const float grid[n] = {1.f, 0.0078125f, 3.5f, 1.5e-3f};
  std::vector<float> x(n * k);
  for (int i = 0; i < n; ++i) {
    const float scale = Bf16ToFloat(FloatToBf16(grid[i]));
    for (int j = 0; j < k; ++j) x[i * k + j] = static_cast<float>((j * (i + 1)) % 15 - 7) * scale;
  }
  std::vector<uint8_t> q(n * 8);
  std::vector<float> scales(n), out(x.size());
  ASSERT_TRUE(
      be_->Int4Encode(ConstTensor::F32(x.data(), n, k), absl::MakeSpan(q), absl::MakeSpan(scales))
          .ok());
  ASSERT_TRUE(be_->Int4Decode(q, scales, Tensor::F32(out.data(), n, k)).ok());
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(scales[i], Bf16ToFloat(FloatToBf16(grid[i]))) << i;
    std::vector<bool> seen(15, false);
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(Int4Code(q, 8, i, j), (j * (i + 1)) % 15 - 7) << i << ", " << j;
      seen[Int4Code(q, 8, i, j) + 7] = true;
    }
    if (i == 0) {
      EXPECT_EQ(std::count(seen.begin(), seen.end(), true), 15);
    }
  }
  EXPECT_EQ(out, x);
}

// The padding nibble of an odd row is not a value: whatever it holds, the row decodes the same.
// The nibble -8, never written, decodes to -8 * scale.
TEST_P(ScalarCodecTest, Int4DecodeIgnoresPaddingAndDecodesMinusEight) {
  const int n = 2, k = 3;
  std::vector<uint8_t> q = {0x7f, 0x01, 0x88, 0x0f};  // (-1, 7, 1 | pad 0), (-8, -8, -1 | 0)
  const std::vector<float> scales = {0.5f, 2.f};
  std::vector<float> out(n * k), padded(n * k);
  ASSERT_TRUE(be_->Int4Decode(q, scales, Tensor::F32(out.data(), n, k)).ok());
  EXPECT_EQ(out, (std::vector<float>{-0.5f, 3.5f, 0.5f, -16.f, -16.f, -2.f}));
  q[1] |= 0xf0;
  q[3] |= 0x70;
  ASSERT_TRUE(be_->Int4Decode(q, scales, Tensor::F32(padded.data(), n, k)).ok());
  EXPECT_EQ(padded, out);
}

TEST_P(ScalarCodecTest, Int4Bf16InputAndExtremeMagnitudes) {
  std::mt19937 rng(5);
  const int n = 9, k = 17;
  const std::vector<float> x = TestRows(rng, n, k);
  std::vector<bf16_t> xb(x.size());
  FloatToBf16(x.data(), xb.data(), x.size());
  std::vector<float> xr(x.size());
  Bf16ToFloat(xb.data(), xr.data(), x.size());
  std::vector<uint8_t> q_b(n * 9), q_f(n * 9);
  std::vector<float> s_b(n), s_f(n);
  ASSERT_TRUE(
      be_->Int4Encode(ConstTensor::BF16(xb.data(), n, k), absl::MakeSpan(q_b), absl::MakeSpan(s_b))
          .ok());
  ASSERT_TRUE(
      be_->Int4Encode(ConstTensor::F32(xr.data(), n, k), absl::MakeSpan(q_f), absl::MakeSpan(s_f))
          .ok());
  EXPECT_EQ(q_b, q_f);
  EXPECT_EQ(s_b, s_f);
  std::vector<bf16_t> out_b(x.size());
  std::vector<float> out_f(x.size());
  ASSERT_TRUE(be_->Int4Decode(q_b, s_b, Tensor::BF16(out_b.data(), n, k)).ok());
  ASSERT_TRUE(be_->Int4Decode(q_b, s_b, Tensor::F32(out_f.data(), n, k)).ok());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(out_b[i], FloatToBf16(out_f[i])) << i;

  // FLT_MAX does not overflow (7 * scale may round past it: clamped, not Inf); a scale that
  // underflows to 0 gives codes 0.
  const std::vector<float> big = {FLT_MAX, -FLT_MAX / 2, 1.f, 1e-45f, -1e-45f, 0.f};
  std::vector<uint8_t> q(4);
  std::vector<float> scales(2), out(big.size());
  ASSERT_TRUE(
      be_->Int4Encode(ConstTensor::F32(big.data(), 2, 3), absl::MakeSpan(q), absl::MakeSpan(scales))
          .ok());
  ASSERT_TRUE(be_->Int4Decode(q, scales, Tensor::F32(out.data(), 2, 3)).ok());
  EXPECT_EQ(Int4Code(q, 2, 0, 0), 7);
  EXPECT_LE(Int4Code(q, 2, 0, 1), -3);  // -3.5 scales, give or take the rounded-up scale
  EXPECT_GE(Int4Code(q, 2, 0, 1), -4);
  EXPECT_EQ(scales[1], 0.f);
  EXPECT_EQ(q[2], 0);
  EXPECT_EQ(q[3], 0);
  for (float v : out) EXPECT_TRUE(std::isfinite(v)) << v;
}

TEST_P(ScalarCodecTest, Int4EmptyIsFine) {
  float scale = -1.f;
  EXPECT_TRUE(be_->Int4Encode(ConstTensor::F32(nullptr, 0, 8), {}, {}).ok());
  EXPECT_TRUE(be_->Int4Decode({}, {}, Tensor::F32(nullptr, 0, 8)).ok());
  EXPECT_TRUE(be_->Int4Encode(ConstTensor::F32(nullptr, 1, 0), {}, absl::MakeSpan(&scale, 1)).ok());
  EXPECT_EQ(scale, 0.f);
}

TEST_P(ScalarCodecTest, Int4EncodeRejectsNonFiniteAndWrongSizes) {
  const int n = 3, k = 5;  // 3 bytes a row
  std::vector<float> x(n * k, 1.f), scales(n + 1, 9.f);
  std::vector<uint8_t> q(n * 3 + 1, 9);
  const ConstTensor xt = ConstTensor::F32(x.data(), n, k);
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    x[1 * k + 3] = bad;
    const absl::Status s =
        be_->Int4Encode(xt, absl::MakeSpan(q.data(), n * 3), absl::MakeSpan(scales.data(), n));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("(1, 3)"), std::string::npos) << s;
  }
  x[1 * k + 3] = 1.f;
  auto expect_invalid = [](const absl::Status& s, const std::string& name) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(s.message().rfind(name + ": expected ", 0), 0u) << s;
  };
  for (int delta : {-1, 1}) {
    SCOPED_TRACE(testing::Message() << "delta " << delta);
    // n * k codes would be the int8 size: int4 wants n * ceil(k / 2).
    expect_invalid(be_->Int4Encode(xt, absl::MakeSpan(q.data(), n * 3 + delta),
                                   absl::MakeSpan(scales.data(), n)),
                   "q");
    expect_invalid(be_->Int4Encode(xt, absl::MakeSpan(q.data(), n * 3),
                                   absl::MakeSpan(scales.data(), n + delta)),
                   "scales");
  }
  for (uint8_t v : q) EXPECT_EQ(v, 9);  // nothing written
  for (float v : scales) EXPECT_EQ(v, 9.f);
  EXPECT_EQ(be_->Int4Encode(ConstTensor::F32(nullptr, n, k), absl::MakeSpan(q.data(), n * 3),
                            absl::MakeSpan(scales.data(), n))
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(ScalarCodecTest, Int4DecodeRejectsCorruptScalesAndWrongSizes) {
  const int n = 3, k = 4;
  std::vector<uint8_t> q(n * 2, 0x71);  // codes 1, 7
  std::vector<float> out(n * k, 7.f);
  std::vector<float> scales = {1.f, 0.5f, 2.f};
  ASSERT_TRUE(be_->Int4Decode(q, scales, Tensor::F32(out.data(), n, k)).ok());
  EXPECT_EQ(out[1], 7.f);
  EXPECT_EQ(out[k], 0.5f);
  for (float bad : {std::nanf(""), INFINITY, -1.f}) {
    scales[2] = bad;
    std::fill(out.begin(), out.end(), 7.f);
    const absl::Status s = be_->Int4Decode(q, scales, Tensor::F32(out.data(), n, k));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("row 2"), std::string::npos) << s;
    for (float v : out) EXPECT_EQ(v, 7.f);
  }
  scales[2] = 1.f;
  q.push_back(0);
  for (size_t size : {q.size() - 2, q.size()}) {
    const absl::Status s =
        be_->Int4Decode(absl::MakeConstSpan(q.data(), size), scales, Tensor::F32(out.data(), n, k));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << size;
    EXPECT_EQ(s.message().rfind("q: expected ", 0), 0u) << s;
  }
  EXPECT_EQ(be_->Int4Decode(absl::MakeConstSpan(q.data(), n * 2), {}, Tensor::F32(out.data(), n, k))
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      be_->Int4Decode(absl::MakeConstSpan(q.data(), n * 2), scales, Tensor::F32(nullptr, n, k))
          .code(),
      absl::StatusCode::kInvalidArgument);
  for (float v : out) EXPECT_EQ(v, 7.f);
}

INSTANTIATE_TEST_SUITE_P(Backends, ScalarCodecTest, ::testing::ValuesIn(BackendNames()),
                         BackendTestName);

}  // namespace
}  // namespace mapl
