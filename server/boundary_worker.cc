// The per-boundary worker: send queue, encoder and decoder threads, inbox, Step.
#include "server/boundary_worker.h"

#include <algorithm>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/check.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "prometheus/histogram.h"
#include "server/frame_codec.h"

namespace mapl {
namespace {

const char* DirName(int d) { return d == v1::DIRECTION_FORWARD ? "forward" : "backward"; }

// Buffers kept for reuse, per kind.
constexpr size_t kSpareBuffers = 8;
// Frames held while their dictionary version is on its way (BoundaryWorker::parked_); beyond this
// one fails at once, as before.
constexpr size_t kMaxParkedFrames = 256;

// Whether every value is finite: all exponent bits set is NaN or Inf. Branch-free, so the loop
// vectorises (a decoded tensor is checked before the trainer may see it).
bool AllFinite(const std::vector<float>& v) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(v.data());
  uint32_t bad = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    bad |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

int64_t TensorBytes(const std::vector<float>& data) {
  return static_cast<int64_t>(data.size() * sizeof(float));
}

// What the trainer's Recv says of a frame the engine rejected (docs/ARCHITECTURE.md, "Errors"):
// the engine's INVALID_ARGUMENT is a malformed frame, corrupt data like a failed checksum
// (DATA_LOSS); UNAVAILABLE (its dictionary version is not here yet) stays retryable; a frame that
// no longer fits this side's state (FAILED_PRECONDITION: its forward is gone; ALREADY_EXISTS: a
// second frame of the tensor) is the exchange failing, not the Recv's caller (ABORTED).
absl::StatusCode RecvStatusCode(absl::StatusCode engine) {
  switch (engine) {
    case absl::StatusCode::kInvalidArgument:
      return absl::StatusCode::kDataLoss;
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAlreadyExists:
      return absl::StatusCode::kAborted;
    default:
      return engine;
  }
}

}  // namespace

BoundaryWorker::BoundaryWorker(std::unique_ptr<Engine> engine, const WorkerOptions& options,
                               CodecTimers timers)
    : config_(engine->config()),
      options_(options),
      timers_(timers),
      sends_(engine->sends()),
      receives_(sends_ == v1::DIRECTION_FORWARD ? v1::DIRECTION_BACKWARD : v1::DIRECTION_FORWARD),
      engine_(std::move(engine)),
      transport_queue_limit_(TransportQueueLimit(options, 0.0)) {}

int64_t BoundaryWorker::TransportQueueLimit(const WorkerOptions& options, double goodput) {
  if (goodput <= 0.0) return options.max_transport_queue_bytes;
  const double bytes = goodput * absl::ToDoubleSeconds(options.max_transport_queue_time);
  if (bytes >= static_cast<double>(options.max_transport_queue_bytes)) {
    return options.max_transport_queue_bytes;
  }
  return std::max<int64_t>(1, static_cast<int64_t>(bytes));
}

BoundaryWorker::~BoundaryWorker() { Stop(absl::InfinitePast()); }

void BoundaryWorker::Start(Transport* transport) {
  MAPL_CHECK(transport_ == nullptr && transport != nullptr,
             "Start is called once, with a transport");
  transport_ = transport;
  encoder_ = std::thread([this] { EncodeLoop(); });
  decoder_ = std::thread([this] { DecodeLoop(); });
  link_monitor_ = std::thread([this] { LinkMonitorLoop(); });
}

std::string BoundaryWorker::Describe(int direction, uint64_t step, uint32_t microbatch) const {
  return absl::StrCat("boundary ", config_.id(), ": ", DirName(direction), " tensor of step ", step,
                      " microbatch ", microbatch);
}

// ---- sending ----

absl::StatusOr<v1::SendReply> BoundaryWorker::Send(uint64_t step, uint32_t microbatch,
                                                   const ConstTensor& t, const int32_t* token_ids,
                                                   bool wait_encoded, absl::Time deadline,
                                                   const SendOptions& options) {
  const std::string what = Describe(sends_, step, microbatch);
  {
    // An earlier Send's tensor failed in the encoder after that Send returned: this is the
    // first call that can tell the trainer.
    absl::MutexLock l(&mu_);
    if (!send_error_.ok()) {
      const absl::Status earlier = std::exchange(send_error_, absl::OkStatus());
      return absl::Status(earlier.code(), absl::StrCat("an earlier Send failed in the background: ",
                                                       earlier.message(), " (this Send's tensor, ",
                                                       what, ", was not taken: send it again)"));
    }
  }
  const bool forward = sends_ == v1::DIRECTION_FORWARD;
  if (forward && config_.method() == v1::METHOD_MAPL && token_ids == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("token_ids: boundary ", config_.id(),
                     " runs METHOD_MAPL, whose anchors need the token ids of every forward "
                     "microbatch"));
  }
  if (!forward && token_ids != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": token_ids: only forward activations carry token ids"));
  }
  MAPL_CHECK(t.cols == config_.d(), "the daemon checked the tensor's columns against d");
  if (!options.shape.empty()) {
    MAPL_RETURN_IF_ERROR(
        CheckTensorShape(options.shape, t.rows, config_.d(), absl::StrCat(what, ": shape")));
  }
  const Key key{step, microbatch};
  const size_t elem = t.dtype == DType::kF32 ? 4 : 2;
  const size_t bytes = static_cast<size_t>(t.size()) * elem;
  EncodeJob job;
  job.step = step;
  job.microbatch = microbatch;
  job.dtype = t.dtype;
  job.rows = t.rows;
  job.shape = options.shape;
  job.evaluation = options.evaluation;
  {
    absl::MutexLock l(&mu_);
    // The checks run before the wait (a caller's mistake is reported at once) and again after
    // it, under the same lock as the reservation: meanwhile a concurrent Send of the same key
    // may have taken it, or Step closed the step.
    for (bool waited : {false, true}) {
      if (stop_) return absl::UnavailableError("mapld is shutting down; tensor not taken");
      if (!forward && evaluation_received_.count(key) != 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            what,
            ": its forward was an evaluation tensor, which trains nothing and takes no "
            "backward; send backwards only of training forwards"));
      }
      if (closed_step_.has_value() && step <= *closed_step_) {
        return absl::FailedPreconditionError(
            absl::StrCat(what, ": step ", step, " was already closed by Step(", *closed_step_,
                         "); steps only move forward"));
      }
      if (sent_.count(key) != 0) {
        return absl::AlreadyExistsError(
            absl::StrCat(what, " was already sent; each (step, microbatch) is sent once"));
      }
      if (waited) break;
      // Backpressure: a trainer far ahead of the encoder waits here instead of filling memory,
      // but not forever: a link that stays down or slow fails the Send by its deadline.
      const absl::Time since = absl::Now();
      while (jobs_.size() + reserved_ >= options_.max_queued_jobs && !stop_) {
        if (cv_.WaitWithDeadline(&mu_, deadline)) {
          if (jobs_.size() + reserved_ < options_.max_queued_jobs || stop_) break;
          const v1::LinkStats link = transport_ != nullptr ? transport_->stats() : v1::LinkStats();
          return absl::UnavailableError(absl::StrCat(
              what, ": not taken; the boundary's queue stayed full for ",
              absl::FormatDuration(absl::Trunc(absl::Now() - since, absl::Milliseconds(1))),
              " (peer link ", link.connected() ? "connected but slow" : "down", ", ",
              link.queued_messages(), " message(s) of ", link.queued_bytes(),
              " bytes unacknowledged); retry, or check the peer"));
        }
      }
    }
    sent_.insert(key);  // reserved now, so a concurrent duplicate fails too
    ++reserved_;        // a queue slot, and Flush waits for it
    if (!spare_tensors_.empty()) {
      job.tensor.swap(spare_tensors_.back());
      spare_tensors_.pop_back();
    }
  }
  // Take the tensor and its ids: after this the trainer may reuse its buffers. Checks run on
  // the copies, so a trainer changing its buffer meanwhile cannot slip anything past them.
  job.tensor.resize(bytes);
  absl::Status taken;
  bool nonfinite_checked = true;  // false: the tensor was refused for NaN or Inf
  if (!CopyAndCheckFinite(t, absl::MakeSpan(job.tensor))) {
    taken = CheckFinite(ConstTensor{job.tensor.data(), t.rows, t.cols, t.dtype}, "tensor");
    nonfinite_checked = taken.ok();
  }
  if (taken.ok() && token_ids != nullptr) {
    job.token_ids.assign(token_ids, token_ids + t.rows);
    const uint32_t vocab = config_.vocab();  // 0: none configured (any id >= 0)
    for (int64_t i = 0; i < t.rows && taken.ok(); ++i) {
      if (job.token_ids[i] < 0 ||
          (vocab != 0 && static_cast<uint32_t>(job.token_ids[i]) >= vocab)) {
        taken = absl::InvalidArgumentError(
            absl::StrCat("token_ids[", i, "] = ", job.token_ids[i], ": must be in [0, ",
                         vocab != 0 ? absl::StrCat("vocab=", vocab) : "2^31", ")"));
      }
    }
  }
  std::shared_ptr<JobResult> result;
  if (wait_encoded) job.result = result = std::make_shared<JobResult>();
  v1::SendReply reply;
  reply.set_raw_bytes(bytes);
  absl::MutexLock l(&mu_);
  --reserved_;
  if (!taken.ok() || stop_) {
    if (!nonfinite_checked) ++nonfinite_refused_;
    sent_.erase(key);
    spare_tensors_.push_back(std::move(job.tensor));
    cv_.SignalAll();
    if (!taken.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", taken.message()));
    return absl::UnavailableError("mapld is shutting down; tensor not taken");
  }
  jobs_.push_back(std::move(job));
  cv_.SignalAll();
  if (result == nullptr) return reply;
  while (!result->done) cv_.Wait(&mu_);
  if (!result->status.ok()) return result->status;
  reply.set_wire_bytes(result->wire_bytes);
  return reply;
}

