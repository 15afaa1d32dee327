// The peer link (docs/ARCHITECTURE.md, "The transport"), the Transport (transport.h):
// one bidirectional gRPC stream (Peer.Link, peer.proto) per pipeline boundary between the two mapld
// processes on either side of it. It knows nothing about codecs: it numbers, orders, acknowledges,
// retains and resends PeerMessages, authenticates the peer, and measures liveness and round-trip
// time.
//
// One end dials, the other listens through a PeerServer (peer_server.h). Which does is
// independent of the pipeline: usually the upstream (stage == boundary) dials and the downstream
// (stage == boundary + 1) listens, but a downstream that cannot be reached (behind NAT) dials its
// upstream's listener instead. Either way the dialer is the TLS client and the listener the TLS
// server, each end checks that the peer is the other side of the boundary (its Hello's stage),
// and everything below (sequencing, acknowledgement, restarts, keepalive, liveness, redialing by
// the dialer) is the same in both directions:
//
//   // Listener (here the downstream): one server per daemon, one registered link per boundary it
//   // listens for.
//   mapl::PeerServerOptions server_options;
//   server_options.listen_address = "0.0.0.0:7000";
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::PeerServer> server,
//                         mapl::PeerServer::Create(server_options));
//   mapl::PeerLinkOptions down_options;
//   down_options.boundary = 3;
//   down_options.stage = 4;
//   down_options.auth_token = token;
//   MAPL_ASSIGN_OR_RETURN(mapl::PeerLink* down,
//                         server->RegisterBoundary(down_options, [&](v1::PeerMessage m) {
//                           ...  // frames, deltas, ... of boundary 3, in order, exactly once
//                         }));
//   MAPL_RETURN_IF_ERROR(server->Start());
//
//   // Dialer (here the upstream): Dial returns at once and connects in the background, retrying
//   // for as long as it takes (the listener may start later, or restart). To dial the other way,
//   // register up_options (stage 3) on the upstream's server and Dial with down_options (stage 4)
//   // and the upstream's address.
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
// Statuses. Send, WaitConnected, Drain and status() report, as absl::Status codes:
//   INVALID_ARGUMENT    invalid options (Dial, RegisterBoundary); Send of a Hello/Ack/Heartbeat, an
//                       empty body, or a message over max_message_bytes; a peer that acknowledged
//                       a seq never written, sent a connection-level or seq-less message, a Hello
//                       without instance_id, a config fingerprint or data plane that differs
//                       (named).
//   UNAUTHENTICATED     the peer's auth token differs (either side checks; the server tells an
//                       unauthenticated peer nothing more).
//   PERMISSION_DENIED   the peer's certificate lacks peer_identity; a UCX data plane with a peer
//                       outside loopback and ucx.trusted_networks.
//   FAILED_PRECONDITION the link was closed; the peer speaks another protocol version, serves
//                       another boundary or stage.
//   NOT_FOUND           the listener does not serve this boundary.
//   ALREADY_EXISTS      another peer instance holds a live stream for the boundary (server side).
//   ABORTED             the same peer's newer stream replaced this one (server side).
//   DATA_LOSS           a gap in the peer's sequence, or a resume point outside what is retained.
//   UNAVAILABLE         no connection for connect_timeout (still trying), a lost connection, a
//                       write that failed, or nothing received within the liveness bound.
//   DEADLINE_EXCEEDED   WaitConnected or Drain ran out of time (the link keeps trying).
//   CANCELLED           the link was closed while a connection ran (status() afterwards).
// The dialer never gives up: it redials until Close, and Send keeps queuing meanwhile (the
// caller bounds the queue with WaitQueueBelow). WaitConnected reports a refusal
// (UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND, INVALID_ARGUMENT) at once. A state only a bug
// can reach stops the process (MAPL_CHECK), it is not reported as a status.
//
// Threading. Every method is thread-safe. Each connection has a reader (the dialer's connection
// thread, or the gRPC handler thread on the server) that calls the handler, and a writer thread.
// The handler is never called concurrently with itself, always in seq order; it may call Send,
// but must not block for long (it stalls reading and acknowledging) and must not destroy the link.
//
// Data planes. The messages of a connection travel on its gRPC stream (the default), or, with
// data_plane DATA_PLANE_UCX, as UCX active messages (ucx/ucx_stream.h) while the gRPC stream
// carries only the Hello exchange and the close. Everything above (sequencing, resends,
// liveness, the rate cap) is the same code either way: it reaches the wire only through
// PeerStream (stream.h).
//
// Code: peer_link.cc holds sequencing, the handshake's checks and one connection's reader and
// writer; peer_dialer.cc the dialing; peer_server.cc the listener's PeerServer and the server
// side of a stream; ucx/ the UCX data plane; network_policy.h who may be a UCX peer.
#ifndef MAPL_SERVER_TRANSPORT_PEER_LINK_H_
#define MAPL_SERVER_TRANSPORT_PEER_LINK_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.grpc.pb.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/transport/network_policy.h"
#include "server/transport/stream.h"
#include "server/transport/token_bucket.h"
#include "server/transport/transport.h"

