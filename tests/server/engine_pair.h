// Test helpers of the engine tests: a synthetic activation stream with a known structure, and an
// upstream and a downstream engine wired in-process (messages moved by hand).
#ifndef MAPL_TESTS_SERVER_ENGINE_PAIR_H_
#define MAPL_TESTS_SERVER_ENGINE_PAIR_H_

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "server/config.h"
#include "server/downstream_engine.h"
#include "server/projector.h"
#include "server/upstream_engine.h"

namespace mapl {
namespace testing_internal {

// Synthetic activations: h = (rank-32 signal in d = 512: a fixed random orthonormal basis B,
// fresh N(0, 1) coefficients per token) + (per-token offset A[t] C: A (V x 8) entries
// N(0, 0.5^2), C (8 x 512) orthonormal rows) + noise whose norm is 1% of the signal's.
// The offsets (norm about a quarter of the signal's) lie outside span(B) and have smaller variance
// per direction, so the principal subspace is span(B) and the anchors must supply the offsets.
class Stream {
 public:
  static constexpr int kD = 512, kSignalRank = 32, kVocab = 256, kOffsetRank = 8;

  explicit Stream(uint64_t seed) : rng_(seed), backend_(MakeCpuBackend()) {
    basis_ = Orthonormal(kD, kSignalRank);  // (d, 32), columns orthonormal
    std::vector<float> c = Orthonormal(kD, kOffsetRank);
    std::normal_distribution<float> normal(0.f, 0.5f);
    table_.resize(kVocab * kOffsetRank);
    for (float& v : table_) v = normal(rng_);
    offsets_.assign(kVocab * kD, 0.f);
    for (int t = 0; t < kVocab; ++t) {
      for (int i = 0; i < kD; ++i) {
        float s = 0.f;
        for (int j = 0; j < kOffsetRank; ++j)
          s += table_[t * kOffsetRank + j] * c[i * kOffsetRank + j];
        offsets_[t * kD + i] = s;
      }
    }
  }

  // One microbatch: n tokens (ids and h (n, d)). The signal goes through the backend's Lift
  // (h = coef B^T, BLAS) and the noise is uniform (std matched), so that the stream stays cheap in
  // unoptimized sanitizer builds.
  void Next(int n, std::vector<float>* h, std::vector<int32_t>* tokens) {
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_int_distribution<int32_t> id(0, kVocab - 1);
    std::vector<float> coef(size_t(n) * kSignalRank);
    for (float& v : coef) v = normal(rng_);
    h->assign(size_t(n) * kD, 0.f);
    EXPECT_TRUE(backend_
                    ->Lift(ConstTensor::F32(coef.data(), n, kSignalRank),
                           ConstTensor::F32(basis_.data(), kD, kSignalRank),
                           Tensor::F32(h->data(), n, kD))
                    .ok());
    // Uniform on [-a, a] has std a / sqrt(3); the noise's norm is 1% of the signal's.
    const float a = std::sqrt(3.f) * 0.01f * std::sqrt(float(kSignalRank) / kD);
    uint64_t x = rng_() | 1;
    tokens->resize(n);
    for (int r = 0; r < n; ++r) {
      (*tokens)[r] = id(rng_);
      float* row = h->data() + size_t(r) * kD;
      const float* off = offsets_.data() + size_t((*tokens)[r]) * kD;
      for (int i = 0; i < kD; ++i) {
        x ^= x << 13;  // xorshift64
        x ^= x >> 7;
        x ^= x << 17;
        const float u = float(x >> 40) * 0x1p-24f;  // [0, 1)
        row[i] += off[i] + a * (2.f * u - 1.f);
      }
    }
  }

