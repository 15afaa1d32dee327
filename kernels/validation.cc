// Argument validation shared by the backends (kernels/validation.h).
#include "kernels/validation.h"

#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace mapl {

absl::Status CheckProjectArgs(const ConstTensor& h, const ConstTensor& u, const ConstTensor& z) {
  MAPL_RETURN_IF_ERROR(CheckTallF32(u, "u"));
  MAPL_RETURN_IF_ERROR(CheckShape(h, "h", -1, u.rows));
  return CheckShape(z, "z", h.rows, u.cols);
}

absl::Status CheckLiftArgs(const ConstTensor& z, const ConstTensor& u, const ConstTensor& h) {
  MAPL_RETURN_IF_ERROR(CheckTallF32(u, "u"));
  MAPL_RETURN_IF_ERROR(CheckShape(z, "z", -1, u.cols));
  return CheckShape(h, "h", z.rows, u.rows);
}

absl::Status CheckLiftWithAnchorArgs(const ConstTensor& zq, const ConstTensor& u,
                                     const ConstTensor& h) {
  MAPL_RETURN_IF_ERROR(CheckTallF32(u, "u"));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(zq, "zq", -1, u.cols));
  return CheckShape(h, "h", zq.rows, u.rows);
}

absl::Status CheckRvqInput(const RvqCodebooks& cb, const ConstTensor& x) {
  MAPL_RETURN_IF_ERROR(cb.Validate());
  return CheckShape(x, "x", -1, cb.dim);
}

absl::Status CheckRvqCodesAndNorms(const RvqCodebooks& cb, int64_t n,
                                   absl::Span<const uint8_t> codes, absl::Span<const float> norms,
                                   const char* rows_of) {
  MAPL_RETURN_IF_ERROR(
      CheckSpanSize(codes, "codes", n * cb.levels, absl::StrCat("n * L = ", n, " * ", cb.levels)));
  if (cb.gain_shape) {
    return CheckSpanSize(norms, "norms", n,
                         absl::StrCat("gain-shape codebooks: one per row of ", rows_of));
  }
  return CheckSpanSize(norms, "norms", 0, "the codebooks are not gain-shape: pass no norms");
}

absl::Status CheckRvqDecodeArgs(const RvqCodebooks& cb, absl::Span<const uint8_t> codes,
                                absl::Span<const float> norms, const ConstTensor& out) {
  MAPL_RETURN_IF_ERROR(cb.Validate());
  MAPL_RETURN_IF_ERROR(CheckShape(out, "out", -1, cb.dim));
  return CheckRvqCodesAndNorms(cb, out.rows, codes, norms, "out");
}

