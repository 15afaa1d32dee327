// The transport under the daemon: it carries one boundary's PeerMessages between the two mapld
// processes on either side of it. A transport numbers, orders, acknowledges, retains and resends
// messages; it knows nothing about codecs. The peer link (peer_link.h) is the implementation;
// its messages travel on its gRPC stream or, with a UCX data plane, as UCX active messages.
//
//   std::unique_ptr<Transport> t = ...;          // opened by the implementation's factory,
//                                                // with the receive handler
//   MAPL_RETURN_IF_ERROR(t->Send(std::move(m)));  // queued, in order, exactly once; never blocks
//   t->WaitQueueBelow(256 << 20, absl::Seconds(1));   // backpressure
//   MAPL_RETURN_IF_ERROR(t->Drain(absl::Seconds(10)));
//   t->Close();
//
// Messages are moved in and out (Send takes the message by value, the handler receives it by
// value), so an implementation can hand a large frame's payload to the wire, and the receiver can
// keep it, without a copy.
//
// Delivery guarantee: sequenced messages reach the peer's handler exactly once and in Send order,
// across broken connections, as long as neither process restarts.
//
// Threading: every method is thread-safe. The handler is never called concurrently with itself;
// it may call Send, but must not block for long (it stalls receiving) and must not call Close.
#ifndef MAPL_SERVER_TRANSPORT_TRANSPORT_H_
#define MAPL_SERVER_TRANSPORT_TRANSPORT_H_

#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.pb.h"

namespace mapl {

class Transport {
 public:
  // Called with every sequenced message the peer sent, in order, exactly once.
  using Handler = std::function<void(v1::PeerMessage msg)>;

  virtual ~Transport() = default;

  // Queues a sequenced message and returns at once; it is written in order when connected and
  // kept until acknowledged, across reconnects (a transport never gives up on its own).
  // INVALID_ARGUMENT for a connection-level or empty body or one over the size limit;
  // FAILED_PRECONDITION after Close.
  virtual absl::Status Send(v1::PeerMessage msg) = 0;

  // Waits until fewer than `bytes` of sequenced messages are unacknowledged, or `timeout` passes;
  // returns whether they are.
  virtual bool WaitQueueBelow(int64_t bytes, absl::Duration timeout) = 0;

  // OK once connected (now or within `timeout`); a refusal by the peer (or of it) at once;
  // DEADLINE_EXCEEDED or UNAVAILABLE (long without a connection) otherwise.
  virtual absl::Status WaitConnected(absl::Duration timeout) = 0;
  virtual bool connected() const = 0;

  // Waits until every message queued so far has been delivered and acknowledged.
  // DEADLINE_EXCEEDED naming how many are left.
  virtual absl::Status Drain(absl::Duration timeout) = 0;

  // Ends the transport; unacknowledged messages are dropped (Drain first). Idempotent.
  virtual void Close() = 0;

  // The record of this transport's counters (local.proto LinkStats).
  virtual v1::LinkStats stats() const = 0;
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_TRANSPORT_H_