void BoundaryWorker::EncodeLoop() {
  for (;;) {
    EncodeJob job;
    {
      absl::MutexLock l(&mu_);
      while (jobs_.empty() && !stop_) cv_.Wait(&mu_);
      if (jobs_.empty()) return;  // stopping, and everything taken was encoded
      job = std::move(jobs_.front());
      jobs_.pop_front();
      ++encoding_;
      cv_.SignalAll();  // room in the queue
    }
    Encode(job);
    absl::MutexLock l(&mu_);
    --encoding_;
    if (spare_tensors_.size() < options_.max_queued_jobs) {
      spare_tensors_.push_back(std::move(job.tensor));
    }
    cv_.SignalAll();
  }
}

void BoundaryWorker::Encode(EncodeJob& job) {
  // Backpressure from the transport: with a slow link its queue would otherwise grow without
  // bound while the trainer keeps sending. The bound is time on the link, not bytes: a frame
  // queued behind 256 MiB on a 20 Mbit/s link would reach the peer long after its Recv gave up.
  int64_t queue_limit;
  {
    absl::MutexLock el(&engine_mu_);
    queue_limit = transport_queue_limit_;
  }
  while (!transport_->WaitQueueBelow(queue_limit, absl::Milliseconds(100))) {
    absl::MutexLock l(&mu_);
    if (stop_) break;
  }
  const ConstTensor t{job.tensor.data(), job.rows, config_.d(), job.dtype};
  absl::Status status;
  uint64_t wire = 0;
  {
    // Busy: the link still holds unacknowledged bytes (a check, not a wait, and no stats copy).
    const bool link_busy = !transport_->WaitQueueBelow(1, absl::ZeroDuration());
    absl::MutexLock el(&engine_mu_);
    engine_->SetLinkBusy(link_busy);
    const absl::Time start = absl::Now();
    // Send took the tensor with CopyAndCheckFinite: only finite ones reach the queue.
    absl::StatusOr<std::vector<v1::PeerMessage>> out = engine_->Encode(
        job.step, job.microbatch, t, job.token_ids.empty() ? nullptr : job.token_ids.data(),
        Engine::FiniteCheck::kCheckedByCaller, job.evaluation);
    status = out.status();
    if (out.ok()) {
      const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
      if (timers_.encode_seconds != nullptr) timers_.encode_seconds->Observe(seconds);
      step_codec_seconds_ += seconds;
      ++step_encoded_;
      for (v1::PeerMessage& m : *out) {
        if (!m.has_frame()) continue;
        wire += FrameWireBytes(m.frame());
        // The shape as the trainer handed the tensor in (outside the checksum, like the header).
        v1::Frame* f = m.mutable_frame();
        if (job.shape.empty()) {
          f->add_shape(static_cast<uint32_t>(job.rows));
          f->add_shape(config_.d());
        } else {
          f->mutable_shape()->Assign(job.shape.begin(), job.shape.end());
        }
      }
      SendAll(*std::move(out));
    } else {
      // The request was checked when it was taken; this is the engine's verdict (for example a
      // backward whose forward was evicted). No frame of it will come: the peer hears so in the
      // frame's place, so that its Recv fails at once instead of by its deadline.
      status = absl::Status(status.code(), absl::StrCat(Describe(sends_, job.step, job.microbatch),
                                                        ": ", status.message()));
      v1::PeerMessage m;
      v1::FrameFailed* failed = m.mutable_frame_failed();
      failed->set_boundary(config_.id());
      failed->set_direction(sends_);
      failed->set_step(job.step);
      failed->set_microbatch(job.microbatch);
      failed->set_reason(std::string(status.message()));
      std::vector<v1::PeerMessage> notice;
      notice.push_back(std::move(m));
      SendAll(std::move(notice));
    }
  }
  if (!status.ok()) {
    Log(LogLevel::kError, "encode failed", {{"error", std::string(status.message())}});
  }
  absl::MutexLock l(&mu_);
  if (job.result != nullptr) {
    job.result->status = status;
    job.result->wire_bytes = wire;
    job.result->done = true;
    cv_.SignalAll();
  } else if (!status.ok()) {
    // Nobody waits for this tensor: the next Send and the next Step say it (the first failure is
    // kept; later ones until then are only logged).
    if (send_error_.ok()) send_error_ = status;
    if (step_error_.ok()) step_error_ = status;
  }
}

