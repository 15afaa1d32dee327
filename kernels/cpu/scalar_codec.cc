// Per-token symmetric int8 and int4: the backward wire's codecs (docs/METHOD.md section 2.5), k
// bytes (int8) or ceil(k / 2) bytes (int4, two codes a byte) of codes plus one scale per token.
// The scale is rounded *up* to a bfloat16 value before the codes are computed, so the wire carries
// it in 2 bytes and the decoder sees exactly the scale the encoder divided by.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/validation.h"

namespace mapl {
namespace {

// The smallest bfloat16 value >= f, for finite f >= 0.
float RoundUpToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (u & 0xffffu) u = (u & 0xffff0000u) + 0x10000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// Codes row (k finite values) as codes[j] = round(row[j] / scale) in [-qmax, qmax], with
// scale = max |row| / qmax rounded up to a bf16 value; returns the scale. int8 and int4 share it,
// so they differ only in qmax and in how the codes are packed.
float QuantizeRow(const float* row, int64_t k, float qmax, int8_t* codes) {
  float max_abs = 0.f;
  for (int64_t j = 0; j < k; ++j) max_abs = std::max(max_abs, std::fabs(row[j]));
  const float scale = RoundUpToBf16(max_abs / qmax);
  // scale also underflows to 0 for rows of tiny subnormals; the codes must then be 0 too,
  // since dividing by it would give Inf and an out-of-range cast.
  if (scale == 0.f) {
    std::fill(codes, codes + k, int8_t{0});
    return scale;
  }
  for (int64_t j = 0; j < k; ++j) {
    // Division (not multiplication by qmax / max) keeps the round-trip error within scale / 2
    // up to one rounding; the clamp guards the last ulp at +-max.
    const float r = std::nearbyint(row[j] / scale);
    codes[j] = static_cast<int8_t>(std::clamp(r, -qmax, qmax));
  }
  return scale;
}

// code * scale; the clamp matters only for rows near FLT_MAX, where qmax * scale can round past
// it.
float Dequantize(int code, float scale) {
  return std::clamp(static_cast<float>(code) * scale, -FLT_MAX, FLT_MAX);
}

}  // namespace

absl::Status CpuBackend::Int8Encode(const ConstTensor& x, absl::Span<int8_t> q,
                                    absl::Span<float> scales) const {
  MAPL_RETURN_IF_ERROR(CheckScalarCodecArgs(x, "x", /*int4=*/false, q.data(), q.size(), scales));
  const int64_t n = x.rows;
  const int64_t k = x.cols;
  // A NaN would make the scale NaN and the codes meaningless, and Inf would divide to NaN: refuse
  // both rather than send garbage the decoder cannot detect.
  MAPL_RETURN_IF_ERROR(CheckFinite(x, "x"));

  F32View xv(x);
  const float* xf = xv.data();
  for (int64_t i = 0; i < n; ++i) {
    scales[i] = QuantizeRow(xf + i * k, k, 127.f, q.data() + i * k);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Int8Decode(absl::Span<const int8_t> q, absl::Span<const float> scales,
                                    const Tensor& out) const {
  MAPL_RETURN_IF_ERROR(
      CheckScalarCodecArgs(out, "out", /*int4=*/false, q.data(), q.size(), scales));
  const int64_t n = out.rows;
  const int64_t k = out.cols;
  MAPL_RETURN_IF_ERROR(CheckScales(scales));

  F32Output o(out);
  float* of = o.data();
  for (int64_t i = 0; i < n; ++i) {
    const int8_t* qrow = q.data() + i * k;
    float* orow = of + i * k;
    for (int64_t j = 0; j < k; ++j) orow[j] = Dequantize(qrow[j], scales[i]);
  }
  o.Commit();
  return absl::OkStatus();
}

absl::Status CpuBackend::Int4Encode(const ConstTensor& x, absl::Span<uint8_t> q,
                                    absl::Span<float> scales) const {
  MAPL_RETURN_IF_ERROR(CheckScalarCodecArgs(x, "x", /*int4=*/true, q.data(), q.size(), scales));
  const int64_t n = x.rows;
  const int64_t k = x.cols;
  const int64_t row_bytes = (k + 1) / 2;
  // As for int8: NaN or Inf would give codes the decoder cannot tell from good ones.
  MAPL_RETURN_IF_ERROR(CheckFinite(x, "x"));

  F32View xv(x);
  const float* xf = xv.data();
  // One code a byte first, then packed; an odd k leaves the last high nibble 0.
  std::vector<int8_t> codes(k + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    scales[i] = QuantizeRow(xf + i * k, k, 7.f, codes.data());
    uint8_t* qrow = q.data() + i * row_bytes;
    for (int64_t b = 0; b < row_bytes; ++b) {
      const uint8_t lo = static_cast<uint8_t>(codes[2 * b]) & 0x0fu;
      const uint8_t hi = static_cast<uint8_t>(codes[2 * b + 1]) & 0x0fu;
      qrow[b] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Int4Decode(absl::Span<const uint8_t> q, absl::Span<const float> scales,
                                    const Tensor& out) const {
  MAPL_RETURN_IF_ERROR(CheckScalarCodecArgs(out, "out", /*int4=*/true, q.data(), q.size(), scales));
  const int64_t n = out.rows;
  const int64_t k = out.cols;
  const int64_t row_bytes = (k + 1) / 2;
  MAPL_RETURN_IF_ERROR(CheckScales(scales));

  F32Output o(out);
  float* of = o.data();
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* qrow = q.data() + i * row_bytes;
    float* orow = of + i * k;
    for (int64_t j = 0; j < k; ++j) {
      const int nibble = (qrow[j / 2] >> (4 * (j % 2))) & 0x0f;
      orow[j] = Dequantize(nibble >= 8 ? nibble - 16 : nibble, scales[i]);  // sign-extend
    }
  }
  o.Commit();
  return absl::OkStatus();
}

}  // namespace mapl
