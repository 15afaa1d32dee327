// The peer link: PeerLink (one end of one boundary's stream) and PeerServer (the downstream's
// Peer service). See peer_link.h for the contract.
#include "server/transport/peer_link.h"

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

#include "absl/memory/memory.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "google/protobuf/descriptor.h"
#include "common/log.h"

namespace mapl {
namespace {

// How often a dialer waiting for the channel checks whether it is being closed.
constexpr absl::Duration kChannelPollSlice = absl::Milliseconds(50);
// Heartbeat echoes queued beyond this are dropped (a peer flooding heartbeats gets fewer echoes).
constexpr size_t kMaxControlQueue = 16;

bool IsSequenced(v1::PeerMessage::BodyCase body) {
  switch (body) {
    case v1::PeerMessage::kFrame:
    case v1::PeerMessage::kDictionaryDelta:
    case v1::PeerMessage::kDictionarySnapshot:
    case v1::PeerMessage::kSnapshotRequest:
    case v1::PeerMessage::kLearningSignal:
    case v1::PeerMessage::kStepMarker:
      return true;
    case v1::PeerMessage::kHello:
    case v1::PeerMessage::kAck:
    case v1::PeerMessage::kHeartbeat:
    case v1::PeerMessage::BODY_NOT_SET:
      return false;
  }
  return false;
}

// Codes after which redialing cannot help: the peer refused us, or we refused it.
bool IsPermanent(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kAborted:  // Superseded by another dialer for the same boundary.
    case absl::StatusCode::kResourceExhausted:
      return true;
    default:
      return false;
  }
}

uint64_t MonotonicNanos() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// Takes time that depends only on expected's length, not on where the inputs differ.
bool ConstantTimeEquals(absl::string_view given, absl::string_view expected) {
  unsigned char diff = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= static_cast<unsigned char>(g ^ static_cast<unsigned char>(expected[i]));
  }
  return diff == 0;
}

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status WithPrefix(absl::string_view prefix, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

const char* ChannelStateName(grpc_connectivity_state state) {
  switch (state) {
    case GRPC_CHANNEL_IDLE:
      return "IDLE";
    case GRPC_CHANNEL_CONNECTING:
      return "CONNECTING";
    case GRPC_CHANNEL_READY:
      return "READY";
    case GRPC_CHANNEL_TRANSIENT_FAILURE:
      return "TRANSIENT_FAILURE";
    case GRPC_CHANNEL_SHUTDOWN:
      return "SHUTDOWN";
  }
  return "?";
}

int ToMillis(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), 1 << 30));
}

