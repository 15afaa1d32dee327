// The daemon: wiring between the local API, the session registry, the boundary workers and the
// transports.
#include "server/daemon.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "kernels/registry.h"
#include "server/config.h"
#include "server/frame_codec.h"
#include "server/local_service.h"
#include "server/state_store.h"
#include "server/transport/tls.h"

namespace mapl {
namespace {

const char* DirName(int d) { return d == v1::DIRECTION_FORWARD ? "forward" : "backward"; }

// Removes a stale socket file; refuses if another daemon is serving it.
absl::Status PrepareSocketPath(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return absl::OkStatus();
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "local_socket: ", path, " exists and is not a socket; remove it or pick another path"));
  }
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const bool live = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  if (live) {
    return absl::AlreadyExistsError(absl::StrCat("local_socket: another mapld is serving ", path,
                                                 "; stop it or give this stage another socket"));
  }
  ::unlink(path.c_str());
  return absl::OkStatus();
}

std::string HostOf(const std::string& address) { return address.substr(0, address.rfind(':')); }

// Whether `address` ("host:port") stays on this machine.
bool IsLoopback(const std::string& address) {
  const std::string host = HostOf(address);
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "[::1]" || host == "::1" ||
         host.rfind("unix:", 0) == 0;
}

// The health service's names: "" is readiness (every boundary's link up, not draining);
// kLivenessService stays SERVING until shutdown whatever the links do (a probe that restarts the
// pod must not fire because the peer is away); "boundary/<id>" follows one link.
constexpr char kLivenessService[] = "liveness";
std::string BoundaryHealthName(uint32_t id) { return absl::StrCat("boundary/", id); }

}  // namespace

Daemon::Daemon(const v1::DaemonConfig& config)
    : config_(config),
      sessions_(config.stage(), config.client_buffers(), config.client_buffer_bytes(),
                config.max_sessions()) {}

Daemon::~Daemon() { Shutdown(absl::ZeroDuration()); }

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const v1::DaemonConfig& config) {
  std::unique_ptr<Daemon> d(new Daemon(config));
  absl::Status s = d->Init();
  if (!s.ok()) {
    d->Shutdown(absl::ZeroDuration());
    return s;
  }
  return d;
}

absl::Status Daemon::Init() {
  const std::string stage = absl::StrCat(config_.stage());
  Log(LogLevel::kInfo, "starting",
      {{"stage", stage},
       {"boundaries", absl::StrCat(config_.boundaries_size())},
       {"compute_threads", absl::StrCat(config_.compute_threads())}});
  MAPL_ASSIGN_OR_RETURN(backend_, MakeBackend(config_.backend()));
  // Set here, not left to OPENBLAS_NUM_THREADS: the daemon computes alike whatever environment
  // an operator starts it in.
  SetCpuBlasThreads(static_cast<int>(config_.compute_threads()));
  metrics_ = std::make_unique<Metrics>(config_.stage(), [this] { return AllStats(); });

  // Engines first: a config the engine rejects stops startup before anything listens.
  for (const v1::BoundaryConfig& bc : config_.boundaries()) {
    absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(bc, backend_.get());
    if (!engine.ok()) {
      return absl::Status(engine.status().code(),
                          absl::StrCat("boundary ", bc.id(), ": ", engine.status().message()));
    }
    const bool up = bc.role() == v1::ROLE_UPSTREAM;
    const CodecTimers timers = metrics_->AddBoundary(bc.id(), up ? "upstream" : "downstream");
    const v1::BoundaryConfig& c = (*engine)->config();
    Log(LogLevel::kInfo, "boundary",
        {{"id", absl::StrCat(c.id())},
         {"role", up ? "upstream" : "downstream"},
         {"d", absl::StrCat(c.d())},
         {"k", absl::StrCat(c.k())},
         {"method", v1::Method_Name(c.method())},
         {"forward_codec", v1::Codec_Name(c.forward_codec())},
         {"backward_codec", v1::Codec_Name(c.backward_codec())},
         {"backend", backend_->name()}});
    WorkerOptions options;
    options.max_transport_queue_time = absl::Milliseconds(config_.max_transport_queue_ms());
    // A frame held for its dictionary fails before the Recv waiting for it does, with the reason.
    options.max_parked_time = absl::Milliseconds(config_.recv_timeout_ms()) / 2;
    workers_[bc.id()] = std::make_unique<BoundaryWorker>(*std::move(engine), options, timers);
  }

  MAPL_RETURN_IF_ERROR(RestoreStates());
  MAPL_RETURN_IF_ERROR(StartTransports());
  // After the transports: a scrape reads the peer server's record.
  if (config_.metrics_address() != "off") {
    if (peer_server_ != nullptr) {
      PeerServer* server = peer_server_.get();
      metrics_->SetPeerServerSource([server] { return server->stats(); });
    }
    MAPL_RETURN_IF_ERROR(metrics_->Serve(config_.metrics_address()));
    Log(LogLevel::kInfo, "metrics",
        {{"url", absl::StrCat("http://", HostOf(config_.metrics_address()), ":", metrics_->port(),
                              "/metrics")}});
  }
  for (auto& [id, w] : workers_) w->Start(transports_.at(id));
  // The local API last: once trainers can attach, everything behind it is ready.
  MAPL_RETURN_IF_ERROR(StartLocalServer());
  health_thread_ = std::thread([this] { HealthLoop(); });
  return absl::OkStatus();
}

