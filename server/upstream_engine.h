// The upstream side of a boundary: it encodes activations, decodes gradients, owns the forward
// dictionary (U and the RVQ codebooks) and learns U (METHOD_MAPL) and the codebooks
// (CODEC_RVQ). See engine.h for the contract shared with the downstream.
//
//   MAPL_ASSIGN_OR_RETURN(auto out, up.EncodeForward(step, mb, h, token_ids));  // ship `out`
//   MAPL_RETURN_IF_ERROR(up.DecodeBackward(frame_from_peer, dh));  // dh goes to the trainer
//   MAPL_RETURN_IF_ERROR(up.HandleLearningSignal(signal));          // the downstream's G_down
//   MAPL_ASSIGN_OR_RETURN(out, up.Step(step));                      // the dictionary delta
#ifndef MAPL_SERVER_UPSTREAM_ENGINE_H_
#define MAPL_SERVER_UPSTREAM_ENGINE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "server/codebook_learner.h"
#include "server/codec_health.h"
#include "server/dictionary.h"
#include "server/engine.h"
#include "server/frame_codec.h"
#include "server/projector.h"

namespace mapl {

class UpstreamEngine : public Engine {
 public:
  // Learning signals held for steps not yet closed.
  static constexpr size_t kMaxPendingSignals = 16;

  // `config`: role ROLE_UPSTREAM, defaults filled in. `backend` is borrowed.
  static absl::StatusOr<std::unique_ptr<UpstreamEngine>> Create(const v1::BoundaryConfig& config,
                                                                const Backend* backend);

  // Encodes the activation h: (n, d) f32/bf16, 1 <= n <= max_tokens, of microbatch `microbatch`
  // of `step`. token_ids: n ids in [0, vocab), required for METHOD_MAPL (the downstream's anchors
  // need them, so they travel in the frame), ignored otherwise. Returns the messages to send, in
  // order: a DictionarySnapshot before the first frame when the dictionary is built from data
  // (PROJECTOR_INIT_PCA: U = principal subspace of this first h), then the Frame. Keeps h for the
  // backward (METHOD_MAPL). With CODEC_RVQ, frames travel as CODEC_BF16 until the codebooks are
  // fitted; the Step() that fits them publishes them whole (outside the budget).
  // token_ids given with another method travel in the frame too. `evaluation`: see engine.h
  // (with PROJECTOR_INIT_PCA, FAILED_PRECONDITION before the first training forward built the
  // dictionary).
  absl::StatusOr<std::vector<v1::PeerMessage>> EncodeForward(
      uint64_t step, uint32_t microbatch, const ConstTensor& h, const int32_t* token_ids,
      FiniteCheck finite = FiniteCheck::kCheck, bool evaluation = false);
  // Decodes a backward frame into dh: (n, d) f32/bf16, dh = gzq U^T with the U its forward was
  // encoded with, and accumulates G_up += h^T gzq (METHOD_MAPL; not for an evaluation frame).
  // Releases the saved forward.
  absl::Status DecodeBackward(const v1::Frame& frame, const Tensor& dh);
  // Holds the downstream's G_down for its step (METHOD_MAPL only).
  absl::Status HandleLearningSignal(const v1::LearningSignal& signal);
  // The snapshot of the published dictionary; empty while it does not exist yet (it will
  // precede the first frame), or when a snapshot already sent to this downstream instance
  // covers the request (counted in snapshot_requests_coalesced).
  absl::StatusOr<std::vector<v1::PeerMessage>> HandleSnapshotRequest(
      const v1::SnapshotRequest& request);

  // ---- Engine ----
  const v1::BoundaryConfig& config() const override { return config_; }
  v1::Direction sends() const override { return v1::DIRECTION_FORWARD; }
  absl::StatusOr<std::vector<v1::PeerMessage>> Encode(uint64_t step, uint32_t microbatch,
                                                      const ConstTensor& t,
                                                      const int32_t* token_ids, FiniteCheck finite,
                                                      bool evaluation = false) override {
    return EncodeForward(step, microbatch, t, token_ids, finite, evaluation);
  }
  absl::Status Decode(const v1::Frame& frame, const Tensor& out,
                      std::vector<v1::PeerMessage>* replies) override;
  absl::Status Handle(const v1::PeerMessage& message,
                      std::vector<v1::PeerMessage>* replies) override;
  // METHOD_MAPL: needs the step's LearningSignal, then takes one SPEL step on the learner U with
  // G = G_up + G_down; CODEC_RVQ fits or updates the codebooks on the step's projected rows;
  // returns the DictionaryDelta that publishes what the byte budget allows,
  // max(dictionary_budget_fraction x payload bytes sent this step, one row), when anything is
  // learned.
  bool ReadyToStep(uint64_t step) const override { return !mapl_ || signals_.count(step) != 0; }
  absl::StatusOr<std::vector<v1::PeerMessage>> Step(uint64_t step) override;
  v1::BoundaryStats stats() const override;
  void SetLinkBusy(bool busy) override { link_busy_ = busy; }
  // The downstream restarted and holds only version 0 (or nothing, with PCA): the current
  // dictionary goes to it at once, ahead of the next frame, instead of after a refused one.
  std::vector<v1::PeerMessage> OnPeerRestart() override;
  v1::BoundaryState SaveState() const override;
  // A restored dictionary goes to the downstream whole, ahead of the first frame: the downstream
  // holds another life's versions, or none.
  absl::Status RestoreState(const v1::BoundaryState& state) override;

