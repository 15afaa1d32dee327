// Codec health accumulators, the subspace drift and the link goodput (codec_health.h).
#include "server/codec_health.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/status_macros.h"

namespace mapl {
namespace {

double Clamp01(double x) { return std::min(1.0, std::max(0.0, x)); }

// a / b, or 0 when b is not positive (a step with nothing to measure reads as 0).
double Ratio(double a, double b) { return b > 0.0 ? a / b : 0.0; }

// sum of value(i)^2 for i < count, in double. Eight independent partial sums let the compiler
// use SIMD lanes; one running sum is bound by the add's latency (|h|^2 of a 4096 x 2048
// microbatch, which every forward frame pays: 4 ms against 6 to 10 ms on a 2-core test host).
template <typename Value>
double SumOfSquares(int64_t count, Value value) {
  double partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int j = 0; j < 8; ++j) {
      const double v = value(i + j);
      partial[j] += v * v;
    }
  }
  double sum = 0.0;
  for (; i < count; ++i) {
    const double v = value(i);
    sum += v * v;
  }
  for (double p : partial) sum += p;
  return sum;
}

}  // namespace

double SquaredNorm(const ConstTensor& t) {
  if (t.dtype == DType::kF32) {
    const float* p = t.f32();
    return SumOfSquares(t.size(), [p](int64_t i) { return double{p[i]}; });
  }
  const bf16_t* p = t.bf16();
  return SumOfSquares(t.size(), [p](int64_t i) { return double{Bf16ToFloat(p[i])}; });
}

double SquaredDistance(const float* a, const float* b, int64_t count) {
  return SumOfSquares(count, [a, b](int64_t i) { return double{a[i]} - b[i]; });
}

// ---- ProjectionHealth ----

void ProjectionHealth::Add(const ConstTensor& x, const float* y, const float* yq, int64_t k) {
  const int64_t count = x.rows * k;
  AddSums(SquaredNorm(x), SquaredNorm(ConstTensor::F32(y, x.rows, k)),
          SquaredDistance(y, yq, count), x.rows);
}

void ProjectionHealth::AddSums(double x_squared, double y_squared, double code_error_squared,
                               int64_t rows) {
  x_squared_ += x_squared;
  y_squared_ += y_squared;
  code_error_squared_ += code_error_squared;
  rows_ += rows;
}

ProjectionHealth::Summary ProjectionHealth::Finish() const {
  Summary s;
  s.rows = rows_;
  if (x_squared_ <= 0.0) return s;
  // |x|^2 - |y|^2 is the energy outside the subspace; rounding can make it a hair negative.
  const double outside = std::max(0.0, x_squared_ - y_squared_);
  s.relative_error = std::sqrt((outside + code_error_squared_) / x_squared_);
  s.subspace_energy_share = Clamp01(y_squared_ / x_squared_);
  s.outside_energy_share = Clamp01(outside / x_squared_);
  s.code_relative_error = std::sqrt(Ratio(code_error_squared_, y_squared_));
  return s;
}

void ProjectionHealth::Reset() { *this = ProjectionHealth(); }

// ---- CodeUsage ----

CodeUsage::CodeUsage(int levels, int codebook_size)
    : levels_(levels),
      codebook_size_(codebook_size),
      counts_(static_cast<size_t>(levels) * codebook_size, 0),
      level_rows_(levels, 0) {
  MAPL_CHECK(levels >= 1 && levels <= kMaxRvqLevels && codebook_size >= 1 &&
                 codebook_size <= kMaxCodebookSize,
             absl::StrCat("CodeUsage(", levels, ", ", codebook_size, "): out of range"));
}

void CodeUsage::Add(absl::Span<const uint8_t> codes, int levels) {
  MAPL_CHECK(levels >= 1 && levels <= levels_ && codes.size() % levels == 0,
             absl::StrCat("CodeUsage::Add: ", codes.size(), " codes is not rows x ", levels,
                          " levels (of ", levels_, "); the caller passes a checked RVQ payload"));
  const int64_t rows = static_cast<int64_t>(codes.size()) / levels;
  for (int64_t r = 0; r < rows; ++r) {
    for (int l = 0; l < levels; ++l) {
      const uint8_t c = codes[r * levels + l];
      MAPL_CHECK(c < codebook_size_, "CodeUsage::Add: a code beyond K; RVQ frames are checked");
      ++counts_[static_cast<size_t>(l) * codebook_size_ + c];
    }
  }
  for (int l = 0; l < levels; ++l) level_rows_[l] += rows;
  rows_ += rows;
}

