// Internal to the CUDA backend: the launches of its .cu files, declared with plain types so that
// the .cc files (compiled by g++ against cuda_runtime_api.h, where absl and protobuf live) and the
// .cu files (compiled by nvcc, which sees neither) share them. Every launch is asynchronous on
// `stream` and returns the launch's error (cudaGetLastError); pointers are device memory.
#ifndef MAPL_KERNELS_CUDA_KERNELS_H_
#define MAPL_KERNELS_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mapl::cuda {

// ---- elementwise.cu ----
// dst[i] = float(src[i]) for `count` bfloat16 values (raw 16 bits).
cudaError_t LaunchBf16ToF32(const uint16_t* src, float* dst, int64_t count, cudaStream_t stream);
// dst[i] = bf16(src[i]), rounding to nearest even exactly as mapl::FloatToBf16 (NaN stays NaN).
cudaError_t LaunchF32ToBf16(const float* src, uint16_t* dst, int64_t count, cudaStream_t stream);
// *first_bad = min(*first_bad, smallest i with src[i] NaN or Inf). The caller sets *first_bad to
// INT64_MAX first. bf16 when `bf16`, else f32.
cudaError_t LaunchFirstNonFinite(const void* src, bool bf16, int64_t count,
                                 unsigned long long* first_bad, cudaStream_t stream);

// r[i] = r[i] + o[i] for `count` floats (commit-if-finite's accumulation, CommitFinite's order).
cudaError_t LaunchAddInPlace(float* r, const float* o, int64_t count, cudaStream_t stream);
// out (n, cols) = rows tokens[i] of table (V, cols): the anchors' P[t]. Tokens are in range
// (checked by the caller).
cudaError_t LaunchGatherRows(const float* table, int64_t cols, const int32_t* tokens, int64_t n,
                             float* out, cudaStream_t stream);

// AnchorGrad's scatter-add: rows[tokens[i]] += src_i for the n rows of src (n, cols) (atomics,
// so repeated tokens sum in a varying order), and touched[tokens[i]] = 1.
cudaError_t LaunchScatterAddRows(const float* src, int64_t n, int64_t cols, const int32_t* tokens,
                                 float* rows, uint8_t* touched, cudaStream_t stream);
// *first_bad = min(*first_bad, the smallest row index t with touched[t] and a NaN or Inf in
// rows[t]) over `count_rows` rows of `cols`. The caller sets *first_bad to ULLONG_MAX first.
cudaError_t LaunchFirstBadTouchedRow(const float* rows, const uint8_t* touched, int64_t count_rows,
                                     int64_t cols, unsigned long long* first_bad,
                                     cudaStream_t stream);

// AdamStep's check before any write (kernels/cpu/anchors.cc): *first_bad = min(*first_bad, the
// smallest i with g[i] NaN or Inf, or with b2 v[i] + (1 - b2) g[i]^2 (in double) above FLT_MAX).
// The caller sets *first_bad to ULLONG_MAX first.
cudaError_t LaunchAdamCheck(const float* g, const float* v, float b2, int64_t count,
                            unsigned long long* first_bad, cudaStream_t stream);
// One AdamW step over `count` elements, in place on p, m and v, with the CPU's arithmetic:
// decoupled decay first, then the bias-corrected update (step_size = lr / bc1,
// inv_sqrt_bc2 = 1 / sqrt(bc2), decay = 1 - lr wd).
cudaError_t LaunchAdamStep(float* p, const float* g, float* m, float* v, int64_t count, float b1,
                           float b2, float step_size, float inv_sqrt_bc2, float eps, float decay,
                           cudaStream_t stream);

// ---- elementwise.cu: the int8/int4 codecs ----
// Per-row symmetric quantization of x (n, k) (f32, or bf16 when `bf16`), bit for bit as
// kernels/cpu/scalar_codec.cc: scale = max|x| / qmax rounded up to a bf16 value, code =
// rintf(x / scale) clamped to [-qmax, qmax]. int8: codes (n, k) bytes. int4 (`int4`, qmax 7):
// codes (n, ceil(k / 2)) bytes, the low nibble first. x must be finite.
cudaError_t LaunchQuantizeRows(const void* x, bool bf16, int64_t n, int64_t k, bool int4,
                               void* codes, float* scales, cudaStream_t stream);
