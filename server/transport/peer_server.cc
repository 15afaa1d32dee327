// The listening end of the peer links (the downstream's, or an upstream's whose downstream dials):
// PeerServer (the Peer service) and the server side of one stream. See peer_link.h and
// peer_server.h for the contract.
#include "server/transport/peer_server.h"

#include <algorithm>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "common/log.h"
#include "grpcpp/ext/health_check_service_server_builder_option.h"
#include "server/transport/peer_link_internal.h"
#include "server/transport/tls.h"

namespace mapl {

// ---- the server side of a stream ----

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

absl::Status PeerLink::ServeStream(grpc::ServerContext* context,
                                   grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* rw,
                                   const v1::Hello& hello) {
  absl::Status checked = CheckPeerHello(hello);
  bool identity_refused = false;
  if (checked.ok()) {
    checked = CheckPeerIdentity(context->auth_context(), options_.peer_identity, Describe());
    identity_refused = !checked.ok();
  }
  if (checked.ok()) checked = CheckDataPlanePeer(context->peer());
  if (!checked.ok()) {
    CountRejectedHello(checked, identity_refused);
    return checked;
  }
  ServerStream stream(context, rw);
  // With a UCX data plane the session runs on it, and the gRPC stream only carries the Hellos
  // and the close.
  std::unique_ptr<DataPlaneStream> data_plane = NewDataPlane(&stream);
  Session session(data_plane != nullptr ? static_cast<Stream*>(data_plane.get()) : &stream);
  v1::PeerMessage data_plane_hello;  // Its address and token, for the reply.
  const absl::Status started = StartDataPlane(data_plane.get(), &data_plane_hello);
  if (!started.ok()) {
    Log(LogLevel::kError, "peer link data plane failed to start",
        {{"link", Describe()}, {"status", started.ToString()}});
    return started;
  }
  v1::PeerMessage reply;
  bool restarted = false;
  {
    absl::MutexLock lock(&mu_);
    if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
    if (active_session_ != nullptr) {
      if (hello.instance_id() != peer_instance_id_) {
        // Another peer instance while the current one is live: never a silent takeover. If the
        // current one is in fact dead, keepalive ends it and the newcomer's retry gets in.
        stats_.set_streams_refused_live(stats_.streams_refused_live() + 1);
        const absl::Status refused = absl::AlreadyExistsError(
            absl::StrCat(Describe(),
                         ": a live stream from another peer instance serves this boundary; retry "
                         "once it ends"));
        Log(LogLevel::kWarning, "second peer refused while the first is live",
            {{"link", Describe()}, {"peer", context->peer()}});
        return refused;
      }
      // The same peer reconnecting: its old stream is dead at its end, so this one takes over.
      stats_.set_streams_replaced(stats_.streams_replaced() + 1);
      Log(LogLevel::kWarning, "the peer's new stream replaces its old one",
          {{"link", Describe()}, {"peer", context->peer()}});
      active_session_->SetEnd(absl::AbortedError(absl::StrCat(
          Describe(), ": replaced by the same peer's newer stream from ", context->peer())));
      active_session_->stream->Cancel();
    }
    const uint64_t ticket = ++attach_ticket_;
    // Only the newest of several waiting streams attaches; the others are turned away.
    auto can_attach = [this, ticket]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return active_session_ == nullptr || closing_ || attach_ticket_ != ticket;
    };
    mu_.Await(absl::Condition(&can_attach));
    if (closing_) return absl::FailedPreconditionError(Describe() + " is closed");
    if (attach_ticket_ != ticket) {
      return absl::AbortedError(Describe() + ": superseded by a newer stream");
    }
    bool reset = false;
    AdoptPeerInstance(hello, &reset, &restarted);
    reply = MakeHello(/*peer_instance_known=*/!reset);
    reply.mutable_hello()->MergeFrom(data_plane_hello.hello());
    absl::Status resumed = ApplyPeerResume(hello);
    if (!resumed.ok()) {
      status_ = resumed;
      Log(LogLevel::kError, "peer link resume failed",
          {{"link", Describe()}, {"status", resumed.ToString()}});
      return resumed;
    }
    active_session_ = &session;
  }

