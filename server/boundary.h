// The codec pipeline of one side of one pipeline boundary (DESIGN.md sections 2 and 3), without
// networking or threads: the daemon feeds it tensors from its trainer and messages from the peer
// link, and ships the messages it returns. The upstream side encodes activations, decodes
// gradients, owns the forward dictionary (U and the RVQ codebooks) and learns U; the downstream
// side decodes activations, encodes gradients, follows the dictionary as a replica and learns the
// anchors.
//
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::BoundaryEngine> up,
//                         mapl::BoundaryEngine::Create(config, backend));   // role UPSTREAM
//   // each microbatch:
//   MAPL_ASSIGN_OR_RETURN(std::vector<mapl::v1::PeerMessage> out,
//                         up->EncodeForward(step, mb, h, token_ids));    // ship `out` in order
//   ...                   up->DecodeBackward(frame_from_peer, dh);       // dh goes to the trainer
//   // the trainer stepped, and the peer's LearningSignal went to up->HandleLearningSignal():
//   MAPL_ASSIGN_OR_RETURN(out, up->Step(step));                         // the dictionary delta
//
// Threading: an engine is not thread-safe; the caller serializes every call (one mutex per engine).
// The Backend is borrowed and must outlive the engine.
//
// Ordering the caller must keep (the peer link's single in-order sequence does it):
// - messages an engine returns go to the peer in the order returned, and calls are made in the
//   order messages arrive, so a delta or snapshot is applied before the frames that name it;
// - upstream: Step(t) needs the downstream's LearningSignal of step t (METHOD_MAPL). It answers
//   FAILED_PRECONDITION until HandleLearningSignal() has it; the caller waits and retries.
// Everything accumulated since the previous Step() belongs to the step being closed.
//
// Error codes: INVALID_ARGUMENT for bad input (shapes, NaN/Inf, token ids, a malformed or
// inconsistent message); DATA_LOSS for a frame whose checksum does not match (the replica also
// answers DATA_LOSS for a delta or snapshot whose state checksum does not match); ALREADY_EXISTS
// for a second tensor of the same (step, microbatch); FAILED_PRECONDITION when the state needed
// is missing: a forward not seen (or evicted) before its backward, the learning signal not yet
// here, and, on the downstream, a frame naming a dictionary version it does not hold or a delta
// that does not apply to the version it holds. For the last two the daemon asks the upstream
// for a snapshot (SnapshotRequest); the frame cannot be decoded until a matching version is held.
// After any error the engine's state is unchanged, and non-finite input never reaches the learners.
#ifndef MAPL_SERVER_BOUNDARY_H_
#define MAPL_SERVER_BOUNDARY_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#include "kernels/rvq.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/dictionary.h"

