// The dialing end of a peer link (the upstream's, or a downstream's that dials its upstream): Dial,
// the connection thread that dials and redials, and the client side of a stream. See peer_link.h
// for the contract.
#include <algorithm>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/check.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_link_internal.h"
#include "server/transport/tls.h"

namespace mapl {
namespace {

// How often a dialer waiting for the channel checks whether it is being closed.
constexpr absl::Duration kChannelPollSlice = absl::Milliseconds(50);

// Codes that mean the peer refused us, or we refused it: a configuration that differs (token,
// identity, boundary, protocol version, config fingerprint). Redialing goes on (the other side
// may be fixed and restarted), but WaitConnected reports such a refusal at once rather than
// waiting out its timeout.
bool IsRefusal(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kUnimplemented:
      return true;
    default:
      return false;
  }
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

using ClientReaderWriter = grpc::ClientReaderWriter<v1::PeerMessage, v1::PeerMessage>;

// The stream's status, waiting at most `grace` for the listener's. A stream whose Read failed
// on this side, on a message that did not parse (corrupted in flight: plaintext TCP has no
// integrity check past its own checksum), is still open at the listener, which keeps it while it
// hears keepalives; Finish alone would wait for it forever. Such a stream is cancelled after
// `grace`, and `*cut` says so. A stream the listener ended has its status already.
grpc::Status FinishWithin(grpc::ClientContext* context, ClientReaderWriter* rw,
                          absl::Duration grace, bool* cut) {
  absl::Notification finished;
  bool cancelled = false;
  std::thread canceller([&] {
    if (!finished.WaitForNotificationWithTimeout(grace)) {
      cancelled = true;
      context->TryCancel();
    }
  });
  grpc::Status status = rw->Finish();
  finished.Notify();
  canceller.join();
  *cut = cancelled;
  return status;
}

}  // namespace

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

absl::StatusOr<std::unique_ptr<PeerLink>> PeerLink::Dial(const PeerLinkOptions& options,
                                                         Handler handler) {
  absl::Status valid = ValidateOptions(Role::kDialer, options, handler);
  if (!valid.ok()) return valid;

  InstallGrpcLogBridge();
  auto link = absl::WrapUnique(new PeerLink(Role::kDialer, options, std::move(handler)));
  link->NewChannel();
  PeerLink* raw = link.get();
  link->dial_thread_ = std::thread([raw] { raw->DialLoop(); });
  return link;
}

void PeerLink::NewChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options_.max_message_bytes);
  args.SetMaxSendMessageSize(options_.max_message_bytes);
  // The channel's own reconnect backoff decides how soon a listener that starts late is seen.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, ToMillis(options_.initial_backoff));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, ToMillis(options_.max_backoff));
  // One TCP connection per link, not one shared by every link to the same listener.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  SetKeepalive(options_.keepalive_time, options_.keepalive_timeout,
               [&args](const char* name, int value) { args.SetInt(name, value); });
  channel_ =
      grpc::CreateCustomChannel(options_.address,
                                options_.channel_credentials ? options_.channel_credentials
                                                             : grpc::InsecureChannelCredentials(),
                                args);
  stub_ = v1::Peer::NewStub(channel_);
}

