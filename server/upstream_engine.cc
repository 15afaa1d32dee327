// The upstream engine: forward encode, backward decode, the dictionary owner and its learners.
#include "server/upstream_engine.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "server/state_store.h"

namespace mapl {
namespace {

std::string KeyName(uint64_t step, uint32_t microbatch) {
  return absl::StrCat("(step ", step, ", microbatch ", microbatch, ")");
}

v1::PeerMessage Wrap(v1::Frame frame) {
  v1::PeerMessage m;
  *m.mutable_frame() = std::move(frame);
  return m;
}

}  // namespace

std::vector<DictionaryTableSpec> DictionaryTables(const v1::BoundaryConfig& config) {
  std::vector<DictionaryTableSpec> specs = {{"U", config.d(), config.k()}};
  if (config.forward_codec() == v1::CODEC_RVQ) {
    specs.push_back({"rvq", int64_t{config.rvq_levels()} * kMaxCodebookSize, config.k()});
  }
  return specs;
}

std::vector<std::vector<float>> SeededDictionary(const v1::BoundaryConfig& config) {
  std::vector<std::vector<float>> tables = {
      SeededOrthonormal(config.d(), config.k(), config.seed())};
  if (config.forward_codec() == v1::CODEC_RVQ) {
    tables.emplace_back(size_t{config.rvq_levels()} * kMaxCodebookSize * config.k(), 0.f);
  }
  return tables;
}

UpstreamEngine::UpstreamEngine(const v1::BoundaryConfig& config, const Backend* backend)
    : config_(config),
      backend_(backend),
      codec_(config_, backend),
      d_(config_.d()),
      k_(config_.k()),
      projected_(config_.method() != v1::METHOD_DENSE),
      mapl_(config_.method() == v1::METHOD_MAPL),
      rvq_(config_.forward_codec() == v1::CODEC_RVQ),
      codebook_cache_(config_.k(), config_.rvq_levels()),
      health_(config_, v1::DIRECTION_FORWARD) {}

absl::StatusOr<std::unique_ptr<UpstreamEngine>> UpstreamEngine::Create(
    const v1::BoundaryConfig& config, const Backend* backend) {
  MAPL_CHECK(config.role() == v1::ROLE_UPSTREAM, "Engine::Create dispatches by role");
  std::unique_ptr<UpstreamEngine> e(new UpstreamEngine(config, backend));
  if (e->mapl_) e->projector_.emplace(e->config_);
  if (e->rvq_) e->codebooks_.emplace(e->config_);
  // PCA: the owner is created from the first batch (EncodeForward).
  if (e->projected_ && config.projector_init() == v1::PROJECTOR_INIT_RANDOM) {
    MAPL_RETURN_IF_ERROR(e->CreateOwner(SeededDictionary(e->config_)));
  }
  return e;
}

absl::Status UpstreamEngine::CreateOwner(std::vector<std::vector<float>> tables) {
  MAPL_ASSIGN_OR_RETURN(
      DictionaryOwner owner,
      DictionaryOwner::Create({config_.id(), v1::DIRECTION_FORWARD}, DictionaryTables(config_),
                              std::move(tables), config_.dictionary_precision()));
  owner_.emplace(std::move(owner));
  return absl::OkStatus();
}

v1::PeerMessage UpstreamEngine::SnapshotMessage() {
  v1::PeerMessage m;
  *m.mutable_dictionary_snapshot() = owner_->Snapshot();
  stats_.set_dictionary_bytes_sent(stats_.dictionary_bytes_sent() +
                                   m.dictionary_snapshot().ByteSizeLong());
  snapshot_sent_version_ = owner_->version();
  return m;
}

absl::Status UpstreamEngine::CheckInput(uint64_t step, uint32_t microbatch, const ConstTensor& h,
                                        const int32_t* token_ids, FiniteCheck finite,
                                        bool evaluation) {
  const int64_t n = h.rows;
  if (n < 1 || n > config_.max_tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("h: rows must be in [1, max_tokens=", config_.max_tokens(), "], got ", n));
  }
  MAPL_RETURN_IF_ERROR(CheckShape(h, "h", n, d_));
  if (finite == FiniteCheck::kCheck) {
    if (absl::Status s = CheckFinite(h, "h"); !s.ok()) {
      stats_.set_nonfinite_inputs(stats_.nonfinite_inputs() + 1);
      return s;
    }
  }
  if (last_step_.has_value() && step <= *last_step_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "EncodeForward: step ", step, " was already closed by Step(", *last_step_, ")"));
  }
  if (pending_.contains({step, microbatch})) {
    return absl::AlreadyExistsError(
        absl::StrCat("EncodeForward: ", KeyName(step, microbatch), " was already encoded"));
  }
  if (mapl_ && token_ids == nullptr) {
    return absl::InvalidArgumentError("token_ids: required for METHOD_MAPL (anchors)");
  }
  if (token_ids != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      if (token_ids[i] < 0 ||
          (config_.vocab() != 0 && static_cast<uint32_t>(token_ids[i]) >= config_.vocab())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token_ids[", i, "] = ", token_ids[i], ": must be in [0, ",
            config_.vocab() != 0 ? absl::StrCat("vocab=", config_.vocab()) : "2^31", ")"));
      }
    }
  }
  if (evaluation && projected_ && !owner_.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "EncodeForward: ", KeyName(step, microbatch),
        " is an evaluation forward, but no dictionary exists yet: with PROJECTOR_INIT_PCA the "
        "first training forward builds it (evaluation trains nothing); send a training forward "
        "first"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::PeerMessage>> UpstreamEngine::EncodeForward(
    uint64_t step, uint32_t microbatch, const ConstTensor& h, const int32_t* token_ids,
    FiniteCheck finite, bool evaluation) {
  MAPL_RETURN_IF_ERROR(CheckInput(step, microbatch, h, token_ids, finite, evaluation));
  const int64_t n = h.rows;
  std::vector<v1::PeerMessage> out;
  if (projected_ && !owner_.has_value()) {
    // PROJECTOR_INIT_PCA: version 0 comes from this first batch and travels as a snapshot.
    MAPL_ASSIGN_OR_RETURN(std::vector<float> u,
                          PrincipalSubspace(*backend_, h, k_, config_.seed()));
    std::vector<std::vector<float>> tables = SeededDictionary(config_);
    tables[0] = std::move(u);
    MAPL_RETURN_IF_ERROR(CreateOwner(std::move(tables)));
    out.push_back(SnapshotMessage());
  } else if (snapshot_first_) {
    out.push_back(SnapshotMessage());
  }
  snapshot_first_ = false;

  v1::Frame frame = codec_.NewFrame(v1::DIRECTION_FORWARD, step, microbatch, n);
  frame.set_dtype(h.dtype == DType::kF32 ? v1::DTYPE_F32 : v1::DTYPE_BF16);
  frame.set_evaluation(evaluation);
  SavedForward saved;
  saved.rows = n;
  if (!projected_) {
    codec_.EncodeDense(h, &frame);
  } else {
    saved.dict = owner_->published();
    std::vector<float> z(n * k_);
    MAPL_RETURN_IF_ERROR(backend_->Project(h, saved.dict->tensor(0), Tensor::F32(z.data(), n, k_)));
    const RvqCodebooks* cb = nullptr;
    if (rvq_ && codebooks_->fitted()) {
      MAPL_ASSIGN_OR_RETURN(cb, codebook_cache_.Get(saved.dict));
      std::vector<uint8_t> codes;
      std::vector<double> errors;
      MAPL_RETURN_IF_ERROR(codec_.RvqCodesWithErrors(z.data(), n, *cb, &codes, &errors));
      const int depth = ChooseRvqDepth(errors, config_.forward_error_budget(), link_busy_);
      if (!evaluation) {  // the refit decision learns from training traffic only
        rvq_error_sum_ += errors.back();
        ++rvq_error_frames_;
      }
      if (depth == 0) {
        MAPL_RETURN_IF_ERROR(codec_.EncodeProjected(v1::CODEC_INT8, z.data(), n, nullptr, &frame));
        stats_.set_forward_budget_fallbacks(stats_.forward_budget_fallbacks() + 1);
      } else {
        codec_.SetRvqPayload(codes, n, cb->levels, depth, &frame);
        stats_.set_forward_rvq_levels(static_cast<uint32_t>(depth));
        rvq_levels_sum_ += depth;
        ++rvq_frames_;
      }
    } else {
      // Before the RVQ codebooks are fitted, forward frames travel as bf16.
      const v1::Codec codec = rvq_ ? v1::CODEC_BF16 : config_.forward_codec();
      MAPL_RETURN_IF_ERROR(codec_.EncodeProjected(codec, z.data(), n, nullptr, &frame));
    }
    MAPL_RETURN_IF_ERROR(health_.AddFrame(codec_, h, z.data(), frame, cb));
    frame.set_dict_version(saved.dict->version());
    if (rvq_ && !evaluation) codebooks_->Observe(z.data(), n);
  }
  if (token_ids != nullptr) codec_.PackTokenIds(token_ids, n, &frame);
  if (mapl_ && !evaluation) {  // kept only for G_up = h^T gzq
    saved.sample = SampleLearnerRows(n, config_.learner_rows(), step, microbatch);
    SaveH(h, &saved);
  }
  FrameCodec::Seal(&frame);
  CountFrameSent(frame, d_, &stats_);
  // An evaluation forward keeps nothing for a backward, and its bytes do not buy dictionary
  // updates (the budget is a share of the training traffic).
  if (!evaluation) {
    payload_bytes_this_step_ += FrameWireBytes(frame);
    pending_.Insert({step, microbatch}, std::move(saved));
  } else {
    evaluated_.Insert({step, microbatch}, true);
  }
  out.push_back(Wrap(std::move(frame)));
  return out;
}

int UpstreamEngine::ChooseRvqDepth(const std::vector<double>& errors, double budget,
                                   bool link_busy) {
  const int levels = static_cast<int>(errors.size());
  if (budget <= 0.0) return levels;
  if (errors.empty() || errors.back() > budget) return 0;
  if (!link_busy) return levels;
  int depth = 1;
  while (errors[depth - 1] > budget) ++depth;
  return depth;
}

void UpstreamEngine::SaveH(const ConstTensor& h, SavedForward* saved) {
  const std::vector<int64_t>& rows = saved->sample.rows;
  const int64_t kept = saved->sample.all() ? h.rows : static_cast<int64_t>(rows.size());
  saved->dtype = h.dtype;
  // Copies row by row when sampled; a whole microbatch is one copy.
  auto copy = [&](auto* dst, const auto* src) {
    if (saved->sample.all()) {
      std::copy(src, src + kept * d_, dst);
      return;
    }
    for (int64_t i = 0; i < kept; ++i) {
      std::copy(src + rows[i] * d_, src + (rows[i] + 1) * d_, dst + i * d_);
    }
  };
  if (h.dtype == DType::kF32) {
    if (!spare_h_f32_.empty()) {
      saved->h_f32.swap(spare_h_f32_.back());
      spare_h_f32_.pop_back();
    }
    saved->h_f32.resize(kept * d_);
    copy(saved->h_f32.data(), h.f32());
  } else {
    if (!spare_h_bf16_.empty()) {
      saved->h_bf16.swap(spare_h_bf16_.back());
      spare_h_bf16_.pop_back();
    }
    saved->h_bf16.resize(kept * d_);
    copy(saved->h_bf16.data(), h.bf16());
  }
}

ConstTensor UpstreamEngine::SavedForward::h() const {
  const int64_t kept = sample.all() ? rows : static_cast<int64_t>(sample.rows.size());
  return dtype == DType::kF32 ? ConstTensor::F32(h_f32.data(), kept, h_f32.size() / kept)
                              : ConstTensor::BF16(h_bf16.data(), kept, h_bf16.size() / kept);
}

absl::Status UpstreamEngine::DecodeBackward(const v1::Frame& frame, const Tensor& dh) {
  absl::Status s = DecodeBackwardImpl(frame, dh);
  if (!s.ok()) stats_.set_frames_rejected(stats_.frames_rejected() + 1);
  return s;
}

absl::Status UpstreamEngine::DecodeBackwardImpl(const v1::Frame& frame, const Tensor& dh) {
  SavedForward* saved = pending_.Find({frame.step(), frame.microbatch()});
  if (saved == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(FrameName(frame), ": no forward of it is pending here",
                     evaluated_.contains({frame.step(), frame.microbatch()})
                         ? " (its forward was an evaluation one, which takes no backward)"
                         : " (its step was closed, or it was evicted behind newer forwards)"));
  }
  MAPL_RETURN_IF_ERROR(codec_.Check(frame, v1::DIRECTION_BACKWARD, saved->rows, dh));
  const int64_t n = saved->rows;
  if (!projected_) {
    MAPL_RETURN_IF_ERROR(codec_.DecodeDense(frame, dh));
  } else {
    if (frame.dict_version() != saved->dict->version()) {
      return absl::InvalidArgumentError(
          absl::StrCat(FrameName(frame), ": dict_version ", frame.dict_version(),
                       ", but its forward was encoded with version ", saved->dict->version()));
    }
    std::vector<float> gzq(n * k_);
    MAPL_RETURN_IF_ERROR(codec_.DecodeProjected(frame, nullptr, gzq.data()));
    const ConstTensor gz = ConstTensor::F32(gzq.data(), n, k_);
    MAPL_RETURN_IF_ERROR(backend_->Lift(gz, saved->dict->tensor(0), dh));
    if (mapl_ && !frame.evaluation()) {
      if (saved->sample.all()) {
        MAPL_RETURN_IF_ERROR(projector_->AccumulateUp(*backend_, saved->h(), gz));
      } else {
        const std::vector<float> gs = GatherRows(gz, saved->sample.rows, saved->sample.scale);
        MAPL_RETURN_IF_ERROR(projector_->AccumulateUp(
            *backend_, saved->h(), ConstTensor::F32(gs.data(), saved->h().rows, k_)));
      }
    }
  }
  CountFrameReceived(frame, d_, &stats_);
  // Keep a few buffers for the next microbatches (a pipeline has that many in flight).
  constexpr size_t kSpares = 8;
  if (!saved->h_f32.empty() && spare_h_f32_.size() < kSpares) {
    spare_h_f32_.push_back(std::move(saved->h_f32));
  }
  if (!saved->h_bf16.empty() && spare_h_bf16_.size() < kSpares) {
    spare_h_bf16_.push_back(std::move(saved->h_bf16));
  }
  pending_.Erase({frame.step(), frame.microbatch()});
  return absl::OkStatus();
}

