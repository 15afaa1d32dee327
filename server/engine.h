// One side of one pipeline boundary (docs/METHOD.md sections 2 and 3), without networking or
// threads: the boundary worker feeds it the tensors its trainer sends and the messages the peer
// sends, and ships the messages it returns. Each role has its engine (upstream_engine.h,
// downstream_engine.h), built from parts with one job each: the frame codec (frame_codec.h), the
// projector and its SPEL learner (projector.h), the RVQ codebooks' learner
// (codebook_learner.h), the anchors (anchor_learner.h) and the dictionary owner / replica
// (dictionary.h).
//
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::Engine> e, mapl::Engine::Create(config, backend));
//   MAPL_ASSIGN_OR_RETURN(auto out, e->Encode(step, mb, tensor, token_ids));  // ship `out`
//   std::vector<v1::PeerMessage> replies;
//   MAPL_RETURN_IF_ERROR(e->Decode(frame_from_peer, out_tensor, &replies));  // ship `replies`
//   MAPL_ASSIGN_OR_RETURN(out, e->Step(step));
//
// Threading: an engine is not thread-safe; the caller serializes every call. The Backend is
// borrowed and must outlive the engine.
//
// Ordering the caller must keep (the transport's single in-order sequence does it): messages an
// engine returns go to the peer in the order returned, and calls are made in the order messages
// arrive, so a delta or snapshot is applied before the frames that name it.
//
// Error codes (one per fault, as docs/ARCHITECTURE.md lists them): INVALID_ARGUMENT for bad
// input (shapes, NaN/Inf, token ids, a malformed or inconsistent message); DATA_LOSS for a frame
// whose checksum does not match (and a delta or snapshot whose state checksum does not match);
// ALREADY_EXISTS for a second tensor or signal of the same (step, microbatch); FAILED_PRECONDITION
// when the state needed is missing or gone: a step already closed, a forward not seen (or
// evicted) before its backward (or a backward of an evaluation forward, which keeps nothing),
// the learning signal not yet here;
// UNAVAILABLE for a frame naming a dictionary version not held (yet: a snapshot is asked for);
// RESOURCE_EXHAUSTED when too many learning signals wait.
//
// Evaluation tensors (Encode's `evaluation`, Frame.evaluation) are encoded and decoded with the
// current dictionary and counted in the statistics (codec health included), but feed no learner:
// upstream, no RVQ rows (Observe), no RVQ error toward a refit, no payload bytes toward the
// dictionary's byte budget, no saved forward (so no G_up); downstream, no saved forward (so no
// G_down and no anchor gradient), and an evaluation backward accumulates neither. The learned
// state after a step is then the same as if they had not been sent. After any error the
// engine's state is unchanged, and non-finite input never reaches the learners. A broken
// invariant stops the process (MAPL_CHECK).
#ifndef MAPL_SERVER_ENGINE_H_
#define MAPL_SERVER_ENGINE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.pb.h"
#include "proto/mapl/v1/state.pb.h"

namespace mapl {

class Engine {
 public:
  // The engine of config.role() (defaults filled in by BoundaryConfigWithDefaults here).
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const v1::BoundaryConfig& config,
                                                        const Backend* backend);
  virtual ~Engine() = default;

  // Whether Encode checks its tensor for NaN and Inf. The boundary worker copies each tensor
  // out of shared memory with CopyAndCheckFinite and hands over only finite ones: a second
  // pass over up to max_tokens x d values would only cost time.
  enum class FiniteCheck { kCheck, kCheckedByCaller };

  // The effective config, defaults filled in.
  virtual const v1::BoundaryConfig& config() const = 0;
  // The direction of the tensors this side sends (FORWARD upstream, BACKWARD downstream).
  virtual v1::Direction sends() const = 0;

  // Encodes the tensor this side's trainer sends: the activation h upstream (token_ids: one id
  // per row, required for METHOD_MAPL, optional otherwise; they travel in the frame), the
  // gradient g of a decoded forward downstream. The frame says the tensor's dtype. `evaluation`:
  // the tensor feeds no learner (engine.h's file comment), and the frame says so. Returns the
  // messages to send, in order.
  virtual absl::StatusOr<std::vector<v1::PeerMessage>> Encode(uint64_t step, uint32_t microbatch,
                                                              const ConstTensor& t,
                                                              const int32_t* token_ids,
                                                              FiniteCheck finite,
                                                              bool evaluation = false) = 0;
  // Checks and decodes a frame from the peer into `out` (n, d) f32/bf16. May add messages to
  // send to `replies` (a snapshot request for a dictionary version it lacks).
  virtual absl::Status Decode(const v1::Frame& frame, const Tensor& out,
                              std::vector<v1::PeerMessage>* replies) = 0;
  // Any other sequenced message from the peer (learning signal, dictionary delta or snapshot,
  // snapshot request); may add messages to send to `replies`.
  virtual absl::Status Handle(const v1::PeerMessage& message,
                              std::vector<v1::PeerMessage>* replies) = 0;
  // Whether Step(step) can run now: false while the upstream waits for the downstream's
  // learning signal of the step (METHOD_MAPL).
  virtual bool ReadyToStep(uint64_t step) const = 0;
  // Closes optimizer step `step` (steps must increase: FAILED_PRECONDITION otherwise) and
  // returns the messages the step sends. Upstream, METHOD_MAPL: FAILED_PRECONDITION until the
  // downstream's LearningSignal of the step has arrived (the caller waits and retries).
  virtual absl::StatusOr<std::vector<v1::PeerMessage>> Step(uint64_t step) = 0;