absl::Status Daemon::RestoreStates() {
  if (config_.state_dir().empty()) return absl::OkStatus();
  MAPL_RETURN_IF_ERROR(PrepareStateDir(config_.state_dir()));
  for (auto& [id, w] : workers_) {
    const std::string path = StateFilePath(config_.state_dir(), id);
    MAPL_ASSIGN_OR_RETURN(std::optional<v1::BoundaryState> state,
                          ReadStateFile(config_.state_dir(), id));
    if (!state.has_value()) {
      Log(LogLevel::kInfo, "no saved state: starting afresh",
          {{"boundary", absl::StrCat(id)}, {"file", path}});
      continue;
    }
    MAPL_RETURN_IF_ERROR(CheckStateFitsConfig(*state, w->config(), path));
    if (absl::Status s = w->RestoreState(*state); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("state file ", path, ": ", s.message(),
                                                 "; move it away to start this boundary afresh"));
    }
    Log(LogLevel::kInfo, "restored state",
        {{"boundary", absl::StrCat(id)},
         {"file", path},
         {"last_step", state->has_last_step() ? absl::StrCat(state->last_step()) : "none"},
         {"dictionary_version",
          state->has_published() ? absl::StrCat(state->published().version()) : "none"},
         {"age_s", absl::StrCat(absl::ToInt64Seconds(
                       absl::Now() - absl::FromUnixMicros(state->unix_micros())))}});
  }
  absl::MutexLock lock(&checkpoint_mu_);
  state_restored_ = true;
  return absl::OkStatus();
}

absl::StatusOr<v1::CheckpointReply> Daemon::WriteCheckpoint(absl::string_view why) {
  absl::MutexLock lock(&checkpoint_mu_);
  if (!state_restored_) {
    return absl::FailedPreconditionError("checkpoint: the saved states were not restored");
  }
  v1::CheckpointReply reply;
  for (const auto& [id, w] : workers_) {
    const v1::BoundaryState state = w->SaveState();
    int64_t bytes = 0;
    absl::StatusOr<std::string> path_or = WriteStateFile(config_.state_dir(), state, &bytes);
    w->CountCheckpoint(path_or.ok(), absl::Now());
    if (!path_or.ok()) return path_or.status();
    const std::string& path = *path_or;
    v1::CheckpointReply::Written* written = reply.add_boundaries();
    written->set_boundary(id);
    written->set_path(path);
    written->set_bytes(static_cast<uint64_t>(bytes));
    if (state.has_last_step()) written->set_last_step(state.last_step());
    written->set_dictionary_version(state.published().version());
    Log(LogLevel::kInfo, "checkpoint",
        {{"boundary", absl::StrCat(id)},
         {"why", std::string(why)},
         {"file", path},
         {"bytes", absl::StrCat(bytes)},
         {"last_step", state.has_last_step() ? absl::StrCat(state.last_step()) : "none"}});
  }
  return reply;
}

absl::StatusOr<v1::CheckpointReply> Daemon::Checkpoint(const v1::CheckpointRequest&) {
  if (config_.state_dir().empty()) {
    return absl::FailedPreconditionError(
        "Checkpoint: this mapld has no state_dir; set state_dir in its config (a directory on a "
        "persistent volume) to keep the learned state across restarts");
  }
  return WriteCheckpoint("request");
}