  // The forward codes' depth for a frame whose RVQ codes have relative error errors[l] at l + 1
  // levels: every level without a budget; with one, the fewest levels within it while the link
  // is busy, every level while it has room; 0 (int8) when every level exceeds it.
  static int ChooseRvqDepth(const std::vector<double>& errors, double budget, bool link_busy);

 private:
  // What is kept of a forward until its backward.
  struct SavedForward {
    std::shared_ptr<const PublishedDictionary> dict;  // null for METHOD_DENSE
    DType dtype = DType::kF32;
    int64_t rows = 0;
    LearnerSample sample;        // the rows of h the projector learns from (METHOD_MAPL)
    std::vector<float> h_f32;    // those rows of h, (sampled rows, d), when dtype is f32
    std::vector<bf16_t> h_bf16;  // when bf16
    ConstTensor h() const;
  };

  UpstreamEngine(const v1::BoundaryConfig& config, const Backend* backend);
  absl::Status CreateOwner(std::vector<std::vector<float>> tables);
  absl::Status CheckInput(uint64_t step, uint32_t microbatch, const ConstTensor& h,
                          const int32_t* token_ids, FiniteCheck finite, bool evaluation);
  void SaveH(const ConstTensor& h, SavedForward* saved);  // the sampled rows of h
  absl::Status DecodeBackwardImpl(const v1::Frame& frame, const Tensor& dh);
  v1::PeerMessage SnapshotMessage();

  const v1::BoundaryConfig config_;
  const Backend* const backend_;
  const FrameCodec codec_;
  const int64_t d_;
  const int64_t k_;
  const bool projected_;  // not METHOD_DENSE
  const bool mapl_;       // METHOD_MAPL
  const bool rvq_;        // forward CODEC_RVQ

  v1::BoundaryStats stats_;
  std::optional<uint64_t> last_step_;  // the last step closed by Step()
  std::optional<DictionaryOwner> owner_;
  std::optional<ProjectorLearner> projector_;  // METHOD_MAPL
  std::optional<CodebookLearner> codebooks_;   // CODEC_RVQ
  CodebookCache codebook_cache_;
  DictionaryGauges gauges_;
  CodecHealth health_;
  uint64_t payload_bytes_this_step_ = 0;
  // The version of the last snapshot sent to the current downstream instance (none since its
  // start or restart): requests it covers are not answered again.
  std::optional<uint64_t> snapshot_sent_version_;
  bool link_busy_ = false;
  // forward_error_budget: the full-depth RVQ error of this step's frames (sum and count), and
  // the step of the last fit. A step whose mean error exceeds the budget refits the codebooks,
  // at most every kRefitInterval steps (each refit publishes them whole).
  static constexpr uint64_t kRefitInterval = 10;
  double rvq_error_sum_ = 0.0;
  int64_t rvq_error_frames_ = 0;
  int64_t rvq_levels_sum_ = 0;  // levels the step's RVQ frames carried (forward_rvq_levels_mean)
  int64_t rvq_frames_ = 0;
  uint64_t last_fit_step_ = 0;
  bool snapshot_first_ = false;  // the next EncodeForward sends the whole dictionary first
  std::map<uint64_t, std::vector<float>> signals_;  // step -> G_down (d, k)
  PendingMicrobatches<SavedForward> pending_;
  // The evaluation forwards of open steps (they keep nothing; only to say why a backward of one
  // is refused).
  PendingMicrobatches<bool> evaluated_;
  // Buffers of released forwards, reused so that saving h does not page-fault fresh memory
  // (32 MiB a microbatch at n = 4096, d = 2048: ~10 ms of page faults against ~2 ms of copy).
  std::vector<std::vector<float>> spare_h_f32_;
  std::vector<std::vector<bf16_t>> spare_h_bf16_;
};

// The dictionary's tables for `config` ("U", and "rvq" with CODEC_RVQ) and their version 0 from
// the seed (the RVQ codebooks start empty: frames travel as bf16 until they are fitted).
std::vector<DictionaryTableSpec> DictionaryTables(const v1::BoundaryConfig& config);
std::vector<std::vector<float>> SeededDictionary(const v1::BoundaryConfig& config);

}  // namespace mapl

#endif  // MAPL_SERVER_UPSTREAM_ENGINE_H_
