// The wire under one connection of a peer link (peer_link.h): PeerLink's reliability engine
// (sequence numbers, acknowledgements, resends, liveness, the rate cap) reaches the wire only
// through this interface, so one session code runs over each data plane: the gRPC stream itself
// (peer_dialer.cc, peer_server.cc) or UCX active messages (ucx/ucx_stream.h).
#ifndef MAPL_SERVER_TRANSPORT_STREAM_H_
#define MAPL_SERVER_TRANSPORT_STREAM_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "proto/mapl/v1/local.pb.h"
#include "proto/mapl/v1/peer.pb.h"

namespace mapl {

// One ordered, bidirectional message stream. One thread reads and one writes at a time; Cancel
// may come from any thread.
class PeerStream {
 public:
  virtual ~PeerStream() = default;
  // The next message; false once the stream ended (cleanly, or see ReadError).
  virtual bool Read(v1::PeerMessage* msg) = 0;
  // false once the stream is broken.
  virtual bool Write(const v1::PeerMessage& msg) = 0;
  // Client: half-close (the peer reads a clean end). Server: nothing (the handler's return ends
  // the stream).
  virtual void WritesDone() = 0;
  // Unblocks Read and Write from any thread; the stream is dead afterwards.
  virtual void Cancel() = 0;
  // Why Read returned false, when the stream itself knows better than "it ended" (a message that
  // broke a limit, a transport error); OK otherwise.
  virtual absl::Status ReadError() const { return absl::OkStatus(); }
  // Adds what the stream counts itself (the data plane's LinkStats fields) to `stats`.
  virtual void AddStats(v1::LinkStats* /*stats*/) const {}
};

// A stream that carries the messages beside a gRPC stream (`control`), which stays open for the
// close: the UCX data plane (ucx/ucx_stream.h). Each side's address and token travel in its Hello.
class DataPlaneStream : public PeerStream {
 public:
  // Readies this side (its address and token are known afterwards).
  virtual absl::Status Start() = 0;
  virtual const std::string& address() const = 0;
  virtual const std::string& token() const = 0;
  // Connects to the peer named by its Hello, once both Hellos are checked.
  virtual absl::Status Connect(absl::string_view peer_address, absl::string_view peer_token) = 0;
  // Ends the connection: waits up to `grace` for the control stream to end, cancels it otherwise,
  // and releases everything. Before the control stream's Finish. Idempotent.
  virtual void Shutdown(absl::Duration grace) = 0;
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_STREAM_H_
