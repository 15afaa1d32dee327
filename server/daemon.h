// mapld's core: one Daemon per pipeline stage. It only wires the parts together:
//   - the compute backend, chosen by name in the config (kernels/registry.h);
//   - the session registry: attached trainers, their shared memory, TensorRef checks
//     (session_registry.h);
//   - one boundary worker per boundary of the stage, each over its engine (boundary_worker.h,
//     engine.h);
//   - one transport per boundary (server/transport/): the gRPC peer link, dialled by the
//     upstream side and served by the downstream side's peer server;
//   - the local API server (gRPC on a Unix socket, local_service.h), the metrics endpoint and
//     the health service.
// main.cc only parses flags.
//
//   MAPL_ASSIGN_OR_RETURN(mapl::v1::DaemonConfig config, mapl::LoadConfig(path, overrides));
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::Daemon> daemon, mapl::Daemon::Start(config));
//   daemon->Wait();          // until Shutdown() (main calls it on SIGTERM / SIGINT)
//
// Data flow of one microbatch (docs/ARCHITECTURE.md): the trainer's Send checks the request
// against its session and hands the tensor to the boundary's worker, which copies it and
// returns; the worker's encoder thread encodes it and queues the frame on the transport, in Send
// order. On the other side the transport's reader hands the frame to that boundary's worker,
// whose decoder thread decodes it into the inbox, and the trainer's Recv copies it into its
// buffer. Step closes the step on every boundary of the stage, downstream sides first.
#ifndef MAPL_SERVER_DAEMON_H_
#define MAPL_SERVER_DAEMON_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "kernels/backend.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "server/boundary_worker.h"
#include "server/fd_server.h"
#include "server/metrics.h"
#include "server/session_registry.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_server.h"
#include "server/transport/transport.h"

namespace mapl {

class Daemon {
 public:
  // Starts everything and returns once the local socket and the peer listener accept
  // connections. Upstream links connect in the background (the peer may start later).
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const v1::DaemonConfig& config);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Blocks until Shutdown() has finished.
  void Wait();
  // Stops taking new tensors, waits up to `drain` for queued frames to be delivered and
  // acknowledged (logging any that were not), then stops the servers. Idempotent.
  void Shutdown(absl::Duration drain);

  const v1::DaemonConfig& config() const { return config_; }
  int peer_port() const { return peer_port_; }  // The peer listener's; 0 when no boundary listens.
  int metrics_port() const { return metrics_ != nullptr ? metrics_->port() : 0; }

  // ---- the local API, called by LocalService (server/local_service.cc) ----
  absl::StatusOr<std::shared_ptr<Session>> Attach(const v1::AttachRequest& request,
                                                  v1::AttachEvent* event);
  void Detach(uint64_t session);
  absl::StatusOr<v1::SendReply> Send(const v1::SendRequest& request);
  // `cancelled` (may be empty) says whether the caller gave up; checked before writing into
  // its buffer.
  absl::StatusOr<v1::RecvReply> Recv(const v1::RecvRequest& request,
                                     const std::function<bool()>& cancelled = {});
  absl::StatusOr<v1::StepReply> Step(const v1::StepRequest& request);
  absl::StatusOr<v1::StatsReply> Stats(const v1::StatsRequest& request);
  // Writes every boundary's learned state to state_dir (state_store.h); also called every
  // checkpoint_every_steps steps and at Shutdown. FAILED_PRECONDITION without a state_dir.
  absl::StatusOr<v1::CheckpointReply> Checkpoint(const v1::CheckpointRequest& request);
  bool shutting_down() const { return shutting_down_.HasBeenNotified(); }

 private:
  explicit Daemon(const v1::DaemonConfig& config);
  absl::Status Init();
  absl::Status StartTransports();
  absl::Status StartLocalServer();
  absl::StatusOr<BoundaryWorker*> FindBoundary(uint32_t id, v1::Direction direction, bool sending);
  std::vector<v1::BoundaryStats> AllStats() const;
  absl::Duration Timeout(uint32_t request_ms) const;
  PeerLinkOptions LinkOptions(uint32_t boundary) const;
  // Restores each boundary's state from state_dir, where a file exists (Init, before Start).
  absl::Status RestoreStates();
  absl::StatusOr<v1::CheckpointReply> WriteCheckpoint(absl::string_view why)
      ABSL_LOCKS_EXCLUDED(checkpoint_mu_);
  // Keeps the health services' statuses (both servers) in step with the links until shutdown.
  void HealthLoop();

  const v1::DaemonConfig config_;
  std::unique_ptr<Backend> backend_;
  SessionRegistry sessions_;
  std::map<uint32_t, std::unique_ptr<BoundaryWorker>> workers_;
  // Transports: the listening ends belong to peer_server_, the dialing ends to dialed_.
  std::unique_ptr<PeerServer> peer_server_;
  std::vector<std::unique_ptr<Transport>> dialed_;
  std::map<uint32_t, Transport*> transports_;
  int peer_port_ = 0;
  // After the workers: destroyed first, so no scrape reads a destroyed worker.
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<FdServer> fd_server_;  // the buffer socket, next to the local socket
  std::unique_ptr<grpc::Service> local_service_;
  std::unique_ptr<grpc::Server> local_server_;

  std::thread health_thread_;  // HealthLoop; joined by Shutdown.
  absl::Notification shutting_down_;
  absl::Notification stopped_;
  absl::Mutex shutdown_mu_;
  // One checkpoint at a time (they write the same files); set once the states were restored, so
  // that a daemon that failed to start never overwrites a good checkpoint with a fresh state.
  absl::Mutex checkpoint_mu_;
  bool state_restored_ = false;
};

}  // namespace mapl

#endif  // MAPL_SERVER_DAEMON_H_