void Daemon::HealthLoop() {
  std::vector<grpc::HealthCheckServiceInterface*> services;
  if (peer_server_ != nullptr && peer_server_->health_check_service() != nullptr) {
    services.push_back(peer_server_->health_check_service());
  }
  if (local_server_->GetHealthCheckService() != nullptr) {
    services.push_back(local_server_->GetHealthCheckService());
  }
  std::map<uint32_t, bool> was_up;
  bool was_ready = true;  // gRPC starts every service SERVING.
  bool first = true;
  do {
    bool ready = !shutting_down();
    for (const auto& [id, t] : transports_) {
      const bool up = t->connected();
      ready &= up;
      auto it = was_up.find(id);
      if (it != was_up.end() && it->second == up) continue;
      was_up[id] = up;
      for (auto* health : services) health->SetServingStatus(BoundaryHealthName(id), up);
    }
    if (first || ready != was_ready) {
      for (auto* health : services) {
        health->SetServingStatus("", ready);
        health->SetServingStatus(kLivenessService, !shutting_down());
      }
      if (!first) {
        Log(ready ? LogLevel::kInfo : LogLevel::kWarning, "health",
            {{"ready", ready ? "true" : "false"}});
      }
      was_ready = ready;
      first = false;
    }
  } while (!shutting_down_.WaitForNotificationWithTimeout(absl::Milliseconds(200)));
  for (auto* health : services) health->SetServingStatus(false);
}

absl::Status Daemon::StartTransports() {
  // The peer listener, for the boundaries this stage listens on (BoundaryConfig.dial: those it is
  // downstream of, unless it dials them, and those it is upstream of with dial: false); it and
  // the local server both serve grpc.health.v1.Health.
  grpc::EnableDefaultHealthCheckService(true);
  bool serves_peers = false;
  for (const auto& [id, w] : workers_) serves_peers |= !DialsPeer(w->config());
  if (config_.has_tls()) {
    Log(LogLevel::kInfo, "peer links use TLS",
        {{"cert_file", config_.tls().cert_file()},
         {"ca_file", config_.tls().ca_file()},
         {"mutual", config_.tls().server_only() ? "false" : "true"}});
  }
  std::string ucx_boundaries;
  for (const auto& [id, w] : workers_) {
    if (w->config().transport() == v1::TRANSPORT_UCX) {
      absl::StrAppend(&ucx_boundaries, ucx_boundaries.empty() ? "" : ",", id);
    }
  }
  if (!ucx_boundaries.empty()) {
    Log(LogLevel::kWarning, "UCX data plane: its frames are plaintext and unauthenticated",
        {{"boundaries", ucx_boundaries},
         {"detail",
          "tls protects only the gRPC handshake (token, identity); UCX peers are accepted on "
          "loopback and ucx.trusted_networks only, unless ucx.allow_untrusted_networks"}});
  }
  if (serves_peers) {
    PeerServerOptions options;
    options.listen_address = config_.peer_listen();
    options.enable_health_service = true;
    options.hello_timeout = absl::Milliseconds(config_.peer_hello_timeout_ms());
    options.max_pending_streams = static_cast<int>(config_.peer_max_pending_streams());
    options.keepalive_time = options.keepalive_timeout =
        absl::Milliseconds(config_.peer_keepalive_ms());
    options.max_message_bytes = 0;
    for (const auto& [id, w] : workers_) {
      if (DialsPeer(w->config())) continue;
      options.max_message_bytes =
          std::max(options.max_message_bytes, MaxPeerMessageBytes(w->config()));
    }
    if (config_.has_tls()) {
      MAPL_ASSIGN_OR_RETURN(options.credentials, TlsServerCredentials(TlsFilesOf(config_.tls())));
    } else if (!IsLoopback(config_.peer_listen())) {
      Log(LogLevel::kWarning, "peer listener without TLS on a non-loopback address",
          {{"address", config_.peer_listen()},
           {"risk", "auth_token travels in clear; set tls for links that leave this host"}});
    }
    MAPL_ASSIGN_OR_RETURN(peer_server_, PeerServer::Create(options));
    for (auto& [id, w] : workers_) {
      if (DialsPeer(w->config())) continue;
      BoundaryWorker* worker = w.get();
      MAPL_ASSIGN_OR_RETURN(PeerLink * link, peer_server_->RegisterBoundary(
                                                 LinkOptions(id), [worker](v1::PeerMessage m) {
                                                   worker->OnPeerMessage(std::move(m));
                                                 }));
      transports_[id] = link;
    }
    MAPL_RETURN_IF_ERROR(peer_server_->Start());
    peer_port_ = peer_server_->port();
    Log(LogLevel::kInfo, "peer listener",
        {{"address", absl::StrCat(HostOf(config_.peer_listen()), ":", peer_port_)}});
  }
  // The other links dial in the background: the listening daemon may start later.
  for (auto& [id, w] : workers_) {
    if (!DialsPeer(w->config())) continue;
    PeerLinkOptions options = LinkOptions(id);
    options.address = w->config().peer_address();
    options.connect_timeout = absl::Milliseconds(config_.peer_connect_timeout_ms());
    if (config_.has_tls()) {
      MAPL_ASSIGN_OR_RETURN(
          options.channel_credentials,
          TlsChannelCredentials(TlsFilesOf(config_.tls()), w->config().peer_identity()));
    } else if (!IsLoopback(options.address)) {
      Log(LogLevel::kWarning, "peer link without TLS to a non-loopback address",
          {{"address", options.address},
           {"risk", "auth_token travels in clear; set tls for links that leave this host"}});
    }
    BoundaryWorker* worker = w.get();
    MAPL_ASSIGN_OR_RETURN(std::unique_ptr<PeerLink> link,
                          PeerLink::Dial(options, [worker](v1::PeerMessage m) {
                            worker->OnPeerMessage(std::move(m));
                          }));
    transports_[id] = link.get();
    dialed_.push_back(std::move(link));
    Log(LogLevel::kInfo, "dialing peer",
        {{"boundary", absl::StrCat(id)}, {"address", w->config().peer_address()}});
  }
  return absl::OkStatus();
}

