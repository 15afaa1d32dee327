// RVQ kernels of the CUDA backend (kernels/cuda/kernels.h): gain-shape normalization, one fused
// greedy level (nearest centroid + residual update), and decoding.
#include <cmath>
#include <cstdint>

#include "kernels/cuda/kernels.h"

namespace mapl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// The fused level: a block owns kRows residual rows, one per thread. Centroids are visited in
// tiles of kTileC; for each tile the block walks dim in chunks of kChunk, staging the rows' chunk
// and the tile's chunk in shared memory, and each thread accumulates its row's kTileC dot
// products in registers. Only the running best (score, index) of a row survives a tile, so the
// (n, K) score matrix never exists.
constexpr int kRows = 128;
constexpr int kTileC = 32;
constexpr int kChunk = 32;

__global__ void NormalizeRowsKernel(float* x, int64_t n, int64_t dim, float* norms) {
  const int64_t row = blockIdx.x * int64_t{kWarpsPerBlock} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;  // the whole warp leaves together
  float* v = x + row * dim;
  double s = 0;
  for (int64_t j = lane; j < dim; j += 32) s += double(v[j]) * v[j];
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  const float norm = static_cast<float>(sqrt(s));
  const float inv = norm > 0 ? 1.f / norm : 0.f;
  for (int64_t j = lane; j < dim; j += 32) v[j] *= inv;
  if (lane == 0) norms[row] = norm;
}

__global__ void __launch_bounds__(kRows)
    RvqLevelKernel(float* residual, int64_t n, int32_t dim, const float* centroids,
                   const float* half_norms, int32_t k, uint8_t* codes, int32_t code_stride,
                   bool subtract) {
  // +1: row t of rs is read by thread t at one column, so rows 33 floats apart hit distinct banks.
  __shared__ float rs[kRows][kChunk + 1];
  __shared__ float cs[kTileC][kChunk + 1];
  __shared__ int32_t chosen[kRows];
  const int t = threadIdx.x;
  const int64_t row0 = int64_t{blockIdx.x} * kRows;
  const int rows = static_cast<int>(n - row0 < kRows ? n - row0 : kRows);

  float best_score = INFINITY;
  int32_t best = 0;
  for (int32_t c0 = 0; c0 < k; c0 += kTileC) {
    float acc[kTileC];
#pragma unroll
    for (int c = 0; c < kTileC; ++c) acc[c] = 0.f;
    for (int32_t d0 = 0; d0 < dim; d0 += kChunk) {
      // 32 consecutive threads load 32 consecutive floats of one row: coalesced.
      for (int e = t; e < kRows * kChunk; e += kRows) {
        const int r = e / kChunk, j = e % kChunk;
        rs[r][j] = (r < rows && d0 + j < dim) ? residual[(row0 + r) * dim + d0 + j] : 0.f;
      }
      for (int e = t; e < kTileC * kChunk; e += kRows) {
        const int c = e / kChunk, j = e % kChunk;
        cs[c][j] = (c0 + c < k && d0 + j < dim) ? centroids[int64_t{c0 + c} * dim + d0 + j] : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int j = 0; j < kChunk; ++j) {
        const float v = rs[t][j];
#pragma unroll
        for (int c = 0; c < kTileC; ++c) acc[c] = fmaf(v, cs[c][j], acc[c]);
      }
      __syncthreads();
    }
    // Increasing index and a strict '<': ties go to the smaller index, as on the CPU.
#pragma unroll
    for (int c = 0; c < kTileC; ++c) {
      if (c0 + c < k) {
        const float score = half_norms[c0 + c] - acc[c];
        if (score < best_score) {
          best_score = score;
          best = c0 + c;
        }
      }
    }
  }
  if (t < rows) {
    chosen[t] = best;
    codes[(row0 + t) * code_stride] = static_cast<uint8_t>(best);
  }
  if (!subtract) return;  // uniform across the block: no thread is left at the barrier
  __syncthreads();
  // Subtract the chosen centroids, the block's rows walked contiguously (coalesced).
  const int64_t count = int64_t{rows} * dim;
  for (int64_t e = t; e < count; e += kRows) {
    const int64_t r = e / dim, j = e % dim;
    residual[(row0 + r) * dim + j] -= centroids[int64_t{chosen[r]} * dim + j];
  }
}

