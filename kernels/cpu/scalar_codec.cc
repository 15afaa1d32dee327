// Per-token symmetric int8: the default codec of the backward wire (docs/METHOD.md section 2), k
// bytes of codes plus one scale per token. The scale is rounded *up* to a bfloat16 value before the
// codes are computed, so the wire carries it in 2 bytes (k + 2 bytes a token) and the decoder
// sees exactly the scale the encoder divided by.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"

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

}  // namespace

absl::Status CpuBackend::Int8Encode(const ConstTensor& x, absl::Span<int8_t> q,
                                    absl::Span<float> scales) const {
  MAPL_RETURN_IF_ERROR(CheckShape(x, "x", -1, -1));
  const int64_t n = x.rows;
  const int64_t k = x.cols;
  MAPL_RETURN_IF_ERROR(CheckSpanSize(q, "q", n * k, absl::StrCat("n * k = ", n, " * ", k)));
  MAPL_RETURN_IF_ERROR(CheckSpanSize(scales, "scales", n, "one per row of x"));
  // A NaN would make the scale NaN and the codes meaningless, and Inf would divide to NaN: refuse
  // both rather than send garbage the decoder cannot detect.
  MAPL_RETURN_IF_ERROR(CheckFinite(x, "x"));

  F32View xv(x);
  const float* xf = xv.data();
  for (int64_t i = 0; i < n; ++i) {
    const float* row = xf + i * k;
    int8_t* qrow = q.data() + i * k;
    float max_abs = 0.f;
    for (int64_t j = 0; j < k; ++j) max_abs = std::max(max_abs, std::fabs(row[j]));
    const float scale = RoundUpToBf16(max_abs / 127.f);
    scales[i] = scale;
    // scale also underflows to 0 for rows of tiny subnormals; the codes must then be 0 too,
    // since dividing by it would give Inf and an out-of-range cast.
    if (scale == 0.f) {
      std::fill(qrow, qrow + k, int8_t{0});
      continue;
    }
    for (int64_t j = 0; j < k; ++j) {
      // Division (not multiplication by 127 / max) keeps the round-trip error within scale / 2
      // up to one rounding; the clamp guards the last ulp at +-max.
      const float r = std::nearbyint(row[j] / scale);
      qrow[j] = static_cast<int8_t>(std::clamp(r, -127.f, 127.f));
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Int8Decode(absl::Span<const int8_t> q, absl::Span<const float> scales,
                                    const Tensor& out) const {
  MAPL_RETURN_IF_ERROR(CheckShape(out, "out", -1, -1));
  const int64_t n = out.rows;
  const int64_t k = out.cols;
  MAPL_RETURN_IF_ERROR(CheckSpanSize(q, "q", n * k, absl::StrCat("n * k = ", n, " * ", k)));
  MAPL_RETURN_IF_ERROR(CheckSpanSize(scales, "scales", n, "one per row of out"));
  // Scales arrive from the peer: a negative or non-finite one can only come from a corrupt or
  // hostile frame, and would hand the trainer NaN gradients.
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(scales[i]) || scales[i] < 0.f) {
      return absl::InvalidArgumentError(
          absl::StrCat("scales: invalid scale ", scales[i], " at row ", i));
    }
  }

  F32Output o(out);
  float* of = o.data();
  for (int64_t i = 0; i < n; ++i) {
    const float scale = scales[i];
    const int8_t* qrow = q.data() + i * k;
    float* orow = of + i * k;
    // The clamp matters only for rows near FLT_MAX, where 127 * scale can round past it.
    for (int64_t j = 0; j < k; ++j) {
      orow[j] = std::clamp(static_cast<float>(qrow[j]) * scale, -FLT_MAX, FLT_MAX);
    }
  }
  o.Commit();
  return absl::OkStatus();
}

}  // namespace mapl
