// The peer link (DESIGN.md sections 4 and 6): the transport between the two mapld processes on
// either side of one pipeline boundary, one bidirectional gRPC stream (Peer.Link, peer.proto) per
// boundary. It knows nothing about codecs: it numbers, orders, acknowledges, retains and resends
// PeerMessages, authenticates the peer, and measures liveness and round-trip time.
//
// The upstream (stage == boundary) dials; the downstream (stage == boundary + 1) serves:
//
//   // Downstream: one server per daemon, one registered link per boundary it serves.
//   mapl::PeerServerOptions server_options;
//   server_options.listen_address = "0.0.0.0:7000";
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::PeerServer> server,
//                         mapl::PeerServer::Create(server_options));
//   mapl::PeerLinkOptions down_options;
//   down_options.boundary = 3;
//   down_options.stage = 4;
//   down_options.auth_token = token;
//   MAPL_ASSIGN_OR_RETURN(mapl::PeerLink* down,
//                         server->RegisterBoundary(down_options, [&](const v1::PeerMessage& m) {
//                           ...  // frames, deltas, ... of boundary 3, in order, exactly once
//                         }));
//   MAPL_RETURN_IF_ERROR(server->Start());
//
//   // Upstream: Dial returns at once and connects in the background, retrying until
//   // connect_timeout (the downstream may start later).
//   mapl::PeerLinkOptions up_options = down_options;
//   up_options.stage = 3;
//   up_options.address = "stage4:7000";
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::PeerLink> up,
//                         mapl::PeerLink::Dial(up_options, handler));
//   v1::PeerMessage m;
//   *m.mutable_frame() = std::move(frame);
//   MAPL_RETURN_IF_ERROR(up->Send(std::move(m)));        // queued, seq assigned; never blocks
//   MAPL_RETURN_IF_ERROR(up->Drain(absl::Seconds(10)));  // written and acknowledged
//
// Delivery guarantee: sequenced messages (frame, dictionary_delta, dictionary_snapshot,
// snapshot_request, learning_signal, step_marker) reach the peer's handler exactly once and in
// Send order, across broken connections, as long as neither process restarts (a restart is seen
// as a new Hello.instance_id; the restarted side starts afresh and the survivor renumbers what it
// still holds from 1). Hello, Ack and Heartbeat are the link's own business: Send refuses them.
//
// Threading. Send, Drain, WaitConnected, stats() and Close are thread-safe. Each connection has a
// reader (the dialer's connection thread, or the gRPC handler thread on the server) that calls the
// handler, and a writer thread. The handler is never called concurrently with itself, always in
// seq order; it may call Send, but must not block for long (it stalls reading and acknowledging)
// and must not call Close or destroy the link.
#ifndef MAPL_SERVER_TRANSPORT_PEER_LINK_H_
#define MAPL_SERVER_TRANSPORT_PEER_LINK_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "proto/mapl/v1/peer.grpc.pb.h"
#include "proto/mapl/v1/peer.pb.h"

