// The daemon: wiring between the local API, the boundary engines and the peer links.
#include "server/daemon.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "common/status_macros.h"
#include "server/local_service.h"
#include "common/log.h"

namespace mapl {
namespace {

const char* DirName(int d) { return d == v1::DIRECTION_FORWARD ? "forward" : "backward"; }
int DirIndex(int d) { return d == v1::DIRECTION_FORWARD ? kForward : kBackward; }

std::string Describe(uint32_t boundary, int direction, uint64_t step, uint32_t mb) {
  return absl::StrCat("boundary ", boundary, ": ", DirName(direction), " tensor of step ", step,
                      " microbatch ", mb);
}

size_t ElementSize(v1::DType t) { return t == v1::DTYPE_BF16 ? 2 : 4; }

// Tensors taken from trainers and not yet encoded, per boundary: a Send beyond this waits.
constexpr size_t kMaxQueuedJobs = 4;
// Encoded bytes waiting on a peer link before the encoder waits for the link.
constexpr int64_t kMaxLinkQueueBytes = int64_t{256} << 20;

// A region of a session's buffer, checked against what was attached.
absl::StatusOr<char*> Resolve(const Daemon::Session& s, const v1::TensorRef& ref,
                              const char* what) {
  if (ref.buffer() >= s.buffers.size()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".buffer: ", ref.buffer(),
                                                   " is not attached (this client has ",
                                                   s.buffers.size(), " buffers)"));
  }
  if (ref.dtype() != v1::DTYPE_F32 && ref.dtype() != v1::DTYPE_BF16 &&
      ref.dtype() != v1::DTYPE_I32) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".dtype: unset or unknown"));
  }
  const size_t elem = ElementSize(ref.dtype());
  const SharedMemory& shm = *s.buffers[ref.buffer()];
  const unsigned __int128 bytes =
      static_cast<unsigned __int128>(ref.rows()) * ref.cols() * elem + ref.offset();
  if (ref.offset() % elem != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ".offset: ", ref.offset(), " is not a multiple of the element size ", elem));
  }
  if (bytes > shm.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": offset ", ref.offset(), " + ", ref.rows(), " x ", ref.cols(), " x ", elem,
        " bytes runs past the end of buffer ", ref.buffer(), " (", shm.size(), " bytes)"));
  }
  return static_cast<char*>(shm.data()) + ref.offset();
}

absl::StatusOr<ConstTensor> ActivationView(const Daemon::Session& s, const v1::TensorRef& ref,
                                           const v1::BoundaryConfig& b, const char* what) {
  if (ref.dtype() != v1::DTYPE_F32 && ref.dtype() != v1::DTYPE_BF16) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".dtype: must be DTYPE_F32 or DTYPE_BF16"));
  }
  if (ref.cols() != b.d()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": ", ref.cols(), " columns, but boundary ", b.id(), " has hidden size d = ", b.d()));
  }
  if (ref.rows() == 0 || ref.rows() > b.max_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", ref.rows(), " rows; boundary ",
                                                   b.id(), " takes 1 to ", b.max_tokens(),
                                                   " tokens (max_tokens)"));
  }
  MAPL_ASSIGN_OR_RETURN(char* p, Resolve(s, ref, what));
  return ConstTensor{p, ref.rows(), ref.cols(),
                     ref.dtype() == v1::DTYPE_F32 ? DType::kF32 : DType::kBF16};
}

uint64_t FrameWireBytes(const v1::Frame& f) {
  return f.payload().size() + f.scales().size() + f.token_ids().size();
}

uint64_t DictionaryBytes(const v1::PeerMessage& m) {
  if (m.has_dictionary_delta()) return m.dictionary_delta().ByteSizeLong();
  if (m.has_dictionary_snapshot()) return m.dictionary_snapshot().ByteSizeLong();
  return 0;
}

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

}  // namespace

