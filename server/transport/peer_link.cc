// The peer link proper: sequencing, retention and acknowledgement, the handshake's checks, and one
// connection's reader and writer. Dialing is in peer_dialer.cc, the server side in peer_server.cc.
#include "server/transport/peer_link.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/check.h"
#include "common/log.h"
#include "google/protobuf/descriptor.h"
#include "server/transport/fingerprint.h"
#include "server/transport/peer_link_internal.h"
#ifdef MAPL_WITH_UCX
#include "server/transport/ucx/ucx_stream.h"
#endif

namespace mapl {
namespace {

// Heartbeat echoes queued beyond this are dropped (a peer flooding heartbeats gets fewer echoes).
constexpr size_t kMaxControlQueue = 16;

// Sequenced messages of at least this size are announced (Heartbeat.next_message_bytes).
constexpr int64_t kAnnounceBytes = 256 << 10;

bool IsSequenced(v1::PeerMessage::BodyCase body) {
  switch (body) {
    case v1::PeerMessage::kFrame:
    case v1::PeerMessage::kDictionaryDelta:
    case v1::PeerMessage::kDictionarySnapshot:
    case v1::PeerMessage::kSnapshotRequest:
    case v1::PeerMessage::kLearningSignal:
    case v1::PeerMessage::kStepMarker:
    case v1::PeerMessage::kFrameFailed:
      return true;
    case v1::PeerMessage::kHello:
    case v1::PeerMessage::kAck:
    case v1::PeerMessage::kHeartbeat:
    case v1::PeerMessage::BODY_NOT_SET:
      return false;
  }
  return false;  // A body case this build does not know (a newer peer's): not sequenced.
}

// Heartbeat times are on the steady clock: the RTT must not jump with the wall clock.
uint64_t MonotonicNanos() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

void AddTraffic(google::protobuf::Map<std::string, v1::Traffic>* by_body,
                v1::PeerMessage::BodyCase body, int64_t bytes) {
  v1::Traffic& t = (*by_body)[std::string(PeerBodyName(body))];
  t.set_messages(t.messages() + 1);
  t.set_bytes(t.bytes() + static_cast<uint64_t>(bytes));
}

}  // namespace

absl::string_view PeerBodyName(v1::PeerMessage::BodyCase body) {
  if (body == v1::PeerMessage::BODY_NOT_SET) return "none";
  const google::protobuf::FieldDescriptor* field =
      v1::PeerMessage::descriptor()->FindFieldByNumber(static_cast<int>(body));
  return field == nullptr ? absl::string_view("unknown") : absl::string_view(field->name());
}

// ---- construction and the public calls ----

PeerLink::PeerLink(Role role, const PeerLinkOptions& options, Handler handler)
    : role_(role), options_(options), handler_(std::move(handler)), instance_id_([] {
        absl::BitGen gen;
        uint64_t id = 0;
        while (id == 0) id = absl::Uniform<uint64_t>(gen);
        return id;
      }()) {
  absl::MutexLock lock(&mu_);
  stats_.set_data_plane(options_.data_plane == v1::DATA_PLANE_UCX ? "ucx" : "grpc");
  if (options_.send_rate_bytes_per_second > 0) {
    send_bucket_.emplace(options_.send_rate_bytes_per_second, options_.send_burst_bytes);
  }
}

PeerLink::~PeerLink() { Close(); }

absl::Status PeerLink::ValidateOptions(Role role, const PeerLinkOptions& o,
                                       const Handler& handler) {
  const std::string where = absl::StrCat("peer link for boundary ", o.boundary, ": ");
  auto invalid = [&where](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(where, what));
  };
  if (o.auth_token.empty()) return invalid("auth_token is required");
  if (o.heartbeat_interval <= absl::ZeroDuration()) {
    return invalid("heartbeat_interval must be positive");
  }
  if (o.peer_timeout <= o.heartbeat_interval) {
    return invalid("peer_timeout must exceed heartbeat_interval");
  }
  if (o.ack_every < 1) return invalid("ack_every must be >= 1");
  if (o.ack_delay < absl::ZeroDuration()) return invalid("ack_delay must not be negative");
  if (o.max_message_bytes <= 0) return invalid("max_message_bytes must be positive");
  if (o.close_grace < absl::ZeroDuration()) return invalid("close_grace must not be negative");
  if (!(o.min_goodput_bytes_per_second > 0)) {
    return invalid("min_goodput_bytes_per_second must be positive");
  }
  if (!(o.send_rate_bytes_per_second >= 0) || o.send_burst_bytes < 1) {
    return invalid("send_rate_bytes_per_second must be >= 0 and send_burst_bytes >= 1");
  }
  if (!handler) return invalid("a handler is required");
  // Either end may dial: the stage says which side of the boundary this end is, the role only
  // who opens the connection (a downstream behind NAT dials its upstream's listener).
  if (o.stage != o.boundary && o.stage != o.boundary + 1) {
    return invalid(absl::StrCat("stage must be ", o.boundary, " (upstream) or ", o.boundary + 1,
                                " (downstream), not ", o.stage));
  }
  if (o.data_plane != v1::DATA_PLANE_GRPC) {
    if (o.data_plane != v1::DATA_PLANE_UCX) {
      return invalid(absl::StrCat("unknown data_plane ", static_cast<int>(o.data_plane)));
    }
    if (!kUcxBuilt) {
      return invalid(
          "the UCX data plane is not in this build (configure with -DMAPL_WITH_UCX=ON and "
          "libucx-dev installed), so transport must be TRANSPORT_GRPC");
    }
    if (o.ucx.max_inflight_bytes < 1) return invalid("ucx max_inflight_bytes must be positive");
    for (const std::string& cidr : o.ucx.trusted_networks) {
      const absl::Status valid = ValidateCidr(cidr);
      if (!valid.ok()) return invalid(absl::StrCat("ucx trusted_networks: ", valid.message()));
    }
  }
  if (role == Role::kServer) return absl::OkStatus();
  if (o.address.empty()) return invalid("address is required");
  if (o.connect_timeout <= absl::ZeroDuration() || o.initial_backoff <= absl::ZeroDuration() ||
      o.max_backoff < o.initial_backoff) {
    return invalid("need connect_timeout > 0 and 0 < initial_backoff <= max_backoff");
  }
  if (!(o.backoff_jitter >= 0 && o.backoff_jitter < 1)) {
    return invalid("backoff_jitter must be in [0, 1)");
  }
  if (o.keepalive_time <= absl::ZeroDuration() || o.keepalive_timeout <= absl::ZeroDuration()) {
    return invalid("keepalive_time and keepalive_timeout must be positive");
  }
  return absl::OkStatus();
}