CodeUsage::Summary CodeUsage::Finish() const {
  Summary s;
  s.rows = rows_;
  if (rows_ == 0) return s;
  for (int l = 0; l < levels_ && level_rows_[l] > 0; ++l) {
    const double n = static_cast<double>(level_rows_[l]);
    int dead = 0;
    double entropy = 0.0;
    for (int c = 0; c < codebook_size_; ++c) {
      const uint64_t count = counts_[static_cast<size_t>(l) * codebook_size_ + c];
      if (count == 0) {
        ++dead;
        continue;
      }
      const double p = static_cast<double>(count) / n;
      entropy -= p * std::log(p);
    }
    s.dead_share.push_back(static_cast<double>(dead) / codebook_size_);
    s.perplexity.push_back(std::exp(entropy));
  }
  s.worst_dead_share = *std::max_element(s.dead_share.begin(), s.dead_share.end());
  s.lowest_perplexity = *std::min_element(s.perplexity.begin(), s.perplexity.end());
  return s;
}

void CodeUsage::Reset() {
  std::fill(counts_.begin(), counts_.end(), 0);
  std::fill(level_rows_.begin(), level_rows_.end(), 0);
  rows_ = 0;
}

// ---- SubspaceDrift ----

absl::StatusOr<double> SubspaceDrift(const Backend& backend, const ConstTensor& u_prev,
                                     const ConstTensor& u_new) {
  MAPL_RETURN_IF_ERROR(CheckTallF32(u_prev, "u_prev"));
  MAPL_RETURN_IF_ERROR(CheckF32Matrix(u_new, "u_new", u_prev.rows, u_prev.cols));
  const int64_t d = u_prev.rows;
  const int64_t k = u_prev.cols;
  // A version that changed only other tables (the RVQ codebooks) kept U bit for bit.
  if (std::equal(u_prev.f32(), u_prev.f32() + d * k, u_new.f32())) return 0.0;
  // 1 - |M|_F^2 / k with M = U_prev^T U_new cancels catastrophically for small drifts (float
  // rounding of |M|^2 alone reads as a drift of ~1e-4), so the same quantity is taken as the
  // part of U_new outside span(U_prev): |U_new - U_prev M|_F^2 / k, which equals it for
  // orthonormal columns. Both products go through the backend, in transposed form:
  // M = Project(U_prev^T, U_new) (k x k) and (U_prev M)^T = Lift(M^T, U_prev) (k x d).
  std::vector<float> prev_t(d * k), new_t(d * k);
  const float* p = u_prev.f32();
  const float* q = u_new.f32();
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      prev_t[j * d + i] = p[i * k + j];
      new_t[j * d + i] = q[i * k + j];
    }
  }
  std::vector<float> overlap(k * k), overlap_t(k * k), inside_t(k * d);
  MAPL_RETURN_IF_ERROR(backend.Project(ConstTensor::F32(prev_t.data(), k, d), u_new,
                                       Tensor::F32(overlap.data(), k, k)));
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b) overlap_t[b * k + a] = overlap[a * k + b];
  }
  MAPL_RETURN_IF_ERROR(backend.Lift(ConstTensor::F32(overlap_t.data(), k, k), u_prev,
                                    Tensor::F32(inside_t.data(), k, d)));
  const double outside = SquaredDistance(new_t.data(), inside_t.data(), k * d);
  return std::sqrt(Clamp01(outside / static_cast<double>(k)));
}

// ---- LinkGoodput ----

void LinkGoodput::Handed(absl::Time now, int64_t bytes) {
  if (!busy_) {
    busy_ = true;
    mark_ = now;
    queued_at_mark_ = 0;
    handed_since_mark_ = 0;
  }
  handed_since_mark_ += bytes;
  step_handed_ += bytes;
}

void LinkGoodput::Drained(absl::Time now, absl::Duration ack_latency) {
  if (!busy_) return;
  step_busy_seconds_ += std::max(0.0, absl::ToDoubleSeconds(now - mark_ - ack_latency));
  step_delivered_ += queued_at_mark_ + handed_since_mark_;  // all of it is acknowledged now
  busy_ = false;
}

