// The buffer socket: where an attached trainer collects the memfds of its shared buffers. gRPC
// cannot pass file descriptors, so they travel here, on a Unix SOCK_SEQPACKET socket next to the
// local API's (<local_socket>.fds), in SCM_RIGHTS messages; the framing is in
// server/fd_passing.h.
//
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<FdServer> fds,
//                         FdServer::Start(FdSocketPath(config.local_socket()), &sessions));
//   ...
//   fds->Stop();   // or let it go: the destructor stops it and removes the socket file
//
// Who gets fds: a peer with the daemon's own uid (SO_PEERCRED; the socket file is mode 0600
// besides) that names an attached session and presents its secret, once per session
// (SessionRegistry::TakeBufferFds). Anything else gets a refusal and no fds, and one log line.
// One thread serves one connection at a time, each bounded by a short timeout: only the
// daemon's user can connect at all, and a trainer asks once.
#ifndef MAPL_SERVER_FD_SERVER_H_
#define MAPL_SERVER_FD_SERVER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/fd_passing.h"
#include "server/session_registry.h"

namespace mapl {

class FdServer {
 public:
  // Removes a stale socket file at `path` (refuses one that a live process serves), listens
  // there, mode 0600 from the first moment, and starts the serving thread. `sessions` must
  // outlive the server.
  static absl::StatusOr<std::unique_ptr<FdServer>> Start(const std::string& path,
                                                         SessionRegistry* sessions);
  ~FdServer();
  FdServer(const FdServer&) = delete;
  FdServer& operator=(const FdServer&) = delete;

  // Stops serving (a request in progress is cut short), joins the thread and removes the socket
  // file. Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(stop_mu_);

  const std::string& path() const { return path_; }

  // How long one connection may take to send its request.
  static constexpr absl::Duration kRequestTimeout = absl::Seconds(2);

 private:
  FdServer(std::string path, SessionRegistry* sessions, UniqueFd listener, UniqueFd wake);
  void Serve();
  void Handle(int connection);

  const std::string path_;
  SessionRegistry* const sessions_;
  const UniqueFd listener_;
  const UniqueFd wake_;  // an eventfd: Stop() writes it, the serving thread polls it
  std::thread thread_;
  absl::Mutex stop_mu_;
  bool stopped_ ABSL_GUARDED_BY(stop_mu_) = false;
};

}  // namespace mapl

#endif  // MAPL_SERVER_FD_SERVER_H_