std::string PeerLink::Describe() const {
  // The role is named only where it is not the usual one (the upstream dials).
  const char* reversed = upstream() == (role_ == Role::kDialer) ? ""
                         : role_ == Role::kDialer               ? ", dialing"
                                                                : ", listening";
  return absl::StrCat("peer link for boundary ", options_.boundary,
                      upstream() ? " (upstream, stage " : " (downstream, stage ", options_.stage,
                      reversed, ")");
}

const char* PeerLink::PeerSide() const { return upstream() ? "downstream" : "upstream"; }

bool PeerLink::OnReaderThread() const { return reader_thread_ == std::this_thread::get_id(); }

absl::Time PeerLink::PeerDeadline() const {
  if (options_.peer_timeout == absl::InfiniteDuration() || in_handler_) {
    return absl::InfiniteFuture();
  }
  absl::Time deadline = last_received_ + options_.peer_timeout;
  if (announced_bytes_ > 0) {
    const double rate = std::max(options_.min_goodput_bytes_per_second, 0.5 * receive_goodput_);
    deadline = std::max(deadline, announced_at_ + options_.peer_timeout +
                                      absl::Seconds(static_cast<double>(announced_bytes_) / rate));
  }
  return deadline;
}

absl::Status PeerLink::Send(v1::PeerMessage msg) {
  const v1::PeerMessage::BodyCase body = msg.body_case();
  if (!IsSequenced(body)) {
    return absl::InvalidArgumentError(
        absl::StrCat(Describe(), ": Send takes frames, dictionary messages, learning signals and ",
                     "step markers, not '", PeerBodyName(body), "'"));
  }
  msg.set_protocol_version(kPeerProtocolVersion);
  // Moved, not copied: the retained message is the caller's, payload and all.
  auto shared = std::make_shared<v1::PeerMessage>(std::move(msg));
  absl::MutexLock lock(&mu_);
  if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
  shared->set_seq(next_seq_);
  const int64_t bytes = static_cast<int64_t>(shared->ByteSizeLong());
  if (bytes > options_.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(Describe(), ": a ", PeerBodyName(body), " of ",
                                                   bytes, " bytes exceeds max_message_bytes ",
                                                   options_.max_message_bytes));
  }
  stats_.set_last_seq(next_seq_++);
  retained_.push_back(Outgoing{std::move(shared), bytes});
  stats_.set_queued_messages(stats_.queued_messages() + 1);
  stats_.set_queued_bytes(stats_.queued_bytes() + static_cast<uint64_t>(bytes));
  return absl::OkStatus();
}