void BoundaryWorker::SendAll(std::vector<v1::PeerMessage> messages) {
  absl::MutexLock l(&link_mu_);
  for (v1::PeerMessage& m : messages) {
    const int64_t bytes = static_cast<int64_t>(m.ByteSizeLong());
    const absl::Time now = absl::Now();
    absl::Status s = transport_->Send(std::move(m));
    if (s.ok()) {
      goodput_.Handed(now, bytes);
    } else {
      Log(LogLevel::kError, "peer send failed",
          {{"boundary", absl::StrCat(config_.id())}, {"error", std::string(s.message())}});
    }
  }
}

void BoundaryWorker::LinkMonitorLoop() {
  for (;;) {
    {
      absl::MutexLock l(&link_mu_);
      auto wake = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_mu_) {
        return link_stop_ || goodput_.busy();
      };
      link_mu_.Await(absl::Condition(&wake));
      if (link_stop_) return;
    }
    // Waits without link_mu_: a sender must never wait for this.
    if (!transport_->WaitQueueBelow(1, absl::Milliseconds(100))) continue;
    absl::MutexLock l(&link_mu_);
    // Nothing is handed over while link_mu_ is held: a queue still empty now ends the busy period.
    if (goodput_.busy() && transport_->WaitQueueBelow(1, absl::ZeroDuration())) {
      const absl::Time now = absl::Now();
      const absl::Duration rtt = absl::Seconds(transport_->stats().last_rtt_seconds());
      goodput_.Drained(now, options_.peer_ack_delay + rtt);
    }
  }
}