absl::Status UpstreamEngine::HandleLearningSignal(const v1::LearningSignal& signal) {
  const std::string name = absl::StrCat("learning signal (step ", signal.step(), ")");
  auto bad = [&](const auto&... msg) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", msg...));
  };
  if (!mapl_) return bad(v1::Method_Name(config_.method()), " learns no projector");
  if (signal.boundary() != config_.id()) {
    return bad("boundary ", signal.boundary(), ", this is boundary ", config_.id());
  }
  if (signal.rows() != d_ || signal.cols() != k_) {
    return bad("shape (", signal.rows(), ", ", signal.cols(), "), expected (", d_, ", ", k_, ")");
  }
  if (static_cast<int64_t>(signal.g_down().size()) != d_ * k_ * 4) {
    return bad("g_down has ", signal.g_down().size(), " bytes, expected ", d_ * k_ * 4);
  }
  if (last_step_.has_value() && signal.step() <= *last_step_) {
    return absl::FailedPreconditionError(
        absl::StrCat(name, ": step already closed (last closed: ", *last_step_, ")"));
  }
  if (signals_.count(signal.step()) != 0) {
    return absl::AlreadyExistsError(absl::StrCat(name, ": already received"));
  }
  if (signals_.size() >= kMaxPendingSignals) {
    return absl::ResourceExhaustedError(
        absl::StrCat(name, ": ", signals_.size(), " signals already wait for their Step()"));
  }
  std::vector<float> g(d_ * k_);
  MAPL_RETURN_IF_ERROR(DecodeDenseValues(signal.g_down(), v1::PRECISION_F32, d_ * k_, k_,
                                         name + " g_down", g.data()));
  signals_.emplace(signal.step(), std::move(g));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::PeerMessage>> UpstreamEngine::HandleSnapshotRequest(
    const v1::SnapshotRequest& request) {
  if (request.boundary() != config_.id() || request.direction() != v1::DIRECTION_FORWARD) {
    return absl::InvalidArgumentError(
        absl::StrCat("snapshot request for boundary ", request.boundary(), " ",
                     v1::Direction_Name(request.direction()), "; this side owns boundary ",
                     config_.id(), " DIRECTION_FORWARD"));
  }
  if (!projected_) {
    return absl::InvalidArgumentError("snapshot request: METHOD_DENSE has no dictionary");
  }
  std::vector<v1::PeerMessage> out;
  // The downstream asks once per version it holds, but it may ask before a snapshot already on
  // its way is in (a refused frame or delta ahead of it in the stream). Such a request names a
  // version older than that snapshot's (or no state): once applied, the replica holds at least
  // the snapshot's version. And while the dictionary has not moved since the last snapshot, a
  // new one would repeat it. Either way the snapshot sent covers the request; a full one is
  // sent again only for a newer version.
  if (snapshot_sent_version_.has_value() &&
      (request.reason() == v1::SNAPSHOT_REASON_NO_STATE ||
       request.have_version() < *snapshot_sent_version_ ||
       (owner_.has_value() && owner_->version() == *snapshot_sent_version_))) {
    stats_.set_snapshot_requests_coalesced(stats_.snapshot_requests_coalesced() + 1);
    Log(LogLevel::kInfo, "snapshot request covered by the snapshot already sent",
        {{"boundary", absl::StrCat(config_.id())},
         {"have_version", absl::StrCat(request.have_version())},
         {"sent_version", absl::StrCat(*snapshot_sent_version_)}});
    return out;
  }
  if (owner_.has_value()) out.push_back(SnapshotMessage());
  return out;
}