namespace mapl {

// XXH3-64 (seed 0) of frame.payload || frame.scales || frame.token_ids, as peer.proto defines
// Frame.checksum.
uint64_t FrameChecksum(const v1::Frame& frame);

// U from a seed: a d x k matrix with orthonormal columns, computed with portable integer and
// IEEE double arithmetic only (no BLAS, no libm), so that both sides of a boundary build the
// bit-identical U on any x86-64 host without transferring it.
std::vector<float> SeededOrthonormal(int64_t d, int64_t k, uint64_t seed);

// Counters and gauges of one engine, for metrics and tests.
struct BoundaryStats {
  // The published forward dictionary this side holds (owner's published copy upstream, replica's
  // current version downstream); has_dictionary is false before it exists (PCA init upstream
  // before the first batch; downstream waiting for the first snapshot; METHOD_DENSE).
  bool has_dictionary = false;
  uint64_t dict_version = 0;
  uint64_t dict_checksum = 0;
  double orthogonality_error = 0.0;  // max |U^T U - I| of the published U
  // Frames this side encoded (sent) and decoded (received). raw: the tensor as dense bf16
  // (tokens x d x 2 bytes); payload: what the frame carries (payload + scales + token ids).
  uint64_t frames_encoded = 0;
  uint64_t frames_decoded = 0;
  uint64_t raw_bytes_sent = 0;
  uint64_t payload_bytes_sent = 0;
  uint64_t raw_bytes_received = 0;
  uint64_t payload_bytes_received = 0;
  // Serialized sizes of deltas and snapshots sent (upstream) or applied (downstream).
  uint64_t dictionary_bytes_sent = 0;
  uint64_t dictionary_bytes_received = 0;
  uint64_t frames_rejected = 0;       // frames from the peer that failed a check
  uint64_t nonfinite_inputs = 0;      // tensors refused for NaN or Inf
  uint64_t dropped_microbatches = 0;  // saved forwards never backpropagated (closed or evicted)
  uint64_t steps = 0;                 // successful Step() calls
  // Learner updates (SPEL, RVQ) refused by the backend, e.g. for a gradient so large that the
  // momentum overflows; the step goes on without them and the learner is unchanged.
  uint64_t learner_updates_skipped = 0;
  double projector_lr = 0.0;      // eta of the last SPEL step (upstream, METHOD_MAPL)
  double rvq_relative_mse = 0.0;  // of the last streaming RVQ update (upstream, CODEC_RVQ)
};

class BoundaryEngine {
 public:
  // Forward RVQ codebooks are fitted once this many projected rows have been seen (4 per
  // centroid); until then forward frames travel as CODEC_BF16 (see EncodeForward()).
  static constexpr int64_t kMinRvqFitRows = 4 * kMaxCodebookSize;
  // Projected rows kept per step for the streaming RVQ update.
  static constexpr int64_t kMaxRvqRowsPerStep = 16384;
  // Forwards kept for their backward; beyond this the oldest is dropped (e.g. forward-only eval
  // microbatches that never see a backward).
  static constexpr size_t kMaxPendingMicrobatches = 256;
  // Learning signals held for steps not yet closed.
  static constexpr size_t kMaxPendingSignals = 16;
  // Subspace iterations for PROJECTOR_INIT_PCA.
  static constexpr int kPcaIterations = 40;

  // `config` with the documented defaults (config.proto) filled in for unset fields, validated.
  // INVALID_ARGUMENT names the field, prefixed with `path` (e.g. "boundaries[0]" gives
  // "boundaries[0].k: must be in [1, d=512], got 600").
  static absl::StatusOr<v1::BoundaryConfig> WithDefaults(const v1::BoundaryConfig& config,
                                                         absl::string_view path = "");

  // An engine for `config` (defaults applied by WithDefaults()). `backend` is borrowed.
  static absl::StatusOr<std::unique_ptr<BoundaryEngine>> Create(const v1::BoundaryConfig& config,
                                                                Backend* backend);

  BoundaryEngine(const BoundaryEngine&) = delete;
  BoundaryEngine& operator=(const BoundaryEngine&) = delete;
  ~BoundaryEngine();

  v1::Role role() const { return config_.role(); }
  // The effective config, defaults filled in.
  const v1::BoundaryConfig& config() const { return config_; }
  BoundaryStats stats() const;

  // ---- upstream ----

  // Encodes the activation h: (n, d) f32/bf16, 1 <= n <= max_tokens, of microbatch `microbatch`
  // of `step`. token_ids: n ids in [0, vocab), required for METHOD_MAPL (the downstream's anchors
  // need them, so they travel in the frame), ignored otherwise. Returns the messages to send, in
  // order: a DictionarySnapshot before the first frame when the dictionary is built from data
  // (PROJECTOR_INIT_PCA: U = principal subspace of this first h), then the Frame. Keeps h for the
  // backward. With CODEC_RVQ, frames travel as CODEC_BF16 until kMinRvqFitRows projected rows
  // have been seen; the Step() that fits the codebooks publishes them (outside the budget).
  absl::StatusOr<std::vector<v1::PeerMessage>> EncodeForward(uint64_t step, uint32_t microbatch,
                                                             const ConstTensor& h,
                                                             const int32_t* token_ids);