  if (restarted && options_.on_peer_restart) options_.on_peer_restart();
  absl::Status reason;
  bool clean = false;
  if (!rw->Write(reply)) {
    reason = absl::UnavailableError(Describe() + ": connection lost during the Hello exchange");
  } else if (data_plane != nullptr &&
             !(reason = data_plane->Connect(hello.ucx_worker_address(), hello.ucx_token())).ok()) {
    data_plane->Shutdown(absl::ZeroDuration());
  } else {
    reason = RunSession(&session);
    // Its reader of the gRPC stream is done before this handler returns. A clean close (the
    // peer's bye) is followed by the end of the peer's gRPC stream; any other end cancels it.
    if (data_plane != nullptr) {
      data_plane->Shutdown(reason.ok() ? options_.close_grace : absl::ZeroDuration());
    }
    if (reason.ok()) {
      clean = !context->IsCancelled();
      reason =
          absl::UnavailableError(absl::StrCat(Describe(), clean ? ": the " : ": connection to the ",
                                              PeerSide(), clean ? " closed the link" : " lost"));
    }
  }
  absl::MutexLock lock(&mu_);
  session.stream->AddStats(&stats_);  // The connection's own counters join the record.
  active_session_ = nullptr;
  status_ = closing_ ? absl::CancelledError(Describe() + " closed") : reason;
  Log(clean || closing_ ? LogLevel::kInfo : LogLevel::kWarning, "peer link disconnected",
      {{"link", Describe()}, {"status", status_.ToString()}});
  return clean ? absl::OkStatus() : reason;
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
  auto invalid = [](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("peer server: ", what));
  };
  if (options.listen_address.empty()) return invalid("listen_address is required");
  if (options.max_message_bytes <= 0) return invalid("max_message_bytes must be positive");
  if (options.hello_timeout <= absl::ZeroDuration())
    return invalid("hello_timeout must be positive");
  if (options.max_pending_streams < 1) return invalid("max_pending_streams must be >= 1");
  if (options.max_threads < 0 || options.max_memory_bytes < 0) {
    return invalid("max_threads and max_memory_bytes must not be negative");
  }
  if (options.keepalive_time <= absl::ZeroDuration() ||
      options.keepalive_timeout <= absl::ZeroDuration() ||
      options.max_connection_idle <= absl::ZeroDuration()) {
    return invalid("keepalive_time, keepalive_timeout and max_connection_idle must be positive");
  }
  return absl::WrapUnique(new PeerServer(options));
}

absl::StatusOr<PeerLink*> PeerServer::RegisterBoundary(const PeerLinkOptions& options,
                                                       Transport::Handler handler) {
  absl::Status valid = PeerLink::ValidateOptions(PeerLink::Role::kServer, options, handler);
  if (!valid.ok()) return valid;
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
  InstallGrpcLogBridge();
  grpc::ServerBuilder builder;
  if (options_.enable_health_service) {
    grpc::EnableDefaultHealthCheckService(true);
  } else {
    // The default health service is switched on process-wide (the daemon's local server wants
    // it); a null service opts this server out.
    builder.SetOption(std::make_unique<grpc::HealthCheckServiceServerBuilderOption>(nullptr));
  }
  builder.AddListeningPort(
      options_.listen_address,
      options_.credentials ? options_.credentials : grpc::InsecureServerCredentials(), &port_);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  int links = 0;
  {
    absl::MutexLock lock(&mu_);
    links = static_cast<int>(links_.size());
  }
  // What an unauthenticated crowd can hold: threads (each stream holds one), memory, handshakes
  // that never finish, connections that never open a stream.
  grpc::ResourceQuota quota("mapl-peer-server");
  quota.SetMaxThreads(options_.max_threads > 0 ? options_.max_threads
                                               : options_.max_pending_streams + 2 * links + 8);
  quota.Resize(static_cast<size_t>(options_.max_memory_bytes > 0
                                       ? options_.max_memory_bytes
                                       : 4 * int64_t{options_.max_message_bytes} + (64 << 20)));
  builder.SetResourceQuota(quota);
  builder.AddChannelArgument(GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS,
                             ToMillis(options_.hello_timeout));
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, 4);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS,
                             ToMillis(options_.max_connection_idle));
  SetKeepalive(
      options_.keepalive_time, options_.keepalive_timeout,
      [&builder](const char* name, int value) { builder.AddChannelArgument(name, value); });
  // Dialers ping every keepalive_time (their own setting; mapld uses one value for both): allow
  // pings that often, and drop a connection that pings much faster.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             ToMillis(options_.keepalive_time / 2));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 2);
  builder.RegisterService(service_.get());
  if (options_.configure) options_.configure(builder);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    return absl::UnavailableError(
        absl::StrCat("peer server: cannot listen on ", options_.listen_address));
  }
  watchdog_ = std::thread([this] { WatchdogLoop(); });
  Log(LogLevel::kInfo, "peer server listening",
      {{"address", options_.listen_address},
       {"port", absl::StrCat(port_)},
       {"tls", options_.credentials ? "on" : "off"}});
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
    {
      // Streams still waiting for a Hello end now.
      absl::MutexLock lock(&mu_);
      for (auto& [context, deadline] : pending_) context->TryCancel();
    }
    server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Milliseconds(100)));
    server_->Wait();
    server_.reset();
  }
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (watchdog_.joinable()) watchdog_.join();
}

v1::PeerServerStats PeerServer::stats() const {
  absl::MutexLock lock(&mu_);
  v1::PeerServerStats s = stats_;
  s.set_pending_streams(pending_.size());
  s.set_tls_handshake_failures(TlsHandshakeFailures());
  return s;
}

