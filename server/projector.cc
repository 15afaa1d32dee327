#include "server/projector.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "common/status_macros.h"
#include "server/state_store.h"

namespace mapl {
namespace {

// Salt that keeps the projector's seeded stream independent of the boundary's others.
constexpr uint64_t kSaltProjector = 0x55f1e6a3c0d2b817ull;

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<float> SeededOrthonormal(int64_t d, int64_t k, uint64_t seed) {
  // Columns stored contiguously. Entries: a sum of four uniforms (near-Gaussian), exact in double.
  uint64_t state = seed ^ kSaltProjector;
  std::vector<double> a(static_cast<size_t>(d * k));
  for (double& v : a) {
    double s = 0.0;
    for (int i = 0; i < 4; ++i) s += static_cast<double>(SplitMix64(&state) >> 11) * 0x1p-53;
    v = s - 2.0;
  }
  // Modified Gram-Schmidt, twice per column for full orthogonality. Every multiply-add is an
  // explicit std::fma (correctly rounded, in hardware or in libm), so the compiler's contraction
  // choices cannot change a bit between builds.
  for (int64_t j = 0; j < k; ++j) {
    double* col = a.data() + j * d;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t p = 0; p < j; ++p) {
        const double* q = a.data() + p * d;
        double dot = 0.0;
        for (int64_t i = 0; i < d; ++i) dot = std::fma(q[i], col[i], dot);
        for (int64_t i = 0; i < d; ++i) col[i] = std::fma(-dot, q[i], col[i]);
      }
    }
    double norm2 = 0.0;
    for (int64_t i = 0; i < d; ++i) norm2 = std::fma(col[i], col[i], norm2);
    const double norm = std::sqrt(norm2);
    for (int64_t i = 0; i < d; ++i) col[i] /= norm;
  }
  std::vector<float> u(static_cast<size_t>(d * k));
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < k; ++j) u[i * k + j] = static_cast<float>(a[j * d + i]);
  }
  return u;
}

absl::StatusOr<std::vector<float>> PrincipalSubspace(const Backend& backend, const ConstTensor& h,
                                                     int64_t k, uint64_t seed, int iterations) {
  // Subspace iteration on C = h^T h without forming it: Y = h^T (h U), U = polar(Y). The shift
  // Y += mu U with mu = 1e-3 |Y|_F leaves the eigenvectors alone and keeps Y's condition number
  // below about 1e3, so the polar factor exists even when h has rank < k.
  const int64_t d = h.cols;
  std::vector<float> u = SeededOrthonormal(d, k, seed);
  std::vector<float> z(h.rows * k), y(d * k);
  for (int it = 0; it < iterations; ++it) {
    MAPL_RETURN_IF_ERROR(
        backend.Project(h, ConstTensor::F32(u.data(), d, k), Tensor::F32(z.data(), h.rows, k)));
    MAPL_RETURN_IF_ERROR(backend.GradUp(h, ConstTensor::F32(z.data(), h.rows, k),
                                        Tensor::F32(y.data(), d, k), /*accumulate=*/false));
    double norm2 = 0.0;
    for (float v : y) norm2 += double{v} * v;
    const float mu = static_cast<float>(1e-3 * std::sqrt(norm2));
    if (!(mu > 0.f) || !std::isfinite(mu)) break;  // h == 0 (keep the seeded U) or overflow
    for (size_t i = 0; i < y.size(); ++i) y[i] += mu * u[i];
    // Cannot fail by the bound above; if it did, the last U is still orthonormal.
    if (!backend.Retract(Tensor::F32(y.data(), d, k)).ok()) break;
    u.swap(y);
  }
  return u;
}

ProjectorLearner::ProjectorLearner(const v1::BoundaryConfig& config)
    : d_(config.d()),
      k_(config.k()),
      lr_(config.projector_lr()),
      beta_(config.projector_beta()),
      warmup_(config.projector_warmup_steps()),
      momentum_(d_ * k_, 0.f),
      g_up_(d_ * k_, 0.f) {}

absl::Status ProjectorLearner::AccumulateUp(const Backend& backend, const ConstTensor& h,
                                            const ConstTensor& gzq) {
  // Into a scratch first: on error G_up is unchanged.
  std::vector<float> g(d_ * k_);
  MAPL_RETURN_IF_ERROR(backend.GradUp(h, gzq, Tensor::F32(g.data(), d_, k_), false));
  for (size_t i = 0; i < g.size(); ++i) g_up_[i] += g[i];
  return absl::OkStatus();
}

double ProjectorLearner::StepLength(double lr, uint32_t warmup, int64_t t) {
  const double w = std::max<uint32_t>(warmup, 1);
  const double tt = static_cast<double>(t);
  return lr * std::min(tt / w, std::sqrt(w / tt));
}

bool ProjectorLearner::Step(const Backend& backend, float* u, const std::vector<float>& g_down) {
  std::vector<float> grad = g_up_;
  for (size_t i = 0; i < grad.size(); ++i) grad[i] += g_down[i];
  ClearGradient();
  SpelOptions options;
  options.lr = static_cast<float>(StepLength(lr_, warmup_, steps_ + 1));
  options.beta = beta_;
  // Atomic in the backend: on error nothing moved.
  const absl::Status s =
      backend.SpelStep(Tensor::F32(u, d_, k_), ConstTensor::F32(grad.data(), d_, k_),
                       Tensor::F32(momentum_.data(), d_, k_), options);
  if (!s.ok()) return false;
  ++steps_;
  last_lr_ = options.lr;
  return true;
}

void ProjectorLearner::Save(v1::ProjectorState* out) const {
  SaveFloats(momentum_, out->mutable_momentum());
  out->set_steps(steps_);
  out->set_last_lr(last_lr_);
}

absl::Status ProjectorLearner::Restore(const v1::ProjectorState& state) {
  if (state.steps() < 0) return absl::InvalidArgumentError("projector: negative steps");
  std::vector<float> momentum;
  MAPL_RETURN_IF_ERROR(
      RestoreFloats(state.momentum(), momentum_.size(), "projector momentum", &momentum));
  momentum_ = std::move(momentum);
  steps_ = state.steps();
  last_lr_ = state.last_lr();
  ClearGradient();
  return absl::OkStatus();
}

void ProjectorLearner::ClearGradient() { std::fill(g_up_.begin(), g_up_.end(), 0.f); }

}  // namespace mapl