bool BoundaryWorker::Flush(absl::Time deadline) {
  absl::MutexLock l(&mu_);
  auto busy = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !jobs_.empty() || encoding_ > 0 || reserved_ > 0;
  };
  while (busy()) {
    if (cv_.WaitWithDeadline(&mu_, deadline) && busy()) return false;
  }
  return true;
}

// ---- receiving ----

void BoundaryWorker::OnPeerMessage(v1::PeerMessage msg) {
  const int64_t bytes = static_cast<int64_t>(msg.ByteSizeLong());
  absl::MutexLock l(&mu_);
  // Flow control: while the decoder is this far behind, the transport stops reading.
  while (incoming_bytes_ > options_.max_incoming_bytes && !stop_) cv_.Wait(&mu_);
  if (stop_) return;  // shutting down: nobody will receive it
  incoming_bytes_ += bytes;
  incoming_.push_back(std::move(msg));
  cv_.SignalAll();
}

void BoundaryWorker::OnPeerRestart() {
  v1::PeerMessage marker;
  marker.mutable_hello();  // The transport never hands on a Hello: here it marks the restart.
  OnPeerMessage(std::move(marker));
}

void BoundaryWorker::DecodeLoop() {
  for (;;) {
    v1::PeerMessage msg;
    bool popped = false;
    {
      absl::MutexLock l(&mu_);
      // Wakes for a message, or when the oldest held frame runs out of time.
      const absl::Time expiry = parked_.empty() ? absl::InfiniteFuture()
                                                : parked_.front().since + options_.max_parked_time;
      while (incoming_.empty() && !stop_) {
        if (cv_.WaitWithDeadline(&mu_, expiry)) break;
      }
      if (stop_) return;
      if (!incoming_.empty()) {
        msg = std::move(incoming_.front());
        incoming_.pop_front();
        incoming_bytes_ -= static_cast<int64_t>(msg.ByteSizeLong());
        cv_.SignalAll();  // room for the transport's reader
        popped = true;
      }
    }
    ExpireParked(absl::Now());
    if (!popped) continue;  // woken only to expire held frames
    switch (msg.body_case()) {
      case v1::PeerMessage::kFrame:
        OnFrame(msg.frame(), absl::Now());
        break;
      case v1::PeerMessage::kStepMarker:
        break;  // advisory
      case v1::PeerMessage::kFrameFailed:
        OnFrameFailed(msg.frame_failed());
        break;
      case v1::PeerMessage::kHello: {  // OnPeerRestart's marker
        {
          absl::MutexLock el(&engine_mu_);
          SendAll(engine_->OnPeerRestart());
        }
        dictionary_synced_ = false;
        // Parked frames are the old peer's: never decode them with the new one's tables. Their
        // Recv fails at once, saying why.
        absl::MutexLock l(&mu_);
        for (const Parked& p : parked_) {
          const v1::Frame& f = p.frame;
          Received r;
          r.status = absl::AbortedError(
              absl::StrCat(Describe(f.direction(), f.step(), f.microbatch()),
                           ": lost: its sender restarted before the dictionary it was encoded "
                           "with arrived; send it again"));
          AddToInbox(Key{f.step(), f.microbatch()}, std::move(r));
        }
        if (!parked_.empty()) cv_.SignalAll();
        parked_.clear();
        break;
      }
      default: {
        absl::Status s;
        {
          absl::MutexLock el(&engine_mu_);
          std::vector<v1::PeerMessage> replies;
          s = engine_->Handle(msg, &replies);
          SendAll(std::move(replies));
        }
        if (!s.ok()) {
          Log(LogLevel::kError, "peer message rejected",
              {{"boundary", absl::StrCat(config_.id())}, {"error", std::string(s.message())}});
        }
        if (s.ok() && (msg.has_dictionary_snapshot() || msg.has_dictionary_delta())) {
          dictionary_synced_ = true;
          std::deque<Parked> retry;
          retry.swap(parked_);
          for (const Parked& p : retry) OnFrame(p.frame, p.since);  // Held frames, in order.
        }
        if (msg.has_learning_signal()) {
          absl::MutexLock l(&mu_);
          ++signals_;
          cv_.SignalAll();
        }
      }
    }
  }
}

void BoundaryWorker::ExpireParked(absl::Time now) {
  while (!parked_.empty() && now - parked_.front().since >= options_.max_parked_time) {
    const v1::Frame& f = parked_.front().frame;
    const std::string what = Describe(f.direction(), f.step(), f.microbatch());
    Received r;
    // Transient: the link or the upstream is slow; the trainer may retry the microbatch.
    r.status = absl::UnavailableError(absl::StrCat(
        what, ": the dictionary version ", f.dict_version(), " it needs never arrived: the frame ",
        "was held for it ", absl::FormatDuration(options_.max_parked_time),
        " (the upstream's snapshot is lost or stuck behind a slow link; check the peer link)"));
    Log(LogLevel::kError, "held frame expired",
        {{"what", what}, {"dict_version", absl::StrCat(f.dict_version())}});
    {
      absl::MutexLock l(&mu_);
      ++parked_expired_;
      AddToInbox(Key{f.step(), f.microbatch()}, std::move(r));
    }
    parked_.pop_front();
  }
}