Daemon::Daemon(const v1::DaemonConfig& config)
    : config_(config), backend_(MakeCpuBackend()), metrics_(config.stage()) {}

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
      {{"stage", stage}, {"boundaries", absl::StrCat(config_.boundaries_size())}});

  // Engines first: a config the engine rejects stops startup before anything listens.
  bool serves_peers = false;
  for (const v1::BoundaryConfig& bc : config_.boundaries()) {
    auto b = std::make_unique<Boundary>();
    b->config = bc;
    const bool up = bc.role() == v1::ROLE_UPSTREAM;
    serves_peers |= !up;
    b->metrics = &metrics_.AddBoundary(bc.id(), up ? "upstream" : "downstream");
    absl::StatusOr<std::unique_ptr<BoundaryEngine>> engine =
        BoundaryEngine::Create(bc, backend_.get());
    if (!engine.ok()) {
      return absl::Status(engine.status().code(),
                          absl::StrCat("boundary ", bc.id(), ": ", engine.status().message()));
    }
    {
      absl::MutexLock l(&b->engine_mu);
      b->engine = *std::move(engine);
    }
    Log(LogLevel::kInfo, "boundary",
        {{"id", absl::StrCat(bc.id())},
         {"role", up ? "upstream" : "downstream"},
         {"d", absl::StrCat(bc.d())},
         {"k", absl::StrCat(bc.k())},
         {"method", v1::Method_Name(bc.method())},
         {"forward_codec", v1::Codec_Name(bc.forward_codec())},
         {"backward_codec", v1::Codec_Name(bc.backward_codec())}});
    boundaries_[bc.id()] = std::move(b);
  }

  if (config_.metrics_address() != "off") {
    MAPL_RETURN_IF_ERROR(metrics_.Serve(config_.metrics_address()));
    Log(LogLevel::kInfo, "metrics",
        {{"url",
          absl::StrCat("http://",
                       config_.metrics_address().substr(0, config_.metrics_address().rfind(':')),
                       ":", metrics_.port(), "/metrics")}});
  }

  // The peer listener, for the boundaries this stage is downstream of; it and the local server
  // both serve grpc.health.v1.Health.
  grpc::EnableDefaultHealthCheckService(true);
  if (serves_peers) {
    PeerServerOptions options;
    options.listen_address = config_.peer_listen();
    options.enable_health_service = true;
    MAPL_ASSIGN_OR_RETURN(peer_server_, PeerServer::Create(options));
    for (auto& [id, b] : boundaries_) {
      if (b->config.role() != v1::ROLE_DOWNSTREAM) continue;
      PeerLinkOptions link = LinkOptions(id);
      Boundary* raw = b.get();
      MAPL_ASSIGN_OR_RETURN(
          b->link, peer_server_->RegisterBoundary(
                       link, [this, raw](const v1::PeerMessage& m) { OnPeerMessage(raw, m); }));
    }
    MAPL_RETURN_IF_ERROR(peer_server_->Start());
    peer_port_ = peer_server_->port();
    Log(LogLevel::kInfo, "peer listener",
        {{"address", absl::StrCat(config_.peer_listen().substr(0, config_.peer_listen().rfind(':')),
                                  ":", peer_port_)}});
  }

  // Upstream links dial in the background: the downstream daemon may start later.
  for (auto& [id, b] : boundaries_) {
    if (b->config.role() != v1::ROLE_UPSTREAM) continue;
    PeerLinkOptions options = LinkOptions(id);
    options.address = b->config.peer_address();
    options.connect_timeout = absl::Milliseconds(config_.peer_connect_timeout_ms());
    Boundary* raw = b.get();
    MAPL_ASSIGN_OR_RETURN(
        std::unique_ptr<PeerLink> link,
        PeerLink::Dial(options, [this, raw](const v1::PeerMessage& m) { OnPeerMessage(raw, m); }));
    b->link = link.get();
    dialed_links_.push_back(std::move(link));
    Log(LogLevel::kInfo, "dialing peer",
        {{"boundary", absl::StrCat(id)}, {"address", b->config.peer_address()}});
  }

  for (auto& [id, b] : boundaries_) {
    Boundary* raw = b.get();
    b->encoder = std::thread([this, raw] { EncodeLoop(raw); });
  }

  // The local API last: once trainers can attach, everything behind it is ready.
  const std::string& path = config_.local_socket();
  MAPL_RETURN_IF_ERROR(PrepareSocketPath(path));
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
  Log(LogLevel::kInfo, "ready", {{"stage", stage}, {"socket", path}});
  return absl::OkStatus();
}

void Daemon::Wait() { stopped_.WaitForNotification(); }

