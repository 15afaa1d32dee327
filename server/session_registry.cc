#include "server/session_registry.h"

#include <errno.h>
#include <sys/random.h>
#include <unistd.h>

#include <cstring>
#include <functional>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace mapl {
namespace {

size_t ElementSize(v1::DType t) { return t == v1::DTYPE_BF16 ? 2 : 4; }

// `size` bytes from the kernel's CSPRNG. getrandom blocks only until the pool is first seeded
// (early boot); it never returns fewer bytes than asked for at these sizes, but a signal may
// interrupt it, hence the loop.
absl::Status FillRandom(void* out, size_t size) {
  uint8_t* p = static_cast<uint8_t*>(out);
  while (size > 0) {
    const ssize_t n = ::getrandom(p, size, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("getrandom: ", std::strerror(errno)));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Compares all of both, so the time taken says nothing about where a guess went wrong.
bool SameSecret(const FdSecret& want, absl::Span<const uint8_t> got) {
  if (got.size() != want.size()) return false;
  uint8_t diff = 0;
  for (size_t i = 0; i < want.size(); ++i) diff |= want[i] ^ got[i];
  return diff == 0;
}

// The device buffers and events the request asks for, if any, into the session and the event.
absl::Status AttachCuda(const v1::AttachRequest& request, Session* session,
                        v1::AttachEvent* event) {
  if (request.cuda_buffers() == 0) {
    if (request.cuda_buffer_bytes() != 0 || request.cuda_events() != 0 ||
        !request.cuda_device_uuid().empty()) {
      return absl::InvalidArgumentError(
          "cuda_buffer_bytes, cuda_events or cuda_device_uuid given with cuda_buffers = 0: ask "
          "for at least one device buffer, or leave them all unset for a host-only session");
    }
    return absl::OkStatus();
  }
  CudaIpcRequest want;
  want.buffers = request.cuda_buffers();
  want.buffer_bytes = request.cuda_buffer_bytes();
  want.events = request.cuda_events();
  want.device_uuid = request.cuda_device_uuid();
  MAPL_ASSIGN_OR_RETURN(session->cuda, OpenCudaIpcBuffers(want));
  v1::CudaBuffers* out = event->mutable_cuda();
  out->set_device_uuid(session->cuda->device_uuid());
  out->set_buffer_bytes(session->cuda->buffer_bytes());
  for (const std::string& h : session->cuda->memory_handles()) out->add_memory_handles(h);
  for (const std::string& h : session->cuda->event_handles()) out->add_event_handles(h);
  return absl::OkStatus();
}

// The checks every reference gets, against `count` buffers whose sizes `size_of` gives; `kind`
// ("" or "device ") names them in messages.
absl::Status CheckRegion(const v1::TensorRef& ref, const char* what, size_t count,
                         const std::function<uint64_t(uint32_t)>& size_of, const char* kind) {
  if (ref.buffer() >= count) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".buffer: ", ref.buffer(),
                                                   " is not attached (this client has ", count, " ",
                                                   kind, " buffers)"));
  }
  if (ref.dtype() != v1::DTYPE_F32 && ref.dtype() != v1::DTYPE_BF16 &&
      ref.dtype() != v1::DTYPE_I32) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".dtype: unset or unknown"));
  }
  const size_t elem = ElementSize(ref.dtype());
  const uint64_t size = size_of(ref.buffer());
  const unsigned __int128 bytes =
      static_cast<unsigned __int128>(ref.rows()) * ref.cols() * elem + ref.offset();
  if (ref.offset() % elem != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ".offset: ", ref.offset(), " is not a multiple of the element size ", elem));
  }
  if (bytes > size) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": offset ", ref.offset(), " + ", ref.rows(), " x ", ref.cols(), " x ", elem,
        " bytes runs past the end of ", kind, "buffer ", ref.buffer(), " (", size, " bytes)"));
  }
  return absl::OkStatus();
}

}  // namespace

