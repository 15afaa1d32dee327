// mapld's core: one Daemon per pipeline stage. It owns the local API server (gRPC on a Unix
// socket, tensors in POSIX shared memory), one BoundaryEngine and one peer link per boundary of
// the stage, the metrics endpoint, and the threads between them. main.cc only parses flags.
//
//   MAPL_ASSIGN_OR_RETURN(mapl::v1::DaemonConfig config, mapl::LoadConfig(path, overrides));
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::Daemon> daemon, mapl::Daemon::Start(config));
//   daemon->Wait();          // until Shutdown() (main calls it on SIGTERM / SIGINT)
//
// Data flow of one microbatch (DESIGN.md section 4): the trainer's Send checks the request, copies
// the tensor out of shared memory (checking it for NaN and Inf on the way) and returns; the
// boundary's encoder thread encodes it and queues the frame on the peer link, in Send order. On
// the other side the link's reader thread decodes the frame into the daemon's inbox at once, and
// the trainer's Recv copies it into its buffer. Step waits for the boundary's queued encodes.
//
// Locks: per boundary, engine_mu serialises the engine (and the order of messages given to the
// link); mu guards the queues and the inbox. engine_mu is taken before mu, never after.
#ifndef MAPL_SERVER_DAEMON_H_
#define MAPL_SERVER_DAEMON_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "kernels/backend.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "server/boundary.h"
#include "server/metrics.h"
#include "server/transport/peer_link.h"
#include "server/shm.h"

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
  int peer_port() const { return peer_port_; }
  int metrics_port() const { return metrics_.port(); }

  // ---- the local API, called by LocalService (server/local_service.cc) ----
  struct Session;
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
  bool shutting_down() const { return shutting_down_.HasBeenNotified(); }

 private:
  // A decoded tensor waiting for the trainer's Recv, or the error that its frame caused.
  struct Received {
    absl::Status status;
    int64_t rows = 0;
    int64_t cols = 0;
    std::vector<float> data;
  };
  using Key = std::tuple<int, uint64_t, uint32_t>;  // direction, step, microbatch

  // What a Send waiting for its frame (wait_encoded) learns when the encoder is done.
  struct JobResult {
    bool done = false;
    absl::Status status;
    uint64_t wire_bytes = 0;
  };
  // A tensor taken from a trainer, waiting for the boundary's encoder thread.
  struct EncodeJob {
    int direction = 0;
    uint64_t step = 0;
    uint32_t microbatch = 0;
    DType dtype = DType::kF32;
    int64_t rows = 0;
    std::vector<char> tensor;  // rows x d elements of dtype
    std::vector<int32_t> token_ids;
    std::shared_ptr<JobResult> result;  // null unless the sender waits
  };

  struct Boundary {
    v1::BoundaryConfig config;
    BoundaryMetrics* metrics = nullptr;
    PeerLink* link = nullptr;  // owned by dialed_links_ or peer_server_

    absl::Mutex engine_mu ABSL_ACQUIRED_BEFORE(mu);
    std::unique_ptr<BoundaryEngine> engine ABSL_GUARDED_BY(engine_mu);

    absl::Mutex mu;
    absl::CondVar cv;  // a job queued or finished, an inbox entry, a learning signal, stopping
    std::map<Key, Received> inbox ABSL_GUARDED_BY(mu);
    std::set<Key> sent ABSL_GUARDED_BY(mu);    // tensors the trainer handed in, until Step
    uint64_t signals ABSL_GUARDED_BY(mu) = 0;  // learning signals handled (wakes Step)
    std::deque<EncodeJob> jobs ABSL_GUARDED_BY(mu);
    int encoding ABSL_GUARDED_BY(mu) = 0;     // jobs the encoder has taken and not finished
    size_t reserved ABSL_GUARDED_BY(mu) = 0;  // Sends copying their tensor, not yet queued
    std::optional<uint64_t> closed_step ABSL_GUARDED_BY(mu);  // the last step Step closed here
    uint64_t snapshot_asked_at ABSL_GUARDED_BY(engine_mu) = ~uint64_t{0};  // version we had
    bool stop ABSL_GUARDED_BY(mu) = false;
    // Reused buffers: fresh 32 MiB allocations cost more in page faults than the copy itself.
    std::vector<std::vector<char>> spare_tensors ABSL_GUARDED_BY(mu);
    std::vector<std::vector<float>> spare_inbox ABSL_GUARDED_BY(mu);
    std::thread encoder;
  };

  explicit Daemon(const v1::DaemonConfig& config);
  absl::Status Init();
  absl::StatusOr<std::shared_ptr<Session>> FindSession(uint64_t id);
  absl::StatusOr<Boundary*> FindBoundary(uint32_t id, v1::Direction direction, bool sending);
  // Peer messages, on the link's reader thread, in order.
  void OnPeerMessage(Boundary* b, const v1::PeerMessage& msg);
  void OnFrame(Boundary* b, const v1::Frame& f);
  // The boundary's encoder thread: takes jobs in order, encodes, hands frames to the link.
  void EncodeLoop(Boundary* b);
  void Encode(Boundary* b, EncodeJob& job);
  // Waits until every queued job of `b` is encoded; false at the deadline.
  bool Flush(Boundary* b, absl::Time deadline);
  void SendAll(Boundary* b, std::vector<v1::PeerMessage> messages)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(b->engine_mu);
  void RequestSnapshot(Boundary* b, const absl::Status& why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(b->engine_mu);
  void FillStats(Boundary* b, v1::BoundaryStats* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(b->engine_mu);
  absl::Duration Timeout(uint32_t request_ms) const;
  PeerLinkOptions LinkOptions(uint32_t boundary) const;

  const v1::DaemonConfig config_;
  std::unique_ptr<Backend> backend_;
  Metrics metrics_;
  std::map<uint32_t, std::unique_ptr<Boundary>> boundaries_;
  std::unique_ptr<PeerServer> peer_server_;
  std::vector<std::unique_ptr<PeerLink>> dialed_links_;
  int peer_port_ = 0;
  std::unique_ptr<grpc::Service> local_service_;
  std::unique_ptr<grpc::Server> local_server_;

  absl::Mutex sessions_mu_;
  std::map<uint64_t, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(sessions_mu_);
  uint64_t next_session_ ABSL_GUARDED_BY(sessions_mu_) = 1;

  absl::Notification shutting_down_;
  absl::Notification stopped_;
  absl::Mutex shutdown_mu_;
};

// What one attached trainer holds: its shared buffers.
struct Daemon::Session {
  uint64_t id = 0;
  std::string client_name;
  uint32_t pid = 0;
  std::vector<std::unique_ptr<SharedMemory>> buffers;
};

}  // namespace mapl

#endif  // MAPL_SERVER_DAEMON_H_
