// The listening side of the peer links: one gRPC server for the Peer service per daemon, owning one
// PeerLink (peer_link.h) per pipeline boundary it listens for (as the downstream, as usual, or as
// the upstream of a downstream that dials). See peer_link.h for an example.
#ifndef MAPL_SERVER_TRANSPORT_PEER_SERVER_H_
#define MAPL_SERVER_TRANSPORT_PEER_SERVER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.grpc.pb.h"
#include "server/transport/peer_link.h"

namespace mapl {

// Settings of the listener's Peer service. The limits bound what anyone who reaches the port can
// hold before authenticating: a thread and one message per stream, for hello_timeout at most.
struct PeerServerOptions {
  // "host:port"; port 0 picks a free port (see PeerServer::port()).
  std::string listen_address = "0.0.0.0:0";
  std::shared_ptr<grpc::ServerCredentials> credentials;  // null: plaintext.
  int max_message_bytes = 256 << 20;                     // Send and receive limit.
  // A stream must send its Hello within this (also the TLS and HTTP/2 handshake's limit).
  absl::Duration hello_timeout = absl::Seconds(10);
  // Streams waiting for their Hello at once; more are refused at once (RESOURCE_EXHAUSTED).
  int max_pending_streams = 32;
  // gRPC's threads for this server (each stream holds one; beyond it gRPC refuses new streams
  // with RESOURCE_EXHAUSTED). 0: max_pending_streams + 2 per registered boundary + 8.
  int max_threads = 0;
  // gRPC's memory for this server's connections (reads pause beyond it). 0: 4 x max_message_bytes
  // + 64 MiB.
  int64_t max_memory_bytes = 0;
  // Keepalive: the server pings each connection every keepalive_time and drops one that does not
  // answer within keepalive_timeout; it accepts the dialers' pings that often. A connection
  // without a stream for max_connection_idle is closed.
  absl::Duration keepalive_time = absl::Seconds(10);
  absl::Duration keepalive_timeout = absl::Seconds(10);
  absl::Duration max_connection_idle = absl::Seconds(30);
  // Serve the standard grpc.health.v1.Health service (health_check_service()) on the same port.
  // Without it this server has none, whatever grpc::EnableDefaultHealthCheckService says for the
  // process's other servers.
  bool enable_health_service = false;
  // Called on the builder just before it builds: add other services, options, etc.
  std::function<void(grpc::ServerBuilder&)> configure;
};

// The listener's gRPC server for the Peer service, owning one PeerLink per registered boundary.
// A stream's first message must be a Hello whose token one of the registered links holds, within
// hello_timeout; otherwise it ends with UNAUTHENTICATED (or DEADLINE_EXCEEDED) and learns nothing
// of this server. An authenticated stream for an unregistered boundary is NOT_FOUND. While a
// boundary's stream is live, a second one from another peer instance is refused (ALREADY_EXISTS,
// the dialer retries); one from the same instance (a reconnect) replaces it, and the old one
// ends with ABORTED. Every refusal is counted (stats(), LinkStats) and logged, at most one line
// a second per kind.
class PeerServer {
 public:
  // Does not listen yet: register boundaries, then Start. INVALID_ARGUMENT for an empty address or
  // a non-positive max_message_bytes.
  static absl::StatusOr<std::unique_ptr<PeerServer>> Create(const PeerServerOptions& options);
  PeerServer(const PeerServer&) = delete;
  PeerServer& operator=(const PeerServer&) = delete;
  ~PeerServer();  // Shutdown()s.

  // Adds the server end of `options.boundary` (options.stage is either side of it, boundary or
  // boundary + 1, and the dialer must be the other; address and the dial-only settings are
  // ignored). The link lives as long as this server. INVALID_ARGUMENT
  // for invalid options; ALREADY_EXISTS if the boundary is registered. May be called before or
  // after Start.
  absl::StatusOr<PeerLink*> RegisterBoundary(const PeerLinkOptions& options,
                                             Transport::Handler handler);

  // Binds and starts serving. UNAVAILABLE if the address cannot be bound; FAILED_PRECONDITION if
  // already started.
  absl::Status Start();
  // The bound port (after Start), e.g. when listen_address asked for port 0.
  int port() const { return port_; }
  // The standard health service (after Start, with enable_health_service), e.g. to
  // SetServingStatus(false) while draining; null otherwise.
  grpc::HealthCheckServiceInterface* health_check_service() const;

  // Closes every link and stops the server. Idempotent.
  void Shutdown();

  // The server's own counters (local.proto PeerServerStats).
  v1::PeerServerStats stats() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  class Service;
  explicit PeerServer(const PeerServerOptions& options);
  // Turns streams away that sent nothing within hello_timeout.
  void WatchdogLoop() ABSL_LOCKS_EXCLUDED(mu_);
  // Counts a refused stream and logs it (at most one line a second per status code); returns the
  // status to end the stream with.
  grpc::Status Refuse(grpc::ServerContext* context, const absl::Status& status,
                      const std::function<void(v1::PeerServerStats&)>& count)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The link whose token `hello` carries (null: none).
  PeerLink* Authenticate(const v1::Hello& hello) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One Link stream: reads the Hello, finds the boundary's link and lets it serve the stream.
  grpc::Status Link(grpc::ServerContext* context,
                    grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream);

  const PeerServerOptions options_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  mutable absl::Mutex mu_;
  std::map<uint32_t, std::unique_ptr<PeerLink>> links_ ABSL_GUARDED_BY(mu_);
  // Streams waiting for their first message, and by when it must come.
  std::map<grpc::ServerContext*, absl::Time> pending_ ABSL_GUARDED_BY(mu_);
  std::set<grpc::ServerContext*> timed_out_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread watchdog_;
  v1::PeerServerStats stats_ ABSL_GUARDED_BY(mu_);
  // Rate limit of the refusal log lines: per kind, when the last was written and how many were
  // not written since.
  std::map<std::string, std::pair<absl::Time, uint64_t>> refusal_log_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_PEER_SERVER_H_