 private:
  std::vector<float> Orthonormal(int d, int k) {
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<double> a(size_t(d) * k);
    for (double& v : a) v = normal(rng_);
    for (int j = 0; j < k; ++j) {  // Gram-Schmidt on columns of a (d, k) row-major
      for (int pass = 0; pass < 2; ++pass) {
        for (int p = 0; p < j; ++p) {
          double dot = 0;
          for (int i = 0; i < d; ++i) dot += a[i * k + p] * a[i * k + j];
          for (int i = 0; i < d; ++i) a[i * k + j] -= dot * a[i * k + p];
        }
      }
      double norm = 0;
      for (int i = 0; i < d; ++i) norm += a[i * k + j] * a[i * k + j];
      norm = std::sqrt(norm);
      for (int i = 0; i < d; ++i) a[i * k + j] /= norm;
    }
    return std::vector<float>(a.begin(), a.end());
  }

  std::mt19937_64 rng_;
  std::unique_ptr<Backend> backend_;
  std::vector<float> basis_, table_, offsets_;
};

inline v1::BoundaryConfig Config(v1::Role role, v1::Method method, v1::Codec forward) {
  v1::BoundaryConfig c;
  c.set_id(7);
  c.set_role(role);
  c.set_d(Stream::kD);
  c.set_k(32);
  c.set_method(method);
  c.set_forward_codec(forward);
  c.set_vocab(Stream::kVocab);
  c.set_seed(1234);
  return c;
}

// An upstream and a downstream engine of one boundary, with the peer link replaced by hand-moved
// messages, and the downstream trainer's loss L = |h_hat - h|^2 / 2 (so g = h_hat - h).
class Pair {
 public:
  explicit Pair(v1::BoundaryConfig config) : backend_(MakeCpuBackend()) {
    config.set_role(v1::ROLE_UPSTREAM);
    absl::StatusOr<v1::BoundaryConfig> full = BoundaryConfigWithDefaults(config);
    EXPECT_TRUE(full.ok()) << full.status();
    auto up = UpstreamEngine::Create(*full, backend_.get());
    EXPECT_TRUE(up.ok()) << up.status();
    if (up.ok()) up_ = std::move(*up);
    full->set_role(v1::ROLE_DOWNSTREAM);
    auto down = DownstreamEngine::Create(*full, backend_.get());
    EXPECT_TRUE(down.ok()) << down.status();
    if (down.ok()) down_ = std::move(*down);
  }

  UpstreamEngine& up() { return *up_; }
  DownstreamEngine& down() { return *down_; }