// out (n, k) f32 = clamp(code * scale, +-FLT_MAX), from codes laid out as LaunchQuantizeRows
// writes them. Scales must be finite and >= 0 (checked by the caller).
cudaError_t LaunchDequantizeRows(const void* codes, bool int4, const float* scales, int64_t n,
                                 int64_t k, float* out, cudaStream_t stream);

// ---- rvq.cu ----
// Gain-shape mode: norms[i] = ||x_i|| (summed in double) and x_i *= 1 / norms[i] (0 for a zero
// row), in place on x (n, dim) f32.
cudaError_t LaunchNormalizeRows(float* x, int64_t n, int64_t dim, float* norms,
                                cudaStream_t stream);
// One greedy RVQ level, fused: for each row i of residual (n, dim), the centroid c of
// centroids (K, dim) minimizing half_norms[c] - r_i . c (ties to the smaller index); writes it to
// codes[i * code_stride] and, when `subtract`, subtracts it from r_i in place. Never forms the
// (n, K) scores.
cudaError_t LaunchRvqLevel(float* residual, int64_t n, int32_t dim, const float* centroids,
                           const float* half_norms, int32_t k, uint8_t* codes, int32_t code_stride,
                           bool subtract, cudaStream_t stream);
// residual_i -= centroids[codes[i]] for the n rows (codes one byte a row).
cudaError_t LaunchSubtractCentroids(float* residual, int64_t n, int32_t dim, const float* centroids,
                                    const uint8_t* codes, cudaStream_t stream);
// RvqUpdate's batch statistics of one level: counts[codes[i]] += 1 and sums[codes[i]] += r_i (in
// double; atomics, so the summation order varies). The caller zeroes counts (K) and sums (K, dim).
cudaError_t LaunchRvqBatchStats(const float* residual, int64_t n, int32_t dim, const uint8_t* codes,
                                unsigned long long* counts, double* sums, cudaStream_t stream);
// *out += sum of x[i]^2 over `count` floats, in double. The caller zeroes *out.
cudaError_t LaunchSumSquares(const float* x, int64_t count, double* out, cudaStream_t stream);
// out (n, dim) f32: out_i = sum over l = 0..L-1 (in that order) of centroids[l][codes[i*L + l]],
// times norms[i] when norms is non-null. Codes must be < K (checked by the caller).
cudaError_t LaunchRvqDecode(const float* centroids, int32_t levels, int32_t k, int32_t dim,
                            const uint8_t* codes, const float* norms, int64_t n, float* out,
                            cudaStream_t stream);

// ---- spel.cu ----
// *out = sum of x[i]^2 over `count` floats, in double, in one block and a fixed order: the same
// bits on every run. Newton-Schulz's normalisation.
cudaError_t LaunchSumSquaresDeterministic(const float* x, int64_t count, double* out,
                                          cudaStream_t stream);
// out[i] = float(double(y[i]) * scale).
cudaError_t LaunchScaleToF32(const float* y, double scale, int64_t count, float* out,
                             cudaStream_t stream);
// One Newton-Schulz step on a = X^T X (k, k), in place: *max_dev = max(*max_dev, the bits of
// max |a - I|) (NaN skipped, as the CPU's std::max skips it), then a <- 1.5 I - 0.5 a, rounded as
// kernels/cpu/spel.cc rounds it. The caller zeroes *max_dev first.
cudaError_t LaunchNewtonSchulzStep(float* a, int32_t k, unsigned long long* max_dev,
                                   cudaStream_t stream);
// out[i] = beta m[i] + g[i] in one rounding (an FMA, as the CPU build computes it).
cudaError_t LaunchMomentum(const float* m, const float* g, float beta, int64_t count, float* out,
                           cudaStream_t stream);
// s (k, k) <- (s + s^T) / 2 in place: each pair 0.5f * (s_ij + s_ji).
cudaError_t LaunchSymmetrize(float* s, int32_t k, cudaStream_t stream);
// y[i] = double(u[i]) - double(lr) * double(xi[i]): the polar retraction's input.
cudaError_t LaunchRetractionInput(const float* u, const float* xi, float lr, int64_t count,
                                  double* y, cudaStream_t stream);
// dst[i] = double(src[i]), and back with round to nearest.
cudaError_t LaunchF32ToF64(const float* src, double* dst, int64_t count, cudaStream_t stream);
cudaError_t LaunchF64ToF32(const double* src, float* dst, int64_t count, cudaStream_t stream);

}  // namespace mapl::cuda

#endif  // MAPL_KERNELS_CUDA_KERNELS_H_
