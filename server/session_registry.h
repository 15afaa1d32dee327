// The trainers attached to a daemon (local API sessions) and their shared-memory buffers
// (sealed memfds, server/shm.h), and the checks of every TensorRef a request names against what
// was attached.
//
//   SessionRegistry sessions(stage, /*buffers=*/8, /*buffer_bytes=*/64 << 20, /*max_sessions=*/16);
//   MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, sessions.Attach(request, &event));
//   // the trainer presents event.buffer_secret() on the buffer socket (server/fd_server.h):
//   MAPL_ASSIGN_OR_RETURN(std::vector<UniqueFd> fds, sessions.TakeBufferFds(id, secret));
//   ...
//   MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, sessions.Find(request.session()));
//   MAPL_ASSIGN_OR_RETURN(ConstTensor h, ActivationView(*s, request.tensor(), config, "tensor"));
//
// Session ids are random (getrandom), so a client cannot name another's session by counting, and
// each session's buffers go only to the client that shows its secret, once. At most
// `max_sessions` sessions are attached at a time.
//
// A caller keeps the Session (shared_ptr) for as long as it reads or writes its buffers: a
// detached session's buffers are unmapped (and their fds closed, if never taken) when the last
// user lets go; the kernel frees the memory once the trainer has unmapped it too.
#ifndef MAPL_SERVER_SESSION_REGISTRY_H_
#define MAPL_SERVER_SESSION_REGISTRY_H_

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kernels/cuda_ipc.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "server/fd_passing.h"
#include "server/shm.h"

namespace mapl {

// What one attached trainer holds: its shared buffers, and its device buffers when it asked for
// them (AttachRequest.cuda_buffers).
struct Session {
  uint64_t id = 0;
  std::string client_name;
  uint32_t pid = 0;
  std::vector<std::unique_ptr<SharedMemory>> buffers;
  std::unique_ptr<CudaIpcBuffers> cuda;
};

class SessionRegistry {
 public:
  SessionRegistry(uint32_t stage, uint32_t buffers, uint64_t buffer_bytes, uint32_t max_sessions);

  // A new session with its buffers; fills the event's session id, buffers and buffer_secret,
  // and its device buffers (event.cuda) when the request asks for them.
  // RESOURCE_EXHAUSTED when max_sessions are attached, or the memory or fds run out; for device
  // buffers, what OpenCudaIpcBuffers says (FAILED_PRECONDITION where CUDA cannot be used).
  absl::StatusOr<std::shared_ptr<Session>> Attach(const v1::AttachRequest& request,
                                                  v1::AttachEvent* event) ABSL_LOCKS_EXCLUDED(mu_);
  // The memfds of session `id`'s buffers, in buffer order, for the client that presents the
  // session's secret; once per session, so a secret that leaks later opens nothing.
  // PERMISSION_DENIED for an unknown session, a wrong secret or buffers already taken; the
  // message says which, for the daemon's log (the client is told only that it was refused).
  absl::StatusOr<std::vector<UniqueFd>> TakeBufferFds(uint64_t id, absl::Span<const uint8_t> secret)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets the session (its buffers go when the last user lets go). Unknown ids are ignored.
  void Detach(uint64_t id) ABSL_LOCKS_EXCLUDED(mu_);
  // FAILED_PRECONDITION for a session that is not attached.
  absl::StatusOr<std::shared_ptr<Session>> Find(uint64_t id) const ABSL_LOCKS_EXCLUDED(mu_);
  // Detaches every session.
  void Clear() ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    std::shared_ptr<Session> session;
    FdSecret secret{};
    bool fds_taken = false;
  };

  const uint32_t stage_;
  const uint32_t buffers_;
  const uint64_t buffer_bytes_;
  const uint32_t max_sessions_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, Entry> sessions_ ABSL_GUARDED_BY(mu_);
  // Ids of Attach calls still creating their buffers (outside the lock): they count against
  // max_sessions and no new session may draw them.
  std::set<uint64_t> pending_ ABSL_GUARDED_BY(mu_);
  // Attach calls so far; only names the memfds apart (the session id stays out of names).
  uint64_t attaches_ ABSL_GUARDED_BY(mu_) = 0;
};

// The bytes `ref` names in the session's shared (host) buffers: INVALID_ARGUMENT (naming `what`)
// for device memory, a buffer not attached, an unset dtype, a misaligned offset or a region that
// runs past the buffer.
absl::StatusOr<char*> ResolveTensorRef(const Session& session, const v1::TensorRef& ref,
                                       const char* what);

// A region of the session's device buffers (TensorRef.memory = MEMORY_CUDA).
struct CudaRegion {
  uint32_t buffer = 0;
  uint64_t offset = 0;
  uint64_t bytes = 0;
  int event = -1;  // index into the session's events; -1 for none
};
// The same checks as ResolveTensorRef against the device buffers, and of the event; also
// INVALID_ARGUMENT for a session without device buffers.
absl::StatusOr<CudaRegion> ResolveCudaRef(const Session& session, const v1::TensorRef& ref,
                                          const char* what);
// INVALID_ARGUMENT unless `ref` is a tensor of boundary `config` (f32 or bf16, d columns, 1 to
// max_tokens rows); in host or device memory.
absl::Status CheckBoundaryTensor(const v1::TensorRef& ref, const v1::BoundaryConfig& config,
                                 const char* what);
// A tensor of boundary `config` in host memory (CheckBoundaryTensor, then ResolveTensorRef).
absl::StatusOr<Tensor> BoundaryTensorView(const Session& session, const v1::TensorRef& ref,
                                          const v1::BoundaryConfig& config, const char* what);
// The token ids of a forward tensor of `rows` rows: (rows, 1) DTYPE_I32.
absl::StatusOr<const int32_t*> TokenIdsView(const Session& session, const v1::TensorRef& ref,
                                            int64_t rows);

}  // namespace mapl

#endif  // MAPL_SERVER_SESSION_REGISTRY_H_