bool PeerLink::WaitQueueBelow(int64_t bytes, absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto below = [this, bytes]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return static_cast<int64_t>(stats_.queued_bytes()) < bytes;
  };
  return mu_.AwaitWithTimeout(absl::Condition(&below), timeout);
}

absl::Status PeerLink::WaitConnected(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto settled = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stats_.connected() || refused_ || closing_;
  };
  mu_.AwaitWithTimeout(absl::Condition(&settled), timeout);
  if (stats_.connected()) return absl::OkStatus();
  if (refused_ || unreachable_) return status_;
  if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
  return absl::DeadlineExceededError(
      absl::StrCat(Describe(), ": not connected after ", absl::FormatDuration(timeout),
                   status_.ok() ? std::string() : absl::StrCat(" (", status_.ToString(), ")")));
}

bool PeerLink::WaitDisconnected(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto down = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !stats_.connected(); };
  return mu_.AwaitWithTimeout(absl::Condition(&down), timeout);
}

bool PeerLink::connected() const {
  absl::MutexLock lock(&mu_);
  return stats_.connected();
}

absl::Status PeerLink::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

absl::Status PeerLink::Drain(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  const uint64_t target = next_seq_ - 1;
  auto drained = [this, target]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return retained_.empty() || retained_.front().msg->seq() > target || closing_;
  };
  mu_.AwaitWithTimeout(absl::Condition(&drained), timeout);
  int64_t left = 0;
  int64_t unwritten = 0;
  for (const Outgoing& o : retained_) {
    if (o.msg->seq() > target) break;
    ++left;
    if (o.msg->seq() >= next_write_seq_ || !stats_.connected()) ++unwritten;
  }
  if (left == 0) return absl::OkStatus();
  const std::string counts =
      absl::StrCat(left, " message(s) unacknowledged, ", unwritten, " of them not yet written");
  if (closing_) return absl::FailedPreconditionError(absl::StrCat(Describe(), " closed; ", counts));
  return absl::DeadlineExceededError(absl::StrCat(
      Describe(), ": drain timed out after ", absl::FormatDuration(timeout), " with ", counts,
      stats_.connected() ? std::string()
                         : absl::StrCat(" (not connected: ", status_.ToString(), ")")));
}

v1::LinkStats PeerLink::stats() const {
  absl::MutexLock lock(&mu_);
  v1::LinkStats stats = stats_;
  // The current connection's own counters join the record when it ends.
  if (active_session_ != nullptr) active_session_->stream->AddStats(&stats);
  return stats;
}

bool PeerLink::AwaitStats(const std::function<bool(const v1::LinkStats&)>& done,
                          absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto cond = [this, &done]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return done(stats_); };
  return mu_.AwaitWithTimeout(absl::Condition(&cond), timeout);
}

void PeerLink::BreakConnectionForTesting() {
  absl::MutexLock lock(&mu_);
  if (active_session_ == nullptr) return;
  active_session_->SetEnd(absl::UnavailableError(Describe() + ": connection broken for testing"));
  active_session_->stream->Cancel();
}

void PeerLink::Close() {
  {
    absl::MutexLock lock(&mu_);
    if (!closing_) {
      closing_ = true;
      Log(LogLevel::kInfo, "peer link closing", {{"link", Describe()}});
    }
    if (active_session_ != nullptr) {
      if (OnReaderThread()) {
        // Called from the handler: we cannot wait for ourselves. Cancel; the session ends as
        // soon as the handler returns.
        active_session_->SetEnd(absl::CancelledError(Describe() + " closed"));
        active_session_->stream->Cancel();
        return;
      }
      auto gone = [this]()
                      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return active_session_ == nullptr; };
      // The dialer half-closes and lets the listener end the stream; the server side can only
      // cancel (a handler ends its stream by returning, and ours is blocked reading).
      if (role_ == Role::kServer ||
          !mu_.AwaitWithTimeout(absl::Condition(&gone), options_.close_grace)) {
        if (active_session_ != nullptr) {
          active_session_->SetEnd(absl::CancelledError(Describe() + " closed"));
          active_session_->stream->Cancel();
        }
      }
      mu_.Await(absl::Condition(&gone));
    }
  }
  if (dial_thread_.joinable() && dial_thread_.get_id() != std::this_thread::get_id()) {
    dial_thread_.join();
  }
}

// ---- handshake ----