void PeerLink::DialLoop() {
  absl::BitGen jitter;
  // Since when this link has had no connection: after connect_timeout of it, status() says so.
  absl::Time down_since = absl::Now();
  absl::Duration backoff = options_.initial_backoff;
  while (true) {
    bool established = false;
    const absl::Status result = DialOnce(
        std::max(down_since + options_.connect_timeout, absl::Now() + options_.max_backoff),
        &established);
    absl::MutexLock lock(&mu_);
    if (closing_) return;
    if (!established) stats_.set_dial_failures(stats_.dial_failures() + 1);
    const absl::Time now = absl::Now();
    if (established) {
      down_since = now;
      backoff = options_.initial_backoff;
    }
    refused_ = IsRefusal(result.code());
    unreachable_ = !established && now - down_since >= options_.connect_timeout;
    if (unreachable_ && !refused_) {
      status_ = absl::UnavailableError(
          absl::StrCat(Describe(), ": no connection to ", options_.address, " for ",
                       absl::FormatDuration(absl::Trunc(now - down_since, absl::Milliseconds(1))),
                       " (still trying); last error: ", result.ToString()));
    } else {
      status_ = result;
    }
    if (refused_ || unreachable_) {
      Log(LogLevel::kWarning, "peer link redialing",
          {{"link", Describe()}, {"status", result.ToString()}});
    }
    // A refusal waits the longest backoff: the other side needs a fix, not a quick retry. The
    // next attempt gets a new connection, so its TLS handshake sees a rotated certificate.
    if (refused_) {
      backoff = options_.max_backoff;
      NewChannel();
    }
    const double factor = 1.0 + options_.backoff_jitter * absl::Uniform<double>(jitter, -1.0, 1.0);
    mu_.AwaitWithTimeout(absl::Condition(&closing_), backoff * factor);
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
  // With a UCX data plane the session runs on it, and the gRPC stream only carries the Hellos
  // and the close.
  std::unique_ptr<DataPlaneStream> data_plane = NewDataPlane(&stream);
  Session session(data_plane != nullptr ? static_cast<Stream*>(data_plane.get()) : &stream);
  v1::PeerMessage hello;
  {
    absl::MutexLock lock(&mu_);
    if (closing_) {
      context.TryCancel();
      rw->Finish();
      return absl::CancelledError(Describe() + " closed");
    }
    MAPL_CHECK(active_session_ == nullptr, Describe() + ": a second dialer session");
    active_session_ = &session;  // From here Close can cancel us.
    hello = MakeHello(/*peer_instance_known=*/true);
  }

  absl::Status result = StartDataPlane(data_plane.get(), &hello);
  bool identity_refused = false;  // The listener's certificate lacks peer_identity.
  v1::PeerMessage reply;
  if (!result.ok()) {
    context.TryCancel();
    rw->Finish();
  } else if (!rw->Write(hello) || !rw->Read(&reply)) {
    // Turned away (the server's status says why: NOT_FOUND, UNAUTHENTICATED...) or no
    // connection after all.
    bool cut = false;
    result = FromGrpcStatus(FinishWithin(&context, rw.get(), options_.close_grace, &cut));
    if (cut) {
      result = absl::UnavailableError(absl::StrCat(
          "the Hello exchange broke off and the listener did not end the stream within ",
          absl::FormatDuration(options_.close_grace)));
    }
    if (result.ok()) result = absl::UnavailableError("stream ended before the Hello exchange");
    result =
        WithPrefix(absl::StrCat(Describe(), ": ", options_.address, " refused the link: "), result);
    if (IsRefusal(result.code())) {
      Log(LogLevel::kError, "peer link refused by the listener", {{"status", result.ToString()}});
    }
  } else {
    if (reply.protocol_version() != kPeerProtocolVersion) {
      result = absl::FailedPreconditionError(
          absl::StrCat(Describe(), ": the ", PeerSide(), " speaks protocol version ",
                       reply.protocol_version(), ", this side ", kPeerProtocolVersion));
    } else if (!reply.has_hello()) {
      result = absl::FailedPreconditionError(
          absl::StrCat(Describe(), ": the ", PeerSide(), "'s first message is a '",
                       PeerBodyName(reply.body_case()), "', not a Hello"));
    } else {
      result = CheckPeerHello(reply.hello());
      if (result.ok()) {
        result = CheckPeerIdentity(context.auth_context(), options_.peer_identity, Describe());
        identity_refused = !result.ok();
      }
      if (result.ok()) result = CheckDataPlanePeer(context.peer());
    }
    if (!result.ok()) {
      CountRejectedHello(result, identity_refused);
    } else if (data_plane != nullptr) {
      result = data_plane->Connect(reply.hello().ucx_worker_address(), reply.hello().ucx_token());
    }
    if (result.ok()) {
      bool restarted = false;
      {
        absl::MutexLock lock(&mu_);
        bool reset = false;
        AdoptPeerInstance(reply.hello(), &reset, &restarted);
        result = ApplyPeerResume(reply.hello());
      }
      if (result.ok() && restarted && options_.on_peer_restart) options_.on_peer_restart();
    }
    if (!result.ok()) {
      context.TryCancel();
      if (data_plane != nullptr) data_plane->Shutdown(absl::ZeroDuration());
      rw->Finish();
    } else {
      *established = true;
      const absl::Status reason = RunSession(&session);
      // Its reader of the gRPC stream is done before Finish.
      if (data_plane != nullptr) data_plane->Shutdown(options_.close_grace);
      bool cut = false;
      absl::Status finish =
          FromGrpcStatus(FinishWithin(&context, rw.get(), options_.close_grace, &cut));
      if (cut) {
        finish = absl::UnavailableError(absl::StrCat(
            "a message from the ", PeerSide(), " did not arrive intact (it did not parse) and the ",
            PeerSide(), " did not end the stream within ",
            absl::FormatDuration(options_.close_grace), "; cancelled it"));
      }
      result = !reason.ok()  ? reason
               : finish.ok() ? absl::CancelledError(Describe() + ": stream ended")
                             : WithPrefix(absl::StrCat(Describe(), ": connection to ",
                                                       options_.address, " ended: "),
                                          finish);
    }
  }

  absl::MutexLock lock(&mu_);
  session.stream->AddStats(&stats_);  // The connection's own counters join the record.
  active_session_ = nullptr;
  if (*established) {
    status_ = closing_ ? absl::CancelledError(Describe() + " closed") : result;
    Log(closing_ ? LogLevel::kInfo : LogLevel::kWarning, "peer link disconnected",
        {{"link", Describe()}, {"status", status_.ToString()}});
  }
  return result;
}

}  // namespace mapl
