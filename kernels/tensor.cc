// Tensor views: shape and finiteness checks, dtype conversion.
#include "kernels/tensor.h"

#include <algorithm>
#include <climits>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/check.h"

namespace mapl {

const char* DTypeName(DType t) { return t == DType::kF32 ? "float32" : "bfloat16"; }

size_t DTypeSize(DType t) { return t == DType::kF32 ? sizeof(float) : sizeof(bf16_t); }

void FloatToBf16(const float* src, bf16_t* dst, size_t count) {
  for (size_t i = 0; i < count; ++i) dst[i] = FloatToBf16(src[i]);
}

void Bf16ToFloat(const bf16_t* src, float* dst, size_t count) {
  for (size_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(src[i]);
}

absl::Status CheckShape(const ConstTensor& t, const char* what, int64_t rows, int64_t cols) {
  if (t.rows < 0 || t.cols < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": negative shape (", t.rows, ", ", t.cols, ")"));
  }
  if (t.rows > INT_MAX || t.cols > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": shape (", t.rows, ", ", t.cols,
                                                   ") too large: each dimension must be < 2^31"));
  }
  if ((rows >= 0 && t.rows != rows) || (cols >= 0 && t.cols != cols)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": expected shape (", rows < 0 ? std::string("*") : absl::StrCat(rows), ", ",
        cols < 0 ? std::string("*") : absl::StrCat(cols), "), got (", t.rows, ", ", t.cols, ")"));
  }
  if (t.size() > 0 && t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": null data for a non-empty tensor"));
  }
  return absl::OkStatus();
}

absl::Status CheckBufferSize(const void* data, size_t size, const char* what, int64_t want,
                             absl::string_view meaning) {
  if (want < 0 || size != static_cast<size_t>(want)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected ", want, " elements (", meaning, "), got ", size));
  }
  if (size > 0 && data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": null data for ", size, " elements"));
  }
  return absl::OkStatus();
}

absl::Status CheckF32Matrix(const ConstTensor& t, const char* what, int64_t rows, int64_t cols) {
  absl::Status s = CheckShape(t, what, rows, cols);
  if (!s.ok()) return s;
  if (t.dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected float32, got ", DTypeName(t.dtype)));
  }
  return absl::OkStatus();
}

absl::Status CheckTallF32(const ConstTensor& t, const char* what) {
  absl::Status s = CheckF32Matrix(t, what, -1, -1);
  if (!s.ok()) return s;
  if (t.cols < 1 || t.rows < t.cols) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": needs rows >= cols >= 1 (d >= k >= 1), got (", t.rows, ", ", t.cols, ")"));
  }
  return absl::OkStatus();
}

absl::Status CommitFinite(std::vector<float>& result, const Tensor& out, bool accumulate,
                          const char* what) {
  float* o = out.f32();
  if (accumulate) {
    for (size_t i = 0; i < result.size(); ++i) result[i] += o[i];
  }
  for (size_t i = 0; i < result.size(); ++i) {
    if (!std::isfinite(result[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": non-finite result at (", i / out.cols, ", ", i % out.cols,
                       "); the inputs hold NaN or Inf, or overflow; ", what, " left unchanged"));
    }
  }
  std::copy(result.begin(), result.end(), o);
  return absl::OkStatus();
}

absl::Status CheckFinite(const ConstTensor& t, const char* what) {
  const int64_t n = t.size();
  for (int64_t i = 0; i < n; ++i) {
    const float v = t.dtype == DType::kF32 ? t.f32()[i] : Bf16ToFloat(t.bf16()[i]);
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": non-finite value ", v, " at (", i / t.cols, ", ", i % t.cols, ")"));
    }
  }
  return absl::OkStatus();
}

namespace {

// All exponent bits set means NaN or Inf, for float32 and bfloat16 alike. Branch-free, so the
// loop vectorises; blocks keep the early exit cheap.
template <typename Bits>
bool CopyFinite(const Bits* src, Bits* dst, int64_t count, Bits exponent) {
  constexpr int64_t kBlock = 16384;
  bool ok = true;
  for (int64_t b = 0; b < count; b += kBlock) {
    const int64_t e = std::min(count, b + kBlock);
    Bits bad = 0;
    for (int64_t i = b; i < e; ++i) {
      const Bits v = src[i];
      dst[i] = v;
      bad |= static_cast<Bits>((v & exponent) == exponent);
    }
    ok &= bad == 0;
  }
  return ok;
}

}  // namespace

bool CopyAndCheckFinite(const ConstTensor& src, absl::Span<char> dst) {
  MAPL_CHECK(dst.size() == static_cast<size_t>(src.size()) * DTypeSize(src.dtype),
             absl::StrCat("CopyAndCheckFinite: destination of ", dst.size(), " bytes for a (",
                          src.rows, ", ", src.cols, ") ", DTypeName(src.dtype), " tensor"));
  if (src.dtype == DType::kF32) {
    return CopyFinite(static_cast<const uint32_t*>(src.data),
                      reinterpret_cast<uint32_t*>(dst.data()), src.size(), uint32_t{0x7f800000});
  }
  return CopyFinite(src.bf16(), reinterpret_cast<bf16_t*>(dst.data()), src.size(), bf16_t{0x7f80});
}

void ToF32(const ConstTensor& src, absl::Span<float> dst) {
  const size_t n = static_cast<size_t>(src.size());
  MAPL_CHECK(dst.size() == n, absl::StrCat("ToF32: destination of ", dst.size(),
                                           " floats for a tensor of ", n, " elements"));
  if (src.dtype == DType::kF32) {
    if (n) std::memcpy(dst.data(), src.data, n * sizeof(float));
  } else {
    Bf16ToFloat(src.bf16(), dst.data(), n);
  }
}

void FromF32(absl::Span<const float> src, const Tensor& dst) {
  const size_t n = static_cast<size_t>(dst.size());
  MAPL_CHECK(src.size() == n, absl::StrCat("FromF32: source of ", src.size(),
                                           " floats for a tensor of ", n, " elements"));
  if (dst.dtype == DType::kF32) {
    if (n && dst.data != src.data()) std::memcpy(dst.data, src.data(), n * sizeof(float));
  } else {
    FloatToBf16(src.data(), dst.bf16(), n);
  }
}

F32View::F32View(const ConstTensor& t) {
  if (t.dtype == DType::kF32) {
    ptr_ = t.f32();
  } else {
    copy_.resize(static_cast<size_t>(t.size()));
    ToF32(t, absl::MakeSpan(copy_));
    ptr_ = copy_.data();
  }
}

F32Output::F32Output(const Tensor& t) : target_(t) {
  if (t.dtype == DType::kF32) {
    ptr_ = t.f32();
  } else {
    scratch_.resize(static_cast<size_t>(t.size()));
    ptr_ = scratch_.data();
  }
}

void F32Output::Commit() {
  if (target_.dtype != DType::kF32) FromF32(scratch_, target_);
}

}  // namespace mapl