absl::Status PeerLink::CheckPeerHello(const v1::Hello& hello) const {
  const char* peer = PeerSide();
  if (hello.protocol_version() != kPeerProtocolVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat(Describe(), ": the ", peer, " speaks protocol version ",
                     hello.protocol_version(), ", this side ", kPeerProtocolVersion));
  }
  // Authenticate before saying anything about this side's configuration.
  if (!ConstantTimeEquals(hello.auth_token(), options_.auth_token)) {
    return absl::UnauthenticatedError(
        absl::StrCat(Describe(), ": the ", peer, "'s auth token does not match"));
  }
  if (hello.boundary() != options_.boundary) {
    return absl::FailedPreconditionError(
        absl::StrCat(Describe(), ": the ", peer, " serves boundary ", hello.boundary()));
  }
  // The other side of the boundary, whichever end dialed.
  const uint32_t expected_stage = upstream() ? options_.boundary + 1 : options_.boundary;
  if (hello.stage() != expected_stage) {
    return absl::FailedPreconditionError(absl::StrCat(
        Describe(), ": the ", peer, " says stage ", hello.stage(), ", expected ", expected_stage));
  }
  if (hello.instance_id() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(Describe(), ": the ", peer, "'s Hello has no instance_id"));
  }
  if (hello.data_plane() != options_.data_plane) {
    return absl::InvalidArgumentError(absl::StrCat(
        Describe(), ": the data planes differ: ", v1::DataPlane_Name(options_.data_plane),
        " here, ", v1::DataPlane_Name(hello.data_plane()), " at the ", peer,
        "; both ends of a boundary must set the same transport"));
  }
  if (options_.data_plane == v1::DATA_PLANE_UCX &&
      (hello.ucx_worker_address().empty() || hello.ucx_token().empty())) {
    return absl::InvalidArgumentError(absl::StrCat(
        Describe(), ": the ", peer, "'s Hello names the UCX data plane but carries no ",
        hello.ucx_worker_address().empty() ? "worker address" : "token"));
  }
  if (options_.fingerprint.has_value()) {
    if (!hello.has_fingerprint()) {
      return absl::InvalidArgumentError(absl::StrCat(
          Describe(), ": the ", peer, "'s Hello carries no config fingerprint to check"));
    }
    if (std::optional<FingerprintDifference> diff =
            FirstDifference(*options_.fingerprint, hello.fingerprint())) {
      return absl::InvalidArgumentError(
          absl::StrCat(Describe(), ": the boundary configs differ: ", diff->field, " = ", diff->a,
                       " here, ", diff->b, " at the ", peer,
                       "; both ends of a boundary must agree on ", FingerprintFields()));
    }
  }
  return absl::OkStatus();
}

absl::Status PeerLink::CheckDataPlanePeer(const std::string& peer_uri) const {
  if (options_.data_plane != v1::DATA_PLANE_UCX) return absl::OkStatus();
  bool untrusted = false;
  const absl::Status allowed = CheckUcxPeer(peer_uri, options_.ucx, &untrusted);
  if (!allowed.ok()) {
    return absl::Status(allowed.code(), absl::StrCat(Describe(), ": ", allowed.message()));
  }
  if (untrusted) {
    Log(LogLevel::kWarning,
        "UCX data plane to a peer on an untrusted network: its messages cross it in clear and "
        "unauthenticated (ucx.allow_untrusted_networks)",
        {{"link", Describe()}, {"peer", peer_uri}});
  }
  return absl::OkStatus();
}

std::unique_ptr<DataPlaneStream> PeerLink::NewDataPlane(PeerStream* control) const {
#ifdef MAPL_WITH_UCX
  if (options_.data_plane == v1::DATA_PLANE_UCX) {
    return std::make_unique<UcxStream>(control, role_ == Role::kDialer, options_.ucx,
                                       options_.max_message_bytes, Describe());
  }
#endif
  (void)control;
  MAPL_CHECK(options_.data_plane == v1::DATA_PLANE_GRPC,
             Describe() + ": a data plane this build lacks passed ValidateOptions");
  return nullptr;
}

absl::Status PeerLink::StartDataPlane(DataPlaneStream* data_plane, v1::PeerMessage* hello) const {
  if (data_plane == nullptr) return absl::OkStatus();
  const absl::Status started = data_plane->Start();
  if (!started.ok()) return started;
  hello->mutable_hello()->set_ucx_worker_address(data_plane->address());
  hello->mutable_hello()->set_ucx_token(data_plane->token());
  return absl::OkStatus();
}