absl::Status ValidateCommon(const PeerLinkOptions& o) {
  const std::string where = absl::StrCat("peer link for boundary ", o.boundary, ": ");
  if (o.auth_token.empty()) return absl::InvalidArgumentError(where + "auth_token is required");
  if (o.heartbeat_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(where + "heartbeat_interval must be positive");
  }
  if (o.peer_timeout <= o.heartbeat_interval) {
    return absl::InvalidArgumentError(where + "peer_timeout must exceed heartbeat_interval");
  }
  if (o.ack_every < 1) return absl::InvalidArgumentError(where + "ack_every must be >= 1");
  if (o.ack_delay < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(where + "ack_delay must not be negative");
  }
  if (o.max_message_bytes <= 0) {
    return absl::InvalidArgumentError(where + "max_message_bytes must be positive");
  }
  if (o.close_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(where + "close_grace must not be negative");
  }
  if (!(o.send_rate_bytes_per_second >= 0) || o.send_burst_bytes < 1) {
    return absl::InvalidArgumentError(
        where + "send_rate_bytes_per_second must be >= 0 and send_burst_bytes >= 1");
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view PeerBodyName(v1::PeerMessage::BodyCase body) {
  if (body == v1::PeerMessage::BODY_NOT_SET) return "none";
  const google::protobuf::FieldDescriptor* field =
      v1::PeerMessage::descriptor()->FindFieldByNumber(static_cast<int>(body));
  return field == nullptr ? absl::string_view("unknown") : absl::string_view(field->name());
}

// ---- streams: the two sides of a gRPC bidi stream behind one interface ----

class PeerLink::Stream {
 public:
  virtual ~Stream() = default;
  virtual bool Read(v1::PeerMessage* msg) = 0;
  virtual bool Write(const v1::PeerMessage& msg) = 0;
  // Client: half-close (the peer reads a clean end). Server: nothing (the handler's return ends
  // the stream).
  virtual void WritesDone() = 0;
  // Unblocks Read and Write from any thread; the stream is dead afterwards.
  virtual void Cancel() = 0;
};

class PeerLink::ClientStream final : public PeerLink::Stream {
 public:
  ClientStream(grpc::ClientContext* context,
               grpc::ClientReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream)
      : context_(context), stream_(stream) {}
  bool Read(v1::PeerMessage* msg) override { return stream_->Read(msg); }
  bool Write(const v1::PeerMessage& msg) override { return stream_->Write(msg); }
  void WritesDone() override { stream_->WritesDone(); }
  void Cancel() override { context_->TryCancel(); }

 private:
  grpc::ClientContext* const context_;
  grpc::ClientReaderWriter<v1::PeerMessage, v1::PeerMessage>* const stream_;
};

class PeerLink::ServerStream final : public PeerLink::Stream {
 public:
  ServerStream(grpc::ServerContext* context,
               grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream)
      : context_(context), stream_(stream) {}
  bool Read(v1::PeerMessage* msg) override { return stream_->Read(msg); }
  bool Write(const v1::PeerMessage& msg) override { return stream_->Write(msg); }
  void WritesDone() override {}
  void Cancel() override { context_->TryCancel(); }

 private:
  grpc::ServerContext* const context_;
  grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* const stream_;
};

// One connection. Lives on the stack of the thread that runs it (the dialer's connection thread or
// a gRPC handler thread); the link points at it (active_session_) while it runs. Fields other than
// `stream` and `writer` are guarded by the link's mu_.
struct PeerLink::Session {
  explicit Session(Stream* s) : stream(s) {}
  Stream* const stream;
  bool stop = false;         // Tells the writer to finish.
  bool writer_done = false;  // The writer has left its loop.
  absl::Status end_status;   // This side's first reason for ending the connection.
  std::thread writer;

  void SetEnd(const absl::Status& status) {
    if (end_status.ok()) end_status = status;
  }
};

// ---- PeerLink ----

PeerLink::PeerLink(Role role, const PeerLinkOptions& options, Handler handler)
    : role_(role), options_(options), handler_(std::move(handler)), instance_id_([] {
        absl::BitGen gen;
        uint64_t id = 0;
        while (id == 0) id = absl::Uniform<uint64_t>(gen);
        return id;
      }()) {}

PeerLink::~PeerLink() { Close(); }

absl::StatusOr<std::unique_ptr<PeerLink>> PeerLink::Dial(const PeerLinkOptions& options,
                                                         Handler handler) {
  absl::Status valid = ValidateCommon(options);
  if (!valid.ok()) return valid;
  const std::string where = absl::StrCat("peer link for boundary ", options.boundary, ": ");
  if (options.stage != options.boundary) {
    return absl::InvalidArgumentError(absl::StrCat(where,
                                                   "the dialing (upstream) side must be stage ",
                                                   options.boundary, ", not ", options.stage));
  }
  if (options.address.empty()) return absl::InvalidArgumentError(where + "address is required");
  if (options.connect_timeout <= absl::ZeroDuration() ||
      options.initial_backoff <= absl::ZeroDuration() ||
      options.max_backoff < options.initial_backoff) {
    return absl::InvalidArgumentError(
        where + "need connect_timeout > 0 and 0 < initial_backoff <= max_backoff");
  }
  if (!handler) return absl::InvalidArgumentError(where + "a handler is required");

  auto link = absl::WrapUnique(new PeerLink(Role::kDialer, options, std::move(handler)));
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  // The channel's own reconnect backoff decides how soon a downstream that starts late is seen.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, ToMillis(options.initial_backoff));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, ToMillis(options.max_backoff));
  // One TCP connection per link, not one shared by every link to the same downstream.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  link->channel_ =
      grpc::CreateCustomChannel(options.address,
                                options.channel_credentials ? options.channel_credentials
                                                            : grpc::InsecureChannelCredentials(),
                                args);
  link->stub_ = v1::Peer::NewStub(link->channel_);
  PeerLink* raw = link.get();
  link->dial_thread_ = std::thread([raw] { raw->DialLoop(); });
  return link;
}

std::string PeerLink::Describe() const {
  return absl::StrCat("peer link for boundary ", options_.boundary,
                      role_ == Role::kDialer ? " (upstream, stage " : " (downstream, stage ",
                      options_.stage, ")");
}

bool PeerLink::OnReaderThread() const { return reader_thread_ == std::this_thread::get_id(); }

absl::Status PeerLink::Send(v1::PeerMessage msg) {
  const v1::PeerMessage::BodyCase body = msg.body_case();
  if (!IsSequenced(body)) {
    return absl::InvalidArgumentError(
        absl::StrCat(Describe(), ": Send takes frames, dictionary messages, learning signals and ",
                     "step markers, not '", PeerBodyName(body), "'"));
  }
  msg.set_protocol_version(kPeerProtocolVersion);
  auto shared = std::make_shared<v1::PeerMessage>(std::move(msg));
  absl::MutexLock lock(&mu_);
  if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
  if (failed_) return status_;
  shared->set_seq(next_seq_);
  const int64_t bytes = static_cast<int64_t>(shared->ByteSizeLong());
  if (bytes > options_.max_message_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(Describe(), ": a ", PeerBodyName(body), " of ",
                                                   bytes, " bytes exceeds max_message_bytes ",
                                                   options_.max_message_bytes));
  }
  stats_.last_seq = next_seq_++;
  retained_.push_back(Outgoing{std::move(shared), bytes});
  ++stats_.queued_messages;
  stats_.queued_bytes += bytes;
  return absl::OkStatus();
}

absl::Status PeerLink::WaitConnected(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto settled = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return connected_ || failed_ || closing_;
  };
  mu_.AwaitWithTimeout(absl::Condition(&settled), timeout);
  if (connected_) return absl::OkStatus();
  if (failed_) return status_;
  if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
  return absl::DeadlineExceededError(
      absl::StrCat(Describe(), ": not connected after ", absl::FormatDuration(timeout),
                   status_.ok() ? std::string() : absl::StrCat(" (", status_.ToString(), ")")));
}