namespace mapl {

// The protocol version this build speaks (PeerMessage.protocol_version, Hello.protocol_version).
inline constexpr uint32_t kPeerProtocolVersion = 1;

// Settings of one end of one boundary's link. A missing setting takes its default; an invalid
// one makes Dial / RegisterBoundary fail with INVALID_ARGUMENT.
struct PeerLinkOptions {
  uint32_t boundary = 0;
  // This side's pipeline stage: boundary for the upstream (dialer), boundary + 1 downstream.
  uint32_t stage = 0;
  // Dial only: the downstream's "host:port".
  std::string address;
  // Shared secret, required (non-empty); both sides present it and check the other's in constant
  // time. Only confidential over TLS (channel_credentials).
  std::string auth_token;
  // Dial only: how long to keep trying to connect, at start and again after each lost
  // connection, before the link fails with UNAVAILABLE.
  absl::Duration connect_timeout = absl::Seconds(30);
  // Dial only: first and longest wait between connection attempts (exponential in between).
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(2);
  // Dial only; null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> channel_credentials;
  absl::Duration heartbeat_interval = absl::Seconds(1);
  // A connection on which nothing arrives for this long is dropped (and redialed);
  // absl::InfiniteDuration() disables the check. Must exceed heartbeat_interval.
  absl::Duration peer_timeout = absl::Seconds(10);
  // Acknowledge after this many applied messages or this long after the first unacknowledged one.
  int ack_every = 64;
  absl::Duration ack_delay = absl::Milliseconds(5);
  // Largest PeerMessage sent or accepted, serialized (Dial: the channel's limits; server side the
  // PeerServerOptions value applies to receiving).
  int max_message_bytes = 256 << 20;
  // Client Close: how long to wait for the peer to end the stream cleanly before cancelling it.
  absl::Duration close_grace = absl::Seconds(1);
  // Cap on this side's send rate, in bytes a second of serialized messages (0: none): a token
  // bucket holding at most send_burst_bytes, so a long run averages the rate and short bursts
  // go out at once. To share a link politely, or to emulate a slow one.
  double send_rate_bytes_per_second = 0;
  int64_t send_burst_bytes = 64 << 10;
};

// Traffic and health counters of one link (all since creation).
struct PeerLinkStats {
  struct Traffic {
    int64_t messages = 0;
    int64_t bytes = 0;  // Serialized PeerMessage bytes (without gRPC framing).
  };
  // Per body type (PeerMessage::BodyCase; name it with PeerBodyName). `sent` counts writes to the
  // stream, resends included.
  std::map<v1::PeerMessage::BodyCase, Traffic> sent;
  std::map<v1::PeerMessage::BodyCase, Traffic> received;
  Traffic sent_total;
  Traffic received_total;
  int64_t acks_sent = 0;
  int64_t acks_received = 0;
  int64_t heartbeats_sent = 0;
  int64_t heartbeats_received = 0;
  int64_t resent = 0;              // Sequenced messages written again after a reconnect.
  int64_t duplicates_dropped = 0;  // Received sequenced messages with seq <= last applied.
  absl::Duration last_rtt = absl::ZeroDuration();  // Zero until the first heartbeat echo.
  int64_t connections = 0;                         // Connections that completed the Hello exchange.
  int64_t reconnects = 0;                          // connections - 1, when positive.
  int64_t disconnects = 0;                         // Established connections that ended.
  int64_t handshakes_rejected = 0;  // Peers turned away at Hello (bad token, version, stage...).
  int64_t peer_restarts = 0;        // Hellos announcing a new peer instance after the first.
  // Sequenced messages not yet acknowledged (sent or still queued) and their bytes.
  int64_t queued_messages = 0;
  int64_t queued_bytes = 0;
  uint64_t last_seq = 0;          // Highest seq assigned by Send.
  uint64_t last_acked_seq = 0;    // Highest seq the peer acknowledged.
  uint64_t last_applied_seq = 0;  // Highest peer seq handed to the handler.
};

// "frame", "ack", ... (the PeerMessage field name); "none" for BODY_NOT_SET.
absl::string_view PeerBodyName(v1::PeerMessage::BodyCase body);

// One end of one boundary's peer stream. Created by PeerLink::Dial (upstream) or
// PeerServer::RegisterBoundary (downstream); see the file comment.
class PeerLink {
 public:
  // Called with every sequenced message the peer sent, in order, exactly once.
  using Handler = std::function<void(const v1::PeerMessage&)>;

  // Starts the upstream end: validates `options`, then connects in the background (retrying with
  // backoff until options.connect_timeout) and keeps reconnecting after a lost connection.
  // Only invalid options fail here; connection failures show in WaitConnected and status().
  static absl::StatusOr<std::unique_ptr<PeerLink>> Dial(const PeerLinkOptions& options,
                                                        Handler handler);

  PeerLink(const PeerLink&) = delete;
  PeerLink& operator=(const PeerLink&) = delete;
  ~PeerLink();  // Close()s.

