// The downstream side of a boundary: it decodes activations, encodes gradients, follows the
// forward dictionary as a replica (asking the owner for a snapshot when it lacks a version) and
// learns the anchors (METHOD_MAPL). See engine.h for the contract shared with the upstream.
//
//   MAPL_RETURN_IF_ERROR(down.DecodeForward(frame_from_peer, h_hat));   // h_hat to the trainer
//   MAPL_ASSIGN_OR_RETURN(v1::PeerMessage m, down.EncodeBackward(step, mb, g));   // ship m
//   MAPL_ASSIGN_OR_RETURN(auto out, down.Step(step));   // the learning signal (METHOD_MAPL)
#ifndef MAPL_SERVER_DOWNSTREAM_ENGINE_H_
#define MAPL_SERVER_DOWNSTREAM_ENGINE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "server/anchor_learner.h"
#include "server/codec_health.h"
#include "server/dictionary.h"
#include "server/engine.h"
#include "server/frame_codec.h"

namespace mapl {

class DownstreamEngine : public Engine {
 public:
  // `config`: role ROLE_DOWNSTREAM, defaults filled in. `backend` is borrowed.
  static absl::StatusOr<std::unique_ptr<DownstreamEngine>> Create(const v1::BoundaryConfig& config,
                                                                  const Backend* backend);

  // Checks and decodes a forward frame into h_hat: (n, d) f32/bf16. METHOD_MAPL:
  // h_hat = zq U^T + a - (a U) U^T with a = P[t] Q; METHOD_FIXED: zq U^T; METHOD_DENSE: the
  // dense values. Keeps (zq, token ids, dictionary version) for the backward (not for an
  // evaluation frame). A frame naming a dictionary version this side does not hold fails with
  // UNAVAILABLE (Decode asks for a snapshot).
  absl::Status DecodeForward(const v1::Frame& frame, const Tensor& h_hat);
  // Encodes g = dL/dh_hat: (n, d) f32/bf16 of a decoded forward: gz = g U with the U that forward
  // used, in the backward codec. Accumulates G_down and the anchor gradients (METHOD_MAPL),
  // unless `evaluation`. FAILED_PRECONDITION for a forward that was an evaluation one.
  absl::StatusOr<v1::PeerMessage> EncodeBackward(uint64_t step, uint32_t microbatch,
                                                 const ConstTensor& g,
                                                 FiniteCheck finite = FiniteCheck::kCheck,
                                                 bool evaluation = false);
  // Applies the owner's delta / snapshot (untrusted: every check of DictionaryReplica).
  absl::Status HandleDelta(const v1::DictionaryDelta& delta);
  absl::Status HandleSnapshot(const v1::DictionarySnapshot& snapshot);
  // A SnapshotRequest for `why`, or nothing when one was already sent while holding the current
  // version: a burst of frames naming a version we lack must not become a burst of snapshots on
  // a slow link. A snapshot that applies allows the next request.
  std::optional<v1::PeerMessage> SnapshotRequest(v1::SnapshotReason reason,
                                                 const absl::Status& why);

  // ---- Engine ----
  const v1::BoundaryConfig& config() const override { return config_; }
  v1::Direction sends() const override { return v1::DIRECTION_BACKWARD; }
  absl::StatusOr<std::vector<v1::PeerMessage>> Encode(uint64_t step, uint32_t microbatch,
                                                      const ConstTensor& t,
                                                      const int32_t* token_ids, FiniteCheck finite,
                                                      bool evaluation = false) override;
  // DecodeForward, plus a snapshot request when the frame names a version not held.
  absl::Status Decode(const v1::Frame& frame, const Tensor& out,
                      std::vector<v1::PeerMessage>* replies) override;
  // Deltas (a snapshot request when one does not apply) and snapshots.
  // The upstream restarted: its dictionary versions start again from 0, so the replica forgets
  // the old lineage (a new version 1 is not the old version 1) and restarts from version 0 (or,
  // with PCA, waits for the owner's snapshot). A frame naming a version it lacks then asks for a
  // snapshot instead of decoding with the old tables.
  std::vector<v1::PeerMessage> OnPeerRestart() override;
  bool AwaitsDictionary(const v1::Frame& frame) const override;
  v1::BoundaryState SaveState() const override;
  // The anchors (METHOD_MAPL); the upstream's dictionary comes from the upstream again.
  absl::Status RestoreState(const v1::BoundaryState& state) override;
  absl::Status Handle(const v1::PeerMessage& message,
                      std::vector<v1::PeerMessage>* replies) override;
  // METHOD_MAPL: returns the LearningSignal (G_down of the step) and takes an Adam step on the
  // anchors.
  bool ReadyToStep(uint64_t) const override { return true; }
  absl::StatusOr<std::vector<v1::PeerMessage>> Step(uint64_t step) override;
  v1::BoundaryStats stats() const override;

 private:
  // What is kept of a forward until its backward.
  struct SavedForward {
    std::shared_ptr<const PublishedDictionary> dict;  // null for METHOD_DENSE
    int64_t rows = 0;
    std::vector<float> zq;        // (rows, k)
    std::vector<int32_t> tokens;  // rows ids (METHOD_MAPL)
  };

  DownstreamEngine(const v1::BoundaryConfig& config, const Backend* backend);
  absl::Status DecodeForwardImpl(const v1::Frame& frame, const Tensor& h_hat);
  // G_down and the anchors' gradients of one backward microbatch: g (n, d) and gu = g U (n, k),
  // on the rows of `sample`.
  absl::Status AccumulateLearning(const SavedForward& saved, const ConstTensor& g,
                                  const ConstTensor& gu, const LearnerSample& sample);

  const v1::BoundaryConfig config_;
  const Backend* const backend_;
  const FrameCodec codec_;
  const int64_t d_;
  const int64_t k_;
  const bool projected_;  // not METHOD_DENSE
  const bool mapl_;       // METHOD_MAPL

  v1::BoundaryStats stats_;
  std::optional<uint64_t> last_step_;  // the last step closed by Step()
  std::optional<DictionaryReplica> replica_;
  // (Re)builds replica_ at its start: version 0 from the seed, or none until a snapshot (PCA).
  absl::Status StartReplica();
  std::optional<AnchorLearner> anchors_;  // METHOD_MAPL
  std::vector<float> g_down_;             // (d, k), summed since the last Step()
  uint32_t microbatches_ = 0;             // backward microbatches since the last Step()
  CodebookCache codebook_cache_;
  DictionaryGauges gauges_;
  CodecHealth health_;
  PendingMicrobatches<SavedForward> pending_;
  // The evaluation forwards of open steps: they keep nothing, and a backward of one is refused.
  PendingMicrobatches<bool> evaluated_;
  uint64_t snapshot_asked_at_ = ~uint64_t{0};  // the version held when we last asked
};

}  // namespace mapl

#endif  // MAPL_SERVER_DOWNSTREAM_ENGINE_H_