bool PeerLink::WaitDisconnected(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  auto down = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !connected_; };
  return mu_.AwaitWithTimeout(absl::Condition(&down), timeout);
}

bool PeerLink::connected() const {
  absl::MutexLock lock(&mu_);
  return connected_;
}

absl::Status PeerLink::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

absl::Status PeerLink::Drain(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  const uint64_t target = next_seq_ - 1;
  auto drained = [this, target]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return retained_.empty() || retained_.front().msg->seq() > target || failed_ || closing_;
  };
  mu_.AwaitWithTimeout(absl::Condition(&drained), timeout);
  int64_t left = 0;
  int64_t unwritten = 0;
  for (const Outgoing& o : retained_) {
    if (o.msg->seq() > target) break;
    ++left;
    if (o.msg->seq() >= next_write_seq_ || !connected_) ++unwritten;
  }
  if (left == 0) return absl::OkStatus();
  const std::string counts =
      absl::StrCat(left, " message(s) unacknowledged, ", unwritten, " of them not yet written");
  if (failed_) return absl::Status(status_.code(), absl::StrCat(status_.message(), "; ", counts));
  if (closing_) return absl::FailedPreconditionError(absl::StrCat(Describe(), " closed; ", counts));
  return absl::DeadlineExceededError(absl::StrCat(
      Describe(), ": drain timed out after ", absl::FormatDuration(timeout), " with ", counts,
      connected_ ? std::string() : absl::StrCat(" (not connected: ", status_.ToString(), ")")));
}

PeerLinkStats PeerLink::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

bool PeerLink::AwaitStats(const std::function<bool(const PeerLinkStats&)>& done,
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
      // The dialer half-closes and lets the downstream end the stream; the server side can only
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
  const char* peer = role_ == Role::kDialer ? "downstream" : "upstream";
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
  const uint32_t expected_stage =
      role_ == Role::kDialer ? options_.boundary + 1 : options_.boundary;
  if (hello.stage() != expected_stage) {
    return absl::FailedPreconditionError(absl::StrCat(
        Describe(), ": the ", peer, " says stage ", hello.stage(), ", expected ", expected_stage));
  }
  if (hello.instance_id() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(Describe(), ": the ", peer, "'s Hello has no instance_id"));
  }
  return absl::OkStatus();
}

void PeerLink::CountRejectedHello(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  ++stats_.handshakes_rejected;
  if (!connected_ && !failed_) status_ = status;
  Log(LogLevel::kWarning, "peer link handshake rejected",
      {{"link", Describe()}, {"status", status.ToString()}});
}