LinkGoodput::Step LinkGoodput::EndStep(absl::Time now, int64_t queued_bytes) {
  if (busy_) {
    // Split the open busy period at `now`: what left the queue since the mark was delivered in
    // this step; what is still queued is delivered in a later one. The transport's count may
    // include a few bytes of its own header per message, hence the clamp.
    step_busy_seconds_ += std::max(0.0, absl::ToDoubleSeconds(now - mark_));
    step_delivered_ += std::max<int64_t>(0, queued_at_mark_ + handed_since_mark_ - queued_bytes);
    mark_ = now;
    queued_at_mark_ = std::min(queued_bytes, queued_at_mark_ + handed_since_mark_);
    handed_since_mark_ = 0;
  }
  Step s;
  s.bytes_handed = step_handed_;
  if (step_busy_seconds_ > 0.0 || step_delivered_ > 0) {
    window_.emplace_back(step_delivered_, step_busy_seconds_);
  }
  // The newest steps that reach the window; older ones are dropped for good.
  int64_t delivered = 0;
  double busy = 0.0;
  size_t used = 0;
  for (auto it = window_.rbegin(); it != window_.rend() && busy < kWindowSeconds; ++it, ++used) {
    delivered += it->first;
    busy += it->second;
  }
  window_.erase(window_.begin(), window_.end() - used);
  if (busy > 0.0 && delivered > 0) s.goodput = static_cast<double>(delivered) / busy;
  step_busy_seconds_ = 0.0;
  step_delivered_ = 0;
  step_handed_ = 0;
  return s;
}

// ---- CodecHealth ----

CodecHealth::CodecHealth(const v1::BoundaryConfig& config, v1::Direction direction)
    : direction_(direction),
      k_(config.k()),
      codes_(static_cast<int>(std::clamp<uint32_t>(config.rvq_levels(), 1, kMaxRvqLevels)),
             kMaxCodebookSize) {}

absl::Status CodecHealth::AddFrame(const FrameCodec& codec, const ConstTensor& x, const float* y,
                                   const v1::Frame& frame, const RvqCodebooks* codebooks) {
  const int64_t n = x.rows;
  zq_.resize(n * k_);
  MAPL_RETURN_IF_ERROR(codec.DecodeProjected(frame, codebooks, zq_.data()));
  projection_.Add(x, y, zq_.data(), k_);
  if (frame.codec() == v1::CODEC_RVQ) {
    codes_.Add(absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(frame.payload().data()),
                                   frame.payload().size()),
               static_cast<int>(frame.levels()));
  }
  return absl::OkStatus();
}

void CodecHealth::FinishStep(const Backend& backend,
                             std::shared_ptr<const PublishedDictionary> published,
                             v1::BoundaryStats* stats) {
  const ProjectionHealth::Summary p = projection_.Finish();
  const bool forward = direction_ == v1::DIRECTION_FORWARD;
  if (forward) {
    stats->set_forward_relative_error(p.relative_error);
    stats->set_forward_subspace_energy_share(p.subspace_energy_share);
    stats->set_forward_code_relative_error(p.code_relative_error);
    const CodeUsage::Summary c = codes_.Finish();
    stats->set_rvq_dead_code_share(c.worst_dead_share);
    stats->set_rvq_perplexity(c.lowest_perplexity);
    stats->mutable_rvq_dead_code_share_per_level()->Assign(c.dead_share.begin(),
                                                           c.dead_share.end());
    stats->mutable_rvq_perplexity_per_level()->Assign(c.perplexity.begin(), c.perplexity.end());
  } else {
    stats->set_gradient_outside_energy_share(p.outside_energy_share);
    stats->set_backward_code_relative_error(p.code_relative_error);
  }
  projection_.Reset();
  codes_.Reset();

  double drift = 0.0;
  if (published != nullptr && last_published_ != nullptr &&
      published->version() != last_published_->version()) {
    absl::StatusOr<double> d =
        SubspaceDrift(backend, last_published_->tensor(0), published->tensor(0));
    MAPL_CHECK(d.ok(), absl::StrCat("subspace drift of two published U of one shape: ",
                                    d.status().ToString()));
    drift = *d;
  }
  if (published != nullptr) last_published_ = std::move(published);
  if (forward) stats->set_subspace_drift(drift);

  // The owner counts what it sends, the replica what it applies.
  const uint64_t bytes =
      forward ? stats->dictionary_bytes_sent() : stats->dictionary_bytes_received();
  stats->set_dictionary_bytes_last_step(bytes - dictionary_bytes_mark_);
  dictionary_bytes_mark_ = bytes;
}

}  // namespace mapl