void Daemon::Shutdown(absl::Duration drain) {
  absl::MutexLock l(&shutdown_mu_);
  if (stopped_.HasBeenNotified()) return;
  if (!shutting_down_.HasBeenNotified()) shutting_down_.Notify();
  const absl::Time deadline = absl::Now() + drain;
  // Tensors already taken are encoded and queued first; then the links deliver them.
  for (auto& [id, b] : boundaries_) {
    if (!Flush(b.get(), deadline)) {
      absl::MutexLock bl(&b->mu);
      Log(LogLevel::kWarning, "still encoding at the drain deadline; finishing them",
          {{"boundary", absl::StrCat(id)}, {"queued", absl::StrCat(b->jobs.size())}});
    }
    {
      absl::MutexLock bl(&b->mu);
      b->stop = true;
      b->cv.SignalAll();  // wakes the encoder, and Recv and Step waiters (UNAVAILABLE)
    }
    if (b->encoder.joinable()) b->encoder.join();
  }
  for (auto& [id, b] : boundaries_) {
    if (b->link == nullptr) continue;
    absl::Status s = b->link->Drain(std::max(deadline - absl::Now(), absl::ZeroDuration()));
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
  for (auto& link : dialed_links_) link->Close();
  if (peer_server_ != nullptr) peer_server_->Shutdown();
  if (local_server_ != nullptr) {
    local_server_->Wait();
    ::unlink(config_.local_socket().c_str());
  }
  {
    absl::MutexLock sl(&sessions_mu_);
    sessions_.clear();
  }
  Log(LogLevel::kInfo, "stopped", {{"stage", absl::StrCat(config_.stage())}});
  stopped_.Notify();
}

PeerLinkOptions Daemon::LinkOptions(uint32_t boundary) const {
  PeerLinkOptions o;
  o.boundary = boundary;
  o.stage = config_.stage();
  o.auth_token = config_.auth_token();
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

// ---- local API ----

absl::StatusOr<std::shared_ptr<Daemon::Session>> Daemon::Attach(const v1::AttachRequest& request,
                                                                v1::AttachEvent* event) {
  if (shutting_down()) return absl::UnavailableError("mapld is shutting down");
  auto session = std::make_shared<Session>();
  session->client_name = request.client_name();
  session->pid = request.pid();
  {
    absl::MutexLock l(&sessions_mu_);
    session->id = next_session_++;
  }
  for (uint32_t i = 0; i < config_.client_buffers(); ++i) {
    const std::string name =
        absl::StrCat("/mapld-", ::getpid(), "-", config_.stage(), "-", session->id, "-", i);
    MAPL_ASSIGN_OR_RETURN(std::unique_ptr<SharedMemory> shm,
                          SharedMemory::Create(name, config_.client_buffer_bytes()));
    v1::SharedBuffer* buf = event->add_buffers();
    buf->set_name(name);
    buf->set_bytes(shm->size());
    session->buffers.push_back(std::move(shm));
  }
  event->set_session(session->id);
  event->set_stage(config_.stage());
  for (const auto& [id, b] : boundaries_) {
    v1::BoundaryInfo* info = event->add_boundaries();
    info->set_id(id);
    info->set_role(b->config.role() == v1::ROLE_UPSTREAM ? "upstream" : "downstream");
    info->set_d(b->config.d());
    info->set_k(b->config.k());
    info->set_method(v1::Method_Name(b->config.method()));
    info->set_vocab(b->config.vocab());
    info->set_max_tokens(b->config.max_tokens());
  }
  {
    absl::MutexLock l(&sessions_mu_);
    sessions_[session->id] = session;
  }
  Log(LogLevel::kInfo, "client attached",
      {{"session", absl::StrCat(session->id)},
       {"client", session->client_name},
       {"pid", absl::StrCat(session->pid)},
       {"buffers", absl::StrCat(config_.client_buffers(), " x ", config_.client_buffer_bytes())}});
  return session;
}

void Daemon::Detach(uint64_t session) {
  std::shared_ptr<Session> s;
  {
    absl::MutexLock l(&sessions_mu_);
    auto it = sessions_.find(session);
    if (it == sessions_.end()) return;
    s = it->second;
    sessions_.erase(it);
  }
  // The buffers are unmapped and unlinked when the last in-flight call using them returns.
  Log(LogLevel::kInfo, "client detached",
      {{"session", absl::StrCat(session)}, {"client", s->client_name}});
}

absl::StatusOr<std::shared_ptr<Daemon::Session>> Daemon::FindSession(uint64_t id) {
  absl::MutexLock l(&sessions_mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", id, " is not attached; call Attach first"));
  }
  return it->second;  // the caller's reference keeps the buffers mapped until it returns
}

absl::StatusOr<Daemon::Boundary*> Daemon::FindBoundary(uint32_t id, v1::Direction direction,
                                                       bool sending) {
  auto it = boundaries_.find(id);
  if (it == boundaries_.end()) {
    std::string have;
    for (const auto& [bid, b] : boundaries_) absl::StrAppend(&have, have.empty() ? "" : ", ", bid);
    return absl::InvalidArgumentError(absl::StrCat("boundary ", id, " is not served by stage ",
                                                   config_.stage(), " (it serves: ", have, ")"));
  }
  if (direction != v1::DIRECTION_FORWARD && direction != v1::DIRECTION_BACKWARD) {
    return absl::InvalidArgumentError("direction: must be DIRECTION_FORWARD or DIRECTION_BACKWARD");
  }
  const bool up = it->second->config.role() == v1::ROLE_UPSTREAM;
  // Upstream sends forward and receives backward; downstream the opposite.
  const bool ok = (up == (direction == v1::DIRECTION_FORWARD)) == sending;
  if (!ok) {
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
  MAPL_ASSIGN_OR_RETURN(Boundary * b, FindBoundary(request.boundary(), request.direction(), true));
  MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, FindSession(request.session()));
  MAPL_ASSIGN_OR_RETURN(ConstTensor t,
                        ActivationView(*session, request.tensor(), b->config, "tensor"));
  const int32_t* tokens = nullptr;
  if (request.has_token_ids()) {
    const v1::TensorRef& ref = request.token_ids();
    if (request.direction() != v1::DIRECTION_FORWARD) {
      return absl::InvalidArgumentError("token_ids: only forward activations carry token ids");
    }
    if (ref.dtype() != v1::DTYPE_I32 || ref.cols() != 1 || ref.rows() != t.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token_ids: expected (", t.rows, ", 1) DTYPE_I32, one id per row of the tensor"));
    }
    MAPL_ASSIGN_OR_RETURN(char* p, Resolve(*session, ref, "token_ids"));
    tokens = reinterpret_cast<const int32_t*>(p);
  } else if (request.direction() == v1::DIRECTION_FORWARD &&
             b->config.method() == v1::METHOD_MAPL) {
    return absl::InvalidArgumentError(
        absl::StrCat("token_ids: boundary ", b->config.id(),
                     " runs METHOD_MAPL, whose anchors need the token "
                     "ids of every forward microbatch"));
  }
  const Key key{request.direction(), request.step(), request.microbatch()};
  const std::string what =
      Describe(b->config.id(), request.direction(), request.step(), request.microbatch());
  const size_t elem = t.dtype == DType::kF32 ? 4 : 2;
  const size_t bytes = static_cast<size_t>(t.size()) * elem;
  EncodeJob job;
  job.direction = request.direction();
  job.step = request.step();
  job.microbatch = request.microbatch();
  job.dtype = t.dtype;
  job.rows = t.rows;
  {
    absl::MutexLock l(&b->mu);
    if (b->closed_step.has_value() && request.step() <= *b->closed_step) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": step ", request.step(), " was already closed by Step(",
                       *b->closed_step, "); steps only move forward"));
    }
    if (b->sent.count(key)) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, " was already sent; each (step, microbatch) is sent once"));
    }
    // Backpressure: a trainer far ahead of the encoder waits here instead of filling memory.
    while (b->jobs.size() + b->reserved >= kMaxQueuedJobs && !b->stop) b->cv.Wait(&b->mu);
    if (b->stop) return absl::UnavailableError("mapld is shutting down; tensor not taken");
    b->sent.insert(key);  // reserved now, so a concurrent duplicate fails too
    ++b->reserved;        // a queue slot, and Flush waits for it
    if (!b->spare_tensors.empty()) {
      job.tensor.swap(b->spare_tensors.back());
      b->spare_tensors.pop_back();
    }
  }
  // Take the tensor and its ids: after this the trainer may reuse its buffers. Checks run on
  // the copies, so a trainer changing its buffer meanwhile cannot slip anything past them.
  job.tensor.resize(bytes);
  absl::Status taken;
  if (!CopyAndCheckFinite(t, job.tensor.data())) {
    taken = CheckFinite(ConstTensor{job.tensor.data(), t.rows, t.cols, t.dtype}, "tensor");
  }
  if (taken.ok() && tokens != nullptr && b->config.method() == v1::METHOD_MAPL) {
    job.token_ids.assign(tokens, tokens + t.rows);
    for (int64_t i = 0; i < t.rows && taken.ok(); ++i) {
      if (job.token_ids[i] < 0 || static_cast<uint32_t>(job.token_ids[i]) >= b->config.vocab()) {
        taken = absl::InvalidArgumentError(
            absl::StrCat("token_ids[", i, "] = ", job.token_ids[i],
                         ": must be in [0, vocab=", b->config.vocab(), ")"));
      }
    }
  }
  std::shared_ptr<JobResult> result;
  if (request.wait_encoded()) job.result = result = std::make_shared<JobResult>();
  v1::SendReply reply;
  reply.set_raw_bytes(bytes);
  absl::MutexLock l(&b->mu);
  --b->reserved;
  if (!taken.ok() || b->stop) {
    b->sent.erase(key);
    b->spare_tensors.push_back(std::move(job.tensor));
    b->cv.SignalAll();
    if (!taken.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", taken.message()));
    return absl::UnavailableError("mapld is shutting down; tensor not taken");
  }
  b->jobs.push_back(std::move(job));
  b->cv.SignalAll();
  if (result == nullptr) return reply;
  while (!result->done) b->cv.Wait(&b->mu);
  if (!result->status.ok()) return result->status;
  reply.set_wire_bytes(result->wire_bytes);
  return reply;
}