void PeerLink::AdoptPeerInstance(const v1::Hello& hello, bool* reset) {
  *reset = hello.instance_id() != peer_instance_id_;
  if (!*reset) return;
  if (peer_instance_id_ != 0) {
    ++stats_.peer_restarts;
    Log(LogLevel::kWarning, "peer restarted; its sequence starts again at 1",
        {{"link", Describe()}, {"last_applied", absl::StrCat(last_applied_)}});
  }
  peer_instance_id_ = hello.instance_id();
  last_applied_ = 0;
  last_ack_sent_ = 0;
  applied_since_ack_ = 0;
  stats_.last_applied_seq = 0;
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
  return msg;
}

absl::Status PeerLink::ApplyPeerResume(const v1::Hello& hello) {
  const uint64_t first = retained_.empty() ? next_seq_ : retained_.front().msg->seq();
  if (hello.resume_instance_id() != instance_id_) {
    // The peer holds nothing of this sequence (first contact, or it restarted): what we still
    // hold is numbered afresh from 1. No writer runs during the handshake, so this is safe.
    if (first != 1) {
      Log(LogLevel::kWarning, "peer starts afresh; renumbering unacknowledged messages from 1",
          {{"link", Describe()}, {"messages", absl::StrCat(retained_.size())}});
    }
    uint64_t seq = 1;
    for (Outgoing& o : retained_) o.msg->set_seq(seq++);
    next_seq_ = seq;
    next_write_seq_ = 1;
    highest_written_ = 0;
    stats_.last_seq = next_seq_ - 1;
    stats_.last_acked_seq = 0;
    return absl::OkStatus();
  }
  const uint64_t from = hello.resume_from_seq();
  if (from < first || from > next_seq_) {
    return absl::DataLossError(absl::StrCat(Describe(), ": the peer resumes from seq ", from,
                                            " but this side holds seqs ", first, " to ",
                                            next_seq_ - 1));
  }
  while (!retained_.empty() && retained_.front().msg->seq() < from) {
    --stats_.queued_messages;
    stats_.queued_bytes -= retained_.front().bytes;
    retained_.pop_front();
  }
  stats_.last_acked_seq = std::max(stats_.last_acked_seq, from - 1);
  next_write_seq_ = from;
  return absl::OkStatus();
}

// ---- dialer ----

void PeerLink::DialLoop() {
  absl::Time deadline = absl::Now() + options_.connect_timeout;
  absl::Duration backoff = options_.initial_backoff;
  while (true) {
    bool established = false;
    const absl::Status result = DialOnce(deadline, &established);
    absl::MutexLock lock(&mu_);
    if (closing_) return;
    if (established) {
      // A new window to reconnect in, starting now.
      deadline = absl::Now() + options_.connect_timeout;
      backoff = options_.initial_backoff;
    }
    if (IsPermanent(result.code())) {
      Fail(result);
      return;
    }
    if (!connected_) status_ = result;
    if (absl::Now() >= deadline) {
      Fail(absl::UnavailableError(absl::StrCat(
          Describe(), ": could not connect to ", options_.address, " within ",
          absl::FormatDuration(options_.connect_timeout), "; last error: ", result.ToString())));
      return;
    }
    mu_.AwaitWithDeadline(absl::Condition(&closing_), std::min(deadline, absl::Now() + backoff));
    if (closing_) return;
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

absl::Status PeerLink::WaitChannelReady(absl::Time deadline) {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (closing_) return absl::CancelledError(Describe() + " closed");
    }
    const grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/true);
    if (state == GRPC_CHANNEL_READY) return absl::OkStatus();
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::UnavailableError(absl::StrCat(Describe(), ": no connection to ",
                                                 options_.address, " (channel ",
                                                 ChannelStateName(state), ")"));
    }
    channel_->WaitForStateChange(state,
                                 absl::ToChronoTime(std::min(deadline, now + kChannelPollSlice)));
  }
}

