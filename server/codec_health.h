// Codec health: what the compression of one boundary keeps of its signal, measured over one
// optimizer step (the gauges of local.proto BoundaryStats that docs/ARCHITECTURE.md lists under
// "Codec health"), and the link's goodput, so that a user sees whether the codec, the sidecar's
// compute or the link limits training.
//
// The parts are small accumulators with Add / Finish / Reset, each unit-tested on data whose
// answer is known:
//   - ProjectionHealth: the energy of x (h upstream, g downstream), of its projection y = x U and
//     of the code error y - yq (yq: what the peer decodes). With U orthonormal,
//     |x - yq U^T|^2 = |x|^2 - |y|^2 + |y - yq|^2, so three sums give the relative error.
//   - CodeUsage: the RVQ code histogram of each level: dead codes and perplexity.
//   - SubspaceDrift: how far the subspace of U moved between two published versions.
//   - LinkGoodput: bytes acknowledged per second of the link's busy time.
// CodecHealth ties the first three to an engine, so that each engine calls it twice:
//
//   CodecHealth health(config, v1::DIRECTION_FORWARD);
//   // each encoded frame (projected methods), before sealing is fine:
//   MAPL_RETURN_IF_ERROR(health.AddFrame(codec, h, z.data(), frame, codebooks));
//   // at the end of Step():
//   health.FinishStep(backend, owner.published(), &stats);
//
// Threading: none of these is thread-safe; their owner serializes calls.
#ifndef MAPL_SERVER_CODEC_HEALTH_H_
#define MAPL_SERVER_CODEC_HEALTH_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "kernels/rvq.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/dictionary.h"
#include "server/frame_codec.h"

namespace mapl {

// sum of t's squared elements (f32 or bf16), accumulated in double.
double SquaredNorm(const ConstTensor& t);
// sum (a_i - b_i)^2 over `count` floats, accumulated in double.
double SquaredDistance(const float* a, const float* b, int64_t count);

// The projection's and the codec's error over the microbatches of a step.
class ProjectionHealth {
 public:
  struct Summary {
    // sqrt((sum |x|^2 - sum |y|^2 + sum |y - yq|^2) / sum |x|^2): the error of x as the peer
    // rebuilds it from yq (before any anchor).
    double relative_error = 0.0;
    // sum |y|^2 / sum |x|^2, and (sum |x|^2 - sum |y|^2) / sum |x|^2 (clamped to [0, 1]: with x
    // inside the subspace, rounding can make |y| exceed |x| by an ulp).
    double subspace_energy_share = 0.0;
    double outside_energy_share = 0.0;
    // sqrt(sum |y - yq|^2 / sum |y|^2).
    double code_relative_error = 0.0;
    int64_t rows = 0;
  };

  // x: (n, d) f32/bf16; y = x U and yq: n * k floats each, with `k` = y's columns.
  void Add(const ConstTensor& x, const float* y, const float* yq, int64_t k);
  // The same from the sums of one microbatch.
  void AddSums(double x_squared, double y_squared, double code_error_squared, int64_t rows);
  // All zeros when nothing was added (or |x| = 0).
  Summary Finish() const;
  void Reset();

 private:
  double x_squared_ = 0.0;
  double y_squared_ = 0.0;
  double code_error_squared_ = 0.0;
  int64_t rows_ = 0;
};

// The code histogram of each RVQ level over a step.
class CodeUsage {
 public:
  struct Summary {
    int64_t rows = 0;  // coded rows counted
    // Per level that coded a row: the share of the K centroids no row used, and exp(H) of the code
    // histogram (H the entropy in nats: 1 when one code takes every row, K when all are used
    // evenly).
    std::vector<double> dead_share;
    std::vector<double> perplexity;
    double worst_dead_share = 0.0;   // max over levels
    double lowest_perplexity = 0.0;  // min over levels
  };

  // `levels` in [1, kMaxRvqLevels], `codebook_size` (K) in [1, kMaxCodebookSize].
  CodeUsage(int levels, int codebook_size);
  // codes: rows x `levels` bytes, row-major (the RVQ frame payload: a frame may carry fewer
  // levels than the codebooks have, forward_error_budget), each < K. levels outside
  // [1, the constructor's], a size that is not a multiple of it or a code >= K is a bug of the
  // caller (checked).
  void Add(absl::Span<const uint8_t> codes, int levels);
  void Add(absl::Span<const uint8_t> codes) { Add(codes, levels_); }
  // Empty lists and zeros when no row was added.
  Summary Finish() const;
  void Reset();