void BoundaryWorker::OnFrameFailed(const v1::FrameFailed& failed) {
  if (failed.boundary() != config_.id() || failed.direction() != receives_) {
    Log(LogLevel::kError, "frame failure notice of another boundary or direction dropped",
        {{"boundary", absl::StrCat(config_.id())},
         {"notice_boundary", absl::StrCat(failed.boundary())},
         {"direction", absl::StrCat(failed.direction())}});
    return;
  }
  const std::string what = Describe(receives_, failed.step(), failed.microbatch());
  Log(LogLevel::kError, "the peer failed to encode a tensor",
      {{"what", what}, {"reason", failed.reason()}});
  Received r;
  r.status = absl::AbortedError(absl::StrCat(
      what, ": the peer's mapld failed to encode it, so it will never arrive: ", failed.reason(),
      " (the sending trainer's next Send or Step reports it too)"));
  absl::MutexLock l(&mu_);
  AddToInbox(Key{failed.step(), failed.microbatch()}, std::move(r));
}

void BoundaryWorker::AddToInbox(const Key& key, Received r) {
  const std::string what = Describe(receives_, key.first, key.second);
  if (closed_step_.has_value() && key.first <= *closed_step_) {
    // A late frame of a step the trainer closed: nobody will Recv it.
    Log(LogLevel::kWarning, "frame of a closed step dropped", {{"what", what}});
  } else if (received_.count(key) != 0) {
    Log(LogLevel::kWarning, "frame of a tensor already received ignored", {{"what", what}});
  } else if (inbox_.count(key) != 0) {
    Log(LogLevel::kWarning, "duplicate frame ignored", {{"what", what}});
  } else {
    inbox_bytes_ += TensorBytes(r.data);
    inbox_[key] = std::move(r);
    cv_.SignalAll();
    return;
  }
  if (!r.data.empty() && spare_inbox_.size() < kSpareBuffers) {
    spare_inbox_.push_back(std::move(r.data));
  }
}

void BoundaryWorker::EraseFromInbox(std::map<Key, Received>::iterator it) {
  inbox_bytes_ -= TensorBytes(it->second.data);
  inbox_.erase(it);
  cv_.SignalAll();  // room for the decoder
}

std::string BoundaryWorker::WaitingBehindTheDecoder() const {
  // A waiter whose tensor or signal is already in has not woken yet: it waits for nothing.
  for (const Key& k : awaited_) {
    if (inbox_.count(k) == 0)
      return absl::StrCat("a Recv of step ", k.first, " microbatch ", k.second);
  }
  if (signal_waits_.count(signals_) != 0) return "Step's wait for the learning signal";
  return "";
}