  // Queues a sequenced message (sets protocol_version and seq) and returns at once; it is written
  // in order when connected and kept until acknowledged. INVALID_ARGUMENT for a connection-level
  // or empty body or one over max_message_bytes; FAILED_PRECONDITION after Close; the failure
  // after the link failed for good.
  absl::Status Send(v1::PeerMessage msg);

  // OK once the Hello exchange completed (now or within `timeout`); the link's failure if it has
  // failed for good (e.g. UNAUTHENTICATED, NOT_FOUND); DEADLINE_EXCEEDED otherwise.
  absl::Status WaitConnected(absl::Duration timeout);
  // True once disconnected (now or within `timeout`); status() then says why.
  bool WaitDisconnected(absl::Duration timeout);
  bool connected() const;

  // OK while connected or before the first attempt finished; otherwise why not connected: the
  // last connection's end, a rejected Hello, or the permanent failure.
  absl::Status status() const;

  // Waits until every message queued so far has been written and acknowledged. DEADLINE_EXCEEDED
  // naming how many are left; the link's failure if it failed for good meanwhile.
  absl::Status Drain(absl::Duration timeout);

  // Ends the link: the dialer half-closes the stream (the peer sees a clean end) and stops
  // reconnecting; the server side cancels its stream and turns later streams away with
  // FAILED_PRECONDITION. Unacknowledged messages are dropped (Drain first). Idempotent; blocks
  // until the link's threads are done, except when called from the handler.
  void Close();

  PeerLinkStats stats() const;
  // Waits until `done(stats)` holds (evaluated under the link's lock: keep it cheap) or `timeout`
  // passes; returns whether it holds. For tests, diagnostics and crude send windows.
  bool AwaitStats(const std::function<bool(const PeerLinkStats&)>& done, absl::Duration timeout);

  // Breaks the current connection as a network failure would (the dialer then reconnects and both
  // sides resend what was not acknowledged). Tests only.
  void BreakConnectionForTesting();

  uint32_t boundary() const { return options_.boundary; }
  uint64_t instance_id() const { return instance_id_; }

 private:
  friend class PeerServer;
  enum class Role { kDialer, kServer };
  class Stream;
  class ClientStream;
  class ServerStream;
  struct Session;
  struct Outgoing {
    std::shared_ptr<v1::PeerMessage> msg;
    int64_t bytes = 0;
  };

  PeerLink(Role role, const PeerLinkOptions& options, Handler handler);

  // Dialer: the connection thread's loop, and one connection attempt (handshake and session).
  void DialLoop();
  absl::Status DialOnce(absl::Time deadline, bool* established);
  absl::Status WaitChannelReady(absl::Time deadline);
  // Server: serves one accepted stream whose Hello `hello` was already read; returns when it ends.
  absl::Status ServeStream(grpc::ServerContext* context,
                           grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream,
                           const v1::Hello& hello);

