// bf16 conversion and the tensor checks.
#include "kernels/tensor.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace mapl {
namespace {

TEST(Bf16, RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  // 1 + 2^-8 is exactly half-way between bf16 1.0 and 1 + 2^-7: ties go to even (1.0).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.f, -8))), 1.0f);
  // Just above half-way rounds up.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.f, -8) + std::ldexp(1.f, -20))),
            1.0f + std::ldexp(1.f, -7));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::infinity()))));
  for (float v : {0.1f, -3.75f, 1e-20f, 6.5e4f}) {
    EXPECT_NEAR(Bf16ToFloat(FloatToBf16(v)), v, std::fabs(v) * (1.f / 256));
  }
}

TEST(TensorChecks, ShapeAndFinite) {
  float data[6] = {1, 2, 3, 4, 5, 6};
  ConstTensor t = ConstTensor::F32(data, 2, 3);
  EXPECT_TRUE(CheckShape(t, "t", 2, 3).ok());
  EXPECT_TRUE(CheckShape(t, "t", -1, 3).ok());
  absl::Status s = CheckShape(t, "h", 3, 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "h: expected shape (3, 2), got (2, 3)");
  EXPECT_TRUE(CheckFinite(t, "t").ok());
  data[4] = std::numeric_limits<float>::infinity();
  s = CheckFinite(t, "h");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("(1, 1)"), std::string::npos) << s;
}

TEST(TensorStaging, F32ViewAndOutputConvert) {
  float f[4] = {1.5f, -2.f, 0.25f, 3.f};
  bf16_t b[4];
  FloatToBf16(f, b, 4);
  F32View v(ConstTensor::BF16(b, 2, 2));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(v.data()[i], f[i]);
  F32View same(ConstTensor::F32(f, 2, 2));
  EXPECT_EQ(same.data(), f);  // no copy for f32
  bf16_t out[4] = {};
  F32Output o(Tensor::BF16(out, 2, 2));
  for (int i = 0; i < 4; ++i) o.data()[i] = f[i];
  o.Commit();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(Bf16ToFloat(out[i]), f[i]);
}

}  // namespace
}  // namespace mapl