  // This side's statistics (the record local.proto defines; id, role and link are the worker's).
  virtual v1::BoundaryStats stats() const = 0;
  // Whether the peer link is the bottleneck now (its send queue is not empty), for codecs that
  // adapt their size to the link (forward_error_budget). Engines that do not adapt ignore it.
  virtual void SetLinkBusy(bool) {}
  // The peer is a new process (the link saw a new instance id): what this side held of the old
  // one's state must not be used with the new one's messages. Called in message order, between
  // the old instance's last message and the new one's first. Returns messages to send the new
  // peer.
  virtual std::vector<v1::PeerMessage> OnPeerRestart() { return {}; }
  // Whether `frame`, whose Decode just failed, names a dictionary version newer than any this
  // side holds, one a snapshot already asked for will bring: the caller may hold the frame and
  // decode it once the snapshot is in.
  virtual bool AwaitsDictionary(const v1::Frame&) const { return false; }

  // What this side learned and a restart would lose (state.proto BoundaryState): upstream, the
  // dictionary it owns (published version and learner copy) and its learners' optimizer state;
  // downstream, the anchors. A step's unfinished gradients are not part of it.
  virtual v1::BoundaryState SaveState() const = 0;
  // Takes back what SaveState returned, before any other call (FAILED_PRECONDITION after one).
  // The caller has checked that the state was taken under this config (CheckStateFitsConfig);
  // INVALID_ARGUMENT or DATA_LOSS for tables that still do not fit, the engine unchanged then.
  virtual absl::Status RestoreState(const v1::BoundaryState& state) = 0;
};

// The fields every BoundaryState starts with: boundary, role, the config's fingerprint, the last
// step closed and the time.
v1::BoundaryState StateHeader(const v1::BoundaryConfig& config,
                              const std::optional<uint64_t>& last_step);

// What an engine keeps of a microbatch until its other direction comes back, keyed by
// (step, microbatch), with a bound: beyond kMaxPending the oldest is dropped (e.g. forward-only
// evaluation microbatches that never see a backward). Drops are counted.
template <typename T>
class PendingMicrobatches {
 public:
  static constexpr size_t kMaxPending = 256;
  using Key = std::pair<uint64_t, uint32_t>;

  bool contains(Key key) const { return map_.count(key) != 0; }
  T* Find(Key key) {
    auto it = map_.find(key);
    return it == map_.end() ? nullptr : &it->second;
  }
  void Insert(Key key, T value) {
    while (map_.size() >= kMaxPending) {
      map_.erase(map_.begin());
      ++dropped_;
    }
    map_.emplace(key, std::move(value));
  }
  void Erase(Key key) { map_.erase(key); }
  // Drops everything of steps <= step (a closed step's microbatches never come back).
  void DropThrough(uint64_t step) {
    while (!map_.empty() && map_.begin()->first.first <= step) {
      map_.erase(map_.begin());
      ++dropped_;
    }
  }
  uint64_t dropped() const { return dropped_; }
  size_t size() const { return map_.size(); }

 private:
  std::map<Key, T> map_;
  uint64_t dropped_ = 0;
};

// Counts a frame this side sent or decoded in `stats`: frames, raw bytes (tokens x d as dense
// bf16, the reference of compression ratios) and the bytes the frame carries.
void CountFrameSent(const v1::Frame& frame, int64_t d, v1::BoundaryStats* stats);
void CountFrameReceived(const v1::Frame& frame, int64_t d, v1::BoundaryStats* stats);

// FAILED_PRECONDITION unless `step` is after the last step closed.
absl::Status CheckStepIncreases(const std::optional<uint64_t>& last_closed, uint64_t step);
// INVALID_ARGUMENT for a peer message this side never takes ("the upstream of boundary 3 takes no
// frame message from its downstream").
absl::Status UnexpectedPeerMessage(const v1::BoundaryConfig& config,
                                   const v1::PeerMessage& message);

// The rows of an n-row microbatch that the learners use (BoundaryConfig.learner_rows): every row
// when n <= max_rows, else max_rows rows evenly strided, with an offset that moves with (step,
// microbatch) so that every position of a sequence is sampled over time. Sorted and distinct.
// Each sampled row stands for n / rows.size() rows (LearnerSample::scale).
struct LearnerSample {
  std::vector<int64_t> rows;  // empty: every row
  float scale = 1.f;
  bool all() const { return rows.empty(); }
};
LearnerSample SampleLearnerRows(int64_t n, int64_t max_rows, uint64_t step, uint32_t microbatch);
// The sampled rows of t (any dtype) as f32, each multiplied by `scale`: (rows.size(), t.cols).
std::vector<float> GatherRows(const ConstTensor& t, const std::vector<int64_t>& rows, float scale);

// The orthogonality error max |U^T U - I| of u (d, k).
double OrthogonalityError(const float* u, int64_t d, int64_t k);

class PublishedDictionary;

// Fills a stats record's dictionary fields from the dictionary a side holds; the orthogonality
// error (O(d k^2)) is computed once per version.
class DictionaryGauges {
 public:
  void Fill(const PublishedDictionary& dict, int64_t d, int64_t k, v1::BoundaryStats* out) const;

 private:
  mutable uint64_t version_ = ~uint64_t{0};
  mutable uint64_t checksum_ = 0;
  mutable double orthogonality_error_ = 0.0;
};

}  // namespace mapl

#endif  // MAPL_SERVER_ENGINE_H_