void Daemon::EncodeLoop(Boundary* b) {
  for (;;) {
    EncodeJob job;
    {
      absl::MutexLock l(&b->mu);
      while (b->jobs.empty() && !b->stop) b->cv.Wait(&b->mu);
      if (b->jobs.empty()) return;
      job = std::move(b->jobs.front());
      b->jobs.pop_front();
      ++b->encoding;
      b->cv.SignalAll();  // room in the queue
    }
    Encode(b, job);
    absl::MutexLock l(&b->mu);
    --b->encoding;
    if (b->spare_tensors.size() < kMaxQueuedJobs) b->spare_tensors.push_back(std::move(job.tensor));
    b->cv.SignalAll();
  }
}

void Daemon::Encode(Boundary* b, EncodeJob& job) {
  // Backpressure from the link: with a capped send rate the link's queue would otherwise grow
  // without bound while trainers keep sending.
  while (!b->link->AwaitStats(
      [](const PeerLinkStats& s) { return s.queued_bytes < kMaxLinkQueueBytes; },
      absl::Seconds(1))) {
    absl::MutexLock l(&b->mu);
    if (b->stop) break;
  }
  const std::string what = Describe(b->config.id(), job.direction, job.step, job.microbatch);
  const ConstTensor t{job.tensor.data(), job.rows, b->config.d(), job.dtype};
  const int dir = DirIndex(job.direction);
  absl::Status status;
  uint64_t wire = 0;
  {
    absl::MutexLock el(&b->engine_mu);
    const absl::Time start = absl::Now();
    std::vector<v1::PeerMessage> out;
    if (job.direction == v1::DIRECTION_FORWARD) {
      absl::StatusOr<std::vector<v1::PeerMessage>> r = b->engine->EncodeForward(
          job.step, job.microbatch, t, job.token_ids.empty() ? nullptr : job.token_ids.data());
      if (r.ok()) out = *std::move(r);
      status = r.status();
    } else {
      absl::StatusOr<v1::PeerMessage> r = b->engine->EncodeBackward(job.step, job.microbatch, t);
      if (r.ok()) out.push_back(*std::move(r));
      status = r.status();
    }
    if (status.ok()) {
      b->metrics->encode_seconds[dir]->Observe(absl::ToDoubleSeconds(absl::Now() - start));
      for (const v1::PeerMessage& m : out) {
        if (m.has_frame()) wire += FrameWireBytes(m.frame());
      }
      // Raw bytes count as dense bf16, the reference of DESIGN.md section 2.
      b->metrics->raw_bytes[dir]->Increment(static_cast<double>(t.size() * 2));
      b->metrics->wire_payload_bytes[dir]->Increment(static_cast<double>(wire));
      b->metrics->frames_sent[dir]->Increment();
      SendAll(b, std::move(out));
    }
  }
  if (!status.ok()) {
    // The request was checked when it was taken; this is the engine's verdict (for example a
    // step already closed by Step). The frame is not sent; the peer's Recv will say so by its
    // deadline, and this log line says why.
    status = absl::Status(status.code(), absl::StrCat(what, ": ", status.message()));
    Log(LogLevel::kError, "encode failed", {{"error", std::string(status.message())}});
  }
  if (job.result != nullptr) {
    absl::MutexLock l(&b->mu);
    job.result->status = status;
    job.result->wire_bytes = wire;
    job.result->done = true;
    b->cv.SignalAll();
  }
}

