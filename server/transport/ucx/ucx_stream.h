// The UCX data plane of one peer-link connection (docs/ARCHITECTURE.md, "The transport"): a
// PeerStream whose messages travel as UCP active messages, while the connection's gRPC stream
// (`control`) stays open beside it for the close. The Hello exchange on that stream carries each
// side's worker address and token (peer.proto Hello.ucx_worker_address, ucx_token); PeerLink's
// reliability (sequence numbers, acknowledgements, resends, liveness) runs on top unchanged.
//
//   UcxStream ucx(&grpc_stream, options, max_message_bytes, describe);
//   MAPL_RETURN_IF_ERROR(ucx.Start());          // the worker; address() and token() for the Hello
//   ... Hello exchange on grpc_stream ...
//   MAPL_RETURN_IF_ERROR(ucx.Connect(peer_hello.ucx_worker_address(), peer_hello.ucx_token()));
//   ... RunSession(&ucx) ...
//   ucx.Shutdown(grace);                        // before the gRPC stream's Finish
//
// Threads. One progress thread makes every UCX call on the connection's worker (UCX's TCP
// transport does not support a multi-threaded worker); Read, Write and Cancel queue their work
// and wake it. A watcher thread reads `control`: its end (or anything arriving on it) ends the
// stream.
//
// On the wire each message carries a 32-byte header: a magic, its kind (a message, or the bye
// that ends a clean close), this stream's own sequence number (UCX does not promise order across
// its protocols and lanes; the receiver reorders) and the receiver's token. A message without the
// token is dropped and counted (foreign_dropped). A message over max_message_bytes is refused
// before anything is allocated for it. Bounded memory: at most max_inflight_bytes of sends are
// in flight (Write blocks beyond), and beyond as much received and not yet read, large
// (rendezvous) messages are deferred, which stalls the sender as HTTP/2 flow control would.
#ifndef MAPL_SERVER_TRANSPORT_UCX_UCX_STREAM_H_
#define MAPL_SERVER_TRANSPORT_UCX_UCX_STREAM_H_

#include <ucp/api/ucp.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/transport/network_policy.h"
#include "server/transport/stream.h"

namespace mapl {

class UcxStream final : public DataPlaneStream {
 public:
  // Counters for LinkStats (ucx_lanes, ucx_foreign_dropped, ucx_rndv_deferred).
  struct Stats {
    std::string lanes;
    uint64_t foreign_dropped = 0;
    uint64_t rndv_deferred = 0;
  };

  // `control` must outlive this stream; `dialer`: this side dialed it (and closes with
  // WritesDone, the listener by ending `control`); `describe` names the link in errors and logs.
  UcxStream(PeerStream* control, bool dialer, const UcxLinkOptions& options, int max_message_bytes,
            std::string describe);
  UcxStream(const UcxStream&) = delete;
  UcxStream& operator=(const UcxStream&) = delete;
  ~UcxStream() override;  // Shutdown(0) if not done.

  // Creates the worker and starts the progress thread. UNAVAILABLE if UCX cannot.
  absl::Status Start() override;
  // This side's worker address and token for its Hello (after Start).
  const std::string& address() const override { return address_; }
  const std::string& token() const override { return token_; }

  // Connects to the peer's worker, waits until both ends' hellos crossed on it (the peer
  // connects at the same time), and starts watching `control`. INVALID_ARGUMENT for an address or
  // token that cannot be one; UNAVAILABLE if UCX refuses or the peer does not answer.
  absl::Status Connect(absl::string_view peer_address, absl::string_view peer_token) override;

  // How long Connect waits for the peer's worker to answer (default 10 s).
  void set_connect_timeout(absl::Duration timeout) { connect_timeout_ = timeout; }

  bool Read(v1::PeerMessage* msg) override;
  bool Write(const v1::PeerMessage& msg) override;
  // Sends the bye after every earlier message (the peer's Read then ends cleanly), then
  // half-closes `control`.
  void WritesDone() override;
  void Cancel() override;
  absl::Status ReadError() const override;
  // Adds this connection's ucx_* counters to `stats` (and sets ucx_lanes once known).
  void AddStats(v1::LinkStats* stats) const override;

  // Waits up to `grace` for `control` to end (the peer's side of a close), cancels it otherwise,
  // and tears the connection down: the endpoint, the worker, both threads. Idempotent. Call
  // before the gRPC stream's Finish (gRPC wants every read done first).
  void Shutdown(absl::Duration grace) override;