void PeerServer::WatchdogLoop() {
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    absl::Time next = absl::InfiniteFuture();
    const absl::Time now = absl::Now();
    for (auto& [context, deadline] : pending_) {
      if (deadline <= now) {
        // The handler is blocked reading its first message: cancelling ends that read. Each is
        // cancelled once; the handler takes its entry out before it returns.
        if (timed_out_.insert(context).second) context->TryCancel();
      } else {
        next = std::min(next, deadline);
      }
    }
    const size_t pending = pending_.size();
    auto changed = [this, pending]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stopping_ || pending_.size() > pending;
    };
    mu_.AwaitWithDeadline(absl::Condition(&changed), std::min(next, now + absl::Seconds(1)));
  }
}

grpc::Status PeerServer::Refuse(grpc::ServerContext* context, const absl::Status& status,
                                const std::function<void(v1::PeerServerStats&)>& count) {
  absl::MutexLock lock(&mu_);
  count(stats_);
  auto& [last, suppressed] = refusal_log_[absl::StatusCodeToString(status.code())];
  const absl::Time now = absl::Now();
  if (now - last >= absl::Seconds(1)) {
    Log(LogLevel::kWarning, "peer stream rejected",
        {{"peer", context->peer()},
         {"status", status.ToString()},
         {"suppressed_since_last", absl::StrCat(suppressed)}});
    last = now;
    suppressed = 0;
  } else {
    ++suppressed;
  }
  return ToGrpcStatus(status);
}

PeerLink* PeerServer::Authenticate(const v1::Hello& hello) {
  // Every registered link is checked, in constant time each, so the time taken does not say
  // which boundary's token was close.
  PeerLink* match = nullptr;
  for (auto& [id, link] : links_) {
    if (ConstantTimeEquals(hello.auth_token(), link->options_.auth_token) && match == nullptr) {
      match = link.get();
    }
  }
  return match;
}

grpc::Status PeerServer::Link(grpc::ServerContext* context,
                              grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream) {
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<int>(pending_.size()) >= options_.max_pending_streams) {
      stats_.set_rejected_over_limit(stats_.rejected_over_limit() + 1);
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "peer server: too many streams waiting to authenticate; retry later");
    }
    pending_[context] = absl::Now() + options_.hello_timeout;
  }
  v1::PeerMessage first;
  const bool read = stream->Read(&first);
  bool timed_out = false;
  {
    absl::MutexLock lock(&mu_);
    pending_.erase(context);
    timed_out = timed_out_.erase(context) > 0;
  }
  if (timed_out) {
    return Refuse(
        context,
        absl::DeadlineExceededError(absl::StrCat("peer server: no Hello within ",
                                                 absl::FormatDuration(options_.hello_timeout))),
        [](v1::PeerServerStats& s) {
          s.set_rejected_hello_timeout(s.rejected_hello_timeout() + 1);
        });
  }
  if (!read) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "peer server: stream ended before Hello");
  }
  // Nothing about this server (its version, its boundaries) before the peer authenticated.
  PeerLink* authenticated = nullptr;
  if (first.has_hello()) {
    absl::MutexLock lock(&mu_);
    authenticated = Authenticate(first.hello());
  }
  if (authenticated == nullptr) {
    return Refuse(context,
                  absl::UnauthenticatedError(
                      "peer server: the first message must be a Hello with this job's auth token"),
                  [](v1::PeerServerStats& s) {
                    s.set_rejected_unauthenticated(s.rejected_unauthenticated() + 1);
                  });
  }
  absl::Status status;
  // Name the field that is wrong: the envelope's version, then the Hello's (0 when missing).
  const auto wrong_version = [](const char* field, uint32_t version) {
    return absl::FailedPreconditionError(absl::StrCat(
        "peer server: ", field, " has protocol_version ", version, version == 0 ? " (missing)" : "",
        "; this server speaks protocol version ", kPeerProtocolVersion));
  };
  if (first.protocol_version() != kPeerProtocolVersion) {
    status = wrong_version("the first message's envelope", first.protocol_version());
  } else if (first.hello().protocol_version() != kPeerProtocolVersion) {
    status = wrong_version("the peer's Hello", first.hello().protocol_version());
  }
  PeerLink* link = nullptr;
  if (status.ok()) {
    absl::MutexLock lock(&mu_);
    auto it = links_.find(first.hello().boundary());
    if (it != links_.end()) {
      link = it->second.get();
      stats_.set_streams_accepted(stats_.streams_accepted() + 1);
    } else {
      std::vector<uint32_t> served;
      for (const auto& entry : links_) served.push_back(entry.first);
      status = absl::NotFoundError(absl::StrCat(
          "peer server: boundary ", first.hello().boundary(), " is not served here (serving: ",
          served.empty() ? "none" : absl::StrJoin(served, ", "), ")"));
    }
  }
  if (!status.ok()) {
    return Refuse(context, status, [](v1::PeerServerStats& s) {
      s.set_rejected_protocol(s.rejected_protocol() + 1);
    });
  }
  return ToGrpcStatus(link->ServeStream(context, stream, first.hello()));
}

}  // namespace mapl
