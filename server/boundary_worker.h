// The daemon's per-boundary worker: everything between the local API, one boundary's engine and
// its transport. It owns
//   - the send queue: a trainer's Send copies its tensor (checking it for NaN and Inf on the way)
//     and returns; beyond WorkerOptions::max_queued_jobs tensors a Send waits (backpressure);
//   - the encoder thread: encodes queued tensors in Send order and hands the messages to the
//     transport, waiting while the transport holds more than max_transport_queue_time of the
//     link's measured goodput (at most max_transport_queue_bytes; that cap alone until measured);
//   - the decoder thread: the transport's receive handler only queues a peer message; this thread
//     decodes frames into the inbox and hands other messages to the engine, in arrival order, so
//     the transport's reader never waits for the engine (which Step holds across the learners).
//     A decoded tensor that is not finite becomes an error entry; a frame held for its
//     dictionary (parked_) longer than max_parked_time becomes one too;
//   - the inbox and Recv's waits for it. The inbox holds at most max_inbox_bytes of tensors: the
//     decoder waits for room (so the transport's reader waits too), except when the trainer
//     waits for something behind it (a Recv of a tensor not yet decoded, a Step for the learning
//     signal): then waiting would deadlock, and the tensor is dropped as a RESOURCE_EXHAUSTED
//     entry that its Recv returns. Entries of closed steps are dropped at Step, and on arrival;
//   - Step: flushes the send queue, closes the step in the engine (waiting for the peer's learning
//     signal where needed), ships what the step sends and drops what the step made stale;
//   - the link monitor thread: it notes when the transport's queue of unacknowledged messages
//     empties, so that the link's goodput counts only the time the link had work (LinkGoodput).
// Its record adds to the engine's the last step's compute and wire seconds per microbatch: encode
// + decode seconds per microbatch (max of frames encoded and decoded), and the bytes this side
// put on the link in the step per frame it sent, over the goodput.
//
//   BoundaryWorker w(std::move(engine), WorkerOptions{}, timers);
//   w.Start(transport);                        // transport->handler calls w.OnPeerMessage
//   MAPL_ASSIGN_OR_RETURN(v1::SendReply r, w.Send(step, mb, tensor, token_ids, false));
//   MAPL_ASSIGN_OR_RETURN(v1::RecvReply r, w.Recv(step, mb, into, deadline, {}));
//   MAPL_RETURN_IF_ERROR(w.Step(step, deadline, &stats));
//   w.Stop(drain_deadline);
//
// Locks: engine_mu_ serialises the engine and the order of messages given to the transport; mu_
// guards the queues and the inbox; link_mu_ the goodput meter (held across each hand-off to the
// transport). engine_mu_ is taken before mu_ and link_mu_, never after; mu_ and link_mu_ are
// never held together.
#ifndef MAPL_SERVER_BOUNDARY_WORKER_H_
#define MAPL_SERVER_BOUNDARY_WORKER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/codec_health.h"
#include "server/engine.h"
#include "server/transport/transport.h"

namespace prometheus {
class Histogram;
}