void PeerLink::CountRejectedHello(const absl::Status& status, bool identity) {
  absl::MutexLock lock(&mu_);
  stats_.set_handshakes_rejected(stats_.handshakes_rejected() + 1);
  if (identity) stats_.set_identity_rejected(stats_.identity_rejected() + 1);
  if (!stats_.connected()) status_ = status;
  Log(LogLevel::kWarning, "peer link handshake rejected",
      {{"link", Describe()}, {"status", status.ToString()}});
}

void PeerLink::AdoptPeerInstance(const v1::Hello& hello, bool* reset, bool* restarted) {
  *reset = hello.instance_id() != peer_instance_id_;
  *restarted = *reset && peer_instance_id_ != 0;
  if (!*reset) return;
  if (*restarted) {
    stats_.set_peer_restarts(stats_.peer_restarts() + 1);
    Log(LogLevel::kWarning, "peer restarted; its sequence starts again at 1",
        {{"link", Describe()}, {"last_applied", absl::StrCat(last_applied_)}});
  }
  peer_instance_id_ = hello.instance_id();
  last_applied_ = 0;
  last_ack_sent_ = 0;
  applied_since_ack_ = 0;
  stats_.set_last_applied_seq(0);
}

v1::PeerMessage PeerLink::MakeHello(bool peer_instance_known) {
  v1::PeerMessage msg;
  msg.set_protocol_version(kPeerProtocolVersion);
  v1::Hello* hello = msg.mutable_hello();
  hello->set_protocol_version(kPeerProtocolVersion);
  hello->set_stage(options_.stage);
  hello->set_boundary(options_.boundary);
  hello->set_auth_token(options_.auth_token);
  hello->set_instance_id(instance_id_);
  hello->set_resume_from_seq(last_applied_ + 1);
  hello->set_resume_instance_id(peer_instance_known ? peer_instance_id_ : 0);
  if (options_.fingerprint.has_value()) *hello->mutable_fingerprint() = *options_.fingerprint;
  hello->set_data_plane(options_.data_plane);  // The caller adds the UCX address and token.
  return msg;
}

void PeerLink::DropRetainedThrough(uint64_t seq) {
  while (!retained_.empty() && retained_.front().msg->seq() <= seq) {
    const uint64_t bytes = static_cast<uint64_t>(retained_.front().bytes);
    MAPL_CHECK(
        stats_.queued_messages() >= 1 && stats_.queued_bytes() >= bytes,
        absl::StrCat(Describe(), ": queue counters (", stats_.queued_messages(), " messages, ",
                     stats_.queued_bytes(), " bytes) fell behind the retained messages"));
    stats_.set_queued_messages(stats_.queued_messages() - 1);
    stats_.set_queued_bytes(stats_.queued_bytes() - bytes);
    retained_.pop_front();
  }
}

absl::Status PeerLink::ApplyPeerResume(const v1::Hello& hello) {
  // Only the handshake calls this, and no writer runs then: the retained messages are ours.
  MAPL_CHECK(!stats_.connected(), Describe() + ": resume point applied while connected");
  const uint64_t first = retained_.empty() ? next_seq_ : retained_.front().msg->seq();
  if (hello.resume_instance_id() != instance_id_) {
    // The peer holds nothing of this sequence (first contact, or it restarted): what we still
    // hold is numbered afresh from 1.
    if (first != 1) {
      Log(LogLevel::kWarning, "peer starts afresh; renumbering unacknowledged messages from 1",
          {{"link", Describe()}, {"messages", absl::StrCat(retained_.size())}});
    }
    uint64_t seq = 1;
    uint64_t queued_bytes = 0;
    for (Outgoing& o : retained_) {
      o.msg->set_seq(seq++);
      o.bytes = static_cast<int64_t>(o.msg->ByteSizeLong());  // The seq's varint may shrink.
      queued_bytes += static_cast<uint64_t>(o.bytes);
    }
    stats_.set_queued_bytes(queued_bytes);
    next_seq_ = seq;
    next_write_seq_ = 1;
    highest_written_ = 0;
    stats_.set_last_seq(next_seq_ - 1);
    stats_.set_last_acked_seq(0);
    return absl::OkStatus();
  }
  const uint64_t from = hello.resume_from_seq();
  if (from < first || from > next_seq_) {
    return absl::DataLossError(absl::StrCat(Describe(), ": the peer resumes from seq ", from,
                                            " but this side holds seqs ", first, " to ",
                                            next_seq_ - 1));
  }
  DropRetainedThrough(from - 1);
  stats_.set_last_acked_seq(std::max(stats_.last_acked_seq(), from - 1));
  next_write_seq_ = from;
  return absl::OkStatus();
}

// ---- one connection ----

