// Non-owning views of row-major 2-D tensors, the dtypes the codec accepts at its edges, and
// bfloat16 conversion. Every kernel computes in fp32; bf16 appears only where tensors enter or
// leave (activations, gradients, dictionary rows on the wire).
//
//   std::vector<float> h(n * d);
//   mapl::ConstTensor in = mapl::ConstTensor::F32(h.data(), n, d);
//   mapl::Tensor out = mapl::Tensor::BF16(bf16_buffer, n, k);
#ifndef MAPL_KERNELS_TENSOR_H_
#define MAPL_KERNELS_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace mapl {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1 };

const char* DTypeName(DType t);
// Bytes per element: 4 for float32, 2 for bfloat16.
size_t DTypeSize(DType t);

// bfloat16 stored as its raw 16 bits.
using bf16_t = uint16_t;

// Round-to-nearest-even fp32 -> bf16; NaN stays NaN (quiet).
inline bf16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16_t>(u >> 16);
}

inline float Bf16ToFloat(bf16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void FloatToBf16(const float* src, bf16_t* dst, size_t count);
void Bf16ToFloat(const bf16_t* src, float* dst, size_t count);

// A read-only row-major matrix: rows x cols elements of `dtype`, row stride == cols.
struct ConstTensor {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kF32;

  static ConstTensor F32(const float* p, int64_t r, int64_t c) { return {p, r, c, DType::kF32}; }
  static ConstTensor BF16(const bf16_t* p, int64_t r, int64_t c) { return {p, r, c, DType::kBF16}; }
  int64_t size() const { return rows * cols; }
  const float* f32() const { return static_cast<const float*>(data); }
  const bf16_t* bf16() const { return static_cast<const bf16_t*>(data); }
};

// A writable row-major matrix.
struct Tensor {
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kF32;

  static Tensor F32(float* p, int64_t r, int64_t c) { return {p, r, c, DType::kF32}; }
  static Tensor BF16(bf16_t* p, int64_t r, int64_t c) { return {p, r, c, DType::kBF16}; }
  int64_t size() const { return rows * cols; }
  float* f32() const { return static_cast<float*>(data); }
  bf16_t* bf16() const { return static_cast<bf16_t*>(data); }
  operator ConstTensor() const { return {data, rows, cols, dtype}; }
};

// INVALID_ARGUMENT unless `t` is non-null (when non-empty) and has exactly rows x cols;
// `what` names the argument in the message ("h", "codes", ...). rows or cols < 0 means "any".
// Each dimension must also fit a 32-bit int: BLAS and LAPACK index with int, and the product
// rows * cols then cannot overflow.
absl::Status CheckShape(const ConstTensor& t, const char* what, int64_t rows, int64_t cols);

// INVALID_ARGUMENT unless a buffer argument of `size` elements at `data` holds exactly `want`
// elements (and has data when non-empty). `what` names the argument, `meaning` says what `want`
// is made of, e.g. "n * L = 300 * 2", so that the message tells the caller how to size it.
absl::Status CheckBufferSize(const void* data, size_t size, const char* what, int64_t want,
                             absl::string_view meaning);
template <typename T>
absl::Status CheckSpanSize(absl::Span<T> s, const char* what, int64_t want,
                           absl::string_view meaning) {
  return CheckBufferSize(s.data(), s.size(), what, want, meaning);
}

// CheckShape, and INVALID_ARGUMENT unless `t` is float32.
absl::Status CheckF32Matrix(const ConstTensor& t, const char* what, int64_t rows, int64_t cols);

// A float32 (d, k) matrix with d >= k >= 1: the shape of U and of everything on the manifold.
absl::Status CheckTallF32(const ConstTensor& t, const char* what);

// out = result (accumulate: out += result) unless a value would be NaN or Inf, in which case
// INVALID_ARGUMENT and `out` is left unchanged: learner state is never poisoned
// (docs/ARCHITECTURE.md). result must hold out.size() values; it is modified.
absl::Status CommitFinite(std::vector<float>& result, const Tensor& out, bool accumulate,
                          const char* what);

// INVALID_ARGUMENT naming the first non-finite element (row, col) of `t`, if any.
absl::Status CheckFinite(const ConstTensor& t, const char* what);

// The three helpers below are handed buffers their caller sized from the same tensor, so a size
// mismatch is a bug, not bad input: they stop the process (MAPL_CHECK) rather than return an error.

// Copies src's raw elements to `dst` (exactly src.size() * DTypeSize(src.dtype) bytes) and checks
// them in the same pass: false if any is NaN or Inf (then CheckFinite on the copy names the first
// one). One pass instead of copy + check: taking a trainer's tensor is memory-bound.
bool CopyAndCheckFinite(const ConstTensor& src, absl::Span<char> dst);

// Copies `src` (any dtype) into fp32 `dst`, which holds exactly src.size() floats.
void ToF32(const ConstTensor& src, absl::Span<float> dst);
// Writes fp32 `src` (exactly dst.size() floats) into `dst` in dst's dtype.
void FromF32(absl::Span<const float> src, const Tensor& dst);

// An fp32 view of a ConstTensor: the data itself when it is f32, a converted copy when bf16.
class F32View {
 public:
  explicit F32View(const ConstTensor& t);
  const float* data() const { return ptr_; }

 private:
  std::vector<float> copy_;
  const float* ptr_;
};

// An fp32 destination for a Tensor: writes go straight to it when it is f32, or to a scratch
// buffer that Commit() converts into it when bf16. Call Commit() once the fp32 result is done.
class F32Output {
 public:
  explicit F32Output(const Tensor& t);
  float* data() { return ptr_; }
  void Commit();

 private:
  Tensor target_;
  std::vector<float> scratch_;
  float* ptr_;
};

}  // namespace mapl

#endif  // MAPL_KERNELS_TENSOR_H_