  absl::Status CheckPeerHello(const v1::Hello& hello) const;
  void CountRejectedHello(const absl::Status& status) ABSL_LOCKS_EXCLUDED(mu_);
  // Takes in the peer's instance (resetting receive state if it changed) and fills our Hello.
  v1::PeerMessage MakeHello(bool peer_instance_known) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AdoptPeerInstance(const v1::Hello& hello, bool* reset) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Positions the send queue where the peer's Hello asks (resume, or renumber from 1).
  absl::Status ApplyPeerResume(const v1::Hello& hello) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Runs an established connection: reads on the calling thread, writes on a new thread. Returns
  // this side's reason for ending it, or OK when the stream simply ended.
  absl::Status RunSession(Session* session) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status HandleIncoming(const v1::PeerMessage& msg) ABSL_LOCKS_EXCLUDED(mu_);
  void WriterLoop(Session* session) ABSL_LOCKS_EXCLUDED(mu_);
  void EndSession(Session* session, const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Fail(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountSent(const v1::PeerMessage& msg, int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool OnReaderThread() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string Describe() const;  // "boundary 3 upstream (stage 3)", for logs and errors.

  const Role role_;
  const PeerLinkOptions options_;
  const Handler handler_;
  const uint64_t instance_id_;
  // Dialer only.
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Peer::Stub> stub_;
  std::thread dial_thread_;  // Owned; joined by Close.

  mutable absl::Mutex mu_;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;  // For good; status_ says why.
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  Session* active_session_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t attach_ticket_ ABSL_GUARDED_BY(mu_) = 0;  // Server: newest stream waiting to attach.
  std::thread::id reader_thread_ ABSL_GUARDED_BY(mu_);

  // Sending. retained_ holds seqs [retained_.front().seq, next_seq_) contiguously: sent or not,
  // not yet acknowledged. Entries before next_write_seq_ were written on the current connection.
  std::deque<Outgoing> retained_ ABSL_GUARDED_BY(mu_);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_write_seq_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t highest_written_ ABSL_GUARDED_BY(mu_) = 0;         // Writes at or below it are resends.
  std::deque<v1::PeerMessage> control_ ABSL_GUARDED_BY(mu_);  // Heartbeat echoes to write.
  absl::Time next_heartbeat_ ABSL_GUARDED_BY(mu_);
  // Token bucket of send_rate_bytes_per_second: bytes that may go out now (negative: debt that
  // the rate pays back before the next write), as of rate_refilled_.
  double rate_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time rate_refilled_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();

  // Receiving.
  uint64_t peer_instance_id_ ABSL_GUARDED_BY(mu_) = 0;  // 0: no peer seen yet.
  uint64_t last_applied_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_ack_sent_ ABSL_GUARDED_BY(mu_) = 0;
  int applied_since_ack_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time first_unacked_ ABSL_GUARDED_BY(mu_);
  absl::Time last_received_ ABSL_GUARDED_BY(mu_);

  PeerLinkStats stats_ ABSL_GUARDED_BY(mu_);
};

// Settings of the downstream's Peer service.
struct PeerServerOptions {
  // "host:port"; port 0 picks a free port (see PeerServer::port()).
  std::string listen_address = "0.0.0.0:0";
  std::shared_ptr<grpc::ServerCredentials> credentials;  // null: plaintext.
  int max_message_bytes = 256 << 20;                     // Send and receive limit.
  // Serve the standard grpc.health.v1.Health service (health_check_service()) on the same port.
  bool enable_health_service = false;
  // Called on the builder just before it builds: add other services, options, etc.
  std::function<void(grpc::ServerBuilder&)> configure;
};

// The downstream's gRPC server for the Peer service, owning one PeerLink per registered boundary.
// A Link stream for an unregistered boundary is rejected with NOT_FOUND; a second stream for a
// registered boundary that authenticates replaces the first (the old one is cancelled).
class PeerServer {
 public:
  // Does not listen yet: register boundaries, then Start.
  static absl::StatusOr<std::unique_ptr<PeerServer>> Create(const PeerServerOptions& options);
  PeerServer(const PeerServer&) = delete;
  PeerServer& operator=(const PeerServer&) = delete;
  ~PeerServer();  // Shutdown()s.

  // Adds the server end of `options.boundary` (options.stage must be boundary + 1; address and
  // the dial-only settings are ignored). The link lives as long as this server. ALREADY_EXISTS if
  // the boundary is registered; may be called before or after Start.
  absl::StatusOr<PeerLink*> RegisterBoundary(const PeerLinkOptions& options,
                                             PeerLink::Handler handler);

  // Binds and starts serving. UNAVAILABLE if the address cannot be bound.
  absl::Status Start();
  // The bound port (after Start), e.g. when listen_address asked for port 0.
  int port() const { return port_; }
  // The standard health service (after Start, with enable_health_service), e.g. to
  // SetServingStatus("", false) while draining; null otherwise.
  grpc::HealthCheckServiceInterface* health_check_service() const;

  // Closes every link and stops the server. Idempotent.
  void Shutdown();

 private:
  class Service;
  explicit PeerServer(const PeerServerOptions& options);
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

#endif  // MAPL_SERVER_TRANSPORT_PEER_LINK_H_
