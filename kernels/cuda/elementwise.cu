// Elementwise kernels of the CUDA backend: bf16 <-> f32, the finite check, and the per-token int8
// and int4 codecs (kernels/cuda/kernels.h). Built without fast-math: the codecs match
// kernels/cpu/scalar_codec.cc bit for bit only with IEEE division and rintf.
#include <cfloat>
#include <cstdint>

#include "kernels/cuda/kernels.h"

namespace mapl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Grid-stride launches: enough blocks to fill the device, capped so the grid size fits.
unsigned BlocksFor(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// As mapl::FloatToBf16 (kernels/tensor.h): round to nearest even, NaN stays a quiet NaN.
__device__ inline uint16_t F32ToBf16Bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

__device__ inline float Bf16BitsToF32(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

// The smallest bfloat16 value >= f, for finite f >= 0 (RoundUpToBf16 of scalar_codec.cc).
__device__ inline float RoundUpToBf16(float f) {
  uint32_t u = __float_as_uint(f);
  if (u & 0xffffu) u = (u & 0xffff0000u) + 0x10000u;
  return __uint_as_float(u);
}

template <bool kBf16>
__device__ inline float Load(const void* p, int64_t i) {
  if constexpr (kBf16) {
    return Bf16BitsToF32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return static_cast<const float*>(p)[i];
  }
}

__global__ void Bf16ToF32Kernel(const uint16_t* src, float* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = Bf16BitsToF32(src[i]);
  }
}

__global__ void F32ToBf16Kernel(const float* src, uint16_t* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = F32ToBf16Bits(src[i]);
  }
}

// All exponent bits set is NaN or Inf, for float32 and bfloat16 alike.
template <bool kBf16>
__global__ void FirstNonFiniteKernel(const void* src, int64_t count,
                                     unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    bool bad;
    if constexpr (kBf16) {
      bad = (static_cast<const uint16_t*>(src)[i] & 0x7f80u) == 0x7f80u;
    } else {
      bad = (static_cast<const uint32_t*>(src)[i] & 0x7f800000u) == 0x7f800000u;
    }
    if (bad) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

__global__ void AddInPlaceKernel(float* r, const float* o, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    r[i] = r[i] + o[i];
  }
}

__global__ void GatherRowsKernel(const float* table, int64_t cols, const int32_t* tokens, int64_t n,
                                 float* out) {
  const int64_t count = n * cols;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / cols, j = e % cols;
    out[e] = table[int64_t{tokens[i]} * cols + j];
  }
}

__global__ void ScatterAddRowsKernel(const float* src, int64_t n, int64_t cols,
                                     const int32_t* tokens, float* rows, uint8_t* touched) {
  const int64_t count = n * cols;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / cols, j = e % cols;
    const int64_t t = tokens[i];
    atomicAdd(&rows[t * cols + j], src[e]);
    if (j == 0) touched[t] = 1;
  }
}

__global__ void FirstBadTouchedRowKernel(const float* rows, const uint8_t* touched,
                                         int64_t count_rows, int64_t cols,
                                         unsigned long long* first_bad) {
  const int64_t count = count_rows * cols;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = e / cols;
    if (touched[t] && !isfinite(rows[e])) atomicMin(first_bad, static_cast<unsigned long long>(t));
  }
}

__global__ void AdamCheckKernel(const float* g, const float* v, float b2, int64_t count,
                                unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const double v_new = static_cast<double>(b2) * v[i] +
                         (1.0 - b2) * static_cast<double>(g[i]) * static_cast<double>(g[i]);
    if (!isfinite(g[i]) || !(v_new <= static_cast<double>(FLT_MAX))) {
      atomicMin(first_bad, static_cast<unsigned long long>(i));
    }
  }
}