namespace mapl {

// The protocol version this build speaks (PeerMessage.protocol_version, Hello.protocol_version).
inline constexpr uint32_t kPeerProtocolVersion = 2;

// Settings of one end of one boundary's link. A missing setting takes its default; an invalid
// one makes Dial / RegisterBoundary fail with INVALID_ARGUMENT.
struct PeerLinkOptions {
  uint32_t boundary = 0;
  // This side's pipeline stage: boundary for the upstream, boundary + 1 for the downstream. The
  // peer must be the other one. Either may dial (the role is Dial or RegisterBoundary).
  uint32_t stage = 0;
  // Dial only: the listening peer's "host:port".
  std::string address;
  // Shared secret, required (non-empty); both sides present it and check the other's in constant
  // time. Only confidential over TLS (channel_credentials).
  std::string auth_token;
  // With TLS: the identity the peer's certificate must carry for this boundary, one of its
  // subject alternative names (DNS, URI or IP; tls.h CheckPeerIdentity). Checked by both sides
  // after the Hello exchange; a mismatch is PERMISSION_DENIED. Empty: any certificate the CA
  // signed.
  std::string peer_identity;
  // What both ends' boundary configs must agree on (peer.proto BoundaryFingerprint), sent in the
  // Hello. Unset: neither sent nor checked (tests of the link alone). Set: the peer's must equal
  // it; a difference is INVALID_ARGUMENT naming the field and both values.
  std::optional<v1::BoundaryFingerprint> fingerprint;
  // Called when a peer of a new instance connects after an earlier one (it restarted), on the
  // reader thread, after the old instance's last message reached the handler and before the new
  // one's first. Not on the first contact. May be empty.
  std::function<void()> on_peer_restart;
  // Dial only: after this long without a connection (at start, or since the last one ended),
  // WaitConnected and status() report UNAVAILABLE naming the last error. The link itself never
  // gives up: it redials until Close.
  absl::Duration connect_timeout = absl::Seconds(30);
  // Dial only: first and longest wait between connection attempts (exponential in between, each
  // wait drawn within +-backoff_jitter of its value so that many dialers do not redial in step).
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(2);
  double backoff_jitter = 0.2;
  // Dial only; null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> channel_credentials;
  // Dial only: gRPC keepalive. A ping every keepalive_time; a connection whose ping is not
  // answered within keepalive_timeout is dead (also while a write is blocked on it: the peer
  // stopped, its host died, or the path black-holes). The server side's are in
  // PeerServerOptions.
  absl::Duration keepalive_time = absl::Seconds(10);
  absl::Duration keepalive_timeout = absl::Seconds(10);
  absl::Duration heartbeat_interval = absl::Seconds(1);
  // A connection on which nothing arrives for this long is dropped (and redialed);
  // absl::InfiniteDuration() disables the check. Must exceed heartbeat_interval. Before each
  // large message the sender announces its size, and the receiver extends the bound by the time
  // that message takes at half the goodput measured on earlier announced messages (at least
  // min_goodput_bytes_per_second), so a message slower than peer_timeout is not taken for a
  // dead peer.
  absl::Duration peer_timeout = absl::Seconds(10);
  double min_goodput_bytes_per_second = 125e3;  // 1 Mbit/s.
  // Acknowledge after this many applied messages or this long after the first unacknowledged one.
  int ack_every = 64;
  absl::Duration ack_delay = absl::Milliseconds(5);
  // Largest PeerMessage sent or accepted, serialized (Dial: the channel's limits; server side the
  // PeerServerOptions value applies to receiving).
  int max_message_bytes = 256 << 20;
  // Client Close: how long to wait for the peer to end the stream cleanly before cancelling it.
  absl::Duration close_grace = absl::Seconds(1);
  // Cap on this side's send rate, in bytes a second of serialized messages, control messages
  // included (0: none): a token bucket (token_bucket.h) holding at most send_burst_bytes, so a
  // long run averages the rate and short bursts go out at once. To share a link politely, or to
  // emulate a slow one.
  double send_rate_bytes_per_second = 0;
  int64_t send_burst_bytes = 64 << 10;
  // Where messages travel once the Hello exchange is done: on the gRPC stream, or as UCX active
  // messages with the gRPC stream kept open beside them (ucx/ucx_stream.h). Both ends must name
  // the same (a difference is INVALID_ARGUMENT naming both). DATA_PLANE_UCX needs a build with
  // MAPL_WITH_UCX, and a peer on loopback or in ucx.trusted_networks (PERMISSION_DENIED
  // otherwise) unless ucx.allow_untrusted_networks.
  v1::DataPlane data_plane = v1::DATA_PLANE_GRPC;
  UcxLinkOptions ucx;
};

// "frame", "ack", ... (the PeerMessage field name); "none" for BODY_NOT_SET. The keys of
// LinkStats.sent and LinkStats.received.
absl::string_view PeerBodyName(v1::PeerMessage::BodyCase body);

class PeerServer;

// One end of one boundary's peer stream. Created by PeerLink::Dial (the dialing end) or
// PeerServer::RegisterBoundary (the listening end); see the file comment.
class PeerLink final : public Transport {
 public:
  // Starts the dialing end: validates `options`, then connects in the background (retrying with
  // backoff, for as long as it takes) and keeps reconnecting after a lost connection.
  // Only invalid options fail here; connection failures show in WaitConnected and status().
  static absl::StatusOr<std::unique_ptr<PeerLink>> Dial(const PeerLinkOptions& options,
                                                        Handler handler);

