// The downstream's side of the peer links: one gRPC server for the Peer service per daemon, owning
// one PeerLink (peer_link.h) per pipeline boundary it serves. See peer_link.h for an example.
#ifndef MAPL_SERVER_TRANSPORT_PEER_SERVER_H_
#define MAPL_SERVER_TRANSPORT_PEER_SERVER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "proto/mapl/v1/peer.grpc.pb.h"
#include "server/transport/peer_link.h"

namespace mapl {

// Settings of the downstream's Peer service.
struct PeerServerOptions {
  // "host:port"; port 0 picks a free port (see PeerServer::port()).
  std::string listen_address = "0.0.0.0:0";
  std::shared_ptr<grpc::ServerCredentials> credentials;  // null: plaintext.
  int max_message_bytes = 256 << 20;                     // Send and receive limit.
  // Serve the standard grpc.health.v1.Health service (health_check_service()) on the same port.
  // Without it this server has none, whatever grpc::EnableDefaultHealthCheckService says for the
  // process's other servers.
  bool enable_health_service = false;
  // Called on the builder just before it builds: add other services, options, etc.
  std::function<void(grpc::ServerBuilder&)> configure;
};

// The downstream's gRPC server for the Peer service, owning one PeerLink per registered boundary.
// A Link stream for an unregistered boundary is rejected with NOT_FOUND; a second stream for a
// registered boundary that authenticates replaces the first (the old one ends with ABORTED).
class PeerServer {
 public:
  // Does not listen yet: register boundaries, then Start. INVALID_ARGUMENT for an empty address or
  // a non-positive max_message_bytes.
  static absl::StatusOr<std::unique_ptr<PeerServer>> Create(const PeerServerOptions& options);
  PeerServer(const PeerServer&) = delete;
  PeerServer& operator=(const PeerServer&) = delete;
  ~PeerServer();  // Shutdown()s.

  // Adds the server end of `options.boundary` (options.stage must be boundary + 1; address and
  // the dial-only settings are ignored). The link lives as long as this server. INVALID_ARGUMENT
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

 private:
  class Service;
  explicit PeerServer(const PeerServerOptions& options);
  // One Link stream: reads the Hello, finds the boundary's link and lets it serve the stream.
  grpc::Status Link(grpc::ServerContext* context,
                    grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream);

  const PeerServerOptions options_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  mutable absl::Mutex mu_;
  std::map<uint32_t, std::unique_ptr<PeerLink>> links_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_PEER_SERVER_H_
