// The downstream engine: forward decode, backward encode, the dictionary replica and the anchors.
#include "server/downstream_engine.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "server/projector.h"
#include "server/upstream_engine.h"

namespace mapl {
namespace {

std::string KeyName(uint64_t step, uint32_t microbatch) {
  return absl::StrCat("(step ", step, ", microbatch ", microbatch, ")");
}

}  // namespace

DownstreamEngine::DownstreamEngine(const v1::BoundaryConfig& config, const Backend* backend)
    : config_(config),
      backend_(backend),
      codec_(config_, backend),
      d_(config_.d()),
      k_(config_.k()),
      projected_(config_.method() != v1::METHOD_DENSE),
      mapl_(config_.method() == v1::METHOD_MAPL),
      codebook_cache_(config_.k(), config_.rvq_levels()),
      health_(config_, v1::DIRECTION_BACKWARD) {}

absl::Status DownstreamEngine::StartReplica() {
  replica_.reset();
  snapshot_asked_at_ = ~uint64_t{0};  // a new lineage: ask afresh
  // With a seeded projector both sides build version 0 themselves; with PCA it arrives as the
  // owner's snapshot before the first frame.
  if (!projected_ || config_.projector_init() != v1::PROJECTOR_INIT_RANDOM) {
    return absl::OkStatus();
  }
  MAPL_ASSIGN_OR_RETURN(
      PublishedDictionary v0,
      PublishedDictionary::Create(DictionaryTables(config_), SeededDictionary(config_),
                                  config_.dictionary_precision(), 0));
  MAPL_ASSIGN_OR_RETURN(
      DictionaryReplica replica,
      DictionaryReplica::Create({config_.id(), v1::DIRECTION_FORWARD}, std::move(v0)));
  replica_.emplace(std::move(replica));
  return absl::OkStatus();
}

std::vector<v1::PeerMessage> DownstreamEngine::OnPeerRestart() {
  const uint64_t had = replica_.has_value() ? replica_->version() : 0;
  // Version 0 was built once already from the same config: only an allocation can fail here.
  const absl::Status s = StartReplica();
  MAPL_CHECK(s.ok(), "rebuilding dictionary version 0: " + s.ToString());
  Log(LogLevel::kWarning, "upstream restarted: dictionary replica back to its start",
      {{"boundary", absl::StrCat(config_.id())}, {"had_version", absl::StrCat(had)}});
  return {};
}

bool DownstreamEngine::AwaitsDictionary(const v1::Frame& frame) const {
  if (!projected_ || frame.direction() != v1::DIRECTION_FORWARD) return false;
  if (!replica_.has_value()) return true;  // PCA: the first snapshot is on its way.
  return replica_->Find(frame.dict_version()) == nullptr &&
         frame.dict_version() > replica_->version();
}

absl::StatusOr<std::unique_ptr<DownstreamEngine>> DownstreamEngine::Create(
    const v1::BoundaryConfig& config, const Backend* backend) {
  MAPL_CHECK(config.role() == v1::ROLE_DOWNSTREAM, "Engine::Create dispatches by role");
  std::unique_ptr<DownstreamEngine> e(new DownstreamEngine(config, backend));
  MAPL_RETURN_IF_ERROR(e->StartReplica());
  if (e->mapl_) {
    e->anchors_.emplace(e->config_);
    e->g_down_.assign(e->d_ * e->k_, 0.f);
  }
  return e;
}

absl::Status DownstreamEngine::DecodeForward(const v1::Frame& frame, const Tensor& h_hat) {
  absl::Status s = DecodeForwardImpl(frame, h_hat);
  if (!s.ok()) stats_.set_frames_rejected(stats_.frames_rejected() + 1);
  return s;
}

absl::Status DownstreamEngine::DecodeForwardImpl(const v1::Frame& frame, const Tensor& h_hat) {
  MAPL_RETURN_IF_ERROR(codec_.Check(frame, v1::DIRECTION_FORWARD, -1, h_hat));
  const PendingMicrobatches<SavedForward>::Key key{frame.step(), frame.microbatch()};
  if (last_step_.has_value() && frame.step() <= *last_step_) {
    return absl::FailedPreconditionError(
        absl::StrCat(FrameName(frame), ": step already closed by Step(", *last_step_, ")"));
  }
  if (pending_.contains(key) || evaluated_.contains(key)) {
    return absl::AlreadyExistsError(absl::StrCat(FrameName(frame), ": already decoded"));
  }
  const int64_t n = frame.tokens();
  SavedForward saved;
  saved.rows = n;
  if (!projected_) {
    MAPL_RETURN_IF_ERROR(codec_.DecodeDense(frame, h_hat));
  } else {
    // Both are transient: the snapshot that brings the version is asked for (Decode).
    if (!replica_.has_value()) {
      return absl::UnavailableError(absl::StrCat(
          FrameName(frame), ": no dictionary yet (waiting for the upstream's snapshot)"));
    }
    saved.dict = replica_->Find(frame.dict_version());
    if (saved.dict == nullptr) {
      return absl::UnavailableError(absl::StrCat(
          FrameName(frame), ": unknown dictionary version ", frame.dict_version(), " (current: ",
          replica_->version(), "; a snapshot of the upstream's dictionary is on its way)"));
    }
    if (mapl_) MAPL_RETURN_IF_ERROR(codec_.UnpackTokenIds(frame, &saved.tokens));
    const RvqCodebooks* cb = nullptr;
    if (frame.codec() == v1::CODEC_RVQ) {
      MAPL_ASSIGN_OR_RETURN(cb, codebook_cache_.Get(saved.dict));
    }
    saved.zq.resize(n * k_);
    MAPL_RETURN_IF_ERROR(codec_.DecodeProjected(frame, cb, saved.zq.data()));
    const ConstTensor zq = ConstTensor::F32(saved.zq.data(), n, k_);
    if (mapl_) {
      MAPL_RETURN_IF_ERROR(backend_->LiftWithAnchor(zq, saved.dict->tensor(0),
                                                    anchors_->Anchor(saved.tokens), h_hat));
    } else {
      MAPL_RETURN_IF_ERROR(backend_->Lift(zq, saved.dict->tensor(0), h_hat));
    }
  }
  CountFrameReceived(frame, d_, &stats_);
  if (frame.evaluation()) {
    evaluated_.Insert(key, true);  // nothing kept: an evaluation forward takes no backward
  } else {
    pending_.Insert(key, std::move(saved));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::PeerMessage> DownstreamEngine::EncodeBackward(uint64_t step, uint32_t microbatch,
                                                                 const ConstTensor& g,
                                                                 FiniteCheck finite,
                                                                 bool evaluation) {
  SavedForward* saved = pending_.Find({step, microbatch});
  if (saved == nullptr) {
    if (evaluated_.contains({step, microbatch})) {
      return absl::FailedPreconditionError(absl::StrCat(
          "EncodeBackward: the forward of ", KeyName(step, microbatch),
          " was an evaluation tensor, which trains nothing and takes no backward; send backwards "
          "only of training forwards"));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "EncodeBackward: no forward of ", KeyName(step, microbatch), " was decoded here"));
  }
  const int64_t n = saved->rows;
  MAPL_RETURN_IF_ERROR(CheckShape(g, "g", n, d_));
  if (finite == FiniteCheck::kCheck) {
    if (absl::Status s = CheckFinite(g, "g"); !s.ok()) {
      stats_.set_nonfinite_inputs(stats_.nonfinite_inputs() + 1);
      return s;
    }
  }
  v1::Frame frame = codec_.NewFrame(v1::DIRECTION_BACKWARD, step, microbatch, n);
  frame.set_dtype(g.dtype == DType::kF32 ? v1::DTYPE_F32 : v1::DTYPE_BF16);
  frame.set_evaluation(evaluation);
  if (!projected_) {
    codec_.EncodeDense(g, &frame);
  } else {
    std::vector<float> gz(n * k_);
    MAPL_RETURN_IF_ERROR(
        backend_->Project(g, saved->dict->tensor(0), Tensor::F32(gz.data(), n, k_)));
    MAPL_RETURN_IF_ERROR(
        codec_.EncodeProjected(config_.backward_codec(), gz.data(), n, nullptr, &frame));
    MAPL_RETURN_IF_ERROR(health_.AddFrame(codec_, g, gz.data(), frame, nullptr));
    frame.set_dict_version(saved->dict->version());
    if (mapl_ && !evaluation) {
      MAPL_RETURN_IF_ERROR(
          AccumulateLearning(*saved, g, ConstTensor::F32(gz.data(), n, k_),
                             SampleLearnerRows(n, config_.learner_rows(), step, microbatch)));
    }
  }
  FrameCodec::Seal(&frame);
  CountFrameSent(frame, d_, &stats_);
  pending_.Erase({step, microbatch});
  v1::PeerMessage m;
  *m.mutable_frame() = std::move(frame);
  return m;
}

absl::Status DownstreamEngine::AccumulateLearning(const SavedForward& saved, const ConstTensor& g,
                                                  const ConstTensor& gu,
                                                  const LearnerSample& sample) {
  // P and Q change only in Step(), so the anchor is the one the forward used. On a sample, g and
  // gu are scaled to the whole microbatch (both signals are linear in them).
  const ConstTensor u = saved.dict->tensor(0);
  std::vector<float> g_down(d_ * k_);
  if (sample.all()) {
    const LowRankAnchor a = anchors_->Anchor(saved.tokens);
    MAPL_RETURN_IF_ERROR(backend_->GradDown(g, gu,
                                            ConstTensor::F32(saved.zq.data(), saved.rows, k_), u,
                                            &a, Tensor::F32(g_down.data(), d_, k_), false));
    // Validates before it accumulates, and its inputs were all checked above.
    MAPL_RETURN_IF_ERROR(anchors_->AccumulateGrad(*backend_, saved.tokens, g, gu, u));
  } else {
    const int64_t s = static_cast<int64_t>(sample.rows.size());
    const std::vector<float> gs = GatherRows(g, sample.rows, sample.scale);
    const std::vector<float> gus = GatherRows(gu, sample.rows, sample.scale);
    const std::vector<float> zqs =
        GatherRows(ConstTensor::F32(saved.zq.data(), saved.rows, k_), sample.rows, 1.f);
    std::vector<int32_t> tokens(s);
    for (int64_t i = 0; i < s; ++i) tokens[i] = saved.tokens[sample.rows[i]];
    const ConstTensor g_s = ConstTensor::F32(gs.data(), s, d_);
    const ConstTensor gu_s = ConstTensor::F32(gus.data(), s, k_);
    const LowRankAnchor a = anchors_->Anchor(tokens);
    MAPL_RETURN_IF_ERROR(backend_->GradDown(g_s, gu_s, ConstTensor::F32(zqs.data(), s, k_), u, &a,
                                            Tensor::F32(g_down.data(), d_, k_), false));
    MAPL_RETURN_IF_ERROR(anchors_->AccumulateGrad(*backend_, tokens, g_s, gu_s, u));
  }
  for (size_t i = 0; i < g_down.size(); ++i) g_down_[i] += g_down[i];
  ++microbatches_;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::PeerMessage>> DownstreamEngine::Encode(
    uint64_t step, uint32_t microbatch, const ConstTensor& t, const int32_t*, FiniteCheck finite,
    bool evaluation) {
  MAPL_ASSIGN_OR_RETURN(v1::PeerMessage m, EncodeBackward(step, microbatch, t, finite, evaluation));
  std::vector<v1::PeerMessage> out;
  out.push_back(std::move(m));
  return out;
}

absl::Status DownstreamEngine::HandleDelta(const v1::DictionaryDelta& delta) {
  if (!projected_) {
    return absl::InvalidArgumentError("dictionary delta: METHOD_DENSE has no dictionary");
  }
  if (!replica_.has_value()) {
    return absl::FailedPreconditionError(
        "dictionary delta before the first snapshot: a snapshot is needed");
  }
  MAPL_RETURN_IF_ERROR(replica_->Apply(delta));
  stats_.set_dictionary_bytes_received(stats_.dictionary_bytes_received() + delta.ByteSizeLong());
  return absl::OkStatus();
}

absl::Status DownstreamEngine::HandleSnapshot(const v1::DictionarySnapshot& snapshot) {
  if (!projected_) {
    return absl::InvalidArgumentError("dictionary snapshot: METHOD_DENSE has no dictionary");
  }
  // The tables must be the ones this config expects, whatever the peer claims.
  const std::vector<DictionaryTableSpec> specs = DictionaryTables(config_);
  if (snapshot.tables_size() != static_cast<int>(specs.size())) {
    return absl::InvalidArgumentError(absl::StrCat("dictionary snapshot: ", snapshot.tables_size(),
                                                   " tables, expected ", specs.size()));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const v1::DictionaryTable& t = snapshot.tables(static_cast<int>(i));
    if (t.name() != specs[i].name || t.rows() != specs[i].rows || t.cols() != specs[i].cols) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dictionary snapshot: table ", i, " is '", t.name(), "' (", t.rows(), " x ", t.cols(),
          "), expected '", specs[i].name, "' (", specs[i].rows, " x ", specs[i].cols, ")"));
    }
  }
  if (replica_.has_value()) {
    MAPL_RETURN_IF_ERROR(replica_->Restore(snapshot));
  } else {
    MAPL_ASSIGN_OR_RETURN(
        DictionaryReplica replica,
        DictionaryReplica::FromSnapshot({config_.id(), v1::DIRECTION_FORWARD}, snapshot));
    replica_.emplace(std::move(replica));
  }
  stats_.set_dictionary_bytes_received(stats_.dictionary_bytes_received() +
                                       snapshot.ByteSizeLong());
  snapshot_asked_at_ = ~uint64_t{0};  // a later loss may ask again
  return absl::OkStatus();
}

std::optional<v1::PeerMessage> DownstreamEngine::SnapshotRequest(v1::SnapshotReason reason,
                                                                 const absl::Status& why) {
  const uint64_t have = replica_.has_value() ? replica_->version() : 0;
  if (snapshot_asked_at_ == have) return std::nullopt;
  snapshot_asked_at_ = have;
  v1::PeerMessage m;
  v1::SnapshotRequest* r = m.mutable_snapshot_request();
  r->set_boundary(config_.id());
  r->set_direction(v1::DIRECTION_FORWARD);
  r->set_have_version(have);
  r->set_reason(replica_.has_value() ? reason : v1::SNAPSHOT_REASON_NO_STATE);
  r->set_detail(std::string(why.message()));
  stats_.set_snapshot_requests_sent(stats_.snapshot_requests_sent() + 1);
  Log(LogLevel::kWarning, "requesting dictionary snapshot",
      {{"boundary", absl::StrCat(config_.id())}, {"reason", std::string(why.message())}});
  return m;
}

absl::Status DownstreamEngine::Decode(const v1::Frame& frame, const Tensor& out,
                                      std::vector<v1::PeerMessage>* replies) {
  absl::Status s = DecodeForward(frame, out);
  if (s.code() == absl::StatusCode::kUnavailable && projected_ &&
      (!replica_.has_value() || replica_->Find(frame.dict_version()) == nullptr)) {
    if (std::optional<v1::PeerMessage> m =
            SnapshotRequest(v1::SNAPSHOT_REASON_UNKNOWN_VERSION, s)) {
      replies->push_back(*std::move(m));
    }
  }
  return s;
}

absl::Status DownstreamEngine::Handle(const v1::PeerMessage& message,
                                      std::vector<v1::PeerMessage>* replies) {
  absl::Status s;
  switch (message.body_case()) {
    case v1::PeerMessage::kDictionaryDelta:
      s = HandleDelta(message.dictionary_delta());
      if (!s.ok() && projected_) {
        const v1::SnapshotReason reason = s.code() == absl::StatusCode::kFailedPrecondition
                                              ? v1::SNAPSHOT_REASON_BASE_VERSION_MISMATCH
                                          : s.code() == absl::StatusCode::kDataLoss
                                              ? v1::SNAPSHOT_REASON_CHECKSUM_MISMATCH
                                              : v1::SNAPSHOT_REASON_INVALID_DELTA;
        if (std::optional<v1::PeerMessage> m = SnapshotRequest(reason, s)) {
          replies->push_back(*std::move(m));
        }
      }
      break;
    case v1::PeerMessage::kDictionarySnapshot:
      s = HandleSnapshot(message.dictionary_snapshot());
      break;
    default:
      s = UnexpectedPeerMessage(config_, message);
  }
  if (!s.ok()) stats_.set_bad_peer_messages(stats_.bad_peer_messages() + 1);
  return s;
}

absl::StatusOr<std::vector<v1::PeerMessage>> DownstreamEngine::Step(uint64_t step) {
  MAPL_RETURN_IF_ERROR(CheckStepIncreases(last_step_, step));
  std::vector<v1::PeerMessage> out;
  if (mapl_) {
    v1::PeerMessage m;
    v1::LearningSignal* signal = m.mutable_learning_signal();
    signal->set_boundary(config_.id());
    signal->set_step(step);
    signal->set_rows(static_cast<uint32_t>(d_));
    signal->set_cols(static_cast<uint32_t>(k_));
    signal->set_microbatches(microbatches_);
    signal->mutable_g_down()->assign(reinterpret_cast<const char*>(g_down_.data()),
                                     g_down_.size() * sizeof(float));
    MAPL_RETURN_IF_ERROR(anchors_->Step(*backend_));
    std::fill(g_down_.begin(), g_down_.end(), 0.f);
    microbatches_ = 0;
    out.push_back(std::move(m));
  }
  pending_.DropThrough(step);
  evaluated_.DropThrough(step);
  last_step_ = step;
  health_.FinishStep(*backend_, nullptr, &stats_);
  stats_.set_steps(stats_.steps() + 1);
  return out;
}

v1::BoundaryStats DownstreamEngine::stats() const {
  v1::BoundaryStats s = stats_;
  s.set_dropped_microbatches(pending_.dropped());
  if (replica_.has_value()) gauges_.Fill(*replica_->current(), d_, k_, &s);
  return s;
}

v1::BoundaryState DownstreamEngine::SaveState() const {
  v1::BoundaryState state = StateHeader(config_, last_step_);
  if (anchors_.has_value()) anchors_->Save(state.mutable_anchors());
  return state;
}

absl::Status DownstreamEngine::RestoreState(const v1::BoundaryState& state) {
  if (last_step_.has_value() || pending_.size() != 0 || stats_.frames_received() != 0) {
    return absl::FailedPreconditionError("RestoreState: the engine is already in use");
  }
  if (state.has_published() || state.learner_size() != 0 || state.has_projector() ||
      state.has_codebooks()) {
    return absl::InvalidArgumentError("state: holds an upstream's tables, this is a downstream");
  }
  if (anchors_.has_value() && state.has_anchors()) {
    MAPL_RETURN_IF_ERROR(anchors_->Restore(state.anchors()));
  }
  return absl::OkStatus();
}

}  // namespace mapl
