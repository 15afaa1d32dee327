// The codec math of docs/METHOD.md section 2 behind one interface, so CPU (BLAS) and CUDA backends
// are interchangeable and testable against each other. All math is fp32; tensors marked "f32/bf16"
// may be either dtype. Every matrix is row-major. Shapes use n tokens, hidden size d, rank k,
// vocabulary V, anchor rank r, L RVQ levels of K centroids.
//
// Every method validates shapes, dtypes, buffer sizes and indices and returns INVALID_ARGUMENT
// naming the bad argument; none has undefined behaviour on bad input. Flat buffers (codes, scales,
// norms, token ids) are absl::Spans that carry their size, and each must hold exactly the number
// of elements its comment states: a wrong size is an error, never a read or write out of bounds.
// Every method is const: a Backend holds no per-call state and may be used from several threads
// at once.
//
// Backends are made by name through the registry (kernels/registry.h):
//
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::Backend> be, mapl::MakeBackend("cpu"));
//   MAPL_RETURN_IF_ERROR(be->Project(h, u, z));   // z = h U
#ifndef MAPL_KERNELS_BACKEND_H_
#define MAPL_KERNELS_BACKEND_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/rvq.h"
#include "kernels/tensor.h"

namespace mapl {

struct MsignOptions {
  // Newton-Schulz iterations stop when max |X^T X - I| < tolerance or after max_iterations.
  int32_t max_iterations = 40;
  float tolerance = 1e-4f;
};

struct SpelOptions {
  float lr = 0.01f;    // eta
  float beta = 0.9f;   // momentum
  MsignOptions msign;  // for the direction D = msign(xi)
};

// The anchor a = P[t] Q of n tokens (docs/METHOD.md section 2), given by its factors. The ops that
// take it never form a as an n x d matrix: a has rank r, so a U = P[t] (Q U) costs n r k, and
// the decoder's reconstruction and the learning signals need one n x d GEMM each instead of three.
struct LowRankAnchor {
  ConstTensor p;                     // (V, r) f32
  ConstTensor q;                     // (r, d) f32
  absl::Span<const int32_t> tokens;  // exactly n ids in [0, V), one per row
};

struct AdamOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.f;  // decoupled (AdamW)
  int64_t step = 1;          // 1-based step count, for bias correction
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // ---- projection (kernels/cpu/projection.cc) ----
  // z = h U.  h: (n, d) f32/bf16; u: (d, k) f32; z: (n, k) f32/bf16.
  virtual absl::Status Project(const ConstTensor& h, const ConstTensor& u,
                               const Tensor& z) const = 0;
  // h = z U^T.  z: (n, k) f32/bf16; u: (d, k) f32; h: (n, d) f32/bf16.
  virtual absl::Status Lift(const ConstTensor& z, const ConstTensor& u, const Tensor& h) const = 0;
  // h = zq U^T + a - (a U) U^T: the decoder's reconstruction with the anchor a = P[t] Q.
  // zq: (n, k) f32; u: (d, k) f32; a: n tokens, q (r, d); h: (n, d) f32/bf16.
  virtual absl::Status LiftWithAnchor(const ConstTensor& zq, const ConstTensor& u,
                                      const LowRankAnchor& a, const Tensor& h) const = 0;

  // ---- residual vector quantization (kernels/cpu/rvq.cc) ----
  // Level-by-level k-means on the residuals of x: (n, dim) f32/bf16, n >= K.
  virtual absl::StatusOr<RvqCodebooks> RvqFit(const ConstTensor& x,
                                              const RvqFitOptions& options) const = 0;
  // x: (n, dim) f32/bf16. codes: exactly n * L bytes, written row-major (n, L). beam == 1 is
  // greedy; beam > 1 keeps the `beam` best partial codes per vector at each level. norms: exactly
  // n floats in gain-shape mode (each row's L2 norm is written there), empty otherwise.
  virtual absl::Status RvqEncode(const RvqCodebooks& cb, const ConstTensor& x, int beam,
                                 absl::Span<uint8_t> codes, absl::Span<float> norms) const = 0;
  // out: (n, dim) f32/bf16. codes: exactly n * L bytes, row-major (n, L), each < K. norms: exactly
  // n finite floats >= 0 in gain-shape mode, empty otherwise.
  virtual absl::Status RvqDecode(const RvqCodebooks& cb, absl::Span<const uint8_t> codes,
                                 absl::Span<const float> norms, const Tensor& out) const = 0;
  // One streaming k-means step on batch x (n, dim) f32/bf16: greedy-encode with the learner's
  // codebooks, update EMA counts and sums, recompute centroids, re-seed dead centroids.
  virtual absl::StatusOr<RvqUpdateStats> RvqUpdate(RvqLearner* learner, const ConstTensor& x,
                                                   const RvqUpdateOptions& options) const = 0;