std::vector<v1::PeerMessage> UpstreamEngine::OnPeerRestart() {
  snapshot_sent_version_.reset();  // the new instance has none of what the old one was sent
  std::vector<v1::PeerMessage> out;
  if (projected_ && owner_.has_value()) {
    out.push_back(SnapshotMessage());
    snapshot_first_ = false;
    Log(LogLevel::kWarning, "downstream restarted: sending it the current dictionary",
        {{"boundary", absl::StrCat(config_.id())}, {"version", absl::StrCat(owner_->version())}});
  }
  return out;
}

v1::BoundaryState UpstreamEngine::SaveState() const {
  v1::BoundaryState state = StateHeader(config_, last_step_);
  if (owner_.has_value()) {
    *state.mutable_published() = owner_->Snapshot();
    for (int t = 0; t < owner_->num_tables(); ++t) {
      const float* learner = owner_->learner(t);
      state.add_learner()->mutable_values()->Assign(
          learner, learner + owner_->spec(t).rows * owner_->spec(t).cols);
    }
  }
  if (projector_.has_value()) projector_->Save(state.mutable_projector());
  if (codebooks_.has_value()) codebooks_->Save(state.mutable_codebooks());
  state.set_last_fit_step(last_fit_step_);
  return state;
}

absl::Status UpstreamEngine::RestoreState(const v1::BoundaryState& state) {
  if (last_step_.has_value() || pending_.size() != 0 || stats_.frames_sent() != 0) {
    return absl::FailedPreconditionError("RestoreState: the engine is already in use");
  }
  // Everything is rebuilt aside and swapped in at the end: on error the engine is unchanged.
  std::optional<DictionaryOwner> owner;
  if (state.has_published()) {
    if (!projected_) {
      return absl::InvalidArgumentError("state: METHOD_DENSE owns no dictionary");
    }
    const std::vector<DictionaryTableSpec> specs = DictionaryTables(config_);
    if (state.learner_size() != static_cast<int>(specs.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "state: ", state.learner_size(), " learner tables, this config has ", specs.size()));
    }
    std::vector<std::vector<float>> learner(specs.size());
    for (size_t t = 0; t < specs.size(); ++t) {
      MAPL_RETURN_IF_ERROR(
          RestoreFloats(state.learner(static_cast<int>(t)).values(), specs[t].rows * specs[t].cols,
                        absl::StrCat("learner table ", specs[t].name), &learner[t]));
    }
    MAPL_ASSIGN_OR_RETURN(
        DictionaryOwner restored,
        DictionaryOwner::Restore({config_.id(), v1::DIRECTION_FORWARD}, specs, state.published(),
                                 std::move(learner), config_.dictionary_precision()));
    owner.emplace(std::move(restored));
  } else if (owner_.has_value()) {
    // A seeded owner exists from the start, so its state always carries it.
    return absl::InvalidArgumentError("state: holds no dictionary, this config owns one");
  }
  std::optional<ProjectorLearner> projector;
  if (mapl_) {
    projector.emplace(config_);
    if (state.has_projector()) MAPL_RETURN_IF_ERROR(projector->Restore(state.projector()));
  }
  std::optional<CodebookLearner> codebooks;
  if (rvq_) {
    codebooks.emplace(config_);
    if (state.has_codebooks()) MAPL_RETURN_IF_ERROR(codebooks->Restore(state.codebooks()));
  }
  if (owner.has_value()) owner_.emplace(std::move(*owner));
  if (mapl_) projector_.emplace(std::move(*projector));
  if (rvq_) codebooks_.emplace(std::move(*codebooks));
  last_fit_step_ = state.last_fit_step();
  snapshot_first_ = owner_.has_value();
  return absl::OkStatus();
}