bool Daemon::Flush(Boundary* b, absl::Time deadline) {
  absl::MutexLock l(&b->mu);
  auto busy = [b]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(b->mu) {
    return !b->jobs.empty() || b->encoding > 0 || b->reserved > 0;
  };
  while (busy()) {
    if (b->cv.WaitWithDeadline(&b->mu, deadline) && busy()) return false;
  }
  return true;
}

void Daemon::SendAll(Boundary* b, std::vector<v1::PeerMessage> messages) {
  for (v1::PeerMessage& m : messages) {
    const uint64_t dict = DictionaryBytes(m);
    if (dict) b->metrics->wire_dictionary_bytes->Increment(static_cast<double>(dict));
    absl::Status s = b->link->Send(std::move(m));
    if (!s.ok()) {
      Log(LogLevel::kError, "peer send failed",
          {{"boundary", absl::StrCat(b->config.id())}, {"error", std::string(s.message())}});
    }
  }
}

void Daemon::RequestSnapshot(Boundary* b, const absl::Status& why) {
  // One request per dictionary version held: a burst of frames naming a version we lack must
  // not become a burst of snapshots on a slow link.
  const uint64_t have = b->engine->stats().dict_version;
  if (b->snapshot_asked_at == have) return;
  b->snapshot_asked_at = have;
  v1::PeerMessage m;
  v1::SnapshotRequest* r = m.mutable_snapshot_request();
  r->set_boundary(b->config.id());
  r->set_direction(v1::DIRECTION_FORWARD);
  r->set_have_version(have);
  r->set_detail(std::string(why.message()));
  Log(LogLevel::kWarning, "requesting dictionary snapshot",
      {{"boundary", absl::StrCat(b->config.id())}, {"reason", std::string(why.message())}});
  SendAll(b, {std::move(m)});
}