namespace mapl {

struct WorkerOptions {
  // Tensors taken from the trainer and not yet encoded: a Send beyond this waits.
  size_t max_queued_jobs = 4;
  // Encoded bytes waiting in the transport before the encoder waits for it.
  int64_t max_transport_queue_bytes = int64_t{256} << 20;
  // Received peer messages not yet decoded, in bytes, before the transport's reader waits.
  int64_t max_incoming_bytes = int64_t{256} << 20;
  // Decoded tensors waiting for the trainer's Recv (4 bytes a value: 32 MiB a microbatch at
  // n = 4096, d = 2048). A tensor that would go beyond waits for room (see the file comment);
  // one tensor is always taken, whatever its size.
  int64_t max_inbox_bytes = int64_t{512} << 20;
  // Time-based backpressure: the encoder waits while the transport holds more than this much of
  // the link's measured goodput (bytes / goodput), so that a frame handed over reaches the peer
  // well within the Recv timeout even on a slow link. max_transport_queue_bytes stays the cap
  // (256 MiB is 107 s at 20 Mbit/s) and is the only bound until the goodput is measured.
  absl::Duration max_transport_queue_time = absl::Seconds(4);
  // How long a frame may be held for the dictionary version it names (one a requested snapshot
  // brings) before its Recv fails saying so. Below the Recv timeout (60 s by default), so the
  // trainer gets that reason rather than a bare DEADLINE_EXCEEDED.
  absl::Duration max_parked_time = absl::Seconds(30);
  // How long the peer's transport may hold an acknowledgement back (PeerLinkOptions::ack_delay,
  // whose default mapld keeps): with the link's round trip, the wait at the end of each busy
  // period that the goodput does not count.
  absl::Duration peer_ack_delay = absl::Milliseconds(5);
};

// What a Send says of its tensor beyond the tensor itself.
struct SendOptions {
  // The shape the trainer handed the tensor in as (SendRequest.shape); empty: [n, d]. It travels
  // with the frame.
  std::vector<uint32_t> shape;
  // Trains nothing on either side (SendRequest.evaluation; engine.h).
  bool evaluation = false;
};

// What a Recv asks beyond the tensor.
struct RecvOptions {
  // Where the token ids that came with the tensor go (null: nowhere), and its capacity.
  int32_t* token_ids = nullptr;
  int64_t token_ids_capacity = 0;
  // The shape the caller expects (RecvRequest.expect_shape); empty: any.
  std::vector<uint32_t> expect_shape;
};

// Histograms of encode and decode time (may be null).
struct CodecTimers {
  prometheus::Histogram* encode_seconds = nullptr;
  prometheus::Histogram* decode_seconds = nullptr;
};

class BoundaryWorker {
 public:
  BoundaryWorker(std::unique_ptr<Engine> engine, const WorkerOptions& options, CodecTimers timers);
  ~BoundaryWorker();  // Stop(now)
  BoundaryWorker(const BoundaryWorker&) = delete;
  BoundaryWorker& operator=(const BoundaryWorker&) = delete;

  const v1::BoundaryConfig& config() const { return config_; }
  // Starts the encoder and decoder threads; messages go out through `transport` (borrowed: it
  // must outlive Stop()).
  void Start(Transport* transport);
  // The transport's receive handler: queues the message for the decoder thread, waiting while
  // more than max_incoming_bytes wait (so a fast peer is slowed down, not buffered without end).
  void OnPeerMessage(v1::PeerMessage msg) ABSL_LOCKS_EXCLUDED(mu_);
  // The transport's on_peer_restart: queued behind the old peer's messages, so the decoder tells
  // the engine (Engine::OnPeerRestart) between the old instance's last message and the new one's
  // first.
  void OnPeerRestart() ABSL_LOCKS_EXCLUDED(mu_);

  // Takes the tensor this side sends (activation upstream, gradient downstream) of
  // (step, microbatch): copies it, checks it (finite; token ids in range) and queues it.
  // token_ids: forward only (required for METHOD_MAPL); they travel with the frame.
  // wait_encoded: returns once it is encoded and handed to the transport, with the wire bytes
  // (an encode failure is then this call's error). Otherwise an encode failure in the background
  // is kept: the next Send (its tensor not taken) and the next Step each return it once, with
  // its code ("an earlier Send failed in the background: ..."); and the peer hears of it
  // (FrameFailed), so that its Recv of the tensor fails at once.
  // INVALID_ARGUMENT for bad input (a shape that does not describe the tensor, token ids out of
  // range or on a backward); ALREADY_EXISTS for a (step, microbatch) already sent;
  // FAILED_PRECONDITION for a step already closed, or a backward of an evaluation forward;
  // UNAVAILABLE once stopping.
  // A Send that finds the queue full waits for room until `deadline`, then fails with UNAVAILABLE
  // naming the boundary, step, microbatch and the link's state (the tensor is not taken).
  absl::StatusOr<v1::SendReply> Send(uint64_t step, uint32_t microbatch, const ConstTensor& t,
                                     const int32_t* token_ids, bool wait_encoded,
                                     absl::Time deadline = absl::InfiniteFuture(),
                                     const SendOptions& options = {})
      ABSL_LOCKS_EXCLUDED(mu_, engine_mu_);