void BoundaryWorker::OnFrame(const v1::Frame& f, absl::Time since) {
  const Key key{f.step(), f.microbatch()};
  const std::string what = Describe(f.direction(), f.step(), f.microbatch());
  // A frame of the direction this side sends would sit in the inbox forever.
  if (f.direction() != receives_) {
    Log(LogLevel::kError, "frame of the wrong direction dropped",
        {{"boundary", absl::StrCat(config_.id())}, {"direction", absl::StrCat(f.direction())}});
    return;
  }
  Received r;
  r.rows = f.tokens();
  absl::Status s;
  if (f.tokens() == 0 || f.tokens() > config_.max_tokens()) {
    s = absl::DataLossError(absl::StrCat("corrupt: a frame of ", f.tokens(), " tokens (max_tokens ",
                                         config_.max_tokens(), ")"));
  } else {
    {
      absl::MutexLock l(&mu_);
      if (!spare_inbox_.empty()) {
        r.data.swap(spare_inbox_.back());
        spare_inbox_.pop_back();
      }
    }
    r.data.resize(static_cast<size_t>(r.rows) * config_.d());
    const Tensor out = Tensor::F32(r.data.data(), r.rows, config_.d());
    absl::MutexLock el(&engine_mu_);
    const absl::Time start = absl::Now();
    std::vector<v1::PeerMessage> replies;
    s = engine_->Decode(f, out, &replies);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (timers_.decode_seconds != nullptr) timers_.decode_seconds->Observe(seconds);
    if (s.ok()) {
      step_codec_seconds_ += seconds;
      ++step_decoded_;
    }
    SendAll(std::move(replies));
    // A frame of a dictionary version that a requested snapshot brings (after the peer restarted,
    // or with PCA before the first one) waits for it rather than failing the trainer's Recv.
    // Only until this peer's first dictionary message is in: later, a missing version means a
    // lost delta, and the frame is refused at once (the snapshot request is on its way).
    if (!s.ok() && !dictionary_synced_ && engine_->AwaitsDictionary(f) &&
        parked_.size() < kMaxParkedFrames) {
      parked_.push_back(Parked{f, since});
      absl::MutexLock l(&mu_);
      spare_inbox_.push_back(std::move(r.data));
      return;
    }
  }
  // A frame can pass every check of the engine and still decode to Inf (an int8 or int4 scale
  // near the bf16 maximum, lifted through U): the trainer must never get it.
  bool nonfinite = false;
  if (s.ok() && !AllFinite(r.data)) {
    nonfinite = true;
    const absl::Status where =
        CheckFinite(ConstTensor::F32(r.data.data(), r.rows, config_.d()), "the decoded tensor");
    s = absl::DataLossError(absl::StrCat(
        where.message(), " (the peer's frame is corrupt, or its scales overflow float32)"));
  }
  if (!s.ok()) {
    Log(LogLevel::kError, "frame rejected", {{"what", what}, {"error", std::string(s.message())}});
    // The trainer's Recv gets the reason at once instead of waiting for its deadline, with a
    // code that says what it can do (RecvStatusCode).
    r.status = absl::Status(RecvStatusCode(s.code()),
                            absl::StrCat(what, ": the frame was rejected: ", s.message()));
  } else {
    r.shape = FrameShape(f, config_.d());
    r.dtype = f.dtype();
    r.token_ids = FrameTokenIds(f);  // checked by the engine's FrameCodec::Check
  }
  absl::MutexLock l(&mu_);
  if (s.ok() && f.evaluation() && receives_ == v1::DIRECTION_FORWARD) {
    evaluation_received_.insert(key);
  }
  if (nonfinite) ++decoded_nonfinite_;
  if (!r.status.ok()) {
    if (!r.data.empty() && spare_inbox_.size() < kSpareBuffers) {
      spare_inbox_.push_back(std::move(r.data));
    }
    r.data = {};  // an error entry holds no tensor
  }
  // Room in the inbox: wait for the trainer's Recvs to take tensors out, unless it waits for one
  // not decoded yet (this one is let in) or for the learning signal; then waiting would deadlock
  // and this tensor is dropped, saying so.
  const int64_t bytes = TensorBytes(r.data);
  while (bytes > 0 && inbox_bytes_ > 0 && inbox_bytes_ + bytes > options_.max_inbox_bytes) {
    if (stop_) return;  // shutting down: nobody will receive it
    if (awaited_.count(key) != 0) break;
    if (const std::string waits = WaitingBehindTheDecoder(); !waits.empty()) {
      r.status = absl::ResourceExhaustedError(absl::StrCat(
          what, ": dropped: the inbox held ", inbox_.size(), " tensor(s) of ", inbox_bytes_,
          " bytes not yet received, at its limit of ", options_.max_inbox_bytes,
          " bytes, while the trainer waited for something behind this tensor (", waits,
          "); receive tensors in the order they are sent, or raise the limit"));
      Log(LogLevel::kError, "inbox full: tensor dropped",
          {{"what", what}, {"error", std::string(r.status.message())}});
      ++inbox_dropped_;
      if (spare_inbox_.size() < kSpareBuffers) spare_inbox_.push_back(std::move(r.data));
      r.data = {};
      break;
    }
    cv_.Wait(&mu_);
  }
  AddToInbox(key, std::move(r));
}

absl::StatusOr<v1::RecvReply> BoundaryWorker::Recv(uint64_t step, uint32_t microbatch,
                                                   const Tensor& into, absl::Time deadline,
                                                   absl::Duration timeout,
                                                   const std::function<bool()>& cancelled,
                                                   const RecvOptions& options) {
  const Key key{step, microbatch};
  const std::string what = Describe(receives_, step, microbatch);
  // A tensor that can no longer come: its step is closed, or it was received already. Said at
  // once rather than by the deadline.
  auto gone = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_step_.has_value() && step <= *closed_step_) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": step ", step, " was already closed by Step(", *closed_step_,
                       "), which dropped its tensors; receive a step's tensors before its Step"));
    }
    if (received_.count(key) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, " was already received; each (step, microbatch) is received once"));
    }
    return absl::Status();
  };
  Received r;
  {
    absl::MutexLock l(&mu_);
    MAPL_RETURN_IF_ERROR(gone());
    if (inbox_.count(key) == 0) {
      // The decoder must not wait for inbox room while this waits (see awaited_).
      const auto awaited = awaited_.insert(key);
      cv_.SignalAll();
      absl::Status waited;
      while (inbox_.count(key) == 0) {
        if (stop_) {
          waited = absl::UnavailableError(absl::StrCat(what, ": mapld is shutting down"));
          break;
        }
        // Step closed the step, or a concurrent Recv took the tensor, while this waited.
        if (waited = gone(); !waited.ok()) break;
        if (cv_.WaitWithDeadline(&mu_, deadline) && inbox_.count(key) == 0) {
          waited = absl::DeadlineExceededError(
              absl::StrCat(what, " did not arrive within ", absl::FormatDuration(timeout),
                           transport_ != nullptr && !transport_->connected()
                               ? " (the peer link is not connected)"
                               : ""));
          break;
        }
      }
      awaited_.erase(awaited);
      if (!waited.ok()) return waited;
    }
    auto it = inbox_.find(key);
    if (!it->second.status.ok()) {
      absl::Status s = it->second.status;
      EraseFromInbox(it);
      return s;
    }
    // The caller's mistakes leave the tensor in the inbox for a Recv that fits.
    const Received& in = it->second;
    if (!options.expect_shape.empty() && options.expect_shape != in.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " has shape ", ShapeString(in.shape), ", but the Recv expects ",
          ShapeString(options.expect_shape), "; the tensor stays for a Recv that expects ",
          ShapeString(in.shape), " (or none)"));
    }
    if (in.rows > into.rows) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has ", in.rows, " rows; `into` holds only ", into.rows,
                       " (its shape is ", ShapeString(in.shape), "); the tensor stays"));
    }
    if (options.token_ids != nullptr && !in.token_ids.empty() &&
        static_cast<int64_t>(in.token_ids.size()) > options.token_ids_capacity) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, " came with ", in.token_ids.size(), " token ids; token_ids_into holds only ",
          options.token_ids_capacity, "; the tensor stays"));
    }
    // A client that gave up (its own deadline, or it died) may already reuse `into` for
    // something else: leave the tensor in the inbox for a retry instead of writing there.
    if (cancelled && cancelled()) {
      return absl::CancelledError(absl::StrCat(what, ": the caller cancelled the Recv"));
    }
    r = std::move(it->second);
    it->second.data.clear();  // moved out: the bytes leave with `r`
    inbox_bytes_ -= TensorBytes(r.data);
    EraseFromInbox(it);
    received_.insert(key);
  }
  FromF32(r.data, Tensor{into.data, r.rows, config_.d(), into.dtype});
  v1::RecvReply reply;
  reply.set_rows(static_cast<uint32_t>(r.rows));
  reply.set_cols(static_cast<uint32_t>(config_.d()));
  reply.mutable_shape()->Assign(r.shape.begin(), r.shape.end());
  reply.set_dtype(r.dtype);
  if (options.token_ids != nullptr && !r.token_ids.empty()) {
    std::copy(r.token_ids.begin(), r.token_ids.end(), options.token_ids);
    reply.set_has_token_ids(true);
  }
  absl::MutexLock l(&mu_);
  if (spare_inbox_.size() < kSpareBuffers) spare_inbox_.push_back(std::move(r.data));
  return reply;
}