absl::Status PeerLink::DialOnce(absl::Time deadline, bool* established) {
  absl::Status ready = WaitChannelReady(deadline);
  if (!ready.ok()) return ready;

  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::PeerMessage, v1::PeerMessage>> rw =
      stub_->Link(&context);
  ClientStream stream(&context, rw.get());
  Session session(&stream);
  v1::PeerMessage hello;
  {
    absl::MutexLock lock(&mu_);
    if (closing_) {
      context.TryCancel();
      rw->Finish();
      return absl::CancelledError(Describe() + " closed");
    }
    active_session_ = &session;  // From here Close can cancel us.
    hello = MakeHello(/*peer_instance_known=*/true);
  }

  absl::Status result;
  v1::PeerMessage reply;
  if (!rw->Write(hello) || !rw->Read(&reply)) {
    // Turned away (the server's status says why: NOT_FOUND, UNAUTHENTICATED...) or no
    // connection after all.
    result = FromGrpc(rw->Finish());
    if (result.ok()) result = absl::UnavailableError("stream ended before the Hello exchange");
    result =
        WithPrefix(absl::StrCat(Describe(), ": ", options_.address, " refused the link: "), result);
    if (IsPermanent(result.code())) {
      Log(LogLevel::kError, "peer link refused by the downstream", {{"status", result.ToString()}});
    }
  } else {
    if (reply.protocol_version() != kPeerProtocolVersion) {
      result = absl::FailedPreconditionError(
          absl::StrCat(Describe(), ": the downstream speaks protocol version ",
                       reply.protocol_version(), ", this side ", kPeerProtocolVersion));
    } else if (!reply.has_hello()) {
      result = absl::FailedPreconditionError(
          absl::StrCat(Describe(), ": the downstream's first message is a '",
                       PeerBodyName(reply.body_case()), "', not a Hello"));
    } else {
      result = CheckPeerHello(reply.hello());
    }
    if (!result.ok()) {
      CountRejectedHello(result);
    } else {
      absl::MutexLock lock(&mu_);
      bool reset = false;
      AdoptPeerInstance(reply.hello(), &reset);
      result = ApplyPeerResume(reply.hello());
    }
    if (!result.ok()) {
      context.TryCancel();
      rw->Finish();
    } else {
      *established = true;
      const absl::Status reason = RunSession(&session);
      const absl::Status finish = FromGrpc(rw->Finish());
      result = !reason.ok()  ? reason
               : finish.ok() ? absl::CancelledError(Describe() + ": stream ended")
                             : WithPrefix(absl::StrCat(Describe(), ": connection to ",
                                                       options_.address, " ended: "),
                                          finish);
    }
  }

  absl::MutexLock lock(&mu_);
  active_session_ = nullptr;
  if (*established) {
    status_ = closing_ ? absl::CancelledError(Describe() + " closed") : result;
    Log(closing_ ? LogLevel::kInfo : LogLevel::kWarning, "peer link disconnected",
        {{"link", Describe()}, {"status", status_.ToString()}});
  }
  return result;
}

void PeerLink::Fail(const absl::Status& status) {
  failed_ = true;
  status_ = status;
  Log(LogLevel::kError, "peer link failed", {{"link", Describe()}, {"status", status.ToString()}});
}

// ---- server side ----

absl::Status PeerLink::ServeStream(grpc::ServerContext* context,
                                   grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* rw,
                                   const v1::Hello& hello) {
  absl::Status checked = CheckPeerHello(hello);
  if (!checked.ok()) {
    CountRejectedHello(checked);
    return checked;
  }
  ServerStream stream(context, rw);
  Session session(&stream);
  v1::PeerMessage reply;
  {
    absl::MutexLock lock(&mu_);
    if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
    const uint64_t ticket = ++attach_ticket_;
    if (active_session_ != nullptr) {
      Log(LogLevel::kWarning, "a new stream replaces the current one",
          {{"link", Describe()}, {"peer", context->peer()}});
      active_session_->SetEnd(absl::AbortedError(
          absl::StrCat(Describe(), ": replaced by a newer stream from ", context->peer())));
      active_session_->stream->Cancel();
    }
    auto can_attach = [this, ticket]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return active_session_ == nullptr || closing_ || attach_ticket_ != ticket;
    };
    mu_.Await(absl::Condition(&can_attach));
    if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
    if (attach_ticket_ != ticket) {
      return absl::AbortedError(Describe() + ": superseded by a newer stream");
    }
    bool reset = false;
    AdoptPeerInstance(hello, &reset);
    reply = MakeHello(/*peer_instance_known=*/!reset);
    absl::Status resumed = ApplyPeerResume(hello);
    if (!resumed.ok()) {
      status_ = resumed;
      Log(LogLevel::kError, "peer link resume failed",
          {{"link", Describe()}, {"status", resumed.ToString()}});
      return resumed;
    }
    active_session_ = &session;
  }

  absl::Status reason;
  bool clean = false;
  if (!rw->Write(reply)) {
    reason = absl::UnavailableError(Describe() + ": connection lost during the Hello exchange");
  } else {
    reason = RunSession(&session);
    if (reason.ok()) {
      clean = !context->IsCancelled();
      reason = absl::UnavailableError(
          absl::StrCat(Describe(), clean ? ": the upstream closed the link"
                                         : ": connection to the upstream lost"));
    }
  }
  absl::MutexLock lock(&mu_);
  active_session_ = nullptr;
  status_ = closing_ ? absl::CancelledError(Describe() + " closed") : reason;
  Log(clean || closing_ ? LogLevel::kInfo : LogLevel::kWarning, "peer link disconnected",
      {{"link", Describe()}, {"status", status_.ToString()}});
  return clean ? absl::OkStatus() : reason;
}

