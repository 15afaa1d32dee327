// Helpers of the peer link tests (peer_link_test.cc, peer_server_test.cc): links on loopback with
// short timings, frames whose every byte the receiver can check, and a handler that checks order.
#ifndef MAPL_TESTS_SERVER_TRANSPORT_PEER_TEST_UTIL_H_
#define MAPL_TESTS_SERVER_TRANSPORT_PEER_TEST_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_server.h"

namespace mapl {
namespace testing_peer {

inline constexpr uint32_t kBoundary = 3;
inline constexpr char kToken[] = "correct horse battery staple";
inline constexpr absl::Duration kWait = absl::Seconds(10);

// Whether this run's links use the UCX data plane: MAPL_TEST_DATA_PLANE=ucx, which ctest sets for
// the "ucx/" copies of the link suites (tests/server/transport/CMakeLists.txt). ServerSide and
// DialerSide then set it; a test that is specific to the gRPC data plane skips, saying why.
bool UcxDataPlane();
#define MAPL_SKIP_UNDER_UCX(why)                                              \
  do {                                                                        \
    if (::mapl::testing_peer::UcxDataPlane()) GTEST_SKIP() << "UCX: " << why; \
  } while (0)

// The downstream and upstream ends of boundary kBoundary, with 200 ms heartbeats and fast redials.
// DialerSide's address is filled in by Connect when port is 0.
PeerLinkOptions ServerSide();
PeerLinkOptions DialerSide(int port = 0);

// A started-later server on 127.0.0.1:port (0: any free port). Does not Start it.
std::unique_ptr<PeerServer> MakeServer(int port = 0);
// A port nothing listens on (a server bound it and went away).
int UnusedPort();

// Frame `index` (step = index) carries pool[offset, offset + size) with the offset in
// `microbatch`, so the receiver can check every byte.
v1::PeerMessage MakeFrame(uint64_t index, size_t size, size_t offset, const std::string& pool);
std::string RandomBytes(size_t n, uint64_t seed);
// The serialized size of `msg` as the link sends it: with protocol_version and `seq` set.
int64_t WireBytes(v1::PeerMessage msg, uint64_t seq);

// Checks what a link's handler sees: frames 0, 1, 2, ... with seq 1, 2, 3, ... and intact payloads.
class Recorder {
 public:
  Recorder(int64_t expected, const std::string* pool) : expected_(expected), pool_(pool) {}

  Transport::Handler handler() {
    return [this](v1::PeerMessage m) { Receive(std::move(m)); };
  }
  bool WaitDone() { return done_.WaitForNotificationWithTimeout(kWait); }
  int64_t received() const;
  std::string errors() const;
  // When the last expected message was handed over (InfinitePast before).
  absl::Time done_at() const;
  // Runs on the reader thread with message number `n` (0-based) before it is counted.
  std::function<void(int64_t)> on_message;

 private:
  void Receive(v1::PeerMessage m);

  const int64_t expected_;
  const std::string* const pool_;
  mutable absl::Mutex mu_;
  int64_t received_ ABSL_GUARDED_BY(mu_) = 0;
  std::string errors_ ABSL_GUARDED_BY(mu_);
  absl::Time done_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Notification done_;
};

// Sends `count` frames of random size in [0, max_size], keeping fewer than `window` bytes
// unacknowledged (the daemon's backpressure, which also bounds the test's memory).
void SendFrames(PeerLink* link, int64_t count, size_t max_size, const std::string& pool,
                uint64_t seed, int64_t window = 32 << 20);

// A connected pair: server side (downstream) and dialer (upstream).
struct Pair {
  std::unique_ptr<PeerServer> server;
  PeerLink* down = nullptr;
  std::unique_ptr<PeerLink> up;
};
Pair Connect(Transport::Handler down_handler, Transport::Handler up_handler,
             PeerLinkOptions down_options = ServerSide(),
             PeerLinkOptions up_options = DialerSide());

inline void Ignore(v1::PeerMessage) {}

}  // namespace testing_peer
}  // namespace mapl

#endif  // MAPL_TESTS_SERVER_TRANSPORT_PEER_TEST_UTIL_H_