void Daemon::OnFrame(Boundary* b, const v1::Frame& f) {
  const Key key{f.direction(), f.step(), f.microbatch()};
  const std::string what = Describe(b->config.id(), f.direction(), f.step(), f.microbatch());
  const int dir = DirIndex(f.direction());
  Received r;
  r.rows = f.tokens();
  r.cols = b->config.d();
  absl::Status s;
  // Upstream receives backward frames, downstream forward ones; anything else would sit in the
  // inbox forever.
  const int expected =
      b->config.role() == v1::ROLE_UPSTREAM ? v1::DIRECTION_BACKWARD : v1::DIRECTION_FORWARD;
  if (f.direction() != expected) {
    b->metrics->bad_messages->Increment();
    Log(LogLevel::kError, "frame of the wrong direction dropped",
        {{"boundary", absl::StrCat(b->config.id())}, {"direction", absl::StrCat(f.direction())}});
    return;
  }
  if (f.tokens() == 0 || f.tokens() > b->config.max_tokens()) {
    s = absl::InvalidArgumentError(
        absl::StrCat("frame of ", f.tokens(), " tokens (max_tokens ", b->config.max_tokens(), ")"));
  } else {
    {
      absl::MutexLock l(&b->mu);
      if (!b->spare_inbox.empty()) {
        r.data.swap(b->spare_inbox.back());
        b->spare_inbox.pop_back();
      }
    }
    r.data.resize(static_cast<size_t>(r.rows) * r.cols);
    const Tensor out = Tensor::F32(r.data.data(), r.rows, r.cols);
    absl::MutexLock el(&b->engine_mu);
    const absl::Time start = absl::Now();
    s = f.direction() == v1::DIRECTION_FORWARD ? b->engine->DecodeForward(f, out)
                                               : b->engine->DecodeBackward(f, out);
    b->metrics->decode_seconds[dir]->Observe(absl::ToDoubleSeconds(absl::Now() - start));
    if (s.code() == absl::StatusCode::kFailedPrecondition &&
        f.direction() == v1::DIRECTION_FORWARD) {
      RequestSnapshot(b, s);
    }
  }
  b->metrics->frames_received[dir]->Increment();
  b->metrics->wire_payload_bytes[dir]->Increment(static_cast<double>(FrameWireBytes(f)));
  if (s.ok()) {
    b->metrics->raw_bytes[dir]->Increment(static_cast<double>(r.data.size() * 2));
  } else {
    b->metrics->bad_messages->Increment();
    Log(LogLevel::kError, "frame rejected", {{"what", what}, {"error", std::string(s.message())}});
    // The trainer's Recv gets the reason at once instead of waiting for its deadline.
    r.status =
        absl::Status(s.code(), absl::StrCat(what, ": the frame was rejected: ", s.message()));
    r.data = {};  // release the memory: an error entry holds no tensor
  }
  absl::MutexLock l(&b->mu);
  if (b->inbox.count(key)) {
    Log(LogLevel::kWarning, "duplicate frame ignored", {{"what", what}});
    return;
  }
  b->inbox[key] = std::move(r);
  b->cv.SignalAll();
}