// ---- steps ----

absl::Status BoundaryWorker::Step(uint64_t step, absl::Time deadline, absl::Duration timeout,
                                  v1::BoundaryStats* out) {
  const std::string where = absl::StrCat("boundary ", config_.id(), ": step ", step, ": ");
  bool closed;
  {
    // A retried Step (say, after its learning-signal wait timed out on a middle stage) skips
    // the boundaries it already closed.
    absl::MutexLock l(&mu_);
    closed = closed_step_.has_value() && *closed_step_ >= step;
  }
  if (closed) {
    if (absl::Status earlier = TakeStepError(); !earlier.ok()) return earlier;
    *out = stats();
    return absl::OkStatus();
  }
  // Everything the trainer sent in this step is encoded before the step closes.
  if (!Flush(deadline)) {
    return absl::DeadlineExceededError(
        absl::StrCat(where, "tensors sent in this step were not encoded within ",
                     absl::FormatDuration(timeout)));
  }
  if (absl::Status earlier = TakeStepError(); !earlier.ok()) return earlier;
  for (;;) {
    uint64_t seen;
    {
      absl::MutexLock l(&mu_);
      seen = signals_;
    }
    {
      absl::MutexLock el(&engine_mu_);
      if (engine_->ReadyToStep(step)) {
        absl::StatusOr<std::vector<v1::PeerMessage>> sent = engine_->Step(step);
        if (!sent.ok()) {
          return absl::Status(sent.status().code(), absl::StrCat(where, sent.status().message()));
        }
        SendAll(*std::move(sent));
        CloseStepTiming();
        break;
      }
    }
    // The downstream's learning signal for this step has not arrived yet: wait for it (and let
    // the decoder past a full inbox meanwhile: see awaited_).
    absl::MutexLock l(&mu_);
    const auto waiting = signal_waits_.insert(seen);
    cv_.SignalAll();
    bool timed_out = false;
    while (signals_ == seen && !stop_) {
      if (cv_.WaitWithDeadline(&mu_, deadline) && signals_ == seen) {
        timed_out = true;
        break;
      }
    }
    signal_waits_.erase(waiting);
    if (timed_out) {
      return absl::DeadlineExceededError(absl::StrCat(
          where, "the downstream's learning signal did not arrive within ",
          absl::FormatDuration(timeout), " (has the downstream trainer called Step(", step, ")?)"));
    }
    if (stop_) return absl::UnavailableError("mapld is shutting down");
  }
  {
    absl::MutexLock l(&mu_);
    closed_step_ = step;
    for (std::set<Key>* keys : {&sent_, &received_, &evaluation_received_}) {
      keys->erase(keys->begin(), keys->upper_bound(Key{step, UINT32_MAX}));
    }
    cv_.SignalAll();  // Recvs waiting for a tensor of the step fail now
    // Tensors of closed steps that the trainer never received would stay forever (and hold
    // room in the inbox that later steps need).
    int64_t stale = 0;
    for (auto it = inbox_.begin(); it != inbox_.end();) {
      if (it->first.first <= step) {
        inbox_bytes_ -= TensorBytes(it->second.data);
        it = inbox_.erase(it);
        ++stale;
      } else {
        ++it;
      }
    }
    if (stale > 0) {
      cv_.SignalAll();  // room for the decoder
      Log(LogLevel::kWarning, "dropped tensors of a closed step that were never received",
          {{"boundary", absl::StrCat(config_.id())},
           {"step", absl::StrCat(step)},
           {"count", absl::StrCat(stale)}});
    }
  }
  *out = stats();
  return absl::OkStatus();
}

