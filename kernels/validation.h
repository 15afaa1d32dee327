// Argument validation shared by the backends (kernels/cpu, kernels/cuda): the checks of each op,
// in one order and with one set of messages, so that every backend refuses the same input with the
// same INVALID_ARGUMENT (backend.h). Each function is a prefix or a step of an op's validation;
// the backends call them in the same sequence and do their own work in between (the CUDA backend
// checks finiteness on the device and copies ids, codes and scales to the host before the value
// checks). Host code only: nothing here touches device memory.
#ifndef MAPL_KERNELS_VALIDATION_H_
#define MAPL_KERNELS_VALIDATION_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "kernels/rvq.h"
#include "kernels/tensor.h"

namespace mapl {

// ---- projection ----
// Project: u (d, k) tall f32, h (n, d), z (n, k).
absl::Status CheckProjectArgs(const ConstTensor& h, const ConstTensor& u, const ConstTensor& z);
// Lift: u (d, k) tall f32, z (n, k), h (n, d).
absl::Status CheckLiftArgs(const ConstTensor& z, const ConstTensor& u, const ConstTensor& h);
// LiftWithAnchor before its anchor: u (d, k) tall f32, zq (n, k) f32, h (n, d).
absl::Status CheckLiftWithAnchorArgs(const ConstTensor& zq, const ConstTensor& u,
                                     const ConstTensor& h);

// ---- residual vector quantization ----
// The codebooks, and x (n, dim) against them (not x's finiteness).
absl::Status CheckRvqInput(const RvqCodebooks& cb, const ConstTensor& x);
// codes: n * L; norms: n in gain-shape mode, empty otherwise (an empty span there would leave
// the decoder without the norms; a non-empty one elsewhere would be left unwritten, or ignored).
// rows_of names the (n, dim) argument in errors.
absl::Status CheckRvqCodesAndNorms(const RvqCodebooks& cb, int64_t n,
                                   absl::Span<const uint8_t> codes, absl::Span<const float> norms,
                                   const char* rows_of);
// RvqDecode's sizes: the codebooks, out (n, dim), then codes and norms.
absl::Status CheckRvqDecodeArgs(const RvqCodebooks& cb, absl::Span<const uint8_t> codes,
                                absl::Span<const float> norms, const ConstTensor& out);
// RvqDecode's values, once CheckRvqDecodeArgs passed: every code < K ...
absl::Status CheckRvqCodeValues(const RvqCodebooks& cb, absl::Span<const uint8_t> codes);
// ... and, in gain-shape mode, every norm finite and >= 0.
absl::Status CheckRvqNormValues(absl::Span<const float> norms);
// RvqUpdate: the learner's statistics against its codebooks, then the options.
absl::Status CheckRvqLearnerAndOptions(const RvqLearner& learner, const RvqUpdateOptions& options);
// RvqUpdate's result: INVALID_ARGUMENT if the updated centroids, counts or sums overflowed.
absl::Status CheckRvqUpdateFinite(const RvqLearner& next);

// ---- scalar codecs ----
// Int8/Int4 Encode (t = x, what "x") and Decode (t = out, what "out"): t (n, k), then q's size
// (n * k int8, or n * ceil(k / 2) bytes for int4), then n scales.
absl::Status CheckScalarCodecArgs(const ConstTensor& t, const char* what, bool int4, const void* q,
                                  size_t q_size, absl::Span<const float> scales);
// A decoder's scales: a negative or non-finite one can only come from a corrupt or hostile frame,
// and would hand the trainer NaN gradients.
absl::Status CheckScales(absl::Span<const float> scales);

// ---- SPEL on the Stiefel manifold ----
// The largest rank k the SPEL ops take: the polar retraction's k x k eigensolver (LAPACK dsyevd,
// on the host for both backends) counts its workspace, 1 + 6k + 2k^2 doubles, in a 32-bit int.
inline constexpr int64_t kMaxSpelRank = 16384;
// A tall (d, k) f32 matrix (CheckTallF32) with k <= kMaxSpelRank.
absl::Status CheckSpelMatrix(const ConstTensor& t, const char* what);
// max_iterations >= 0, tolerance not NaN.
absl::Status CheckMsignOptions(const MsignOptions& options);
// Msign before y's finiteness: y (d, k) as CheckSpelMatrix, out of y's shape f32, the options.
absl::Status CheckMsignArgs(const ConstTensor& y, const ConstTensor& out,
                            const MsignOptions& options);
// SpelStep before the finiteness of grad, u and momentum (in that order): u as CheckSpelMatrix,
// grad and momentum of u's shape f32, lr finite and >= 0, beta in [0, 1], the msign options.
absl::Status CheckSpelStepArgs(const ConstTensor& u, const ConstTensor& grad,
                               const ConstTensor& momentum, const SpelOptions& options);
// SpelStep's error when the new momentum beta M + G is not finite at flat index i of a (d, cols)
// matrix.
absl::Status MomentumOverflowError(int64_t i, int64_t cols);

// ---- anchors ----
// p (V, r) and q (r, d), both f32.
absl::Status CheckAnchorTables(const ConstTensor& p, const ConstTensor& q);
// The anchor's tables, and q (r, d) against the projector u (d, k); `what` names the anchor.
absl::Status CheckAnchorAgainstU(const LowRankAnchor& a, const ConstTensor& u, const char* what);
// Token ids come from the wire or the client: exactly one for each of the n rows of `rows_of` ...
absl::Status CheckTokenCount(absl::Span<const int32_t> tokens, int64_t n, const char* rows_of);
// ... each indexing a row of P: in [0, vocab).
absl::Status CheckTokenValues(absl::Span<const int32_t> tokens, int64_t vocab);
// AnchorGrad's shapes: g (n, d), dp like p, dq like q, u (d, k) tall f32, gu (n, k) f32.
absl::Status CheckAnchorGradArgs(const ConstTensor& p, const ConstTensor& q, const ConstTensor& g,
                                 const ConstTensor& gu, const ConstTensor& u, const ConstTensor& dp,
                                 const ConstTensor& dq);
// AnchorGrad's error when the new dp row of `token` is not finite.
absl::Status AnchorGradOverflowError(int64_t token);
// AdamStep: param f32, grad, m and v of its shape, then the options.
absl::Status CheckAdamArgs(const ConstTensor& param, const ConstTensor& grad, const ConstTensor& m,
                           const ConstTensor& v, const AdamOptions& options);
// AdamStep's error for the gradient `value` at flat index i of a matrix of `cols` columns, when it
// is non-finite or would overflow the second moment.
absl::Status AdamGradError(float value, int64_t i, int64_t cols);

// ---- learning signals ----
// GradUp: h (n, d), gzq (n, k) f32, g_up (d, k) f32.
absl::Status CheckGradUpArgs(const ConstTensor& h, const ConstTensor& gzq, const ConstTensor& g_up);
// GradDown: g (n, d), u (d, k) f32, gu and zq (n, k) f32, g_down (d, k) f32.
absl::Status CheckGradDownArgs(const ConstTensor& g, const ConstTensor& gu, const ConstTensor& zq,
                               const ConstTensor& u, const ConstTensor& g_down);

}  // namespace mapl

#endif  // MAPL_KERNELS_VALIDATION_H_