void Daemon::OnPeerMessage(Boundary* b, const v1::PeerMessage& msg) {
  if (msg.body_case() == v1::PeerMessage::kFrame) {
    OnFrame(b, msg.frame());
    return;
  }
  const std::string boundary = absl::StrCat(b->config.id());
  absl::Status s;
  {
    absl::MutexLock el(&b->engine_mu);
    switch (msg.body_case()) {
      case v1::PeerMessage::kLearningSignal:
        s = b->engine->HandleLearningSignal(msg.learning_signal());
        break;
      case v1::PeerMessage::kDictionaryDelta:
        b->metrics->wire_dictionary_bytes->Increment(
            static_cast<double>(msg.dictionary_delta().ByteSizeLong()));
        s = b->engine->HandleDelta(msg.dictionary_delta());
        if (!s.ok()) RequestSnapshot(b, s);
        break;
      case v1::PeerMessage::kDictionarySnapshot:
        b->metrics->wire_dictionary_bytes->Increment(
            static_cast<double>(msg.dictionary_snapshot().ByteSizeLong()));
        s = b->engine->HandleSnapshot(msg.dictionary_snapshot());
        if (s.ok()) b->snapshot_asked_at = ~uint64_t{0};  // a later loss may ask again
        break;
      case v1::PeerMessage::kSnapshotRequest: {
        Log(LogLevel::kWarning, "peer asked for a dictionary snapshot",
            {{"boundary", boundary}, {"reason", msg.snapshot_request().detail()}});
        absl::StatusOr<std::vector<v1::PeerMessage>> out =
            b->engine->HandleSnapshotRequest(msg.snapshot_request());
        if (out.ok()) SendAll(b, *std::move(out));
        s = out.status();
        break;
      }
      default:
        return;  // connection-level messages are the link's business; step markers are advisory
    }
  }
  if (msg.body_case() == v1::PeerMessage::kLearningSignal) {
    absl::MutexLock l(&b->mu);
    ++b->signals;
    b->cv.SignalAll();
  }
  if (!s.ok()) {
    b->metrics->bad_messages->Increment();
    Log(LogLevel::kError, "peer message rejected",
        {{"boundary", boundary}, {"error", std::string(s.message())}});
  }
}

absl::StatusOr<v1::RecvReply> Daemon::Recv(const v1::RecvRequest& request,
                                           const std::function<bool()>& cancelled) {
  if (shutting_down()) return absl::UnavailableError("mapld is shutting down");
  MAPL_ASSIGN_OR_RETURN(Boundary * b, FindBoundary(request.boundary(), request.direction(), false));
  MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, FindSession(request.session()));
  const v1::TensorRef& into = request.into();
  if (into.dtype() != v1::DTYPE_F32 && into.dtype() != v1::DTYPE_BF16) {
    return absl::InvalidArgumentError("into.dtype: must be DTYPE_F32 or DTYPE_BF16");
  }
  if (into.cols() != b->config.d()) {
    return absl::InvalidArgumentError(absl::StrCat("into: ", into.cols(), " columns, but boundary ",
                                                   b->config.id(), " has d = ", b->config.d()));
  }
  MAPL_ASSIGN_OR_RETURN(char* dst, Resolve(*session, into, "into"));
  const Key key{request.direction(), request.step(), request.microbatch()};
  const std::string what =
      Describe(b->config.id(), request.direction(), request.step(), request.microbatch());
  const absl::Duration timeout = Timeout(request.timeout_ms());
  const absl::Time deadline = absl::Now() + timeout;
  Received r;
  {
    absl::MutexLock l(&b->mu);
    while (!b->inbox.count(key)) {
      if (shutting_down())
        return absl::UnavailableError(absl::StrCat(what, ": mapld is shutting down"));
      if (b->cv.WaitWithDeadline(&b->mu, deadline) && !b->inbox.count(key)) {
        return absl::DeadlineExceededError(absl::StrCat(
            what, " did not arrive within ", absl::FormatDuration(timeout),
            b->link != nullptr && !b->link->connected() ? " (the peer link is not connected)"
                                                        : ""));
      }
    }
    auto it = b->inbox.find(key);
    if (!it->second.status.ok()) {
      absl::Status s = it->second.status;
      b->inbox.erase(it);
      return s;
    }
    if (it->second.rows > into.rows()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has ", it->second.rows, " rows; `into` holds only ", into.rows()));
    }
    // A client that gave up (its own deadline, or it died) may already reuse `into` for
    // something else: leave the tensor in the inbox for a retry instead of writing there.
    if (cancelled && cancelled()) {
      return absl::CancelledError(absl::StrCat(what, ": the caller cancelled the Recv"));
    }
    r = std::move(it->second);
    b->inbox.erase(it);
  }
  FromF32(r.data.data(),
          Tensor{dst, r.rows, r.cols, into.dtype() == v1::DTYPE_F32 ? DType::kF32 : DType::kBF16});
  v1::RecvReply reply;
  reply.set_rows(static_cast<uint32_t>(r.rows));
  reply.set_cols(static_cast<uint32_t>(r.cols));
  return reply;
}