  PeerLink(const PeerLink&) = delete;
  PeerLink& operator=(const PeerLink&) = delete;
  ~PeerLink() override;  // Close()s.

  // Queues a sequenced message (sets protocol_version and seq) and returns at once; it is written
  // in order when connected and kept until acknowledged. INVALID_ARGUMENT for a connection-level
  // or empty body or one over max_message_bytes; FAILED_PRECONDITION after Close; the failure
  // after the link failed for good.
  absl::Status Send(v1::PeerMessage msg) override;

  // Waits until fewer than `bytes` (serialized) of sequenced messages are unacknowledged, or
  // `timeout` passes; returns whether they are. It waits out the timeout on a failed or closed
  // link, so a caller that loops on it must check its own reason to stop.
  bool WaitQueueBelow(int64_t bytes, absl::Duration timeout) override;

  // OK once the Hello exchange completed (now or within `timeout`); the link's failure if it has
  // failed for good (e.g. UNAUTHENTICATED, NOT_FOUND); FAILED_PRECONDITION once closed;
  // DEADLINE_EXCEEDED otherwise.
  absl::Status WaitConnected(absl::Duration timeout) override;
  // True once disconnected (now or within `timeout`); status() then says why.
  bool WaitDisconnected(absl::Duration timeout);
  bool connected() const override;