absl::Status PeerLink::RunSession(Session* session) {
  {
    absl::MutexLock lock(&mu_);
    MAPL_CHECK(active_session_ == session && !stats_.connected(),
               Describe() + ": a session runs that is not the link's only active one");
    stats_.set_connected(true);
    status_ = absl::OkStatus();
    refused_ = false;
    unreachable_ = false;
    stats_.set_connections(stats_.connections() + 1);
    stats_.set_reconnects(stats_.connections() - 1);
    const absl::Time now = absl::Now();
    next_heartbeat_ = now;  // The first heartbeat measures the RTT right away.
    last_received_ = now;
    announced_bytes_ = 0;
    in_handler_ = false;
    control_.clear();
    last_ack_sent_ = last_applied_;  // The peer's resume point already told it as much.
    applied_since_ack_ = 0;
    reader_thread_ = std::this_thread::get_id();
    Log(LogLevel::kInfo, "peer link connected",
        {{"link", Describe()},
         {"resend_from", absl::StrCat(next_write_seq_)},
         {"queued", absl::StrCat(retained_.size())}});
  }
  session->writer = std::thread([this, session] { WriterLoop(session); });
  // Liveness has its own thread: the reader may be blocked in Read and the writer in Write (a
  // peer that stopped granting flow-control window), and either way the bound must hold.
  std::thread watchdog([this, session] { WatchdogLoop(session); });

  absl::Status reason;
  while (true) {
    v1::PeerMessage msg;
    if (!session->stream->Read(&msg)) {
      // A stream that knows why it ended (the UCX data plane) logged it.
      reason = session->stream->ReadError();
      if (!reason.ok() && role_ == Role::kDialer) session->stream->Cancel();
      break;
    }
    reason = HandleIncoming(std::move(msg));
    if (!reason.ok()) {
      Log(LogLevel::kError, "peer link protocol error",
          {{"link", Describe()}, {"status", reason.ToString()}});
      // The dialer must cancel (its Finish would wait for the server); the server ends the
      // stream with `reason` by returning it.
      if (role_ == Role::kDialer) session->stream->Cancel();
      break;
    }
  }
  {
    absl::MutexLock lock(&mu_);
    if (!reason.ok()) session->SetEnd(reason);
    session->stop = true;
    // The writer finishes the message it is writing; one stuck on a peer that stopped reading is
    // cut off.
    if (!mu_.AwaitWithTimeout(absl::Condition(&session->writer_done), options_.close_grace)) {
      session->stream->Cancel();
    }
  }
  session->writer.join();
  watchdog.join();
  absl::MutexLock lock(&mu_);
  stats_.set_connected(false);
  stats_.set_disconnects(stats_.disconnects() + 1);
  reader_thread_ = std::thread::id();
  return session->end_status;
}

void PeerLink::CountSent(const v1::PeerMessage& msg, int64_t bytes) {
  AddTraffic(stats_.mutable_sent(), msg.body_case(), bytes);
  stats_.set_messages_sent(stats_.messages_sent() + 1);
  stats_.set_bytes_sent(stats_.bytes_sent() + static_cast<uint64_t>(bytes));
  if (msg.has_ack()) stats_.set_acks_sent(stats_.acks_sent() + 1);
  if (msg.has_heartbeat()) stats_.set_heartbeats_sent(stats_.heartbeats_sent() + 1);
  if (msg.seq() != 0) {
    // Counted once written, so a message taken but cut off before its write is no resend.
    if (msg.seq() <= highest_written_) {
      stats_.set_resent(stats_.resent() + 1);
    } else {
      highest_written_ = msg.seq();
    }
  }
}

void PeerLink::CountReceived(v1::PeerMessage::BodyCase body, int64_t bytes) {
  AddTraffic(stats_.mutable_received(), body, bytes);
  stats_.set_messages_received(stats_.messages_received() + 1);
  stats_.set_bytes_received(stats_.bytes_received() + static_cast<uint64_t>(bytes));
}

