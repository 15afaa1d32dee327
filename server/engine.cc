#include "server/engine.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "server/config.h"
#include "server/dictionary.h"
#include "server/downstream_engine.h"
#include "server/frame_codec.h"
#include "server/upstream_engine.h"

namespace mapl {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const v1::BoundaryConfig& config,
                                                       const Backend* backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("backend: null");
  MAPL_ASSIGN_OR_RETURN(v1::BoundaryConfig full, BoundaryConfigWithDefaults(config));
  if (full.role() == v1::ROLE_UPSTREAM) {
    MAPL_ASSIGN_OR_RETURN(std::unique_ptr<UpstreamEngine> e, UpstreamEngine::Create(full, backend));
    return std::unique_ptr<Engine>(std::move(e));
  }
  MAPL_ASSIGN_OR_RETURN(std::unique_ptr<DownstreamEngine> e,
                        DownstreamEngine::Create(full, backend));
  return std::unique_ptr<Engine>(std::move(e));
}

LearnerSample SampleLearnerRows(int64_t n, int64_t max_rows, uint64_t step, uint32_t microbatch) {
  LearnerSample sample;
  if (max_rows <= 0 || n <= max_rows) return sample;
  // A phase in [0, 1) from (step, microbatch): row i is floor((i + phase) n / max_rows), strictly
  // increasing since n / max_rows > 1, and below n.
  uint64_t x = step * 0x9e3779b97f4a7c15ull + microbatch + 1;
  x = (x ^ (x >> 31)) * 0xbf58476d1ce4e5b9ull;
  const double phase = static_cast<double>(x >> 11) * 0x1p-53;
  const double stride = static_cast<double>(n) / static_cast<double>(max_rows);
  sample.rows.resize(static_cast<size_t>(max_rows));
  for (int64_t i = 0; i < max_rows; ++i) {
    sample.rows[i] = std::min<int64_t>(n - 1, static_cast<int64_t>((i + phase) * stride));
  }
  sample.scale = static_cast<float>(stride);
  return sample;
}

std::vector<float> GatherRows(const ConstTensor& t, const std::vector<int64_t>& rows, float scale) {
  const int64_t cols = t.cols;
  std::vector<float> out(rows.size() * cols);
  for (size_t i = 0; i < rows.size(); ++i) {
    float* dst = out.data() + i * cols;
    if (t.dtype == DType::kF32) {
      const float* src = t.f32() + rows[i] * cols;
      for (int64_t j = 0; j < cols; ++j) dst[j] = src[j] * scale;
    } else {
      Bf16ToFloat(t.bf16() + rows[i] * cols, dst, cols);
      for (int64_t j = 0; j < cols; ++j) dst[j] *= scale;
    }
  }
  return out;
}

void CountFrameSent(const v1::Frame& frame, int64_t d, v1::BoundaryStats* stats) {
  stats->set_frames_sent(stats->frames_sent() + 1);
  stats->set_raw_bytes_sent(stats->raw_bytes_sent() + uint64_t{frame.tokens()} * d * 2);
  stats->set_payload_bytes_sent(stats->payload_bytes_sent() + FrameWireBytes(frame));
}

void CountFrameReceived(const v1::Frame& frame, int64_t d, v1::BoundaryStats* stats) {
  stats->set_frames_received(stats->frames_received() + 1);
  stats->set_raw_bytes_received(stats->raw_bytes_received() + uint64_t{frame.tokens()} * d * 2);
  stats->set_payload_bytes_received(stats->payload_bytes_received() + FrameWireBytes(frame));
}

v1::BoundaryState StateHeader(const v1::BoundaryConfig& config,
                              const std::optional<uint64_t>& last_step) {
  v1::BoundaryState state;
  state.set_boundary(config.id());
  state.set_role(config.role());
  *state.mutable_fingerprint() = BoundaryFingerprintOf(config);
  if (last_step.has_value()) state.set_last_step(*last_step);
  state.set_unix_micros(absl::ToUnixMicros(absl::Now()));
  return state;
}

absl::Status CheckStepIncreases(const std::optional<uint64_t>& last_closed, uint64_t step) {
  if (last_closed.has_value() && step <= *last_closed) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Step(", step, "): step already closed; steps must increase, the last closed was ",
        *last_closed));
  }
  return absl::OkStatus();
}

absl::Status UnexpectedPeerMessage(const v1::BoundaryConfig& config,
                                   const v1::PeerMessage& message) {
  const bool up = config.role() == v1::ROLE_UPSTREAM;
  const google::protobuf::FieldDescriptor* body =
      message.GetDescriptor()->FindFieldByNumber(message.body_case());
  return absl::InvalidArgumentError(
      absl::StrCat("the ", up ? "upstream" : "downstream", " of boundary ", config.id(),
                   " takes no ", body != nullptr ? body->name() : "empty", " message from its ",
                   up ? "downstream" : "upstream"));
}

double OrthogonalityError(const float* u, int64_t d, int64_t k) {
  double err = 0.0;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = a; b < k; ++b) {
      double dot = 0.0;
      for (int64_t i = 0; i < d; ++i) dot += double{u[i * k + a]} * u[i * k + b];
      err = std::max(err, std::fabs(dot - (a == b ? 1.0 : 0.0)));
    }
  }
  return err;
}

void DictionaryGauges::Fill(const PublishedDictionary& dict, int64_t d, int64_t k,
                            v1::BoundaryStats* out) const {
  if (dict.version() != version_ || dict.Checksum() != checksum_) {
    version_ = dict.version();
    checksum_ = dict.Checksum();
    orthogonality_error_ = OrthogonalityError(dict.table(0), d, k);
  }
  out->set_has_dictionary(true);
  out->set_dictionary_version(version_);
  out->set_dictionary_checksum(checksum_);
  out->set_orthogonality_error(orthogonality_error_);
}

}  // namespace mapl