  // Decodes a backward frame into dh: (n, d) f32/bf16, dh = gzq U^T with the U its forward was
  // encoded with, and accumulates G_up += h^T gzq (METHOD_MAPL). Releases the saved forward.
  absl::Status DecodeBackward(const v1::Frame& frame, const Tensor& dh);

  // Holds the downstream's G_down for its step (METHOD_MAPL only).
  absl::Status HandleLearningSignal(const v1::LearningSignal& signal);

  // The snapshot of the published forward dictionary, for a SnapshotRequest; empty while the
  // dictionary does not exist yet (it will arrive before the first frame).
  absl::StatusOr<std::vector<v1::PeerMessage>> HandleSnapshotRequest(
      const v1::SnapshotRequest& request);

  // ---- downstream ----

  // Checks and decodes a forward frame into h_hat: (n, d) f32/bf16. METHOD_MAPL:
  // h_hat = zq U^T + a - (a U) U^T with a = P[t] Q; METHOD_FIXED: zq U^T; METHOD_DENSE: the
  // dense values. Keeps (zq, token ids, dictionary version) for the backward.
  absl::Status DecodeForward(const v1::Frame& frame, const Tensor& h_hat);

  // Encodes g = dL/dh_hat: (n, d) f32/bf16 of a decoded forward: gz = g U with the U that forward
  // used, in the backward codec. Accumulates G_down and the anchor gradients (METHOD_MAPL).
  absl::StatusOr<v1::PeerMessage> EncodeBackward(uint64_t step, uint32_t microbatch,
                                                 const ConstTensor& g);

  // Applies the owner's delta / snapshot (untrusted: every check of DictionaryReplica).
  absl::Status HandleDelta(const v1::DictionaryDelta& delta);
  absl::Status HandleSnapshot(const v1::DictionarySnapshot& snapshot);

  // ---- both ----

  // Closes optimizer step `step` (steps must increase). Upstream: METHOD_MAPL needs the step's
  // LearningSignal, then takes one SPEL step on the learner U with G = G_up + G_down; CODEC_RVQ
  // fits or updates the codebooks on the step's projected rows; returns the DictionaryDelta that
  // publishes what the byte budget allows, max(dictionary_budget_fraction x payload bytes sent
  // this step, one row), when anything is learned (METHOD_MAPL or CODEC_RVQ). Downstream
  // (METHOD_MAPL): returns the LearningSignal and takes an Adam step on the anchors. The
  // PeerMessage envelopes leave seq and protocol_version to the link.
  //
  // Projector step length: eta_t = projector_lr * min(t / w, sqrt(w / t)), t = 1, 2, ... the
  // number of SPEL steps taken, w = max(projector_warmup_steps, 1): linear warm-up over w steps,
  // then inverse-square-root decay (SPEL's direction has unit singular values, so eta is a step
  // length on the manifold and must decay for U to settle).
  absl::StatusOr<std::vector<v1::PeerMessage>> Step(uint64_t step);

 private:
  using Key = std::pair<uint64_t, uint32_t>;  // (step, microbatch)

  // What the upstream keeps of a forward until its backward.
  struct UpForward {
    std::shared_ptr<const PublishedDictionary> dict;  // null for METHOD_DENSE
    DType dtype = DType::kF32;
    int64_t rows = 0;
    std::vector<float> h_f32;    // (rows, d) when dtype is f32
    std::vector<bf16_t> h_bf16;  // when bf16
    ConstTensor h() const;
  };
  // What the downstream keeps of a forward until its backward.
  struct DownForward {
    std::shared_ptr<const PublishedDictionary> dict;  // null for METHOD_DENSE
    int64_t rows = 0;
    std::vector<float> zq;        // (rows, k)
    std::vector<int32_t> tokens;  // rows ids (METHOD_MAPL)
  };

  BoundaryEngine(v1::BoundaryConfig config, Backend* backend);