  Stats stats() const;

 private:
  struct Header;
  struct SendOp;
  struct Incoming {
    std::string bytes;
    bool complete = false;
    bool bye = false;
  };
  struct Parked {  // A rendezvous message deferred by backpressure.
    uint64_t seq;
    void* desc;
    size_t length;
  };

  static ucs_status_t OnActiveMessage(void* arg, const void* header, size_t header_length,
                                      void* data, size_t length, const ucp_am_recv_param_t* param);
  static void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);
  static void OnSendDone(void* request, ucs_status_t status, void* user_data);
  static void OnReceiveDone(void* request, ucs_status_t status, size_t length, void* user_data);

  // Progress thread only.
  ucs_status_t Receive(const void* header, size_t header_length, void* data, size_t length,
                       const ucp_am_recv_param_t* param) ABSL_LOCKS_EXCLUDED(mu_);
  // Receive's bookkeeping; *rendezvous_seq is set to the seq of a rendezvous message to receive
  // now.
  ucs_status_t Accept(const void* header, size_t header_length, void* data, size_t length,
                      const ucp_am_recv_param_t* param, uint64_t* rendezvous_seq)
      ABSL_LOCKS_EXCLUDED(mu_);
  void ReceiveRendezvous(uint64_t seq, void* desc, size_t length) ABSL_LOCKS_EXCLUDED(mu_);
  void StartSend(SendOp* op) ABSL_LOCKS_EXCLUDED(mu_);
  // Starts receiving the deferred rendezvous messages that fit now, and the one Read needs next.
  void ResumeParked() ABSL_LOCKS_EXCLUDED(mu_);
  // Waits for the peer's hello (and, if need_sent, our own's completion), up to connect_timeout_.
  absl::Status AwaitPeer(bool need_sent) ABSL_LOCKS_EXCLUDED(mu_);
  void ProgressLoop();
  void CloseEndpoint();
  void WatchControl();
  void NoteLanes();

  // Queues `op` for the progress thread and wakes it.
  void Post(std::function<void()> op) ABSL_LOCKS_EXCLUDED(mu_);
  // The first failure wins; the stream is dead afterwards.
  void Fail(const absl::Status& status) ABSL_LOCKS_EXCLUDED(mu_);
  void FailLocked(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool SendFrame(uint32_t kind, const std::string* body) ABSL_LOCKS_EXCLUDED(mu_);

  PeerStream* const control_;
  const bool dialer_;
  const UcxLinkOptions options_;
  const int max_message_bytes_;
  const std::string describe_;
  ucp_worker_h worker_ = nullptr;  // Set by Start; UCX calls on it from the progress thread only.
  int event_fd_ = -1;
  ucp_ep_h ep_ = nullptr;  // Progress thread only.
  std::string address_;
  std::string token_;       // What the peer must put in every header it sends us.
  std::string peer_token_;  // What we put in ours; set by Connect before the first send.
  std::thread progress_;
  std::thread watcher_;
  bool shut_down_ = false;  // Shutdown's; it runs on one thread.
  absl::Duration connect_timeout_ = absl::Seconds(10);

  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> ops_ ABSL_GUARDED_BY(mu_);
  bool stop_progress_ ABSL_GUARDED_BY(mu_) = false;
  bool progress_done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;  // By this side, which knows why.
  bool control_ended_ ABSL_GUARDED_BY(mu_) = false;
  bool connected_ ABSL_GUARDED_BY(mu_) = false;
  bool writes_done_ ABSL_GUARDED_BY(mu_) = false;
  bool hello_sent_ ABSL_GUARDED_BY(mu_) = false;      // Completed on our endpoint.
  bool hello_received_ ABSL_GUARDED_BY(mu_) = false;  // The peer's, on its endpoint.
  // Sending: our sequence; bytes and operations posted and not yet completed.
  uint64_t next_send_seq_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t send_inflight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t sends_pending_ ABSL_GUARDED_BY(mu_) = 0;
  // Receiving: messages by our sequence, complete or still arriving (rendezvous); the next one
  // Read hands on; bytes held; rendezvous messages deferred; receives in progress.
  std::map<uint64_t, Incoming> incoming_ ABSL_GUARDED_BY(mu_);
  uint64_t next_read_seq_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t received_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<Parked> parked_ ABSL_GUARDED_BY(mu_);
  int64_t receives_pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool bye_read_ ABSL_GUARDED_BY(mu_) = false;
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_UCX_UCX_STREAM_H_