absl::Status Daemon::StartLocalServer() {
  const std::string& path = config_.local_socket();
  MAPL_RETURN_IF_ERROR(PrepareSocketPath(path));
  // Before the local API: a trainer that attaches collects its buffers there at once.
  MAPL_ASSIGN_OR_RETURN(fd_server_, FdServer::Start(FdSocketPath(path), &sessions_));
  local_service_ = MakeLocalService(this);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat("unix:", path), grpc::InsecureServerCredentials());
  builder.RegisterService(local_service_.get());
  // The socket is created by BuildAndStart: a 0077 umask makes it 0600 from the first moment.
  const mode_t old_umask = ::umask(0077);
  local_server_ = builder.BuildAndStart();
  ::umask(old_umask);
  if (local_server_ == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("local_socket: cannot listen on ", path, " (is the directory writable?)"));
  }
  ::chmod(path.c_str(), 0600);
  Log(LogLevel::kInfo, "ready", {{"stage", absl::StrCat(config_.stage())}, {"socket", path}});
  return absl::OkStatus();
}

void Daemon::Wait() { stopped_.WaitForNotification(); }

void Daemon::Shutdown(absl::Duration drain) {
  absl::MutexLock l(&shutdown_mu_);
  if (stopped_.HasBeenNotified()) return;
  if (!shutting_down_.HasBeenNotified()) shutting_down_.Notify();
  const absl::Time deadline = absl::Now() + drain;
  // Probes see NOT_SERVING from here on.
  if (health_thread_.joinable()) health_thread_.join();
  // Tensors already taken are encoded and queued first; then the transports deliver them.
  for (auto& [id, w] : workers_) w->Stop(deadline);
  if (!config_.state_dir().empty()) {
    // The engines are idle now; what they learned up to here survives the restart.
    absl::StatusOr<v1::CheckpointReply> written = WriteCheckpoint("shutdown");
    if (!written.ok() && !absl::IsFailedPrecondition(written.status())) {
      Log(LogLevel::kError, "checkpoint at shutdown failed",
          {{"error", std::string(written.status().message())}});
    }
  }
  for (auto& [id, t] : transports_) {
    absl::Status s = t->Drain(std::max(deadline - absl::Now(), absl::ZeroDuration()));
    if (drain <= absl::ZeroDuration()) continue;
    if (s.ok()) {
      Log(LogLevel::kInfo, "drained", {{"boundary", absl::StrCat(id)}});
    } else {
      Log(LogLevel::kWarning, "undelivered at shutdown",
          {{"boundary", absl::StrCat(id)}, {"error", std::string(s.message())}});
    }
  }
  if (local_server_ != nullptr) {
    local_server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  }
  for (auto& t : dialed_) t->Close();
  if (peer_server_ != nullptr) peer_server_->Shutdown();
  if (local_server_ != nullptr) {
    local_server_->Wait();
    ::unlink(config_.local_socket().c_str());
  }
  if (fd_server_ != nullptr) fd_server_->Stop();
  sessions_.Clear();
  Log(LogLevel::kInfo, "stopped", {{"stage", absl::StrCat(config_.stage())}});
  stopped_.Notify();
}