absl::Status BoundaryWorker::TakeStepError() {
  absl::MutexLock l(&mu_);
  if (step_error_.ok()) return absl::OkStatus();
  const absl::Status earlier = std::exchange(step_error_, absl::OkStatus());
  return absl::Status(earlier.code(),
                      absl::StrCat("an earlier Send failed in the background: ", earlier.message(),
                                   " (the step is not closed: call Step again)"));
}

void BoundaryWorker::CloseStepTiming() {
  const int64_t microbatches = std::max(step_encoded_, step_decoded_);
  compute_seconds_per_microbatch_ = microbatches > 0 ? step_codec_seconds_ / microbatches : 0.0;
  LinkGoodput::Step link;
  {
    absl::MutexLock l(&link_mu_);
    const int64_t queued = transport_ != nullptr ? transport_->stats().queued_bytes() : 0;
    link = goodput_.EndStep(absl::Now(), queued);
  }
  // A step that kept the link idle says nothing new about it: the last measurement stands.
  if (link.goodput.has_value()) wire_goodput_ = *link.goodput;
  transport_queue_limit_ = TransportQueueLimit(options_, wire_goodput_);
  wire_seconds_per_microbatch_ =
      step_encoded_ > 0 && wire_goodput_ > 0.0
          ? static_cast<double>(link.bytes_handed) / step_encoded_ / wire_goodput_
          : 0.0;
  step_codec_seconds_ = 0.0;
  step_encoded_ = 0;
  step_decoded_ = 0;
}

void BoundaryWorker::Stop(absl::Time deadline) {
  {
    absl::MutexLock l(&mu_);
    if (stop_ && !encoder_.joinable() && !decoder_.joinable()) return;
  }
  if (!Flush(deadline)) {
    absl::MutexLock l(&mu_);
    Log(LogLevel::kWarning, "still encoding at the drain deadline; finishing them",
        {{"boundary", absl::StrCat(config_.id())}, {"queued", absl::StrCat(jobs_.size())}});
  }
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    cv_.SignalAll();  // wakes the threads, and Send, Recv and Step waiters (UNAVAILABLE)
  }
  if (encoder_.joinable()) encoder_.join();
  if (decoder_.joinable()) decoder_.join();
  {
    absl::MutexLock l(&link_mu_);
    link_stop_ = true;
  }
  if (link_monitor_.joinable()) link_monitor_.join();
}

v1::BoundaryState BoundaryWorker::SaveState() const {
  absl::MutexLock lock(&engine_mu_);
  return engine_->SaveState();
}

void BoundaryWorker::CountCheckpoint(bool written, absl::Time when) {
  absl::MutexLock lock(&engine_mu_);
  if (written) {
    ++checkpoints_written_;
    last_checkpoint_unix_seconds_ = absl::ToDoubleSeconds(when - absl::UnixEpoch());
  } else {
    ++checkpoint_failures_;
  }
}

absl::Status BoundaryWorker::RestoreState(const v1::BoundaryState& state) {
  MAPL_CHECK(transport_ == nullptr, "BoundaryWorker::RestoreState after Start");
  absl::MutexLock lock(&engine_mu_);
  return engine_->RestoreState(state);
}

v1::BoundaryStats BoundaryWorker::stats() const {
  v1::BoundaryStats s;
  {
    absl::MutexLock el(&engine_mu_);
    s = engine_->stats();
    s.set_compute_seconds_per_microbatch(compute_seconds_per_microbatch_);
    s.set_wire_seconds_per_microbatch(wire_seconds_per_microbatch_);
    s.set_wire_goodput_bytes_per_second(wire_goodput_);
    s.set_transport_queue_limit_bytes(static_cast<uint64_t>(transport_queue_limit_));
    s.set_checkpoints_written(checkpoints_written_);
    s.set_checkpoint_failures(checkpoint_failures_);
    s.set_last_checkpoint_unix_seconds(last_checkpoint_unix_seconds_);
  }
  {
    // The engine counts what reached it; NaN and Inf are refused here first.
    absl::MutexLock l(&mu_);
    s.set_nonfinite_inputs(s.nonfinite_inputs() + nonfinite_refused_);
    s.set_inbox_bytes(static_cast<uint64_t>(inbox_bytes_));
    s.set_inbox_entries(inbox_.size());
    s.set_inbox_tensors_dropped(inbox_dropped_);
    s.set_frames_decoded_nonfinite(decoded_nonfinite_);
    s.set_held_frames_expired(parked_expired_);
  }
  s.set_id(config_.id());
  s.set_role(config_.role() == v1::ROLE_UPSTREAM ? "upstream" : "downstream");
  if (transport_ != nullptr) *s.mutable_link() = transport_->stats();
  return s;
}

}  // namespace mapl
