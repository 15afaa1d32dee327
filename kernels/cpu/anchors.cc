// Factorized anchor embeddings a(t) = P[t] Q (docs/METHOD.md section 2): lookup, their gradients,
// and the AdamW step that learns them. The gradient and optimizer ops write learner state, so they
// check everything (token ids, finiteness) before the first write.
#include <cblas.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/validation.h"

namespace mapl {
namespace {

// Token ids come from the wire or the client: one for each of the n rows, each indexing a row of P.
absl::Status CheckTokens(absl::Span<const int32_t> tokens, int64_t n, int64_t vocab,
                         const char* rows_of) {
  MAPL_RETURN_IF_ERROR(CheckTokenCount(tokens, n, rows_of));
  return CheckTokenValues(tokens, vocab);
}

// pt = P[t] (n, r).
std::vector<float> Gather(const float* p, int64_t r, absl::Span<const int32_t> tokens) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<float> pt(static_cast<size_t>(n * r));
  for (int64_t i = 0; i < n; ++i) {
    const float* src = p + static_cast<int64_t>(tokens[i]) * r;
    std::copy(src, src + r, pt.begin() + i * r);
  }
  return pt;
}

}  // namespace

namespace cpu {

absl::StatusOr<AnchorFactors> FactorAnchor(const LowRankAnchor& a, int64_t n, const ConstTensor& u,
                                           const char* what) {
  MAPL_RETURN_IF_ERROR(CheckAnchorAgainstU(a, u, what));
  MAPL_RETURN_IF_ERROR(CheckTokens(a.tokens, n, a.p.rows, what));
  AnchorFactors f;
  f.r = a.p.cols;
  f.pt = Gather(a.p.f32(), f.r, a.tokens);
  const int64_t d = u.rows, k = u.cols;
  f.qu.assign(static_cast<size_t>(f.r * k), 0.f);
  if (f.r > 0 && k > 0 && d > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, f.r, k, d, 1.f, a.q.f32(), d, u.f32(), k,
                0.f, f.qu.data(), k);
  }
  return f;
}

}  // namespace cpu

absl::Status CpuBackend::AnchorLookup(const ConstTensor& p, const ConstTensor& q,
                                      absl::Span<const int32_t> tokens, const Tensor& a) const {
  MAPL_RETURN_IF_ERROR(CheckAnchorTables(p, q));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(a, "a", -1, q.cols));
  const int64_t n = a.rows;
  const int64_t r = p.cols;
  const int64_t d = q.cols;
  MAPL_RETURN_IF_ERROR(CheckTokens(tokens, n, p.rows, "a"));
  if (n == 0 || d == 0) return absl::OkStatus();
  if (r == 0) {
    std::fill(a.f32(), a.f32() + n * d, 0.f);
    return absl::OkStatus();
  }
  // One gather and one GEMM beat n GEMVs: Q is read once, not once per token.
  const std::vector<float> pt = Gather(p.f32(), r, tokens);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(d),
              static_cast<int>(r), 1.f, pt.data(), static_cast<int>(r), q.f32(),
              static_cast<int>(d), 0.f, a.f32(), static_cast<int>(d));
  return absl::OkStatus();
}