SessionRegistry::SessionRegistry(uint32_t stage, uint32_t buffers, uint64_t buffer_bytes,
                                 uint32_t max_sessions)
    : stage_(stage), buffers_(buffers), buffer_bytes_(buffer_bytes), max_sessions_(max_sessions) {}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Attach(const v1::AttachRequest& request,
                                                                 v1::AttachEvent* event) {
  auto session = std::make_shared<Session>();
  session->client_name = request.client_name();
  session->pid = request.pid();
  uint64_t ordinal = 0;
  {
    absl::MutexLock l(&mu_);
    if (sessions_.size() + pending_.size() >= max_sessions_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "mapld already has ", sessions_.size() + pending_.size(),
          " trainers attached, its limit (max_sessions = ", max_sessions_,
          "); end a trainer that is done (its session ends with its process or Close()) or raise "
          "max_sessions in the daemon's config"));
    }
    // Random and unique: a client cannot reach another's session by counting. Zero stays
    // free, so an unset session field never names a session.
    do {
      MAPL_RETURN_IF_ERROR(FillRandom(&session->id, sizeof(session->id)));
    } while (session->id == 0 || sessions_.count(session->id) != 0 ||
             pending_.count(session->id) != 0);
    pending_.insert(session->id);
    ordinal = ++attaches_;
  }
  // The buffers are created outside the lock (reserving them takes a while), under the pending
  // id; a failure gives the id and its slot back.
  FdSecret secret;
  absl::Status created = FillRandom(secret.data(), secret.size());
  for (uint32_t i = 0; created.ok() && i < buffers_; ++i) {
    // Daemon pid, stage and attach number: enough to tell buffers apart in /proc/<pid>/maps.
    const std::string name = absl::StrCat("mapld-", ::getpid(), "-", stage_, "-", ordinal, "-", i);
    absl::StatusOr<std::unique_ptr<SharedMemory>> shm = SharedMemory::Create(name, buffer_bytes_);
    if (!shm.ok()) {
      created = shm.status();
      break;
    }
    v1::SharedBuffer* buf = event->add_buffers();
    buf->set_name(name);
    buf->set_bytes((*shm)->size());
    session->buffers.push_back(*std::move(shm));
  }
  if (created.ok()) created = AttachCuda(request, session.get(), event);
  size_t attached = 0;
  {
    absl::MutexLock l(&mu_);
    pending_.erase(session->id);
    if (created.ok()) sessions_[session->id] = Entry{session, secret, false};
    attached = sessions_.size();
  }
  if (!created.ok()) {
    event->clear_buffers();
    event->clear_cuda();
    return created;  // the buffers made so far go with `session`
  }
  event->set_session(session->id);
  event->set_buffer_secret(secret.data(), secret.size());
  Log(LogLevel::kInfo, "client attached",
      {{"session", absl::StrCat(session->id)},
       {"client", session->client_name},
       {"pid", absl::StrCat(session->pid)},
       {"buffers", absl::StrCat(buffers_, " x ", buffer_bytes_)},
       {"cuda_buffers", session->cuda == nullptr ? std::string("none")
                                                 : absl::StrCat(request.cuda_buffers(), " x ",
                                                                request.cuda_buffer_bytes(), ", ",
                                                                request.cuda_events(), " events")},
       {"sessions", absl::StrCat(attached, "/", max_sessions_)}});
  return session;
}

absl::StatusOr<std::vector<UniqueFd>> SessionRegistry::TakeBufferFds(
    uint64_t id, absl::Span<const uint8_t> secret) {
  absl::MutexLock l(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    return absl::PermissionDeniedError(absl::StrCat("session ", id, " is not attached"));
  }
  Entry& e = it->second;
  if (!SameSecret(e.secret, secret)) {
    return absl::PermissionDeniedError(absl::StrCat("wrong secret for session ", id));
  }
  if (e.fds_taken) {
    return absl::PermissionDeniedError(
        absl::StrCat("the buffers of session ", id, " were already handed out"));
  }
  e.fds_taken = true;
  std::vector<UniqueFd> fds;
  fds.reserve(e.session->buffers.size());
  for (const std::unique_ptr<SharedMemory>& b : e.session->buffers) fds.push_back(b->TakeFd());
  return fds;
}