PeerLinkOptions Daemon::LinkOptions(uint32_t boundary) const {
  PeerLinkOptions o;
  BoundaryWorker* restarts = workers_.at(boundary).get();
  o.on_peer_restart = [restarts] { restarts->OnPeerRestart(); };
  o.boundary = boundary;
  o.stage = config_.stage();
  o.auth_token = config_.auth_token();
  const BoundaryWorker& worker = *workers_.at(boundary);
  o.peer_identity = worker.config().peer_identity();
  o.max_message_bytes = MaxPeerMessageBytes(worker.config());
  o.fingerprint = BoundaryFingerprintOf(worker.config());
  o.keepalive_time = o.keepalive_timeout = absl::Milliseconds(config_.peer_keepalive_ms());
  if (worker.config().transport() == v1::TRANSPORT_UCX) {
    o.data_plane = v1::DATA_PLANE_UCX;
    const v1::UcxConfig& ucx = config_.ucx();
    o.ucx.tls = ucx.tls();
    o.ucx.net_devices = ucx.net_devices();
    o.ucx.trusted_networks.assign(ucx.trusted_networks().begin(), ucx.trusted_networks().end());
    o.ucx.allow_untrusted_networks = ucx.allow_untrusted_networks();
    o.ucx.max_inflight_bytes = int64_t{ucx.max_inflight_mib()} << 20;
  }
  if (config_.send_rate_mbit() > 0) {
    o.send_rate_bytes_per_second = config_.send_rate_mbit() * 1e6 / 8;
    o.send_burst_bytes =
        std::max<int64_t>(64 << 10, static_cast<int64_t>(o.send_rate_bytes_per_second * 0.05));
  }
  return o;
}

absl::Duration Daemon::Timeout(uint32_t request_ms) const {
  return absl::Milliseconds(request_ms != 0 ? request_ms : config_.recv_timeout_ms());
}

std::vector<v1::BoundaryStats> Daemon::AllStats() const {
  std::vector<v1::BoundaryStats> out;
  for (const auto& [id, w] : workers_) out.push_back(w->stats());
  return out;
}

// ---- local API ----

absl::StatusOr<std::shared_ptr<Session>> Daemon::Attach(const v1::AttachRequest& request,
                                                        v1::AttachEvent* event) {
  if (shutting_down()) return absl::UnavailableError("mapld is shutting down");
  MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, sessions_.Attach(request, event));
  event->set_stage(config_.stage());
  for (const auto& [id, w] : workers_) {
    const v1::BoundaryConfig& c = w->config();
    v1::BoundaryInfo* info = event->add_boundaries();
    info->set_id(id);
    info->set_role(c.role() == v1::ROLE_UPSTREAM ? "upstream" : "downstream");
    info->set_d(c.d());
    info->set_k(c.k());
    info->set_method(v1::Method_Name(c.method()));
    info->set_vocab(c.vocab());
    info->set_max_tokens(c.max_tokens());
  }
  return session;
}

void Daemon::Detach(uint64_t session) { sessions_.Detach(session); }

absl::StatusOr<BoundaryWorker*> Daemon::FindBoundary(uint32_t id, v1::Direction direction,
                                                     bool sending) {
  auto it = workers_.find(id);
  if (it == workers_.end()) {
    std::string have;
    for (const auto& [bid, w] : workers_) absl::StrAppend(&have, have.empty() ? "" : ", ", bid);
    return absl::InvalidArgumentError(absl::StrCat("boundary ", id, " is not served by stage ",
                                                   config_.stage(), " (it serves: ", have, ")"));
  }
  if (direction != v1::DIRECTION_FORWARD && direction != v1::DIRECTION_BACKWARD) {
    return absl::InvalidArgumentError("direction: must be DIRECTION_FORWARD or DIRECTION_BACKWARD");
  }
  const bool up = it->second->config().role() == v1::ROLE_UPSTREAM;
  // Upstream sends forward and receives backward; downstream the opposite.
  if ((up == (direction == v1::DIRECTION_FORWARD)) != sending) {
    return absl::InvalidArgumentError(absl::StrCat(
        "boundary ", id, ": stage ", config_.stage(), " is ", up ? "upstream" : "downstream",
        " of it, so it ", sending ? "sends " : "receives ",
        (up == sending) ? "forward activations" : "backward gradients", ", not ",
        DirName(direction), " tensors"));
  }
  return it->second.get();
}