const v1::PeerMessage* PeerLink::NextToWrite(absl::Time now, v1::PeerMessage* control,
                                             std::shared_ptr<const v1::PeerMessage>* sequenced,
                                             int64_t* bytes, absl::Time* wake) {
  // Control first: acks and echoes are small and their delay distorts the peer's view.
  if (!control_.empty()) {
    *control = std::move(control_.front());
    control_.pop_front();
    *bytes = static_cast<int64_t>(control->ByteSizeLong());
    return control;
  }
  const bool ack_due =
      last_applied_ > last_ack_sent_ &&
      (applied_since_ack_ >= options_.ack_every || now >= first_unacked_ + options_.ack_delay);
  if (ack_due) {
    control->set_protocol_version(kPeerProtocolVersion);
    control->mutable_ack()->set_seq(last_applied_);
    last_ack_sent_ = last_applied_;
    applied_since_ack_ = 0;
    *bytes = static_cast<int64_t>(control->ByteSizeLong());
    return control;
  }
  if (now >= next_heartbeat_) {
    control->set_protocol_version(kPeerProtocolVersion);
    control->mutable_heartbeat()->set_send_time_ns(MonotonicNanos());
    next_heartbeat_ = now + options_.heartbeat_interval;
    *bytes = static_cast<int64_t>(control->ByteSizeLong());
    return control;
  }
  if (next_write_seq_ < next_seq_) {
    MAPL_CHECK(!retained_.empty() && retained_.front().msg->seq() <= next_write_seq_ &&
                   retained_.back().msg->seq() == next_seq_ - 1,
               absl::StrCat(Describe(), ": seq ", next_write_seq_,
                            " is due to be written but not retained"));
    const Outgoing& o = retained_[next_write_seq_ - retained_.front().msg->seq()];
    *sequenced = o.msg;
    *bytes = o.bytes;
    ++next_write_seq_;
    return sequenced->get();
  }
  *wake = next_heartbeat_;
  if (last_applied_ > last_ack_sent_) *wake = std::min(*wake, first_unacked_ + options_.ack_delay);
  return nullptr;
}

void PeerLink::WatchdogLoop(Session* session) {
  absl::MutexLock lock(&mu_);
  while (!session->stop) {
    const absl::Time now = absl::Now();
    if (now > PeerDeadline()) {
      session->SetEnd(absl::UnavailableError(absl::StrCat(
          Describe(), ": nothing received from the peer for ",
          absl::FormatDuration(now - last_received_),
          announced_bytes_ > 0
              ? absl::StrCat(" (it announced a message of ", announced_bytes_, " bytes)")
              : std::string())));
      session->stream->Cancel();
      return;
    }
    // Wakes at the deadline, or sooner to follow a deadline that moved (a message arrived).
    mu_.AwaitWithDeadline(
        absl::Condition(&session->stop),
        std::min(PeerDeadline(), now + options_.heartbeat_interval) + absl::Milliseconds(1));
  }
}

void PeerLink::WriterLoop(Session* session) {
  mu_.Lock();
  bool half_close = false;
  while (true) {
    if (session->stop) break;
    if (closing_) {
      half_close = role_ == Role::kDialer;
      break;
    }
    const absl::Time now = absl::Now();
    v1::PeerMessage control;
    std::shared_ptr<const v1::PeerMessage> sequenced;
    int64_t bytes = 0;
    absl::Time wake = absl::InfiniteFuture();
    const v1::PeerMessage* out = NextToWrite(now, &control, &sequenced, &bytes, &wake);
    if (out == nullptr) {
      // Also wake when a first unacknowledged message arrives after `wake` was computed: its ack
      // deadline may come sooner.
      auto work = [this, session, wake]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return session->stop || closing_ || !control_.empty() ||
               applied_since_ack_ >= options_.ack_every || next_write_seq_ < next_seq_ ||
               (applied_since_ack_ > 0 && first_unacked_ + options_.ack_delay < wake);
      };
      mu_.AwaitWithDeadline(absl::Condition(&work), wake);
      continue;
    }
    if (send_bucket_.has_value()) {
      // Over time the writes average the rate; a message larger than the burst still goes
      // through, after the rate has paid for it.
      const absl::Duration wait = send_bucket_->Take(bytes, now);
      if (wait > absl::ZeroDuration()) {
        auto stopping = [session, this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return session->stop || closing_;
        };
        // A message taken from the queue but not written stays retained (unacknowledged) and is
        // written on the next connection, so stopping here loses nothing.
        if (mu_.AwaitWithDeadline(absl::Condition(&stopping), now + wait)) continue;
      }
    }
    // A large message takes the peer a while to receive, with nothing else arriving meanwhile:
    // announce its size first, so the peer's liveness bound allows for it.
    v1::PeerMessage announce;
    int64_t announce_bytes = 0;
    if (sequenced != nullptr && bytes >= kAnnounceBytes) {
      announce.set_protocol_version(kPeerProtocolVersion);
      announce.mutable_heartbeat()->set_send_time_ns(MonotonicNanos());
      announce.mutable_heartbeat()->set_next_message_bytes(static_cast<uint64_t>(bytes));
      announce_bytes = static_cast<int64_t>(announce.ByteSizeLong());
    }
    mu_.Unlock();
    const bool ok =
        (announce_bytes == 0 || session->stream->Write(announce)) && session->stream->Write(*out);
    mu_.Lock();
    if (!ok) {
      session->SetEnd(absl::UnavailableError(Describe() + ": write failed: connection lost"));
      break;
    }
    if (announce_bytes > 0) CountSent(announce, announce_bytes);
    CountSent(*out, bytes);
  }
  mu_.Unlock();
  if (half_close) session->stream->WritesDone();
  absl::MutexLock lock(&mu_);
  session->writer_done = true;
}