  // Waits until the peer's tensor of (step, microbatch) is decoded, then writes it into `into`
  // (at least its rows) and its token ids, if it came with any, into options.token_ids; the
  // reply says its rows, shape, dtype as sent and whether ids were written.
  // The caller's mistakes: FAILED_PRECONDITION at once for a step already closed by Step or a
  // tensor already received; INVALID_ARGUMENT when `into` or options.token_ids is too small or
  // the tensor's shape is not options.expect_shape (the tensor stays for a Recv that fits).
  // Transient: UNAVAILABLE when the frame named a dictionary version that never came (held
  // max_parked_time for it), or once stopping; ABORTED when the peer's encoder failed on the
  // tensor (FrameFailed), its frame came from a peer that restarted, or it no longer fits this
  // side's state (a backward whose forward is gone). DATA_LOSS for a corrupt frame (checksum,
  // a malformed or contradictory header, a decode to NaN or Inf). RESOURCE_EXHAUSTED when it was
  // dropped for max_inbox_bytes; DEADLINE_EXCEEDED at `deadline` (its message names `timeout`);
  // CANCELLED when `cancelled()` says the caller left (the tensor stays for a retry).
  absl::StatusOr<v1::RecvReply> Recv(uint64_t step, uint32_t microbatch, const Tensor& into,
                                     absl::Time deadline, absl::Duration timeout,
                                     const std::function<bool()>& cancelled,
                                     const RecvOptions& options = {}) ABSL_LOCKS_EXCLUDED(mu_);

  // Closes `step` on this boundary (see the file comment); a step this boundary already closed
  // is skipped (a retried Step). Drops the inbox's entries of steps up to `step`. Fills `out`
  // with the boundary's statistics. An encode failure kept from a background Send is returned
  // once instead, after the flush and before the step closes (a retry closes it).
  absl::Status Step(uint64_t step, absl::Time deadline, absl::Duration timeout,
                    v1::BoundaryStats* out) ABSL_LOCKS_EXCLUDED(mu_, engine_mu_);