absl::StatusOr<v1::SendReply> Daemon::Send(const v1::SendRequest& request) {
  if (shutting_down()) return absl::UnavailableError("mapld is shutting down; tensor not taken");
  MAPL_ASSIGN_OR_RETURN(BoundaryWorker * w,
                        FindBoundary(request.boundary(), request.direction(), true));
  MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, sessions_.Find(request.session()));
  const v1::TensorRef& ref = request.tensor();
  MAPL_RETURN_IF_ERROR(CheckBoundaryTensor(ref, w->config(), "tensor"));
  // One deadline for the whole call: the trainer's event (device memory), then room in the
  // boundary's queue.
  const absl::Duration timeout = absl::Milliseconds(
      request.timeout_ms() != 0 ? request.timeout_ms() : config_.send_timeout_ms());
  const absl::Time deadline = absl::Now() + timeout;
  const int32_t* tokens = nullptr;
  if (request.has_token_ids()) {
    if (request.direction() != v1::DIRECTION_FORWARD) {
      return absl::InvalidArgumentError(
          "token_ids: only forward activations carry token ids; leave it unset on a backward "
          "Send");
    }
    MAPL_ASSIGN_OR_RETURN(tokens, TokenIdsView(*session, request.token_ids(), ref.rows()));
  }
  // A tensor in device memory is copied to page-locked host memory first, once the trainer's
  // event says it is written; the worker then takes it from there as from a shared buffer.
  // `staged` (and `session`, for shared buffers) stay until the worker has copied the tensor.
  std::unique_ptr<CudaIpcBuffers::Staged> staged;
  Tensor t;
  if (ref.memory() == v1::MEMORY_CUDA) {
    MAPL_ASSIGN_OR_RETURN(const CudaRegion region, ResolveCudaRef(*session, ref, "tensor"));
    MAPL_ASSIGN_OR_RETURN(staged, session->cuda->CopyToHost(region.buffer, region.offset,
                                                            region.bytes, region.event, deadline));
    t = Tensor{staged->data(), ref.rows(), ref.cols(),
               ref.dtype() == v1::DTYPE_F32 ? DType::kF32 : DType::kBF16};
  } else {
    MAPL_ASSIGN_OR_RETURN(t, BoundaryTensorView(*session, ref, w->config(), "tensor"));
  }
  SendOptions options;
  options.shape.assign(request.shape().begin(), request.shape().end());
  options.evaluation = request.evaluation();
  return w->Send(request.step(), request.microbatch(), ConstTensor{t.data, t.rows, t.cols, t.dtype},
                 tokens, request.wait_encoded(), deadline, options);
}