  // OK while connected or before the first attempt finished; otherwise why not connected: the
  // last connection's end, a rejected Hello, or the permanent failure.
  absl::Status status() const;

  // Waits until every message queued so far has been written and acknowledged. DEADLINE_EXCEEDED
  // naming how many are left; the link's failure if it failed for good meanwhile;
  // FAILED_PRECONDITION if it was closed meanwhile.
  absl::Status Drain(absl::Duration timeout) override;

  // Ends the link: the dialer half-closes the stream (the peer sees a clean end) and stops
  // reconnecting; the server side cancels its stream and turns later streams away with
  // FAILED_PRECONDITION. Unacknowledged messages are dropped (Drain first). Idempotent; blocks
  // until the link's threads are done, except when called from the handler.
  void Close() override;

  // A copy of the link's record of counters (local.proto LinkStats; per-body maps keyed by
  // PeerBodyName). Hello messages are not counted.
  v1::LinkStats stats() const override;
  // Waits until `done(stats)` holds (evaluated under the link's lock on the record itself, no
  // copy: keep it cheap) or `timeout` passes; returns whether it holds. For tests and diagnostics.
  bool AwaitStats(const std::function<bool(const v1::LinkStats&)>& done, absl::Duration timeout);

  // Breaks the current connection as a network failure would (the dialer then reconnects and both
  // sides resend what was not acknowledged). Tests only.
  void BreakConnectionForTesting();

  uint32_t boundary() const { return options_.boundary; }
  uint64_t instance_id() const { return instance_id_; }

 private:
  friend class PeerServer;
  enum class Role { kDialer, kServer };
  // The two sides of a gRPC bidi stream, and the UCX data plane, behind one interface, so one
  // session code runs them all.
  using Stream = PeerStream;  // stream.h
  class ClientStream;         // peer_dialer.cc
  class ServerStream;         // peer_server.cc
  struct Session;             // peer_link_internal.h
  struct Outgoing {
    std::shared_ptr<v1::PeerMessage> msg;  // Shared with a writer that writes it unlocked.
    int64_t bytes = 0;
  };

  PeerLink(Role role, const PeerLinkOptions& options, Handler handler);

  // INVALID_ARGUMENT naming the first invalid setting of `options` (or a missing handler) for an
  // end of `role`.
  static absl::Status ValidateOptions(Role role, const PeerLinkOptions& options,
                                      const Handler& handler);

  // Dialer (peer_dialer.cc): the connection thread's loop, and one connection attempt (handshake
  // and session).
  void DialLoop();
  // (Re)creates channel_ and stub_: a new connection. Dialer thread (and Dial) only.
  void NewChannel();
  absl::Status DialOnce(absl::Time deadline, bool* established);
  absl::Status WaitChannelReady(absl::Time deadline);
  // Server (peer_server.cc): serves one accepted stream whose Hello `hello` was already read;
  // returns when it ends.
  absl::Status ServeStream(grpc::ServerContext* context,
                           grpc::ServerReaderWriter<v1::PeerMessage, v1::PeerMessage>* stream,
                           const v1::Hello& hello);