absl::Status CpuBackend::AnchorGrad(const ConstTensor& p, const ConstTensor& q,
                                    absl::Span<const int32_t> tokens, const ConstTensor& g,
                                    const ConstTensor& gu, const ConstTensor& u, const Tensor& dp,
                                    const Tensor& dq) const {
  MAPL_RETURN_IF_ERROR(CheckAnchorGradArgs(p, q, g, gu, u, dp, dq));
  const int64_t n = g.rows;
  MAPL_ASSIGN_OR_RETURN(cpu::AnchorFactors f, cpu::FactorAnchor({p, q, tokens}, n, u, "anchor"));
  // dp and dq accumulate over microbatches: one bad microbatch must not spoil the others.
  MAPL_RETURN_IF_ERROR(CheckFinite(g, "g"));
  MAPL_RETURN_IF_ERROR(CheckFinite(gu, "gu"));
  const int r = static_cast<int>(f.r);
  const int d = static_cast<int>(q.cols);
  const int k = static_cast<int>(u.cols);
  if (n == 0 || r == 0 || d == 0) return absl::OkStatus();
  const int ni = static_cast<int>(n);
  F32View gv(g);

  // g_perp Q^T = g Q^T - gu (Q U)^T: an n x d x r GEMM and an n x k x r one.
  std::vector<float> gq(static_cast<size_t>(n) * r);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ni, r, d, 1.f, gv.data(), d, q.f32(), d, 0.f,
              gq.data(), r);
  if (k > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ni, r, k, -1.f, gu.f32(), k, f.qu.data(),
                k, 1.f, gq.data(), r);
  }
  // dp[t_i] += (g_perp Q^T)_i: a scatter-add (repeated tokens sum). New rows are built aside and
  // checked before anything is written: an overflow must not reach dp or dq.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return tokens[a] < tokens[b]; });
  std::vector<int32_t> rows;    // distinct tokens touched
  std::vector<float> new_rows;  // their new dp rows, in the same order
  const float* dpf = dp.f32();
  for (size_t i = 0; i < order.size(); ++i) {
    const int32_t t = tokens[order[i]];
    if (rows.empty() || rows.back() != t) {
      rows.push_back(t);
      new_rows.insert(new_rows.end(), dpf + int64_t{t} * r, dpf + int64_t{t} * r + r);
    }
    float* dst = new_rows.data() + (rows.size() - 1) * r;
    const float* src = gq.data() + order[i] * r;
    for (int j = 0; j < r; ++j) dst[j] += src[j];
  }
  for (size_t i = 0; i < new_rows.size(); ++i) {
    if (!std::isfinite(new_rows[i])) {
      return AnchorGradOverflowError(rows[i / r]);
    }
  }

  // dq += P[t]^T g_perp = P[t]^T g - (P[t]^T gu) U^T, into scratch first for the same reason.
  std::vector<float> dq_new(static_cast<size_t>(r) * d);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, d, ni, 1.f, f.pt.data(), r, gv.data(), d,
              0.f, dq_new.data(), d);
  if (k > 0) {
    std::vector<float> ptgu(static_cast<size_t>(r) * k);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, k, ni, 1.f, f.pt.data(), r, gu.f32(), k,
                0.f, ptgu.data(), k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r, d, k, -1.f, ptgu.data(), k, u.f32(), k,
                1.f, dq_new.data(), d);
  }
  MAPL_RETURN_IF_ERROR(CommitFinite(dq_new, dq, /*accumulate=*/true, "dq"));
  for (size_t i = 0; i < rows.size(); ++i) {
    std::copy(new_rows.begin() + i * r, new_rows.begin() + (i + 1) * r,
              dp.f32() + int64_t{rows[i]} * r);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::LiftWithAnchor(const ConstTensor& zq, const ConstTensor& u,
                                        const LowRankAnchor& a, const Tensor& h) const {
  MAPL_RETURN_IF_ERROR(CheckLiftWithAnchorArgs(zq, u, h));
  const int64_t n = zq.rows, d = u.rows, k = u.cols;
  MAPL_ASSIGN_OR_RETURN(cpu::AnchorFactors f, cpu::FactorAnchor(a, n, u, "a"));
  if (n == 0 || d == 0) return absl::OkStatus();
  const int64_t r = f.r;
  // h = (zq - P[t] (Q U)) U^T + P[t] Q: an n x k correction, then n x d x (k + r) of GEMMs.
  std::vector<float> coef(zq.f32(), zq.f32() + n * k);
  if (r > 0 && k > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, r, -1.f, f.pt.data(), r,
                f.qu.data(), k, 1.f, coef.data(), k);
  }
  F32Output out(h);
  if (k > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, k, 1.f, coef.data(), k, u.f32(), k,
                0.f, out.data(), d);
  } else {
    std::fill(out.data(), out.data() + n * d, 0.f);
  }
  if (r > 0) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, r, 1.f, f.pt.data(), r, a.q.f32(),
                d, 1.f, out.data(), d);
  }
  out.Commit();
  return absl::OkStatus();
}

absl::Status CpuBackend::AdamStep(const Tensor& param, const ConstTensor& grad, const Tensor& m,
                                  const Tensor& v, const AdamOptions& options) const {
  MAPL_RETURN_IF_ERROR(CheckAdamArgs(param, grad, m, v, options));

  const int64_t count = param.size();
  const float* g = grad.f32();
  const float* vf = v.f32();
  const float b2 = options.beta2;
  // A finite but huge gradient would overflow v to Inf and freeze that parameter for good, so the
  // new second moment is checked too, before anything is written.
  for (int64_t i = 0; i < count; ++i) {
    const double v_new = static_cast<double>(b2) * vf[i] +
                         (1.0 - b2) * static_cast<double>(g[i]) * static_cast<double>(g[i]);
    if (!std::isfinite(g[i]) || !(v_new <= static_cast<double>(FLT_MAX))) {
      return AdamGradError(g[i], i, param.cols);
    }
  }

  // PyTorch's AdamW: decay first, then the bias-corrected Adam update.
  const double bc1 = 1.0 - std::pow(static_cast<double>(options.beta1), options.step);
  const double bc2 = 1.0 - std::pow(static_cast<double>(options.beta2), options.step);
  const float step_size = static_cast<float>(options.lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float decay = 1.f - options.lr * options.weight_decay;
  const float b1 = options.beta1;
  float* pf = param.f32();
  float* mf = m.f32();
  float* vw = v.f32();
  for (int64_t i = 0; i < count; ++i) {
    const float gi = g[i];
    const float mi = b1 * mf[i] + (1.f - b1) * gi;
    // g^2 in double: it may exceed FLT_MAX where (1 - beta2) g^2 does not.
    const float vi = static_cast<float>(static_cast<double>(b2) * vw[i] +
                                        (1.0 - b2) * static_cast<double>(gi) * gi);
    mf[i] = mi;
    vw[i] = vi;
    pf[i] = pf[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + options.eps);
  }
  return absl::OkStatus();
}

}  // namespace mapl