void Daemon::FillStats(Boundary* b, v1::BoundaryStats* out) {
  const BoundaryStats st = b->engine->stats();
  out->set_id(b->config.id());
  out->set_role(b->config.role() == v1::ROLE_UPSTREAM ? "upstream" : "downstream");
  out->set_dictionary_version(st.dict_version);
  out->set_dictionary_checksum(st.dict_checksum);
  out->set_orthogonality_error(st.orthogonality_error);
  out->set_raw_bytes_sent(st.raw_bytes_sent);
  out->set_raw_bytes_received(st.raw_bytes_received);
  out->set_payload_bytes_sent(st.payload_bytes_sent);
  out->set_payload_bytes_received(st.payload_bytes_received);
  out->set_dictionary_bytes_sent(st.dictionary_bytes_sent);
  out->set_dictionary_bytes_received(st.dictionary_bytes_received);
  out->set_frames_sent(st.frames_encoded);
  out->set_frames_received(st.frames_decoded);
  out->set_rvq_relative_mse(st.rvq_relative_mse);
  b->metrics->orthogonality_error->Set(st.orthogonality_error);
  b->metrics->dictionary_version->Set(static_cast<double>(st.dict_version));
  b->metrics->dictionary_checksum->Set(
      static_cast<double>(st.dict_checksum & ((uint64_t{1} << 53) - 1)));
}

absl::StatusOr<v1::StepReply> Daemon::Step(const v1::StepRequest& request) {
  if (shutting_down()) return absl::UnavailableError("mapld is shutting down");
  const absl::Duration timeout = Timeout(request.timeout_ms());
  const absl::Time deadline = absl::Now() + timeout;
  v1::StepReply reply;
  // Downstream sides first: their learning signals are what the upstream sides (of this stage's
  // other boundary, and of the previous stage) wait for.
  for (int pass = 0; pass < 2; ++pass) {
    const v1::Role role = pass == 0 ? v1::ROLE_DOWNSTREAM : v1::ROLE_UPSTREAM;
    for (auto& [id, b] : boundaries_) {
      if (b->config.role() != role) continue;
      const std::string where = absl::StrCat("boundary ", id, ": step ", request.step(), ": ");
      {
        // A retried Step (say, after its learning-signal wait timed out on a middle stage) skips
        // the boundaries it already closed.
        absl::MutexLock l(&b->mu);
        if (b->closed_step.has_value() && *b->closed_step >= request.step()) continue;
      }
      // Everything the trainer sent in this step is encoded before the step closes.
      if (!Flush(b.get(), deadline)) {
        return absl::DeadlineExceededError(
            absl::StrCat(where, "tensors sent in this step were not encoded within ",
                         absl::FormatDuration(timeout)));
      }
      for (;;) {
        uint64_t seen;
        {
          absl::MutexLock l(&b->mu);
          seen = b->signals;
        }
        absl::StatusOr<std::vector<v1::PeerMessage>> out;
        {
          absl::MutexLock el(&b->engine_mu);
          out = b->engine->Step(request.step());
          if (out.ok()) {
            SendAll(b.get(), *std::move(out));
            FillStats(b.get(), reply.add_boundaries());
            break;
          }
        }
        if (out.status().code() != absl::StatusCode::kFailedPrecondition ||
            role != v1::ROLE_UPSTREAM) {
          return absl::Status(out.status().code(), absl::StrCat(where, out.status().message()));
        }
        // The downstream's learning signal for this step has not arrived yet: wait for it.
        absl::MutexLock l(&b->mu);
        while (b->signals == seen && !b->stop) {
          if (b->cv.WaitWithDeadline(&b->mu, deadline) && b->signals == seen) {
            return absl::DeadlineExceededError(absl::StrCat(
                where, "the downstream's learning signal did not arrive within ",
                absl::FormatDuration(timeout), " (has the downstream trainer called Step(",
                request.step(), ")?): ", out.status().message()));
          }
        }
        if (b->stop) return absl::UnavailableError("mapld is shutting down");
      }
      absl::MutexLock l(&b->mu);
      b->closed_step = request.step();
      for (auto it = b->sent.begin(); it != b->sent.end();) {
        it = std::get<1>(*it) <= request.step() ? b->sent.erase(it) : std::next(it);
      }
      // Tensors of closed steps that the trainer never received would stay forever.
      int64_t stale = 0;
      for (auto it = b->inbox.begin(); it != b->inbox.end();) {
        if (std::get<1>(it->first) <= request.step()) {
          it = b->inbox.erase(it);
          ++stale;
        } else {
          ++it;
        }
      }
      if (stale > 0) {
        Log(LogLevel::kWarning, "dropped tensors of a closed step that were never received",
            {{"boundary", absl::StrCat(id)},
             {"step", absl::StrCat(request.step())},
             {"count", absl::StrCat(stale)}});
      }
    }
  }
  metrics_.Refresh();
  return reply;
}

absl::StatusOr<v1::StatsReply> Daemon::Stats(const v1::StatsRequest&) {
  v1::StatsReply reply;
  reply.set_stage(config_.stage());
  for (auto& [id, b] : boundaries_) {
    absl::MutexLock l(&b->engine_mu);
    FillStats(b.get(), reply.add_boundaries());
  }
  metrics_.Refresh();
  return reply;
}

}  // namespace mapl