absl::Status CheckRvqCodeValues(const RvqCodebooks& cb, absl::Span<const uint8_t> codes) {
  const int64_t nl = cb.levels;
  for (int64_t i = 0; i < static_cast<int64_t>(codes.size()); ++i) {
    if (codes[i] >= cb.codebook_size) {
      return absl::InvalidArgumentError(absl::StrCat("rvq decode: code ", int(codes[i]), " at (",
                                                     i / nl, ", ", i % nl, ") is out of range [0, ",
                                                     cb.codebook_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRvqNormValues(absl::Span<const float> norms) {
  for (int64_t i = 0; i < static_cast<int64_t>(norms.size()); ++i) {
    if (!std::isfinite(norms[i]) || norms[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("rvq decode: norm ", norms[i], " of row ", i, " is not a finite >= 0"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRvqLearnerAndOptions(const RvqLearner& learner, const RvqUpdateOptions& options) {
  const RvqCodebooks& cb = learner.codebooks;
  const int64_t k = cb.codebook_size, nl = cb.levels;
  if (learner.counts.size() != size_t(nl * k) || learner.sums.size() != cb.centroids.size()) {
    return absl::InvalidArgumentError("rvq update: learner counts/sums do not match its codebooks");
  }
  if (!(options.decay > 0.f && options.decay < 1.f) || !(options.dead_fraction >= 0.f)) {
    return absl::InvalidArgumentError(absl::StrCat("rvq update: decay must be in (0, 1), got ",
                                                   options.decay, "; dead_fraction >= 0, got ",
                                                   options.dead_fraction));
  }
  return absl::OkStatus();
}

absl::Status CheckRvqUpdateFinite(const RvqLearner& next) {
  for (const std::vector<float>* v : {&next.codebooks.centroids, &next.counts, &next.sums}) {
    for (float f : *v) {
      if (!std::isfinite(f)) {
        return absl::InvalidArgumentError(
            "rvq update: the batch overflows the codebook statistics (values too large); the "
            "learner is left unchanged");
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckScalarCodecArgs(const ConstTensor& t, const char* what, bool int4, const void* q,
                                  size_t q_size, absl::Span<const float> scales) {
  MAPL_RETURN_IF_ERROR(CheckShape(t, what, -1, -1));
  const int64_t n = t.rows, k = t.cols;
  if (int4) {
    const int64_t row_bytes = (k + 1) / 2;
    MAPL_RETURN_IF_ERROR(CheckBufferSize(q, q_size, "q", n * row_bytes,
                                         absl::StrCat("n * ceil(k / 2) = ", n, " * ", row_bytes)));
  } else {
    MAPL_RETURN_IF_ERROR(
        CheckBufferSize(q, q_size, "q", n * k, absl::StrCat("n * k = ", n, " * ", k)));
  }
  return CheckSpanSize(scales, "scales", n, absl::StrCat("one per row of ", what));
}

absl::Status CheckScales(absl::Span<const float> scales) {
  for (size_t i = 0; i < scales.size(); ++i) {
    if (!std::isfinite(scales[i]) || scales[i] < 0.f) {
      return absl::InvalidArgumentError(
          absl::StrCat("scales: invalid scale ", scales[i], " at row ", i));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckSpelMatrix(const ConstTensor& t, const char* what) {
  MAPL_RETURN_IF_ERROR(CheckTallF32(t, what));
  if (t.cols > kMaxSpelRank) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": rank ", t.cols, " too large (at most ", kMaxSpelRank, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckMsignOptions(const MsignOptions& options) {
  if (options.max_iterations < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("msign.max_iterations: must be >= 0, got ", options.max_iterations));
  }
  if (std::isnan(options.tolerance)) {
    return absl::InvalidArgumentError("msign.tolerance: NaN");
  }
  return absl::OkStatus();
}

absl::Status CheckMsignArgs(const ConstTensor& y, const ConstTensor& out,
                            const MsignOptions& options) {
  MAPL_RETURN_IF_ERROR(CheckSpelMatrix(y, "y"));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(out, "out", y.rows, y.cols));
  return CheckMsignOptions(options);
}

absl::Status CheckSpelStepArgs(const ConstTensor& u, const ConstTensor& grad,
                               const ConstTensor& momentum, const SpelOptions& options) {
  MAPL_RETURN_IF_ERROR(CheckSpelMatrix(u, "u"));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(grad, "grad", u.rows, u.cols));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(momentum, "momentum", u.rows, u.cols));
  if (!std::isfinite(options.lr) || options.lr < 0.f) {
    return absl::InvalidArgumentError(
        absl::StrCat("lr: must be finite and >= 0, got ", options.lr));
  }
  if (!(options.beta >= 0.f && options.beta <= 1.f)) {
    return absl::InvalidArgumentError(absl::StrCat("beta: must be in [0, 1], got ", options.beta));
  }
  return CheckMsignOptions(options.msign);
}

absl::Status MomentumOverflowError(int64_t i, int64_t cols) {
  return absl::InvalidArgumentError(absl::StrCat("grad: momentum overflows at (", i / cols, ", ",
                                                 i % cols, "); gradient too large"));
}

absl::Status CheckAnchorTables(const ConstTensor& p, const ConstTensor& q) {
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(p, "p", -1, -1));
  return CheckF32Matrix(q, "q", p.cols, -1);
}

absl::Status CheckAnchorAgainstU(const LowRankAnchor& a, const ConstTensor& u, const char* what) {
  MAPL_RETURN_IF_ERROR(CheckAnchorTables(a.p, a.q));
  if (a.q.cols != u.rows) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": q has ", a.q.cols, " columns, u has ", u.rows, " rows"));
  }
  return absl::OkStatus();
}

absl::Status CheckTokenCount(absl::Span<const int32_t> tokens, int64_t n, const char* rows_of) {
  return CheckSpanSize(tokens, "tokens", n, absl::StrCat("one per row of ", rows_of));
}

absl::Status CheckTokenValues(absl::Span<const int32_t> tokens, int64_t vocab) {
  for (int64_t i = 0; i < static_cast<int64_t>(tokens.size()); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokens[", i, "] = ", tokens[i], " out of range [0, ", vocab, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckAnchorGradArgs(const ConstTensor& p, const ConstTensor& q, const ConstTensor& g,
                                 const ConstTensor& gu, const ConstTensor& u, const ConstTensor& dp,
                                 const ConstTensor& dq) {
  MAPL_RETURN_IF_ERROR(CheckShape(g, "g", -1, q.cols));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(dp, "dp", p.rows, p.cols));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(dq, "dq", q.rows, q.cols));
  MAPL_RETURN_IF_ERROR(CheckTallF32(u, "u"));
  return CheckF32Matrix(gu, "gu", g.rows, u.cols);
}

absl::Status AnchorGradOverflowError(int64_t token) {
  return absl::InvalidArgumentError(
      absl::StrCat("dp: non-finite result for token ", token,
                   " (overflow; P, Q or g too large); dp and dq left unchanged"));
}

absl::Status CheckAdamArgs(const ConstTensor& param, const ConstTensor& grad, const ConstTensor& m,
                           const ConstTensor& v, const AdamOptions& options) {
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(param, "param", -1, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(grad, "grad", param.rows, param.cols));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(m, "m", param.rows, param.cols));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(v, "v", param.rows, param.cols));
  if (!std::isfinite(options.lr) || options.lr < 0.f) {
    return absl::InvalidArgumentError(
        absl::StrCat("lr: must be finite and >= 0, got ", options.lr));
  }
  if (!(options.beta1 >= 0.f && options.beta1 < 1.f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("beta1: must be in [0, 1), got ", options.beta1));
  }
  if (!(options.beta2 >= 0.f && options.beta2 < 1.f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("beta2: must be in [0, 1), got ", options.beta2));
  }
  if (!std::isfinite(options.eps) || options.eps <= 0.f) {
    return absl::InvalidArgumentError(
        absl::StrCat("eps: must be finite and > 0, got ", options.eps));
  }
  if (!std::isfinite(options.weight_decay) || options.weight_decay < 0.f) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight_decay: must be finite and >= 0, got ", options.weight_decay));
  }
  if (options.step < 1) {
    return absl::InvalidArgumentError(absl::StrCat("step: must be >= 1, got ", options.step));
  }
  return absl::OkStatus();
}

absl::Status AdamGradError(float value, int64_t i, int64_t cols) {
  return absl::InvalidArgumentError(absl::StrCat("grad: value ", value, " at (", i / cols, ", ",
                                                 i % cols, ") is non-finite or too large"));
}

absl::Status CheckGradUpArgs(const ConstTensor& h, const ConstTensor& gzq,
                             const ConstTensor& g_up) {
  MAPL_RETURN_IF_ERROR(CheckShape(h, "h", -1, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(gzq, "gzq", h.rows, -1));
  return CheckF32Matrix(g_up, "g_up", h.cols, gzq.cols);
}

absl::Status CheckGradDownArgs(const ConstTensor& g, const ConstTensor& gu, const ConstTensor& zq,
                               const ConstTensor& u, const ConstTensor& g_down) {
  MAPL_RETURN_IF_ERROR(CheckShape(g, "g", -1, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(u, "u", g.cols, -1));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(gu, "gu", g.rows, u.cols));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(zq, "zq", g.rows, u.cols));
  return CheckF32Matrix(g_down, "g_down", g.cols, u.cols);
}

}  // namespace mapl
