// The downstream end of the peer links: PeerServer (the Peer service) and the server side of one
// stream. See peer_link.h and peer_server.h for the contract.
#include "server/transport/peer_server.h"

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
  // Name the field that is wrong: the envelope's version, then the Hello's (0 when missing).
  const auto wrong_version = [](const char* field, uint32_t version) {
    return absl::FailedPreconditionError(absl::StrCat(
        "peer server: ", field, " has protocol_version ", version, version == 0 ? " (missing)" : "",
        "; this server speaks protocol version ", kPeerProtocolVersion));
  };
  if (first.protocol_version() != kPeerProtocolVersion) {
    status = wrong_version("the first message's envelope", first.protocol_version());
  } else if (first.has_hello() && first.hello().protocol_version() != kPeerProtocolVersion) {
    status = wrong_version("the peer's Hello", first.hello().protocol_version());
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
    return ToGrpcStatus(status);
  }
  return ToGrpcStatus(link->ServeStream(context, stream, first.hello()));
}

}  // namespace mapl