__global__ void SubtractCentroidsKernel(float* residual, int64_t n, int32_t dim,
                                        const float* centroids, const uint8_t* codes) {
  const int64_t count = n * dim;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / dim, j = e % dim;
    residual[e] -= centroids[int64_t{codes[i]} * dim + j];
  }
}

__global__ void RvqBatchStatsKernel(const float* residual, int64_t n, int32_t dim,
                                    const uint8_t* codes, unsigned long long* counts,
                                    double* sums) {
  const int64_t count = n * dim;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / dim, j = e % dim;
    const int64_t c = codes[i];
    atomicAdd(&sums[c * dim + j], static_cast<double>(residual[e]));
    if (j == 0) atomicAdd(&counts[c], 1ull);
  }
}

// A block's partial sum by a shared-memory tree, then one atomic per block.
__global__ void SumSquaresKernel(const float* x, int64_t count, double* out) {
  __shared__ double part[kThreads];
  double s = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    s += double(x[i]) * x[i];
  }
  part[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out, part[0]);
}

// Grid-stride launches: enough blocks to fill the device, capped so the grid size fits.
unsigned BlocksFor(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// Sums the levels in order from 0, then scales: the CPU's RvqDecode does the same float
// operations in the same order, so the results agree bit for bit.
__global__ void RvqDecodeKernel(const float* centroids, int32_t levels, int32_t k, int32_t dim,
                                const uint8_t* codes, const float* norms, int64_t n, float* out) {
  const int64_t count = n * dim;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < count;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / dim, j = e % dim;
    float s = 0.f;
    for (int32_t l = 0; l < levels; ++l) {
      s += centroids[(int64_t{l} * k + codes[i * levels + l]) * dim + j];
    }
    if (norms != nullptr) s *= norms[i];
    out[e] = s;
  }
}

}  // namespace

cudaError_t LaunchNormalizeRows(float* x, int64_t n, int64_t dim, float* norms,
                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  NormalizeRowsKernel<<<blocks, kThreads, 0, stream>>>(x, n, dim, norms);
  return cudaGetLastError();
}

cudaError_t LaunchRvqLevel(float* residual, int64_t n, int32_t dim, const float* centroids,
                           const float* half_norms, int32_t k, uint8_t* codes, int32_t code_stride,
                           bool subtract, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((n + kRows - 1) / kRows);
  RvqLevelKernel<<<blocks, kRows, 0, stream>>>(residual, n, dim, centroids, half_norms, k, codes,
                                               code_stride, subtract);
  return cudaGetLastError();
}

cudaError_t LaunchSubtractCentroids(float* residual, int64_t n, int32_t dim, const float* centroids,
                                    const uint8_t* codes, cudaStream_t stream) {
  if (n * dim == 0) return cudaSuccess;
  SubtractCentroidsKernel<<<BlocksFor(n * dim), kThreads, 0, stream>>>(residual, n, dim, centroids,
                                                                       codes);
  return cudaGetLastError();
}

cudaError_t LaunchRvqBatchStats(const float* residual, int64_t n, int32_t dim, const uint8_t* codes,
                                unsigned long long* counts, double* sums, cudaStream_t stream) {
  if (n * dim == 0) return cudaSuccess;
  RvqBatchStatsKernel<<<BlocksFor(n * dim), kThreads, 0, stream>>>(residual, n, dim, codes, counts,
                                                                   sums);
  return cudaGetLastError();
}

cudaError_t LaunchSumSquares(const float* x, int64_t count, double* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  SumSquaresKernel<<<BlocksFor(count), kThreads, 0, stream>>>(x, count, out);
  return cudaGetLastError();
}

cudaError_t LaunchRvqDecode(const float* centroids, int32_t levels, int32_t k, int32_t dim,
                            const uint8_t* codes, const float* norms, int64_t n, float* out,
                            cudaStream_t stream) {
  const int64_t count = n * dim;
  if (count == 0) return cudaSuccess;
  const int64_t want = (count + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(want < 65536 ? want : 65536);
  RvqDecodeKernel<<<blocks, kThreads, 0, stream>>>(centroids, levels, k, dim, codes, norms, n, out);
  return cudaGetLastError();
}

}  // namespace mapl::cuda