absl::Status UpstreamEngine::Decode(const v1::Frame& frame, const Tensor& out,
                                    std::vector<v1::PeerMessage>*) {
  return DecodeBackward(frame, out);
}

absl::Status UpstreamEngine::Handle(const v1::PeerMessage& message,
                                    std::vector<v1::PeerMessage>* replies) {
  absl::Status s;
  switch (message.body_case()) {
    case v1::PeerMessage::kLearningSignal:
      s = HandleLearningSignal(message.learning_signal());
      break;
    case v1::PeerMessage::kSnapshotRequest: {
      absl::StatusOr<std::vector<v1::PeerMessage>> out =
          HandleSnapshotRequest(message.snapshot_request());
      if (out.ok()) {
        for (v1::PeerMessage& m : *out) replies->push_back(std::move(m));
      }
      s = out.status();
      break;
    }
    default:
      s = UnexpectedPeerMessage(config_, message);
  }
  if (!s.ok()) stats_.set_bad_peer_messages(stats_.bad_peer_messages() + 1);
  return s;
}

absl::StatusOr<std::vector<v1::PeerMessage>> UpstreamEngine::Step(uint64_t step) {
  MAPL_RETURN_IF_ERROR(CheckStepIncreases(last_step_, step));
  std::vector<v1::PeerMessage> out;
  auto signal = signals_.end();
  if (mapl_) {
    signal = signals_.find(step);
    if (signal == signals_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("Step(", step, "): the downstream's learning signal has not arrived"));
    }
  }
  if (projected_ && owner_.has_value()) {
    int64_t extra_budget = 0;
    if (mapl_) {
      // G = G_up + G_down: one SPEL step of the learner U (the published copy follows by delta).
      if (projector_->Step(*backend_, owner_->mutable_learner(0), signal->second)) {
        stats_.set_projector_lr(projector_->last_lr());
      } else {
        stats_.set_learner_updates_skipped(stats_.learner_updates_skipped() + 1);
      }
    }
    if (rvq_) {
      const double budget = config_.forward_error_budget();
      const bool refit = budget > 0.0 && rvq_error_frames_ > 0 &&
                         rvq_error_sum_ / static_cast<double>(rvq_error_frames_) > budget &&
                         step >= last_fit_step_ + kRefitInterval;
      const CodebookLearner::StepResult r = codebooks_->Step(*backend_, refit);
      if (r.fitted_now) {
        last_fit_step_ = step;
        if (refit) stats_.set_rvq_refits(stats_.rvq_refits() + 1);
      }
      rvq_error_sum_ = 0.0;
      rvq_error_frames_ = 0;
      stats_.set_forward_rvq_levels_mean(rvq_frames_ > 0 ? static_cast<double>(rvq_levels_sum_) /
                                                               static_cast<double>(rvq_frames_)
                                                         : 0.0);
      rvq_levels_sum_ = 0;
      rvq_frames_ = 0;
      if (r.skipped) stats_.set_learner_updates_skipped(stats_.learner_updates_skipped() + 1);
      if (r.updated) stats_.set_rvq_relative_mse(r.relative_mse);
      // Fitted codebooks (the first, or a refit) are published whole, outside the budget: RVQ
      // frames need them.
      if (r.fitted_now) {
        extra_budget = int64_t{config_.rvq_levels()} * kMaxCodebookSize * owner_->RowBytes(1);
      }
      if (codebooks_->fitted()) {
        const std::vector<float>& c = codebooks_->centroids();
        std::copy(c.begin(), c.end(), owner_->mutable_learner(1));
      }
    }
    if (mapl_ || rvq_) {
      int64_t row_bytes = owner_->RowBytes(0);
      if (rvq_) row_bytes = std::max(row_bytes, owner_->RowBytes(1));
      const int64_t budget =
          std::max(static_cast<int64_t>(config_.dictionary_budget_fraction() *
                                        static_cast<double>(payload_bytes_this_step_)),
                   row_bytes) +
          extra_budget;
      MAPL_ASSIGN_OR_RETURN(v1::DictionaryDelta delta, owner_->MakeDelta(budget));
      stats_.set_dictionary_bytes_sent(stats_.dictionary_bytes_sent() + delta.ByteSizeLong());
      v1::PeerMessage m;
      *m.mutable_dictionary_delta() = std::move(delta);
      out.push_back(std::move(m));
    }
  }
  if (projector_.has_value()) projector_->ClearGradient();
  payload_bytes_this_step_ = 0;
  signals_.erase(signals_.begin(), signals_.upper_bound(step));
  pending_.DropThrough(step);
  evaluated_.DropThrough(step);
  last_step_ = step;
  health_.FinishStep(*backend_, owner_.has_value() ? owner_->published() : nullptr, &stats_);
  stats_.set_steps(stats_.steps() + 1);
  return out;
}

v1::BoundaryStats UpstreamEngine::stats() const {
  v1::BoundaryStats s = stats_;
  s.set_dropped_microbatches(pending_.dropped());
  if (owner_.has_value()) {
    gauges_.Fill(*owner_->published(), d_, k_, &s);
    s.set_dictionary_rows_skipped(owner_->nonfinite_rows_skipped());
  }
  return s;
}

}  // namespace mapl