  absl::Status CheckPeerHello(const v1::Hello& hello) const;
  // With a UCX data plane: whether the peer at `peer_uri` (the gRPC peer) may be one
  // (network_policy.h), warning when it is only because untrusted networks are allowed.
  absl::Status CheckDataPlanePeer(const std::string& peer_uri) const;
  // The data plane beside the gRPC stream `control` if options_.data_plane is not gRPC (null
  // then), not yet started.
  std::unique_ptr<DataPlaneStream> NewDataPlane(PeerStream* control) const;
  // Starts `data_plane` (if any) and puts its address and token into `hello`.
  absl::Status StartDataPlane(DataPlaneStream* data_plane, v1::PeerMessage* hello) const;
  // `identity`: the refusal is CheckPeerIdentity's (the peer's certificate lacks peer_identity).
  void CountRejectedHello(const absl::Status& status, bool identity) ABSL_LOCKS_EXCLUDED(mu_);
  // Takes in the peer's instance, resetting receive state if it changed (*reset says so);
  // *restarted: it changed from an earlier known instance (call on_peer_restart, unlocked).
  void AdoptPeerInstance(const v1::Hello& hello, bool* reset, bool* restarted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // This side's Hello, with its resume point.
  v1::PeerMessage MakeHello(bool peer_instance_known) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Positions the send queue where the peer's Hello asks (resume, or renumber from 1).
  absl::Status ApplyPeerResume(const v1::Hello& hello) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets retained messages with seq <= `seq`: the peer has them.
  void DropRetainedThrough(uint64_t seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Runs an established connection: reads on the calling thread, writes on a new thread. Returns
  // this side's reason for ending it, or OK when the stream simply ended.
  absl::Status RunSession(Session* session) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status HandleIncoming(v1::PeerMessage msg) ABSL_LOCKS_EXCLUDED(mu_);
  void WriterLoop(Session* session) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends the session (UNAVAILABLE, cancelling the stream) once PeerDeadline passes.
  void WatchdogLoop(Session* session) ABSL_LOCKS_EXCLUDED(mu_);
  // The next message the writer should write now, or null (with *wake set) if none is due before
  // *wake. `control` holds a control message; *bytes gets the message's serialized size.
  const v1::PeerMessage* NextToWrite(absl::Time now, v1::PeerMessage* control,
                                     std::shared_ptr<const v1::PeerMessage>* sequenced,
                                     int64_t* bytes, absl::Time* wake)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountSent(const v1::PeerMessage& msg, int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountReceived(v1::PeerMessage::BodyCase body, int64_t bytes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool OnReaderThread() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // When the current connection counts as dead if nothing more arrives: peer_timeout after the
  // last message, extended for an announced large message (PeerLinkOptions::peer_timeout).
  absl::Time PeerDeadline() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // "peer link for boundary 3 (upstream, stage 3)"; ", dialing" or ", listening" is added where
  // the role is not the usual one for the stage.
  std::string Describe() const;
  // This end's side of the boundary (its stage), whichever role it has; and the peer's, by name.
  bool upstream() const { return options_.stage == options_.boundary; }
  const char* PeerSide() const;  // "downstream" or "upstream".

  const Role role_;
  const PeerLinkOptions options_;
  const Handler handler_;
  const uint64_t instance_id_;
  // Dialer only; used by Dial, then by the dial thread alone.
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Peer::Stub> stub_;
  std::thread dial_thread_;  // Owned; joined by Close.

  mutable absl::Mutex mu_;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  // Dialer: the last attempt was refused (status_ says why), or no connection for
  // connect_timeout. The link keeps redialing either way.
  bool refused_ ABSL_GUARDED_BY(mu_) = false;
  bool unreachable_ ABSL_GUARDED_BY(mu_) = false;
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
  // The send-rate cap, if options_.send_rate_bytes_per_second is set. It outlives connections.
  std::optional<TokenBucket> send_bucket_ ABSL_GUARDED_BY(mu_);

  // Receiving.
  uint64_t peer_instance_id_ ABSL_GUARDED_BY(mu_) = 0;  // 0: no peer seen yet.
  uint64_t last_applied_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t last_ack_sent_ ABSL_GUARDED_BY(mu_) = 0;
  int applied_since_ack_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time first_unacked_ ABSL_GUARDED_BY(mu_);
  absl::Time last_received_ ABSL_GUARDED_BY(mu_);
  // The size of the large message the peer announced and has not finished sending (0: none),
  // when it announced it, and the goodput measured on earlier announced messages (0: none yet).
  uint64_t announced_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time announced_at_ ABSL_GUARDED_BY(mu_);
  double receive_goodput_ ABSL_GUARDED_BY(mu_) = 0;
  bool in_handler_ ABSL_GUARDED_BY(mu_) = false;  // The reader is in the handler (not reading).

  // The one record of the link's counters and state (connected() reads stats_.connected()).
  v1::LinkStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_PEER_LINK_H_
