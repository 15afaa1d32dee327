// The trainers attached to a daemon (local API sessions) and their POSIX shared-memory buffers,
// and the checks of every TensorRef a request names against what was attached.
//
//   SessionRegistry sessions(stage, /*buffers=*/8, /*buffer_bytes=*/64 << 20);
//   MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, sessions.Attach(request, &event));
//   ...
//   MAPL_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, sessions.Find(request.session()));
//   MAPL_ASSIGN_OR_RETURN(ConstTensor h, ActivationView(*s, request.tensor(), config, "tensor"));
//
// A caller keeps the Session (shared_ptr) for as long as it reads or writes its buffers: a
// detached session's buffers are unmapped and unlinked when the last user lets go.
#ifndef MAPL_SERVER_SESSION_REGISTRY_H_
#define MAPL_SERVER_SESSION_REGISTRY_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "server/shm.h"

namespace mapl {

// What one attached trainer holds: its shared buffers.
struct Session {
  uint64_t id = 0;
  std::string client_name;
  uint32_t pid = 0;
  std::vector<std::unique_ptr<SharedMemory>> buffers;
};

class SessionRegistry {
 public:
  SessionRegistry(uint32_t stage, uint32_t buffers, uint64_t buffer_bytes);

  // A new session with its buffers; fills the event's session id and buffers.
  absl::StatusOr<std::shared_ptr<Session>> Attach(const v1::AttachRequest& request,
                                                  v1::AttachEvent* event) ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets the session (its buffers go when the last user lets go). Unknown ids are ignored.
  void Detach(uint64_t id) ABSL_LOCKS_EXCLUDED(mu_);
  // FAILED_PRECONDITION for a session that is not attached.
  absl::StatusOr<std::shared_ptr<Session>> Find(uint64_t id) const ABSL_LOCKS_EXCLUDED(mu_);
  // Detaches every session.
  void Clear() ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const uint32_t stage_;
  const uint32_t buffers_;
  const uint64_t buffer_bytes_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
};

// The bytes `ref` names in the session's buffers: INVALID_ARGUMENT (naming `what`) for a buffer
// not attached, an unset dtype, a misaligned offset or a region that runs past the buffer.
absl::StatusOr<char*> ResolveTensorRef(const Session& session, const v1::TensorRef& ref,
                                       const char* what);
// A tensor of boundary `config` (f32 or bf16, d columns, 1 to max_tokens rows).
absl::StatusOr<Tensor> BoundaryTensorView(const Session& session, const v1::TensorRef& ref,
                                          const v1::BoundaryConfig& config, const char* what);
// The token ids of a forward tensor of `rows` rows: (rows, 1) DTYPE_I32.
absl::StatusOr<const int32_t*> TokenIdsView(const Session& session, const v1::TensorRef& ref,
                                            int64_t rows);

}  // namespace mapl

#endif  // MAPL_SERVER_SESSION_REGISTRY_H_