// ---- one connection ----

absl::Status PeerLink::RunSession(Session* session) {
  {
    absl::MutexLock lock(&mu_);
    connected_ = true;
    status_ = absl::OkStatus();
    ++stats_.connections;
    stats_.reconnects = stats_.connections - 1;
    const absl::Time now = absl::Now();
    next_heartbeat_ = now;  // The first heartbeat measures the RTT right away.
    last_received_ = now;
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

  absl::Status reason;
  v1::PeerMessage msg;
  while (session->stream->Read(&msg)) {
    reason = HandleIncoming(msg);
    if (!reason.ok()) break;
  }
  if (!reason.ok()) {
    Log(LogLevel::kError, "peer link protocol error",
        {{"link", Describe()}, {"status", reason.ToString()}});
    // The dialer must cancel (its Finish would wait for the server); the server ends the stream
    // with `reason` by returning it.
    if (role_ == Role::kDialer) session->stream->Cancel();
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
  absl::MutexLock lock(&mu_);
  connected_ = false;
  ++stats_.disconnects;
  reader_thread_ = std::thread::id();
  return session->end_status;
}

void PeerLink::CountSent(const v1::PeerMessage& msg, int64_t bytes) {
  PeerLinkStats::Traffic& t = stats_.sent[msg.body_case()];
  ++t.messages;
  t.bytes += bytes;
  ++stats_.sent_total.messages;
  stats_.sent_total.bytes += bytes;
  if (msg.has_ack()) ++stats_.acks_sent;
  if (msg.has_heartbeat()) ++stats_.heartbeats_sent;
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
    if (options_.peer_timeout != absl::InfiniteDuration() &&
        now - last_received_ > options_.peer_timeout) {
      session->SetEnd(
          absl::UnavailableError(absl::StrCat(Describe(), ": nothing received from the peer for ",
                                              absl::FormatDuration(options_.peer_timeout))));
      session->stream->Cancel();
      break;
    }
    std::shared_ptr<const v1::PeerMessage> sequenced;
    v1::PeerMessage control;
    const v1::PeerMessage* out = nullptr;
    int64_t bytes = 0;
    const bool ack_due =
        last_applied_ > last_ack_sent_ &&
        (applied_since_ack_ >= options_.ack_every || now >= first_unacked_ + options_.ack_delay);
    if (!control_.empty()) {
      control = std::move(control_.front());
      control_.pop_front();
      out = &control;
    } else if (ack_due) {
      control.set_protocol_version(kPeerProtocolVersion);
      control.mutable_ack()->set_seq(last_applied_);
      last_ack_sent_ = last_applied_;
      applied_since_ack_ = 0;
      out = &control;
    } else if (now >= next_heartbeat_) {
      control.set_protocol_version(kPeerProtocolVersion);
      control.mutable_heartbeat()->set_send_time_ns(MonotonicNanos());
      next_heartbeat_ = now + options_.heartbeat_interval;
      out = &control;
    } else if (next_write_seq_ < next_seq_) {
      const Outgoing& o = retained_[next_write_seq_ - retained_.front().msg->seq()];
      sequenced = o.msg;
      bytes = o.bytes;
      if (next_write_seq_ <= highest_written_) {
        ++stats_.resent;
      } else {
        highest_written_ = next_write_seq_;
      }
      ++next_write_seq_;
      out = sequenced.get();
    }
    if (out == nullptr) {
      absl::Time wake = next_heartbeat_;
      if (last_applied_ > last_ack_sent_)
        wake = std::min(wake, first_unacked_ + options_.ack_delay);
      if (options_.peer_timeout != absl::InfiniteDuration()) {
        wake = std::min(wake, last_received_ + options_.peer_timeout + absl::Milliseconds(1));
      }
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
    if (out == &control) bytes = static_cast<int64_t>(control.ByteSizeLong());
    if (options_.send_rate_bytes_per_second > 0) {
      // Refill, take this message's bytes (possibly into debt), and wait out any debt: over time
      // the writes average the rate, and a message larger than the burst still goes through.
      const double rate = options_.send_rate_bytes_per_second;
      const double burst = static_cast<double>(options_.send_burst_bytes);
      rate_tokens_ =
          rate_refilled_ == absl::InfinitePast()
              ? burst
              : std::min(burst, rate_tokens_ + rate * absl::ToDoubleSeconds(now - rate_refilled_));
      rate_refilled_ = now;
      rate_tokens_ -= static_cast<double>(bytes);
      if (rate_tokens_ < 0) {
        const absl::Time ready = now + absl::Seconds(-rate_tokens_ / rate);
        auto stopping = [session, this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return session->stop || closing_;
        };
        // A message taken from the queue but not written stays retained (unacknowledged) and is
        // resent on the next connection, so stopping here loses nothing.
        if (mu_.AwaitWithDeadline(absl::Condition(&stopping), ready)) continue;
      }
    }
    mu_.Unlock();
    const bool ok = session->stream->Write(*out);
    mu_.Lock();
    if (!ok) {
      session->SetEnd(absl::UnavailableError(Describe() + ": write failed: connection lost"));
      break;
    }
    CountSent(*out, bytes);
  }
  mu_.Unlock();
  if (half_close) session->stream->WritesDone();
  absl::MutexLock lock(&mu_);
  session->writer_done = true;
}

absl::Status PeerLink::HandleIncoming(const v1::PeerMessage& msg) {
  const v1::PeerMessage::BodyCase body = msg.body_case();
  const int64_t bytes = static_cast<int64_t>(msg.ByteSizeLong());
  const uint64_t seq = msg.seq();
  {
    absl::MutexLock lock(&mu_);
    last_received_ = absl::Now();
    PeerLinkStats::Traffic& t = stats_.received[body];
    ++t.messages;
    t.bytes += bytes;
    ++stats_.received_total.messages;
    stats_.received_total.bytes += bytes;
    if (msg.protocol_version() != kPeerProtocolVersion) {
      return absl::FailedPreconditionError(
          absl::StrCat(Describe(), ": received a message of protocol version ",
                       msg.protocol_version(), ", this side speaks ", kPeerProtocolVersion));
    }
    if (body == v1::PeerMessage::kAck) {
      ++stats_.acks_received;
      const uint64_t acked = msg.ack().seq();
      if (acked >= next_write_seq_) {
        return absl::InvalidArgumentError(absl::StrCat(Describe(), ": the peer acknowledged seq ",
                                                       acked, " but only seqs up to ",
                                                       next_write_seq_ - 1, " were written"));
      }
      while (!retained_.empty() && retained_.front().msg->seq() <= acked) {
        --stats_.queued_messages;
        stats_.queued_bytes -= retained_.front().bytes;
        retained_.pop_front();
      }
      stats_.last_acked_seq = std::max(stats_.last_acked_seq, acked);
      return absl::OkStatus();
    }
    if (body == v1::PeerMessage::kHeartbeat) {
      ++stats_.heartbeats_received;
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
        stats_.last_rtt = absl::Nanoseconds(now_ns - msg.heartbeat().echo_time_ns());
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
    if (seq <= last_applied_) {
      ++stats_.duplicates_dropped;
      return absl::OkStatus();
    }
    if (seq != last_applied_ + 1) {
      return absl::DataLossError(
          absl::StrCat(Describe(), ": expected seq ", last_applied_ + 1, ", received ", seq));
    }
  }
  handler_(msg);
  absl::MutexLock lock(&mu_);
  last_applied_ = seq;
  stats_.last_applied_seq = seq;
  if (applied_since_ack_++ == 0) first_unacked_ = absl::Now();
  return absl::OkStatus();
}

// ---- PeerServer ----

class PeerServer::Service final : public v1::Peer::Service {
 public:
  explicit Service(PeerServer* server) : server_(server) {}
  grpc::Status Link(grpc::ServerContext* context,
                    grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream) override {
    return server_->Link(context, stream);
  }

 private:
  PeerServer* const server_;
};

PeerServer::PeerServer(const PeerServerOptions& options)
    : options_(options), service_(std::make_unique<Service>(this)) {}

PeerServer::~PeerServer() { Shutdown(); }

absl::StatusOr<std::unique_ptr<PeerServer>> PeerServer::Create(const PeerServerOptions& options) {
  if (options.listen_address.empty()) {
    return absl::InvalidArgumentError("peer server: listen_address is required");
  }
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError("peer server: max_message_bytes must be positive");
  }
  return absl::WrapUnique(new PeerServer(options));
}

absl::StatusOr<PeerLink*> PeerServer::RegisterBoundary(const PeerLinkOptions& options,
                                                       PeerLink::Handler handler) {
  absl::Status valid = ValidateCommon(options);
  if (!valid.ok()) return valid;
  if (options.stage != options.boundary + 1) {
    return absl::InvalidArgumentError(absl::StrCat("peer link for boundary ", options.boundary,
                                                   ": the serving (downstream) side must be stage ",
                                                   options.boundary + 1, ", not ", options.stage));
  }
  if (!handler) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer link for boundary ", options.boundary, ": a handler is required"));
  }
  absl::MutexLock lock(&mu_);
  std::unique_ptr<PeerLink>& slot = links_[options.boundary];
  if (slot != nullptr) {
    return absl::AlreadyExistsError(
        absl::StrCat("peer server: boundary ", options.boundary, " is already registered"));
  }
  slot.reset(new PeerLink(PeerLink::Role::kServer, options, std::move(handler)));
  return slot.get();
}

absl::Status PeerServer::Start() {
  if (server_ != nullptr) return absl::FailedPreconditionError("peer server already started");
  if (options_.enable_health_service) grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(
      options_.listen_address,
      options_.credentials ? options_.credentials : grpc::InsecureServerCredentials(), &port_);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  builder.RegisterService(service_.get());
  if (options_.configure) options_.configure(builder);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    return absl::UnavailableError(
        absl::StrCat("peer server: cannot listen on ", options_.listen_address));
  }
  Log(LogLevel::kInfo, "peer server listening",
      {{"address", options_.listen_address}, {"port", absl::StrCat(port_)}});
  return absl::OkStatus();
}

