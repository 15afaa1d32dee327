#include "server/session_registry.h"

#include <errno.h>
#include <sys/random.h>
#include <unistd.h>

#include <cstring>

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
  size_t attached = 0;
  {
    absl::MutexLock l(&mu_);
    pending_.erase(session->id);
    if (created.ok()) sessions_[session->id] = Entry{session, secret, false};
    attached = sessions_.size();
  }
  if (!created.ok()) {
    event->clear_buffers();
    return created;  // the buffers made so far go with `session`
  }
  event->set_session(session->id);
  event->set_buffer_secret(secret.data(), secret.size());
  Log(LogLevel::kInfo, "client attached",
      {{"session", absl::StrCat(session->id)},
       {"client", session->client_name},
       {"pid", absl::StrCat(session->pid)},
       {"buffers", absl::StrCat(buffers_, " x ", buffer_bytes_)},
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

absl::StatusOr<Tensor> BoundaryTensorView(const Session& s, const v1::TensorRef& ref,
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
