// SPEL kernels of the CUDA backend (kernels/cuda/kernels.h): the elementwise steps of
// Newton-Schulz, of the SPEL step and of the polar retraction around the cuBLAS GEMMs of
// kernels/cuda/spel.cc. Each one rounds as kernels/cpu/spel.cc does: where the CPU multiplies and
// adds separately,
// __fmul_rn / __fadd_rn keep nvcc from contracting the two into an FMA.
#include <cstdint>

#include "kernels/cuda/kernels.h"

namespace mapl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSumThreads = 1024;

unsigned BlocksFor(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// One block: every thread sums a fixed stride of x, then a fixed tree. No atomics, so the
// result is the same bits on every run (SumSquaresKernel of rvq.cu adds its blocks in whatever
// order they finish).
__global__ void __launch_bounds__(kSumThreads)
    SumSquaresOneBlockKernel(const float* x, int64_t count, double* out) {
  __shared__ double part[kSumThreads];
  double s = 0;
  for (int64_t i = threadIdx.x; i < count; i += kSumThreads) {
    s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  }
  part[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kSumThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = part[0];
}

__global__ void ScaleToF32Kernel(const float* y, double scale, int64_t count, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = static_cast<float>(static_cast<double>(y[i]) * scale);
  }
}

// err = max |a - I| as NewtonSchulz of spel.cc takes it (std::max(err, NaN) keeps err, so a NaN
// is skipped here too), then a <- (-0.5 a) + 1.5 I, the CPU's two roundings. The maximum of
// non-negative floats is the maximum of their bit patterns, so atomicMax on the bits finds it.
__global__ void NewtonSchulzStepKernel(float* a, int32_t k, unsigned long long* max_dev) {
  const int64_t count = int64_t{k} * k;
  float local = 0.f;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const bool diag = e / k == e % k;
    const float v = a[e];
    const float dev = fabsf(__fsub_rn(v, diag ? 1.f : 0.f));
    if (dev > local) local = dev;
    float next = __fmul_rn(v, -0.5f);
    if (diag) next = __fadd_rn(next, 1.5f);
    a[e] = next;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    local = fmaxf(local, __shfl_xor_sync(0xffffffffu, local, offset));
  }
  if (threadIdx.x % 32 == 0 && local > 0.f) {
    atomicMax(max_dev, static_cast<unsigned long long>(__float_as_uint(local)));
  }
}

// beta m + g in one rounding: the CPU backend's loop is contracted into an FMA (GCC contracts by
// default, and the project's -march=x86-64-v3 has FMA). A CPU build without FMA instructions
// rounds twice, and then the two momenta differ by at most an ulp.
__global__ void MomentumKernel(const float* m, const float* g, float beta, int64_t count,
                               float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __fmaf_rn(beta, m[i], g[i]);
  }
}

// One thread a pair (i, j), i <= j: both entries read before either is written, so in place is
// safe. The diagonal goes through the same formula, as on the CPU (0.5 (x + x) overflows where x
// is above FLT_MAX / 2).
__global__ void SymmetrizeKernel(float* s, int32_t k) {
  const int64_t count = int64_t{k} * k;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / k, j = e % k;
    if (i > j) continue;
    const float v = __fmul_rn(0.5f, __fadd_rn(s[i * k + j], s[j * k + i]));
    s[i * k + j] = v;
    s[j * k + i] = v;
  }
}

// double(u) - double(lr) * double(xi): the product of two floats is exact in double, so an FMA
// rounds it as the CPU's multiply-then-subtract does.
__global__ void RetractionInputKernel(const float* u, const float* xi, float lr, int64_t count,
                                      double* y) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = static_cast<double>(u[i]) - static_cast<double>(lr) * static_cast<double>(xi[i]);
  }
}

__global__ void F32ToF64Kernel(const float* src, double* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = static_cast<double>(src[i]);
  }
}

__global__ void F64ToF32Kernel(const double* src, float* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = __double2float_rn(src[i]);
  }
}

}  // namespace

cudaError_t LaunchSumSquaresDeterministic(const float* x, int64_t count, double* out,
                                          cudaStream_t stream) {
  SumSquaresOneBlockKernel<<<1, kSumThreads, 0, stream>>>(x, count, out);
  return cudaGetLastError();
}

cudaError_t LaunchScaleToF32(const float* y, double scale, int64_t count, float* out,
                             cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  ScaleToF32Kernel<<<BlocksFor(count), kThreads, 0, stream>>>(y, scale, count, out);
  return cudaGetLastError();
}

cudaError_t LaunchNewtonSchulzStep(float* a, int32_t k, unsigned long long* max_dev,
                                   cudaStream_t stream) {
  const int64_t count = int64_t{k} * k;
  if (count == 0) return cudaSuccess;
  NewtonSchulzStepKernel<<<BlocksFor(count), kThreads, 0, stream>>>(a, k, max_dev);
  return cudaGetLastError();
}

cudaError_t LaunchMomentum(const float* m, const float* g, float beta, int64_t count, float* out,
                           cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  MomentumKernel<<<BlocksFor(count), kThreads, 0, stream>>>(m, g, beta, count, out);
  return cudaGetLastError();
}

cudaError_t LaunchSymmetrize(float* s, int32_t k, cudaStream_t stream) {
  const int64_t count = int64_t{k} * k;
  if (count == 0) return cudaSuccess;
  SymmetrizeKernel<<<BlocksFor(count), kThreads, 0, stream>>>(s, k);
  return cudaGetLastError();
}

cudaError_t LaunchRetractionInput(const float* u, const float* xi, float lr, int64_t count,
                                  double* y, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  RetractionInputKernel<<<BlocksFor(count), kThreads, 0, stream>>>(u, xi, lr, count, y);
  return cudaGetLastError();
}

cudaError_t LaunchF32ToF64(const float* src, double* dst, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  F32ToF64Kernel<<<BlocksFor(count), kThreads, 0, stream>>>(src, dst, count);
  return cudaGetLastError();
}

cudaError_t LaunchF64ToF32(const double* src, float* dst, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  F64ToF32Kernel<<<BlocksFor(count), kThreads, 0, stream>>>(src, dst, count);
  return cudaGetLastError();
}

}  // namespace mapl::cuda