void SessionRegistry::Detach(uint64_t id) {
  std::shared_ptr<Session> s;
  {
    absl::MutexLock l(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;
    s = it->second.session;
    sessions_.erase(it);
  }
  // The buffers are unmapped when the last in-flight call using them returns.
  Log(LogLevel::kInfo, "client detached",
      {{"session", absl::StrCat(id)}, {"client", s->client_name}});
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Find(uint64_t id) const {
  absl::MutexLock l(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", id, " is not attached; call Attach first"));
  }
  return it->second.session;  // the caller's reference keeps the buffers mapped until it returns
}

void SessionRegistry::Clear() {
  absl::MutexLock l(&mu_);
  sessions_.clear();
}

size_t SessionRegistry::size() const {
  absl::MutexLock l(&mu_);
  return sessions_.size();
}

absl::StatusOr<char*> ResolveTensorRef(const Session& s, const v1::TensorRef& ref,
                                       const char* what) {
  if (ref.memory() == v1::MEMORY_CUDA) {  // the daemon resolves tensors in device memory itself
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".memory: must be MEMORY_HOST (token ids are always in host memory)"));
  }
  if (ref.memory() != v1::MEMORY_HOST) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".memory: unknown value ", static_cast<int>(ref.memory()),
                     "; MEMORY_HOST, or MEMORY_CUDA for a tensor in the session's device buffers"));
  }
  if (ref.event() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".event: ", ref.event(),
                     ", but only tensors in device memory take an event; "
                     "leave it 0"));
  }
  MAPL_RETURN_IF_ERROR(CheckRegion(
      ref, what, s.buffers.size(), [&s](uint32_t b) { return s.buffers[b]->size(); }, ""));
  return static_cast<char*>(s.buffers[ref.buffer()]->data()) + ref.offset();
}

absl::StatusOr<CudaRegion> ResolveCudaRef(const Session& s, const v1::TensorRef& ref,
                                          const char* what) {
  if (s.cuda == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(what,
                     ".memory: MEMORY_CUDA, but this session has no device buffers; "
                     "attach with cuda_buffers > 0, or pass the tensor in host memory"));
  }
  const CudaIpcBuffers& cuda = *s.cuda;
  MAPL_RETURN_IF_ERROR(CheckRegion(
      ref, what, cuda.memory_handles().size(), [&cuda](uint32_t) { return cuda.buffer_bytes(); },
      "device "));
  if (ref.event() > cuda.event_handles().size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".event: ", ref.event(), ", but this session has ",
                     cuda.event_handles().size(), " events (1 + an index; 0 for none)"));
  }
  CudaRegion r;
  r.buffer = ref.buffer();
  r.offset = ref.offset();
  r.bytes = uint64_t{ref.rows()} * ref.cols() * ElementSize(ref.dtype());
  r.event = static_cast<int>(ref.event()) - 1;
  return r;
}

absl::Status CheckBoundaryTensor(const v1::TensorRef& ref, const v1::BoundaryConfig& b,
                                 const char* what) {
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
  return absl::OkStatus();
}

absl::StatusOr<Tensor> BoundaryTensorView(const Session& s, const v1::TensorRef& ref,
                                          const v1::BoundaryConfig& b, const char* what) {
  MAPL_RETURN_IF_ERROR(CheckBoundaryTensor(ref, b, what));
  MAPL_ASSIGN_OR_RETURN(char* p, ResolveTensorRef(s, ref, what));
  return Tensor{p, ref.rows(), ref.cols(),
                ref.dtype() == v1::DTYPE_F32 ? DType::kF32 : DType::kBF16};
}

absl::StatusOr<const int32_t*> TokenIdsView(const Session& s, const v1::TensorRef& ref,
                                            int64_t rows) {
  if (ref.dtype() != v1::DTYPE_I32 || ref.cols() != 1 || ref.rows() != rows) {
    return absl::InvalidArgumentError(absl::StrCat("token_ids: expected (", rows,
                                                   ", 1) DTYPE_I32, one id per row of the tensor"));
  }
  MAPL_ASSIGN_OR_RETURN(char* p, ResolveTensorRef(s, ref, "token_ids"));
  return reinterpret_cast<const int32_t*>(p);
}

}  // namespace mapl
