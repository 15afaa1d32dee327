#include "server/session_registry.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace mapl {
namespace {

size_t ElementSize(v1::DType t) { return t == v1::DTYPE_BF16 ? 2 : 4; }

}  // namespace

SessionRegistry::SessionRegistry(uint32_t stage, uint32_t buffers, uint64_t buffer_bytes)
    : stage_(stage), buffers_(buffers), buffer_bytes_(buffer_bytes) {}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Attach(const v1::AttachRequest& request,
                                                                 v1::AttachEvent* event) {
  auto session = std::make_shared<Session>();
  session->client_name = request.client_name();
  session->pid = request.pid();
  {
    absl::MutexLock l(&mu_);
    session->id = next_id_++;
  }
  for (uint32_t i = 0; i < buffers_; ++i) {
    const std::string name =
        absl::StrCat("/mapld-", ::getpid(), "-", stage_, "-", session->id, "-", i);
    MAPL_ASSIGN_OR_RETURN(std::unique_ptr<SharedMemory> shm,
                          SharedMemory::Create(name, buffer_bytes_));
    v1::SharedBuffer* buf = event->add_buffers();
    buf->set_name(name);
    buf->set_bytes(shm->size());
    session->buffers.push_back(std::move(shm));
  }
  event->set_session(session->id);
  {
    absl::MutexLock l(&mu_);
    sessions_[session->id] = session;
  }
  Log(LogLevel::kInfo, "client attached",
      {{"session", absl::StrCat(session->id)},
       {"client", session->client_name},
       {"pid", absl::StrCat(session->pid)},
       {"buffers", absl::StrCat(buffers_, " x ", buffer_bytes_)}});
  return session;
}

void SessionRegistry::Detach(uint64_t id) {
  std::shared_ptr<Session> s;
  {
    absl::MutexLock l(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;
    s = it->second;
    sessions_.erase(it);
  }
  // The buffers are unmapped and unlinked when the last in-flight call using them returns.
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
  return it->second;  // the caller's reference keeps the buffers mapped until it returns
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