  absl::Status Init();
  absl::Status CheckRole(v1::Role want, const char* call) const;
  // The dictionary's tables, and version 0 from the seed.
  std::vector<DictionaryTableSpec> TableSpecs() const;
  std::vector<std::vector<float>> SeededTables() const;
  absl::Status CreateOwner(std::vector<std::vector<float>> tables);
  absl::StatusOr<std::vector<float>> PcaInit(const ConstTensor& h);
  // The published RVQ codebooks of `dict`, cached per version.
  absl::StatusOr<const RvqCodebooks*> Codebooks(const std::shared_ptr<const PublishedDictionary>&);
  // Shared checks of an incoming frame; payload sizes and the checksum.
  absl::Status CheckFrame(const v1::Frame& frame, v1::Direction direction, int64_t tokens_expected,
                          const Tensor& out);
  // Decodes a projected payload (BF16, INT8 or RVQ) into zq (rows, k) f32.
  absl::Status DecodeProjected(const v1::Frame& frame,
                               const std::shared_ptr<const PublishedDictionary>& dict, float* zq);
  // Encodes x (rows, k) f32 with `codec` into frame's payload and scales.
  absl::Status EncodeProjected(v1::Codec codec, const float* x, int64_t rows,
                               const std::shared_ptr<const PublishedDictionary>& dict,
                               v1::Frame* frame);
  v1::Frame NewFrame(v1::Direction direction, uint64_t step, uint32_t microbatch,
                     int64_t rows) const;
  void SealFrame(v1::Frame* frame, bool sent);
  template <typename Map>
  void Evict(Map* pending);
  template <typename Map>
  void DropClosed(Map* pending, uint64_t step);
  absl::Status DecodeForwardImpl(const v1::Frame& frame, const Tensor& h_hat);
  absl::Status DecodeBackwardImpl(const v1::Frame& frame, const Tensor& dh);
  absl::StatusOr<std::vector<v1::PeerMessage>> StepUpstream(uint64_t step);
  absl::StatusOr<std::vector<v1::PeerMessage>> StepDownstream(uint64_t step);
  void UpdateDictionaryGauges(const std::shared_ptr<const PublishedDictionary>& dict);
  absl::Status NonFinite(absl::Status status);

  const v1::BoundaryConfig config_;
  Backend* const backend_;
  const int64_t d_;
  const int64_t k_;
  const bool projected_;  // not METHOD_DENSE
  const bool mapl_;       // METHOD_MAPL
  const bool rvq_;        // forward CODEC_RVQ

  BoundaryStats stats_;
  std::optional<uint64_t> last_step_;  // the last step closed by Step()

  // Cache for Codebooks().
  std::shared_ptr<const PublishedDictionary> codebooks_dict_;
  RvqCodebooks codebooks_;

  // ---- upstream ----
  std::optional<DictionaryOwner> owner_;
  std::vector<float> momentum_;  // SPEL momentum (d, k)
  std::vector<float> g_up_;      // (d, k), summed since the last Step()
  int64_t spel_steps_ = 0;
  std::optional<RvqLearner> rvq_learner_;
  std::vector<float> rvq_rows_;  // projected rows kept for the RVQ fit / update (k floats each)
  uint64_t payload_bytes_this_step_ = 0;
  std::map<uint64_t, std::vector<float>> signals_;  // step -> G_down (d, k)
  std::map<Key, UpForward> up_pending_;
  // Buffers of released UpForwards, reused so that saving h does not page-fault fresh memory
  // (32 MiB a microbatch at n = 4096, d = 2048: ~10 ms of page faults against ~2 ms of copy).
  std::vector<std::vector<float>> spare_h_f32_;
  std::vector<std::vector<bf16_t>> spare_h_bf16_;

  // ---- downstream ----
  std::optional<DictionaryReplica> replica_;
  // Anchors: P (V, r), Q (r, d), their gradients since the last Step() and Adam moments.
  std::vector<float> p_, q_, dp_, dq_, p_m_, p_v_, q_m_, q_v_;
  int64_t adam_steps_ = 0;
  std::vector<float> g_down_;  // (d, k), summed since the last Step()
  uint32_t down_microbatches_ = 0;
  std::map<Key, DownForward> down_pending_;
};

}  // namespace mapl

#endif  // MAPL_SERVER_BOUNDARY_H_
