// Parts of PeerLink shared by its three source files (peer_link.cc, peer_dialer.cc,
// peer_server.cc) and by nothing else.
#ifndef MAPL_SERVER_TRANSPORT_PEER_LINK_INTERNAL_H_
#define MAPL_SERVER_TRANSPORT_PEER_LINK_INTERNAL_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpc/impl/codegen/grpc_types.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/transport/peer_link.h"

namespace mapl {

// Takes time that depends only on expected's length, not on where the inputs differ.
inline bool ConstantTimeEquals(absl::string_view given, absl::string_view expected) {
  unsigned char diff = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= static_cast<unsigned char>(g ^ static_cast<unsigned char>(expected[i]));
  }
  return diff == 0;
}

// A duration as gRPC's int milliseconds (channel arguments), capped at about 12 days.
inline int ToMillis(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), 1 << 30));
}

// gRPC keepalive, the same on both ends, through `set(name, value)` (a channel's or a server's
// arguments). Keepalive finds a dead connection also while a write is blocked on it; gRPC then
// sets TCP_USER_TIMEOUT to the keepalive timeout, so unacknowledged bytes end it too. Pings go
// out whether or not a call or data is in flight: gRPC would otherwise space them 5 minutes apart
// while no data goes out, which is just when they matter (a writer blocked on a peer that grants
// no flow-control window sends none).
inline void SetKeepalive(absl::Duration time, absl::Duration timeout,
                         const std::function<void(const char*, int)>& set) {
  set(GRPC_ARG_KEEPALIVE_TIME_MS, ToMillis(time));
  set(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, ToMillis(timeout));
  set(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  set(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  set(GRPC_ARG_HTTP2_MIN_SENT_PING_INTERVAL_WITHOUT_DATA_MS, ToMillis(time));
}

// One connection. Lives on the stack of the thread that runs it (the dialer's connection thread or
// a gRPC handler thread); the link points at it (active_session_) while it runs. Fields other than
// `stream` and `writer` are guarded by the link's mu_.
struct PeerLink::Session {
  explicit Session(Stream* s) : stream(s) {}
  Stream* const stream;
  bool stop = false;         // Tells the writer to finish.
  bool writer_done = false;  // The writer has left its loop.
  absl::Status end_status;   // This side's first reason for ending the connection.
  std::thread writer;

  void SetEnd(const absl::Status& status) {
    if (end_status.ok()) end_status = status;
  }
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_PEER_LINK_INTERNAL_H_