  // Delivers upstream -> downstream messages except frames, which are returned.
  absl::Status ToDownstream(const std::vector<v1::PeerMessage>& messages,
                            std::vector<v1::Frame>* frames) {
    for (const v1::PeerMessage& m : messages) {
      absl::Status s;
      if (m.has_frame()) {
        frames->push_back(m.frame());
      } else if (m.has_dictionary_delta()) {
        s = down_->HandleDelta(m.dictionary_delta());
      } else if (m.has_dictionary_snapshot()) {
        s = down_->HandleSnapshot(m.dictionary_snapshot());
      } else {
        s = absl::InternalError("unexpected message to the downstream");
      }
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  }

  // One microbatch forward and backward; adds |h_hat - h|^2 and |h|^2 to *err2, *norm2.
  absl::Status Microbatch(uint64_t step, uint32_t mb, const std::vector<float>& h,
                          const std::vector<int32_t>& tokens, double* err2, double* norm2) {
    const int64_t n = tokens.size(), d = up_->config().d();
    auto out = up_->EncodeForward(step, mb, ConstTensor::F32(h.data(), n, d), tokens.data());
    if (!out.ok()) return out.status();
    std::vector<v1::Frame> frames;
    if (absl::Status s = ToDownstream(*out, &frames); !s.ok()) return s;
    if (frames.size() != 1) return absl::InternalError("expected one frame");
    std::vector<float> h_hat(n * d);
    if (absl::Status s = down_->DecodeForward(frames[0], Tensor::F32(h_hat.data(), n, d));
        !s.ok()) {
      return s;
    }
    std::vector<float> g(n * d);
    for (int64_t i = 0; i < n * d; ++i) {
      g[i] = h_hat[i] - h[i];
      *err2 += double(g[i]) * g[i];
      *norm2 += double(h[i]) * h[i];
    }
    auto back = down_->EncodeBackward(step, mb, ConstTensor::F32(g.data(), n, d));
    if (!back.ok()) return back.status();
    std::vector<float> dh(n * d);
    return up_->DecodeBackward(back->frame(), Tensor::F32(dh.data(), n, d));
  }

  // Both sides close the step: downstream first, its signal upstream, the delta downstream.
  absl::Status CloseStep(uint64_t step) {
    auto signal = down_->Step(step);
    if (!signal.ok()) return signal.status();
    for (const v1::PeerMessage& m : *signal) {
      if (!m.has_learning_signal()) return absl::InternalError("downstream sent a non-signal");
      if (absl::Status s = up_->HandleLearningSignal(m.learning_signal()); !s.ok()) return s;
    }
    auto delta = up_->Step(step);
    if (!delta.ok()) return delta.status();
    std::vector<v1::Frame> frames;
    if (absl::Status s = ToDownstream(*delta, &frames); !s.ok()) return s;
    return frames.empty() ? absl::OkStatus() : absl::InternalError("frame from Step()");
  }

 private:
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<UpstreamEngine> up_;
  std::unique_ptr<DownstreamEngine> down_;
};

struct Curve {
  std::vector<double> error;    // relative error of each step
  std::vector<double> rvq_mse;  // the codebooks' relative MSE, of each step that updated them
};

// Runs `steps` steps of 4 microbatches of 256 tokens; checks dictionary sync after every step.
inline Curve RunScenario(const v1::BoundaryConfig& config, int steps, const char* label) {
  constexpr int kMicrobatches = 4, kTokens = 256;
  const auto start = std::chrono::steady_clock::now();
  Pair pair(config);
  Stream stream(/*seed=*/42);
  Curve curve;
  std::vector<float> h;
  std::vector<int32_t> tokens;
  for (int step = 1; step <= steps; ++step) {
    double err2 = 0, norm2 = 0;
    for (int mb = 0; mb < kMicrobatches; ++mb) {
      stream.Next(kTokens, &h, &tokens);
      absl::Status s = pair.Microbatch(step, mb, h, tokens, &err2, &norm2);
      EXPECT_TRUE(s.ok()) << label << " step " << step << ": " << s;
      if (!s.ok()) return curve;
    }
    absl::Status s = pair.CloseStep(step);
    EXPECT_TRUE(s.ok()) << label << " step " << step << ": " << s;
    if (!s.ok()) return curve;
    curve.error.push_back(std::sqrt(err2 / norm2));
    const v1::BoundaryStats up = pair.up().stats(), down = pair.down().stats();
    if (up.rvq_relative_mse() > 0) curve.rvq_mse.push_back(up.rvq_relative_mse());
    EXPECT_EQ(up.dictionary_version(), down.dictionary_version()) << label << " step " << step;
    EXPECT_EQ(up.dictionary_checksum(), down.dictionary_checksum()) << label << " step " << step;
    if (step == 1 || step % 20 == 0) {
      std::printf(
          "[%s] step %3d  rel.error %.4f  dict v%llu  |U^TU-I| %.1e  eta %.4f  payload %llu B  "
          "dict %llu B  rvq mse %.3f\n",
          label, step, curve.error.back(), static_cast<unsigned long long>(up.dictionary_version()),
          up.orthogonality_error(), up.projector_lr(),
          static_cast<unsigned long long>(up.payload_bytes_sent()),
          static_cast<unsigned long long>(up.dictionary_bytes_sent()), up.rvq_relative_mse());
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("[%s] %d steps in %.1f s\n", label, steps, seconds);
  std::fflush(stdout);
  return curve;
}

}  // namespace testing_internal
}  // namespace mapl

#endif  // MAPL_TESTS_SERVER_ENGINE_PAIR_H_