__global__ void AdamStepKernel(float* p, const float* g, float* m, float* v, int64_t count,
                               float b1, float b2, float step_size, float inv_sqrt_bc2, float eps,
                               float decay) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float gi = g[i];
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    // g^2 in double: it may exceed FLT_MAX where (1 - beta2) g^2 does not.
    const float vi = static_cast<float>(static_cast<double>(b2) * v[i] +
                                        (1.0 - b2) * static_cast<double>(gi) * gi);
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
  }
}

// code = rintf(v / scale) clamped to [-qmax, qmax]; 0 when the scale underflowed to 0 (rows of
// tiny subnormals), as the CPU's QuantizeRow.
__device__ inline int QuantizeValue(float v, float scale, float qmax) {
  if (scale == 0.f) return 0;
  const float r = rintf(v / scale);
  return static_cast<int>(fminf(fmaxf(r, -qmax), qmax));
}

// One warp per row: max |x| by a warp reduction (max is exact, so its order does not matter),
// then the codes.
template <bool kBf16, bool kInt4>
__global__ void QuantizeRowsKernel(const void* x, int64_t n, int64_t k, void* codes,
                                   float* scales) {
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;  // the whole warp leaves together
  const float qmax = kInt4 ? 7.f : 127.f;
  const int64_t base = row * k;
  float max_abs = 0.f;
  for (int64_t j = lane; j < k; j += 32) max_abs = fmaxf(max_abs, fabsf(Load<kBf16>(x, base + j)));
  for (int offset = 16; offset > 0; offset /= 2) {
    max_abs = fmaxf(max_abs, __shfl_xor_sync(0xffffffffu, max_abs, offset));
  }
  const float scale = RoundUpToBf16(max_abs / qmax);
  if (lane == 0) scales[row] = scale;
  if constexpr (kInt4) {
    const int64_t row_bytes = (k + 1) / 2;
    uint8_t* out = static_cast<uint8_t*>(codes) + row * row_bytes;
    for (int64_t b = lane; b < row_bytes; b += 32) {
      const int lo = QuantizeValue(Load<kBf16>(x, base + 2 * b), scale, qmax);
      const int hi =
          2 * b + 1 < k ? QuantizeValue(Load<kBf16>(x, base + 2 * b + 1), scale, qmax) : 0;
      out[b] = static_cast<uint8_t>((lo & 0x0f) | ((hi & 0x0f) << 4));
    }
  } else {
    int8_t* out = static_cast<int8_t*>(codes) + base;
    for (int64_t j = lane; j < k; j += 32) {
      out[j] = static_cast<int8_t>(QuantizeValue(Load<kBf16>(x, base + j), scale, qmax));
    }
  }
}

// code * scale, clamped: only rows near FLT_MAX can round past it (Dequantize of the CPU).
template <bool kInt4>
__global__ void DequantizeRowsKernel(const void* codes, const float* scales, int64_t n, int64_t k,
                                     float* out) {
  const int64_t count = n * k;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / k, j = e % k;
    int code;
    if constexpr (kInt4) {
      const uint8_t byte = static_cast<const uint8_t*>(codes)[i * ((k + 1) / 2) + j / 2];
      const int nibble = (byte >> (4 * (j % 2))) & 0x0f;
      code = nibble >= 8 ? nibble - 16 : nibble;  // sign-extend
    } else {
      code = static_cast<const int8_t*>(codes)[e];
    }
    out[e] = fminf(fmaxf(static_cast<float>(code) * scales[i], -FLT_MAX), FLT_MAX);
  }
}

}  // namespace

cudaError_t LaunchBf16ToF32(const uint16_t* src, float* dst, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  Bf16ToF32Kernel<<<BlocksFor(count), kThreads, 0, stream>>>(src, dst, count);
  return cudaGetLastError();
}

cudaError_t LaunchF32ToBf16(const float* src, uint16_t* dst, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  F32ToBf16Kernel<<<BlocksFor(count), kThreads, 0, stream>>>(src, dst, count);
  return cudaGetLastError();
}