absl::Status PeerLink::HandleIncoming(v1::PeerMessage msg) {
  const v1::PeerMessage::BodyCase body = msg.body_case();
  const uint64_t seq = msg.seq();
  const int64_t bytes = static_cast<int64_t>(msg.ByteSizeLong());
  {
    absl::MutexLock lock(&mu_);
    last_received_ = absl::Now();
    CountReceived(body, bytes);
    if (msg.protocol_version() != kPeerProtocolVersion) {
      return absl::FailedPreconditionError(
          absl::StrCat(Describe(), ": received a message of protocol version ",
                       msg.protocol_version(), ", this side speaks ", kPeerProtocolVersion));
    }
    if (body == v1::PeerMessage::kAck) {
      stats_.set_acks_received(stats_.acks_received() + 1);
      const uint64_t acked = msg.ack().seq();
      if (acked >= next_write_seq_) {
        return absl::InvalidArgumentError(absl::StrCat(Describe(), ": the peer acknowledged seq ",
                                                       acked, " but only seqs up to ",
                                                       next_write_seq_ - 1, " were written"));
      }
      DropRetainedThrough(acked);
      stats_.set_last_acked_seq(std::max(stats_.last_acked_seq(), acked));
      return absl::OkStatus();
    }
    if (body == v1::PeerMessage::kHeartbeat) {
      stats_.set_heartbeats_received(stats_.heartbeats_received() + 1);
      if (msg.heartbeat().next_message_bytes() > 0) {
        announced_bytes_ = msg.heartbeat().next_message_bytes();
        announced_at_ = last_received_;
      }
      const uint64_t now_ns = MonotonicNanos();
      if (msg.heartbeat().echo_time_ns() == 0) {
        if (control_.size() < kMaxControlQueue) {
          v1::PeerMessage echo;
          echo.set_protocol_version(kPeerProtocolVersion);
          echo.mutable_heartbeat()->set_send_time_ns(now_ns);
          echo.mutable_heartbeat()->set_echo_time_ns(msg.heartbeat().send_time_ns());
          control_.push_back(std::move(echo));
        }
      } else if (msg.heartbeat().echo_time_ns() <= now_ns) {
        stats_.set_last_rtt_seconds(static_cast<double>(now_ns - msg.heartbeat().echo_time_ns()) *
                                    1e-9);
      }
      return absl::OkStatus();
    }
    if (!IsSequenced(body)) {
      return absl::InvalidArgumentError(absl::StrCat(
          Describe(), ": unexpected '", PeerBodyName(body), "' message (seq ", seq, ")"));
    }
    if (seq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(Describe(), ": a '", PeerBodyName(body), "' without a seq"));
    }
    if (announced_bytes_ > 0) {
      // The announced message arrived: its transfer time measures the goodput that later
      // announcements are allowed at.
      const double seconds = absl::ToDoubleSeconds(last_received_ - announced_at_);
      if (seconds > 1e-3) {
        const double rate = static_cast<double>(announced_bytes_) / seconds;
        receive_goodput_ = receive_goodput_ == 0 ? rate : 0.5 * (receive_goodput_ + rate);
      }
      announced_bytes_ = 0;
    }
    if (seq <= last_applied_) {
      stats_.set_duplicates_dropped(stats_.duplicates_dropped() + 1);
      return absl::OkStatus();
    }
    if (seq != last_applied_ + 1) {
      return absl::DataLossError(
          absl::StrCat(Describe(), ": expected seq ", last_applied_ + 1, ", received ", seq));
    }
  }
  {
    absl::MutexLock lock(&mu_);
    in_handler_ = true;  // The peer's silence only counts while this side reads.
  }
  handler_(std::move(msg));  // The handler owns the message (and its payload) from here.
  absl::MutexLock lock(&mu_);
  in_handler_ = false;
  last_received_ = std::max(last_received_, absl::Now());
  last_applied_ = seq;
  stats_.set_last_applied_seq(seq);
  if (applied_since_ack_++ == 0) first_unacked_ = absl::Now();
  return absl::OkStatus();
}

}  // namespace mapl