 private:
  const int levels_;
  const int codebook_size_;
  std::vector<uint64_t> counts_;     // (levels, K)
  std::vector<int64_t> level_rows_;  // rows coded at each level
  int64_t rows_ = 0;
};

// sqrt(1 - |U_prev^T U_new|_F^2 / k) for two (d, k) f32 matrices with orthonormal columns:
// 0 when they span the same subspace, 1 when the subspaces are orthogonal (clamped to [0, 1]).
// Computed without cancellation as |U_new - U_prev (U_prev^T U_new)|_F / sqrt(k), two d x k x k
// GEMMs through the backend; exactly 0 for identical matrices. INVALID_ARGUMENT for shapes that
// differ or are not tall (d >= k >= 1).
absl::StatusOr<double> SubspaceDrift(const Backend& backend, const ConstTensor& u_prev,
                                     const ConstTensor& u_new);

// The goodput of one direction of a link: bytes delivered (acknowledged) per second of busy time,
// the time during which the transport held unacknowledged messages. The caller reports each
// message it hands to the transport, the moments the transport's queue becomes empty, and the end
// of each step; time the link spends idle is never counted, so the figure is what the link
// carries while it has work: its capacity when it is the bottleneck, and not an average diluted by
// idle time when it is not. Each busy period ends with a wait for the last acknowledgement (the
// receiver's ack delay and a round trip) that carries no bytes; the caller passes that latency
// with Drained and it is taken off the period, so that a burst of small frames does not read as a
// slow link. The figure covers the latest steps that together hold kWindowSeconds of busy time
// (all steps until then): a step closed while its traffic has barely started says little alone.
class LinkGoodput {
 public:
  static constexpr double kWindowSeconds = 1.0;

  // A message of `bytes` handed to the transport at `now`; starts a busy period when idle.
  void Handed(absl::Time now, int64_t bytes);
  // The transport's queue was seen empty at `now`: the busy period ends (no-op when idle).
  // `ack_latency` of it was spent waiting for the acknowledgement, not sending: it is not counted
  // (down to a period of 0 s; its bytes still count: a burst that fits in the acknowledgement
  // delay took the link no measurable time).
  void Drained(absl::Time now, absl::Duration ack_latency = absl::ZeroDuration());
  bool busy() const { return busy_; }

  struct Step {
    int64_t bytes_handed = 0;  // bytes handed to the transport since the last EndStep
    // Delivered bytes per busy second over the window; nullopt while there is no busy time in it.
    std::optional<double> goodput;
  };
  // Closes the step at `now`, with `queued_bytes` still unacknowledged (the transport's count):
  // an open busy period is split there, its delivered part counted in this step.
  Step EndStep(absl::Time now, int64_t queued_bytes);

 private:
  bool busy_ = false;
  absl::Time mark_;             // start of the busy period, or of its part in this step
  int64_t queued_at_mark_ = 0;  // unacknowledged bytes at mark_
  int64_t handed_since_mark_ = 0;
  double step_busy_seconds_ = 0.0;
  int64_t step_delivered_ = 0;
  int64_t step_handed_ = 0;
  // (delivered bytes, busy seconds) of the latest steps, newest last; trimmed to the window.
  std::deque<std::pair<int64_t, double>> window_;
};

// One engine's codec health: the error of the frames it encodes (its direction's
// ProjectionHealth), the RVQ code usage (forward), the subspace drift of the dictionary it
// publishes (upstream) and its dictionary bytes of the step.
class CodecHealth {
 public:
  // `config` with defaults filled in; `direction`: what this side encodes (FORWARD upstream,
  // BACKWARD downstream).
  CodecHealth(const v1::BoundaryConfig& config, v1::Direction direction);

  // One frame this side encoded (projected methods only): x (n, d) the trainer's tensor, y = x U
  // (n * k floats), `frame` the encoded frame (payload written; sealing not needed), `codebooks`
  // those it was encoded with (RVQ frames). Decodes the frame as the peer will. Accumulates only
  // when every step succeeded.
  absl::Status AddFrame(const FrameCodec& codec, const ConstTensor& x, const float* y,
                        const v1::Frame& frame, const RvqCodebooks* codebooks);

  // Closes the step: writes this direction's gauges into `stats` and resets the accumulators.
  // `published`: the dictionary this side publishes at the end of the step (upstream; null
  // downstream or before it exists): the drift against the one of the step before is computed
  // when its version changed, and is 0 when it did not. Its GEMM failing is a bug (checked).
  void FinishStep(const Backend& backend, std::shared_ptr<const PublishedDictionary> published,
                  v1::BoundaryStats* stats);

 private:
  const v1::Direction direction_;
  const int64_t k_;
  ProjectionHealth projection_;
  CodeUsage codes_;
  std::shared_ptr<const PublishedDictionary> last_published_;
  uint64_t dictionary_bytes_mark_ = 0;
  std::vector<float> zq_;  // scratch
};

}  // namespace mapl

#endif  // MAPL_SERVER_CODEC_HEALTH_H_