  // ---- scalar codecs (kernels/cpu/scalar_codec.cc) ----
  // Per-token symmetric int8: scale_i = max_j |x_ij| / 127 rounded up to a bfloat16 value (so it
  // travels losslessly in 2 bytes), q = round(x / scale). x: (n, k) f32/bf16; q: exactly n * k
  // int8, row-major; scales: exactly n floats, each exactly representable in bf16.
  virtual absl::Status Int8Encode(const ConstTensor& x, absl::Span<int8_t> q,
                                  absl::Span<float> scales) const = 0;
  // out: (n, k) f32/bf16. q: exactly n * k int8; scales: exactly n finite floats >= 0.
  virtual absl::Status Int8Decode(absl::Span<const int8_t> q, absl::Span<const float> scales,
                                  const Tensor& out) const = 0;
  // Per-token symmetric int4, as int8 with 7 for 127: scale_i = max_j |x_ij| / 7 rounded up to a
  // bfloat16 value, q = round(x / scale) in [-7, 7]. Two codes a byte, 4-bit two's complement,
  // the low nibble first; each row starts on a byte and an odd k leaves the last high nibble 0.
  // x: (n, k) f32/bf16; q: exactly n * ceil(k / 2) bytes; scales: exactly n floats, each exactly
  // representable in bf16.
  virtual absl::Status Int4Encode(const ConstTensor& x, absl::Span<uint8_t> q,
                                  absl::Span<float> scales) const = 0;
  // out: (n, k) f32/bf16. q: exactly n * ceil(k / 2) bytes (a padding nibble is ignored; the
  // nibble -8, which the encoder never writes, decodes to -8 * scale); scales: exactly n finite
  // floats >= 0.
  virtual absl::Status Int4Decode(absl::Span<const uint8_t> q, absl::Span<const float> scales,
                                  const Tensor& out) const = 0;

  // ---- SPEL on the Stiefel manifold (kernels/cpu/spel.cc) ----
  // out = msign(y) = y (y^T y)^(-1/2) by Newton-Schulz iterations. y, out: (d, k) f32, d >= k.
  virtual absl::Status Msign(const ConstTensor& y, const Tensor& out,
                             const MsignOptions& options) const = 0;
  // Polar retraction: u <- u (u^T u)^(-1/2), exactly, through the k x k Gram matrix.
  virtual absl::Status Retract(const Tensor& u) const = 0;
  // One SPEL step (docs/METHOD.md section 2): M = beta M + G; xi = M - U sym(U^T M); D = msign(xi);
  // U <- msign(U - lr D).  u, grad, momentum: (d, k) f32; u and momentum are updated in place.
  // grad is the loss gradient dL/dU (G_up + G_down): the step descends it. D has unit singular
  // values, so lr is a step length on the manifold whatever the scale of grad.
  virtual absl::Status SpelStep(const Tensor& u, const ConstTensor& grad, const Tensor& momentum,
                                const SpelOptions& options) const = 0;

  // ---- anchors (kernels/cpu/anchors.cc) ----
  // a = P[t] Q.  p: (V, r); q: (r, d); tokens: exactly n ids in [0, V); a: (n, d) f32.
  virtual absl::Status AnchorLookup(const ConstTensor& p, const ConstTensor& q,
                                    absl::Span<const int32_t> tokens, const Tensor& a) const = 0;
  // Accumulates the anchor gradients for the part of the loss gradient outside span(U),
  // g_perp = g - gu U^T, without forming it:  dp[t_i] += g_perp_i Q^T;
  // dq += sum_i P[t_i]^T g_perp_i.  g: (n, d) f32/bf16; gu: (n, k) f32, g U as the caller
  // computed it (the backward frame's projection); u: (d, k) f32; tokens: exactly n ids in
  // [0, V); dp: (V, r); dq: (r, d).
  virtual absl::Status AnchorGrad(const ConstTensor& p, const ConstTensor& q,
                                  absl::Span<const int32_t> tokens, const ConstTensor& g,
                                  const ConstTensor& gu, const ConstTensor& u, const Tensor& dp,
                                  const Tensor& dq) const = 0;
  // One Adam(W) step that *descends* grad: param, m, v updated in place, all the same shape f32.
  virtual absl::Status AdamStep(const Tensor& param, const ConstTensor& grad, const Tensor& m,
                                const Tensor& v, const AdamOptions& options) const = 0;

  // ---- learning signals (kernels/cpu/signals.cc) ----
  // g_up (+)= h^T gzq.  h: (n, d) f32/bf16; gzq: (n, k) f32; g_up: (d, k) f32.
  virtual absl::Status GradUp(const ConstTensor& h, const ConstTensor& gzq, const Tensor& g_up,
                              bool accumulate) const = 0;
  // g_down (+)= g^T zq - a^T (g U) - g^T (a U).  g: (n, d) f32/bf16; gu: (n, k) f32, g U as the
  // caller computed it (the backward frame's projection); zq: (n, k) f32; u: (d, k) f32;
  // a: null for no anchor; g_down: (d, k) f32.
  virtual absl::Status GradDown(const ConstTensor& g, const ConstTensor& gu, const ConstTensor& zq,
                                const ConstTensor& u, const LowRankAnchor* a, const Tensor& g_down,
                                bool accumulate) const = 0;
};

// The BLAS (OpenBLAS) backend, also registered as "cpu" (kernels/registry.h). BLAS threading
// follows OPENBLAS_NUM_THREADS unless SetCpuBlasThreads set it; the rest of the math runs on the
// calling thread.
std::unique_ptr<Backend> MakeCpuBackend();

// How many threads the CPU backend's BLAS calls use, for the whole process (OpenBLAS keeps one
// setting a process, shared with anything else in it that calls OpenBLAS). For a process that
// owns its threading, such as mapld; a library in someone else's process (the Python codec)
// leaves it alone. threads >= 1.
void SetCpuBlasThreads(int threads);
int CpuBlasThreads();

}  // namespace mapl

#endif  // MAPL_KERNELS_BACKEND_H_