grpc::HealthCheckServiceInterface* PeerServer::health_check_service() const {
  return server_ == nullptr ? nullptr : server_->GetHealthCheckService();
}

void PeerServer::Shutdown() {
  std::vector<PeerLink*> links;
  {
    absl::MutexLock lock(&mu_);
    for (auto& entry : links_) links.push_back(entry.second.get());
  }
  // Closed links end their streams and turn new ones away, so the server stops promptly.
  for (PeerLink* link : links) link->Close();
  if (server_ != nullptr) {
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Milliseconds(100)));
    server_->Wait();
    server_.reset();
  }
}

grpc::Status PeerServer::Link(grpc::ServerContext* context,
                              grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream) {
  v1::PeerMessage first;
  if (!stream->Read(&first)) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "peer server: stream ended before Hello");
  }
  absl::Status status;
  if (first.protocol_version() != kPeerProtocolVersion ||
      (first.has_hello() && first.hello().protocol_version() != kPeerProtocolVersion)) {
    status = absl::FailedPreconditionError(absl::StrCat(
        "peer server: the peer speaks protocol version ",
        first.has_hello() ? first.hello().protocol_version() : first.protocol_version(),
        ", this server ", kPeerProtocolVersion));
  } else if (!first.has_hello()) {
    status = absl::FailedPreconditionError(
        absl::StrCat("peer server: the first message must be a Hello, not a '",
                     PeerBodyName(first.body_case()), "'"));
  }
  PeerLink* link = nullptr;
  if (status.ok()) {
    absl::MutexLock lock(&mu_);
    auto it = links_.find(first.hello().boundary());
    if (it != links_.end()) {
      link = it->second.get();
    } else {
      std::vector<uint32_t> served;
      for (const auto& entry : links_) served.push_back(entry.first);
      status = absl::NotFoundError(absl::StrCat(
          "peer server: boundary ", first.hello().boundary(), " is not served here (serving: ",
          served.empty() ? "none" : absl::StrJoin(served, ", "), ")"));
    }
  }
  if (!status.ok()) {
    Log(LogLevel::kWarning, "peer stream rejected",
        {{"peer", context->peer()}, {"status", status.ToString()}});
    return ToGrpc(status);
  }
  return ToGrpc(link->ServeStream(context, stream, first.hello()));
}

}  // namespace mapl