cudaError_t LaunchFirstNonFinite(const void* src, bool bf16, int64_t count,
                                 unsigned long long* first_bad, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (bf16) {
    FirstNonFiniteKernel<true><<<BlocksFor(count), kThreads, 0, stream>>>(src, count, first_bad);
  } else {
    FirstNonFiniteKernel<false><<<BlocksFor(count), kThreads, 0, stream>>>(src, count, first_bad);
  }
  return cudaGetLastError();
}

cudaError_t LaunchAddInPlace(float* r, const float* o, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  AddInPlaceKernel<<<BlocksFor(count), kThreads, 0, stream>>>(r, o, count);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(const float* table, int64_t cols, const int32_t* tokens, int64_t n,
                             float* out, cudaStream_t stream) {
  if (n * cols == 0) return cudaSuccess;
  GatherRowsKernel<<<BlocksFor(n * cols), kThreads, 0, stream>>>(table, cols, tokens, n, out);
  return cudaGetLastError();
}

cudaError_t LaunchScatterAddRows(const float* src, int64_t n, int64_t cols, const int32_t* tokens,
                                 float* rows, uint8_t* touched, cudaStream_t stream) {
  if (n * cols == 0) return cudaSuccess;
  ScatterAddRowsKernel<<<BlocksFor(n * cols), kThreads, 0, stream>>>(src, n, cols, tokens, rows,
                                                                     touched);
  return cudaGetLastError();
}

cudaError_t LaunchFirstBadTouchedRow(const float* rows, const uint8_t* touched, int64_t count_rows,
                                     int64_t cols, unsigned long long* first_bad,
                                     cudaStream_t stream) {
  if (count_rows * cols == 0) return cudaSuccess;
  FirstBadTouchedRowKernel<<<BlocksFor(count_rows * cols), kThreads, 0, stream>>>(
      rows, touched, count_rows, cols, first_bad);
  return cudaGetLastError();
}

cudaError_t LaunchAdamCheck(const float* g, const float* v, float b2, int64_t count,
                            unsigned long long* first_bad, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  AdamCheckKernel<<<BlocksFor(count), kThreads, 0, stream>>>(g, v, b2, count, first_bad);
  return cudaGetLastError();
}

cudaError_t LaunchAdamStep(float* p, const float* g, float* m, float* v, int64_t count, float b1,
                           float b2, float step_size, float inv_sqrt_bc2, float eps, float decay,
                           cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  AdamStepKernel<<<BlocksFor(count), kThreads, 0, stream>>>(p, g, m, v, count, b1, b2, step_size,
                                                            inv_sqrt_bc2, eps, decay);
  return cudaGetLastError();
}

cudaError_t LaunchQuantizeRows(const void* x, bool bf16, int64_t n, int64_t k, bool int4,
                               void* codes, float* scales, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (bf16 && int4) {
    QuantizeRowsKernel<true, true><<<blocks, kThreads, 0, stream>>>(x, n, k, codes, scales);
  } else if (bf16) {
    QuantizeRowsKernel<true, false><<<blocks, kThreads, 0, stream>>>(x, n, k, codes, scales);
  } else if (int4) {
    QuantizeRowsKernel<false, true><<<blocks, kThreads, 0, stream>>>(x, n, k, codes, scales);
  } else {
    QuantizeRowsKernel<false, false><<<blocks, kThreads, 0, stream>>>(x, n, k, codes, scales);
  }
  return cudaGetLastError();
}

cudaError_t LaunchDequantizeRows(const void* codes, bool int4, const float* scales, int64_t n,
                                 int64_t k, float* out, cudaStream_t stream) {
  const int64_t count = n * k;
  if (count == 0) return cudaSuccess;
  if (int4) {
    DequantizeRowsKernel<true><<<BlocksFor(count), kThreads, 0, stream>>>(codes, scales, n, k, out);
  } else {
    DequantizeRowsKernel<false>
        <<<BlocksFor(count), kThreads, 0, stream>>>(codes, scales, n, k, out);
  }
  return cudaGetLastError();
}

}  // namespace mapl::cuda