absl::StatusOr<v1::RecvReply> Daemon::Recv(const v1::RecvRequest& request,
                                           const std::function<bool()>& cancelled) {
  if (shutting_down()) return absl::UnavailableError("mapld is shutting down");
  MAPL_ASSIGN_OR_RETURN(BoundaryWorker * w,
                        FindBoundary(request.boundary(), request.direction(), false));
  MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, sessions_.Find(request.session()));
  const v1::TensorRef& into = request.into();
  if (into.dtype() != v1::DTYPE_F32 && into.dtype() != v1::DTYPE_BF16) {
    return absl::InvalidArgumentError("into.dtype: must be DTYPE_F32 or DTYPE_BF16");
  }
  if (into.cols() != w->config().d()) {
    return absl::InvalidArgumentError(absl::StrCat("into: ", into.cols(), " columns, but boundary ",
                                                   w->config().id(), " has d = ", w->config().d()));
  }
  // Into device memory: the worker writes into page-locked host memory, copied to the device
  // buffer after it.
  // No tensor has more than max_tokens rows, so the staging block needs no more, whatever the
  // capacity of `into` (which only the device buffer's size bounds).
  std::unique_ptr<CudaIpcBuffers::Staged> staged;
  CudaRegion region;
  char* dst = nullptr;
  uint32_t rows = into.rows();
  const uint64_t elem = into.dtype() == v1::DTYPE_F32 ? 4 : 2;
  if (into.memory() == v1::MEMORY_CUDA) {
    MAPL_ASSIGN_OR_RETURN(region, ResolveCudaRef(*session, into, "into"));
    rows = std::min(rows, w->config().max_tokens());
    MAPL_ASSIGN_OR_RETURN(staged,
                          session->cuda->StageForDevice(uint64_t{rows} * into.cols() * elem));
    dst = static_cast<char*>(staged->data());
  } else {
    MAPL_ASSIGN_OR_RETURN(dst, ResolveTensorRef(*session, into, "into"));
  }
  RecvOptions options;
  if (request.has_token_ids_into()) {
    const v1::TensorRef& ids = request.token_ids_into();
    if (ids.dtype() != v1::DTYPE_I32 || ids.cols() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("token_ids_into: must be (capacity, 1) DTYPE_I32, got (", ids.rows(), ", ",
                       ids.cols(), ") ", v1::DType_Name(ids.dtype())));
    }
    MAPL_ASSIGN_OR_RETURN(char* p, ResolveTensorRef(*session, ids, "token_ids_into"));
    options.token_ids = reinterpret_cast<int32_t*>(p);
    options.token_ids_capacity = ids.rows();
  }
  if (request.expect_shape_size() > kMaxShapeDims) {
    return absl::InvalidArgumentError(absl::StrCat("expect_shape: ", request.expect_shape_size(),
                                                   " dimensions; a shape has at most ",
                                                   kMaxShapeDims));
  }
  options.expect_shape.assign(request.expect_shape().begin(), request.expect_shape().end());
  const absl::Duration timeout = Timeout(request.timeout_ms());
  const Tensor out{dst, rows, into.cols(),
                   into.dtype() == v1::DTYPE_F32 ? DType::kF32 : DType::kBF16};
  absl::StatusOr<v1::RecvReply> reply = w->Recv(request.step(), request.microbatch(), out,
                                                absl::Now() + timeout, timeout, cancelled, options);
  if (!reply.ok() || staged == nullptr) return reply;
  // The tensor has left the inbox: a failure from here on loses it, and says so.
  const uint64_t bytes = uint64_t{reply->rows()} * reply->cols() * elem;
  if (absl::Status s = session->cuda->CopyToDevice(std::move(staged), bytes, region.buffer,
                                                   region.offset, region.event);
      !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("the tensor was received but could not be copied "
                                               "into the device buffer, and is lost: ",
                                               s.message()));
  }
  return reply;
}

absl::StatusOr<v1::StepReply> Daemon::Step(const v1::StepRequest& request) {
  if (shutting_down()) return absl::UnavailableError("mapld is shutting down");
  const absl::Duration timeout = Timeout(request.timeout_ms());
  const absl::Time deadline = absl::Now() + timeout;
  v1::StepReply reply;
  // Downstream sides first: their learning signals are what the upstream sides (of this stage's
  // other boundary, and of the previous stage) wait for.
  for (const v1::Role role : {v1::ROLE_DOWNSTREAM, v1::ROLE_UPSTREAM}) {
    for (auto& [id, w] : workers_) {
      if (w->config().role() != role) continue;
      MAPL_RETURN_IF_ERROR(w->Step(request.step(), deadline, timeout, reply.add_boundaries()));
    }
  }
  const uint32_t every = config_.checkpoint_every_steps();
  if (every != 0 && request.step() % every == 0) {
    // The step is closed either way: a checkpoint that fails is logged and retried at the next
    // multiple, not reported as the Step's failure (the trainer would retry a finished step).
    absl::StatusOr<v1::CheckpointReply> written =
        WriteCheckpoint(absl::StrCat("every ", every, " steps"));
    if (!written.ok()) {
      Log(LogLevel::kError, "checkpoint failed",
          {{"step", absl::StrCat(request.step())},
           {"error", std::string(written.status().message())}});
    }
  }
  return reply;
}

absl::StatusOr<v1::StatsReply> Daemon::Stats(const v1::StatsRequest&) {
  v1::StatsReply reply;
  reply.set_stage(config_.stage());
  for (v1::BoundaryStats& s : AllStats()) *reply.add_boundaries() = std::move(s);
  return reply;
}

}  // namespace mapl