  // Waits until every tensor taken so far is encoded; false at the deadline.
  bool Flush(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);
  // Stops taking tensors, flushes until `deadline` (then finishes what is queued anyway), and
  // stops the threads; waiters get UNAVAILABLE. Idempotent.
  void Stop(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  // The engine's learned state (Engine::SaveState), taken between two engine calls.
  v1::BoundaryState SaveState() const ABSL_LOCKS_EXCLUDED(engine_mu_);
  // Counts a checkpoint of SaveState's state: written to disk at `when`, or failed.
  void CountCheckpoint(bool written, absl::Time when) ABSL_LOCKS_EXCLUDED(engine_mu_);
  // Engine::RestoreState; before Start.
  absl::Status RestoreState(const v1::BoundaryState& state) ABSL_LOCKS_EXCLUDED(engine_mu_);

  // The record: the engine's counters, id, role and the transport's.
  v1::BoundaryStats stats() const ABSL_LOCKS_EXCLUDED(engine_mu_);

  // The encoder's bound on the transport's queue for a link goodput of `goodput` bytes/s (0: not
  // measured): goodput x max_transport_queue_time, at least 1 byte, at most
  // max_transport_queue_bytes.
  static int64_t TransportQueueLimit(const WorkerOptions& options, double goodput);

 private:
  using Key = std::pair<uint64_t, uint32_t>;  // (step, microbatch)
  // Frames whose dictionary version is on its way in a snapshot (Engine::AwaitsDictionary), in
  // arrival order, with the time each was first held; decoded again after each dictionary
  // message, failed after max_parked_time. Decoder thread only.
  struct Parked {
    v1::Frame frame;
    absl::Time since;
  };
  std::deque<Parked> parked_;
  // A dictionary message of the current peer was applied (decoder thread only); frames are held
  // only before that.
  bool dictionary_synced_ = false;
  // A decoded tensor waiting for the trainer's Recv, or the error that its frame caused.
  struct Received {
    absl::Status status;
    int64_t rows = 0;
    std::vector<float> data;
    std::vector<uint32_t> shape;  // as the sender handed it in ([n, d] when it said nothing)
    v1::DType dtype = v1::DTYPE_UNSPECIFIED;
    std::vector<int32_t> token_ids;  // empty: none came
  };
  // What a Send waiting for its frame (wait_encoded) learns when the encoder is done.
  struct JobResult {
    bool done = false;
    absl::Status status;
    uint64_t wire_bytes = 0;
  };
  // A tensor taken from the trainer, waiting for the encoder thread.
  struct EncodeJob {
    uint64_t step = 0;
    uint32_t microbatch = 0;
    DType dtype = DType::kF32;
    int64_t rows = 0;
    std::vector<char> tensor;  // rows x d elements of dtype
    std::vector<int32_t> token_ids;
    std::vector<uint32_t> shape;  // empty: [rows, d]
    bool evaluation = false;
    std::shared_ptr<JobResult> result;  // null unless the sender waits
  };

  void EncodeLoop() ABSL_LOCKS_EXCLUDED(mu_, engine_mu_);
  void Encode(EncodeJob& job) ABSL_LOCKS_EXCLUDED(mu_, engine_mu_);
  void DecodeLoop() ABSL_LOCKS_EXCLUDED(mu_, engine_mu_);
  // `since`: when the frame was first tried (held frames keep their first time).
  void OnFrame(const v1::Frame& frame, absl::Time since) ABSL_LOCKS_EXCLUDED(mu_, engine_mu_);
  // The peer's encoder failed on a tensor: its Recv fails at once (ABORTED).
  void OnFrameFailed(const v1::FrameFailed& failed) ABSL_LOCKS_EXCLUDED(mu_);
  // Fails the held frames older than max_parked_time (their Recv says which version never came).
  void ExpireParked(absl::Time now) ABSL_LOCKS_EXCLUDED(mu_);
  // Puts an entry in the inbox, unless its step is closed or its key is there already (both
  // logged); an error entry holds no tensor.
  void AddToInbox(const Key& key, Received r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EraseFromInbox(std::map<Key, Received>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What the trainer waits for that only the decoder can bring ("" if nothing): a Recv of a
  // tensor not in the inbox, or a Step's learning signal not handled yet.
  std::string WaitingBehindTheDecoder() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SendAll(std::vector<v1::PeerMessage> messages) ABSL_EXCLUSIVE_LOCKS_REQUIRED(engine_mu_);
  void LinkMonitorLoop() ABSL_LOCKS_EXCLUDED(link_mu_);
  // Rolls the step's codec time and link traffic over into the last step's gauges.
  void CloseStepTiming() ABSL_EXCLUSIVE_LOCKS_REQUIRED(engine_mu_) ABSL_LOCKS_EXCLUDED(link_mu_);
  // The kept background encode failure for Step, once (ok: none).
  absl::Status TakeStepError() ABSL_LOCKS_EXCLUDED(mu_);
  std::string Describe(int direction, uint64_t step, uint32_t microbatch) const;

  const v1::BoundaryConfig config_;
  const WorkerOptions options_;
  const CodecTimers timers_;
  const v1::Direction sends_;  // FORWARD upstream, BACKWARD downstream
  const v1::Direction receives_;
  Transport* transport_ = nullptr;  // set by Start, before the threads

  mutable absl::Mutex engine_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  const std::unique_ptr<Engine> engine_ ABSL_PT_GUARDED_BY(engine_mu_);
  // The step in progress: codec seconds (encode and decode, measured under engine_mu_) and the
  // frames encoded and decoded; and the last closed step's gauges.
  double step_codec_seconds_ ABSL_GUARDED_BY(engine_mu_) = 0.0;
  int64_t step_encoded_ ABSL_GUARDED_BY(engine_mu_) = 0;
  int64_t step_decoded_ ABSL_GUARDED_BY(engine_mu_) = 0;
  double compute_seconds_per_microbatch_ ABSL_GUARDED_BY(engine_mu_) = 0.0;
  double wire_seconds_per_microbatch_ ABSL_GUARDED_BY(engine_mu_) = 0.0;
  double wire_goodput_ ABSL_GUARDED_BY(engine_mu_) = 0.0;  // bytes/s; 0 until measured
  uint64_t checkpoints_written_ ABSL_GUARDED_BY(engine_mu_) = 0;
  uint64_t checkpoint_failures_ ABSL_GUARDED_BY(engine_mu_) = 0;
  double last_checkpoint_unix_seconds_ ABSL_GUARDED_BY(engine_mu_) = 0.0;
  // TransportQueueLimit of the goodput, renewed as each step closes.
  int64_t transport_queue_limit_ ABSL_GUARDED_BY(engine_mu_);

  mutable absl::Mutex link_mu_ ABSL_ACQUIRED_AFTER(engine_mu_);
  LinkGoodput goodput_ ABSL_GUARDED_BY(link_mu_);
  bool link_stop_ ABSL_GUARDED_BY(link_mu_) = false;

  mutable absl::Mutex mu_;
  absl::CondVar cv_;  // a job queued or finished, an inbox entry, a learning signal, stopping
  std::deque<EncodeJob> jobs_ ABSL_GUARDED_BY(mu_);
  int encoding_ ABSL_GUARDED_BY(mu_) = 0;        // jobs the encoder has taken and not finished
  size_t reserved_ ABSL_GUARDED_BY(mu_) = 0;     // Sends copying their tensor, not yet queued
  std::set<Key> sent_ ABSL_GUARDED_BY(mu_);      // tensors the trainer handed in, until Step
  std::set<Key> received_ ABSL_GUARDED_BY(mu_);  // tensors the trainer's Recv took, until Step
  // Evaluation forwards decoded here (downstream), until Step: a backward of one is refused.
  std::set<Key> evaluation_received_ ABSL_GUARDED_BY(mu_);
  // The first encode failure of a Send that did not wait, until the next Send and the next Step
  // have each returned it (ok: none).
  absl::Status send_error_ ABSL_GUARDED_BY(mu_);
  absl::Status step_error_ ABSL_GUARDED_BY(mu_);
  std::optional<uint64_t> closed_step_ ABSL_GUARDED_BY(mu_);  // the last step closed here
  std::deque<v1::PeerMessage> incoming_ ABSL_GUARDED_BY(mu_);
  int64_t incoming_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t signals_ ABSL_GUARDED_BY(mu_) = 0;            // learning signals handled (wakes Step)
  uint64_t nonfinite_refused_ ABSL_GUARDED_BY(mu_) = 0;  // Sends refused for NaN or Inf
  std::map<Key, Received> inbox_ ABSL_GUARDED_BY(mu_);
  int64_t inbox_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // of the tensors in inbox_
  // The keys of waiting Recvs, and the signals_ count each Step waiting for a learning signal
  // started from. While one of them waits for what the decoder has not brought yet, the decoder
  // never waits for room in the inbox (it would wait for them, and they for it).
  std::multiset<Key> awaited_ ABSL_GUARDED_BY(mu_);
  std::multiset<uint64_t> signal_waits_ ABSL_GUARDED_BY(mu_);
  uint64_t inbox_dropped_ ABSL_GUARDED_BY(mu_) = 0;      // tensors dropped for max_inbox_bytes
  uint64_t decoded_nonfinite_ ABSL_GUARDED_BY(mu_) = 0;  // frames that decoded to NaN or Inf
  uint64_t parked_expired_ ABSL_GUARDED_BY(mu_) = 0;     // held frames failed by max_parked_time
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Reused buffers: fresh 32 MiB allocations cost more in page faults than the copy itself.
  std::vector<std::vector<char>> spare_tensors_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<float>> spare_inbox_ ABSL_GUARDED_BY(mu_);
  std::thread encoder_;
  std::thread decoder_;
  std::thread link_monitor_;
};

}  // namespace mapl

#endif  // MAPL_SERVER_BOUNDARY_WORKER_H_
