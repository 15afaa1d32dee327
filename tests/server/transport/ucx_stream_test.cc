// The UCX data plane on its own (UcxStream over real UCX on this host) and the link's checks
// around it: tokens, size limits, a peer that dies, data planes that differ, untrusted networks.
// The link suites run over UCX as well (ctest's ucx/ copies, peer_test_util.h UcxDataPlane).
#include "server/transport/ucx/ucx_stream.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/transport/network_policy.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_server.h"
#include "tests/server/transport/peer_test_util.h"

namespace mapl {
namespace {

using ::testing::HasSubstr;
using testing_peer::DialerSide;
using testing_peer::Ignore;
using testing_peer::kWait;
using testing_peer::ServerSide;

// One end of an in-process control stream: Read blocks until the other end half-closes (or this
// end is cancelled); it carries no messages, as a UCX link's gRPC stream carries none after the
// Hello. Cancel ends only this end's reads, so a test decides what the peer's end sees.
class ControlEnd final : public PeerStream {
 public:
  void Connect(ControlEnd* other) { other_ = other; }
  bool Read(v1::PeerMessage*) override {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&ended_));
    return false;
  }
  bool Write(const v1::PeerMessage&) override { return false; }
  void WritesDone() override { other_->End(); }
  void Cancel() override { End(); }
  void End() {
    absl::MutexLock lock(&mu_);
    ended_ = true;
  }

 private:
  ControlEnd* other_ = nullptr;
  absl::Mutex mu_;
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
};

// A UcxStream with its control end.
struct End {
  End(bool dialer, int max_message_bytes, const std::string& name)
      : stream(&control, dialer, UcxLinkOptions(), max_message_bytes, name) {}
  ControlEnd control;
  UcxStream stream;
};

v1::PeerMessage Frame(uint64_t step, size_t bytes) {
  v1::PeerMessage m;
  m.mutable_frame()->set_step(step);
  m.mutable_frame()->set_payload(std::string(bytes, static_cast<char>('a' + step % 26)));
  return m;
}

// Connects a (dialer) and b (listener) as the Hello exchange would.
void Pair(End* a, End* b) {
  a->control.Connect(&b->control);
  b->control.Connect(&a->control);
  ASSERT_TRUE(a->stream.Start().ok());
  ASSERT_TRUE(b->stream.Start().ok());
  // Both at once, as the two ends of a link do: each waits for the other's hello.
  absl::Status b_connected;
  std::thread b_connect(
      [&] { b_connected = b->stream.Connect(a->stream.address(), a->stream.token()); });
  const absl::Status a_connected = a->stream.Connect(b->stream.address(), b->stream.token());
  b_connect.join();
  ASSERT_TRUE(a_connected.ok()) << a_connected;
  ASSERT_TRUE(b_connected.ok()) << b_connected;
}

bool AwaitForeignDropped(const UcxStream& s, uint64_t n) {
  const absl::Time deadline = absl::Now() + kWait;
  while (absl::Now() < deadline) {
    if (s.stats().foreign_dropped >= n) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

TEST(UcxStreamTest, MessagesOfEverySizeArriveInOrderAndForeignOnesAreDropped) {
  End a(true, 64 << 20, "a");
  End b(false, 64 << 20, "b");
  Pair(&a, &b);
  // A stranger that knows b's worker address but not its token: its messages never reach Read.
  End stranger(true, 64 << 20, "stranger");
  stranger.control.Connect(&b.control);
  ASSERT_TRUE(stranger.stream.Start().ok());
  // b never answers its hello (b drops it).
  stranger.stream.set_connect_timeout(absl::Milliseconds(300));
  const absl::Status unanswered = stranger.stream.Connect(b.stream.address(), std::string(16, 'x'));
  EXPECT_EQ(unanswered.code(), absl::StatusCode::kUnavailable) << unanswered;
  EXPECT_THAT(unanswered.message(), HasSubstr("did not answer"));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(stranger.stream.Write(Frame(1000 + i, (100 << 10) * i)));

  // Eager (small) and rendezvous (256 KiB and more) messages interleaved, both ways.
  const size_t sizes[] = {0, 10, 20000, 300 << 10, 5, 2 << 20, 1 << 10};
  constexpr int kCount = 70;
  for (int i = 0; i < kCount; ++i) {
    ASSERT_TRUE(a.stream.Write(Frame(i, sizes[i % 7])));
    ASSERT_TRUE(b.stream.Write(Frame(i, sizes[(i + 3) % 7])));
  }
  for (int i = 0; i < kCount; ++i) {
    v1::PeerMessage m;
    ASSERT_TRUE(b.stream.Read(&m)) << b.stream.ReadError();
    EXPECT_EQ(m.frame().step(), static_cast<uint64_t>(i));
    EXPECT_EQ(m.frame().payload(), Frame(i, sizes[i % 7]).frame().payload());
    ASSERT_TRUE(a.stream.Read(&m)) << a.stream.ReadError();
    EXPECT_EQ(m.frame().step(), static_cast<uint64_t>(i));
    EXPECT_EQ(m.frame().payload().size(), sizes[(i + 3) % 7]);
  }
  // Its hello and its three messages.
  EXPECT_TRUE(AwaitForeignDropped(b.stream, 4)) << b.stream.stats().foreign_dropped;
  EXPECT_EQ(b.stream.stats().foreign_dropped, 4u);
  EXPECT_EQ(b.stream.stats().lanes.empty(), false);

  // A clean close: a's bye after everything it wrote, then the end of its control stream.
  a.stream.WritesDone();
  v1::PeerMessage m;
  EXPECT_FALSE(b.stream.Read(&m));
  EXPECT_TRUE(b.stream.ReadError().ok()) << b.stream.ReadError();
  b.stream.Shutdown(absl::Seconds(1));
  a.stream.Shutdown(absl::ZeroDuration());
  stranger.stream.Shutdown(absl::ZeroDuration());
}

TEST(UcxStreamTest, AMessageOverTheLimitIsRefusedUnread) {
  End a(true, 64 << 20, "a");
  End b(false, /*max_message_bytes=*/100000, "b");
  Pair(&a, &b);
  ASSERT_TRUE(a.stream.Write(Frame(0, 1000)));
  ASSERT_TRUE(a.stream.Write(Frame(1, 1 << 20)));  // Rendezvous: never received.
  // The first may or may not be read before the second's arrival ends the stream.
  v1::PeerMessage m;
  int read = 0;
  while (b.stream.Read(&m)) {
    EXPECT_EQ(m.frame().step(), 0u);
    ++read;
  }
  EXPECT_LE(read, 1);
  EXPECT_EQ(b.stream.ReadError().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(b.stream.ReadError().message(), HasSubstr("over max_message_bytes 100000"));
}

TEST(UcxStreamTest, BackpressureDefersLargeMessagesUntilReadCatchesUp) {
  End a(true, 64 << 20, "a");
  UcxLinkOptions small;
  small.max_inflight_bytes = 1 << 20;
  ControlEnd b_control;
  UcxStream b(&b_control, false, small, 64 << 20, "b");
  a.control.Connect(&b_control);
  b_control.Connect(&a.control);
  ASSERT_TRUE(a.stream.Start().ok());
  ASSERT_TRUE(b.Start().ok());
  std::thread b_connect([&] { ASSERT_TRUE(b.Connect(a.stream.address(), a.stream.token()).ok()); });
  ASSERT_TRUE(a.stream.Connect(b.address(), b.token()).ok());
  b_connect.join();
  constexpr int kCount = 16;  // 8 MiB of 512 KiB messages against b's 1 MiB.
  for (int i = 0; i < kCount; ++i) ASSERT_TRUE(a.stream.Write(Frame(i, 512 << 10)));
  absl::SleepFor(absl::Milliseconds(200));  // Nothing read yet: b defers what does not fit.
  EXPECT_GE(b.stats().rndv_deferred, 1u);
  for (int i = 0; i < kCount; ++i) {
    v1::PeerMessage m;
    ASSERT_TRUE(b.Read(&m)) << b.ReadError();
    EXPECT_EQ(m.frame().step(), static_cast<uint64_t>(i));
    EXPECT_EQ(m.frame().payload().size(), 512u << 10);
  }
  b.Shutdown(absl::ZeroDuration());
}

// A peer that goes away without a bye (its process died): the survivor's Read ends with
// UNAVAILABLE from UCX's peer failure detection, not only when the control stream notices.
TEST(UcxStreamTest, APeerThatDiesEndsTheStreamAsUnavailable) {
  auto a = std::make_unique<End>(true, 64 << 20, "a");
  End b(false, 64 << 20, "b");
  Pair(a.get(), &b);
  ASSERT_TRUE(a->stream.Write(Frame(0, 10)));
  v1::PeerMessage m;
  ASSERT_TRUE(b.stream.Read(&m));
  // a's teardown closes its endpoint by force; its control end is cancelled, which b's does not
  // see (ControlEnd::Cancel), so only UCX tells b.
  a->stream.Shutdown(absl::ZeroDuration());
  const absl::Time start = absl::Now();
  EXPECT_FALSE(b.stream.Read(&m));
  EXPECT_EQ(b.stream.ReadError().code(), absl::StatusCode::kUnavailable) << b.stream.ReadError();
  EXPECT_LT(absl::Now() - start, kWait);
  EXPECT_FALSE(b.stream.Write(Frame(1, 10)));
  b.control.End();
  b.stream.Shutdown(absl::ZeroDuration());
}

// ---- the link around it ----

TEST(UcxLinkTest, DataPlanesThatDifferAreRefusedNamingBoth) {
  PeerLinkOptions down_options = ServerSide();
  down_options.data_plane = v1::DATA_PLANE_UCX;
  std::unique_ptr<PeerServer> server = testing_peer::MakeServer();
  absl::StatusOr<PeerLink*> down = server->RegisterBoundary(down_options, Ignore);
  ASSERT_TRUE(down.ok()) << down.status();
  ASSERT_TRUE(server->Start().ok());
  PeerLinkOptions up_options = DialerSide(server->port());
  up_options.data_plane = v1::DATA_PLANE_GRPC;
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(up_options, Ignore);
  ASSERT_TRUE(up.ok());
  const absl::Status connected = (*up)->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kInvalidArgument) << connected;
  EXPECT_THAT(connected.message(),
              HasSubstr("the data planes differ: DATA_PLANE_UCX here, DATA_PLANE_GRPC at the "
                        "upstream"));
  EXPECT_GE((*down)->stats().handshakes_rejected(), 1u);
}

// A UCX link connects, carries frames, survives broken connections, and reports its lanes.
TEST(UcxLinkTest, AUcxLinkCarriesFramesAcrossBreaksAndNamesItsLanes) {
  PeerLinkOptions down_options = ServerSide();
  PeerLinkOptions up_options = DialerSide();
  down_options.data_plane = up_options.data_plane = v1::DATA_PLANE_UCX;
  const std::string pool = testing_peer::RandomBytes(1 << 20, 7);
  testing_peer::Recorder recorder(300, &pool);
  testing_peer::Pair p =
      testing_peer::Connect(recorder.handler(), Ignore, down_options, up_options);
  for (int i = 0; i < 300; ++i) {
    if (i == 100 || i == 200) p.up->BreakConnectionForTesting();
    ASSERT_TRUE(p.up->Send(testing_peer::MakeFrame(i, 1000 + 3000 * (i % 100), i, pool)).ok());
  }
  ASSERT_TRUE(recorder.WaitDone()) << recorder.received();
  EXPECT_EQ(recorder.errors(), "");
  EXPECT_TRUE(p.up->Drain(kWait).ok());
  const v1::LinkStats stats = p.up->stats();
  EXPECT_EQ(stats.data_plane(), "ucx");
  EXPECT_EQ(stats.ucx_lanes(), "tcp/lo");  // Loopback with peer error handling: TCP.
  EXPECT_EQ(p.down->stats().data_plane(), "ucx");
}

// This host's first non-loopback IPv4 address, or "" if it has none.
std::string NonLoopbackAddress() {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return "";
  std::string found;
  for (ifaddrs* i = list; i != nullptr && found.empty(); i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    char text[INET_ADDRSTRLEN];
    const auto* in = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
    if (inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text)) == nullptr) continue;
    if (std::string(text).rfind("127.", 0) != 0) found = text;
  }
  freeifaddrs(list);
  return found;
}

// Dialing this host's own non-loopback address makes each end see the other there: outside
// loopback, so UCX is refused unless that network is trusted or untrusted ones are allowed.
TEST(UcxLinkTest, APeerOnAnUntrustedNetworkIsRefusedUnlessTrustedOrAllowed) {
  const std::string host = NonLoopbackAddress();
  if (host.empty()) GTEST_SKIP() << "this host has no non-loopback IPv4 address";
  auto attempt = [&host](const UcxLinkOptions& down_ucx, const UcxLinkOptions& up_ucx) {
    PeerServerOptions so;
    so.listen_address = absl::StrCat(host, ":0");
    absl::StatusOr<std::unique_ptr<PeerServer>> server = PeerServer::Create(so);
    EXPECT_TRUE(server.ok()) << server.status();
    PeerLinkOptions down_options = ServerSide();
    down_options.data_plane = v1::DATA_PLANE_UCX;
    down_options.ucx = down_ucx;
    absl::StatusOr<PeerLink*> down = (*server)->RegisterBoundary(down_options, Ignore);
    EXPECT_TRUE(down.ok()) << down.status();
    EXPECT_TRUE((*server)->Start().ok());
    PeerLinkOptions up_options = DialerSide();
    up_options.address = absl::StrCat(host, ":", (*server)->port());
    up_options.data_plane = v1::DATA_PLANE_UCX;
    up_options.ucx = up_ucx;
    absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(up_options, Ignore);
    EXPECT_TRUE(up.ok());
    const absl::Status connected = (*up)->WaitConnected(kWait);
    // A refusal by network is not one by certificate identity.
    EXPECT_EQ((*down)->stats().identity_rejected(), 0u);
    EXPECT_EQ((*up)->stats().identity_rejected(), 0u);
    return connected;
  };
  UcxLinkOptions loopback_only;
  absl::Status s = attempt(loopback_only, loopback_only);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
  EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("the peer is at ", host)));
  EXPECT_THAT(s.message(), HasSubstr("ucx.trusted_networks"));

  UcxLinkOptions trusted;
  trusted.trusted_networks = {"192.0.2.0/24", absl::StrCat(host, "/32")};
  s = attempt(trusted, trusted);
  EXPECT_TRUE(s.ok()) << s;

  UcxLinkOptions allowed;
  allowed.allow_untrusted_networks = true;
  s = attempt(allowed, allowed);
  EXPECT_TRUE(s.ok()) << s;
  // Each end judges for itself: the dialer allows, the listener does not.
  s = attempt(loopback_only, allowed);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
}

TEST(NetworkPolicyTest, LoopbackAndTrustedNetworksPassOthersNeedTheOptIn) {
  UcxLinkOptions o;
  o.trusted_networks = {"10.0.0.0/8", "fd00::/8"};
  bool untrusted = true;
  EXPECT_TRUE(CheckUcxPeer("ipv4:127.0.0.1:5000", o, &untrusted).ok());
  EXPECT_FALSE(untrusted);
  EXPECT_TRUE(CheckUcxPeer("ipv6:[::1]:5000", o, &untrusted).ok());
  EXPECT_TRUE(CheckUcxPeer("unix:/tmp/x", o, &untrusted).ok());
  EXPECT_TRUE(CheckUcxPeer("ipv4:10.200.3.4:5000", o, &untrusted).ok());
  EXPECT_TRUE(CheckUcxPeer("ipv6:[fd12::5%eth0]:5000", o, &untrusted).ok());
  EXPECT_EQ(CheckUcxPeer("ipv4:11.0.0.1:5000", o, &untrusted).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(CheckUcxPeer("ipv6:[fe80::1]:5000", o, &untrusted).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(CheckUcxPeer("something odd", o, &untrusted).code(),
            absl::StatusCode::kPermissionDenied);
  o.allow_untrusted_networks = true;
  EXPECT_TRUE(CheckUcxPeer("ipv4:11.0.0.1:5000", o, &untrusted).ok());
  EXPECT_TRUE(untrusted);
  EXPECT_TRUE(ValidateCidr("0.0.0.0/0").ok());
  EXPECT_FALSE(ValidateCidr("10.0.0.0/8/1").ok());
  EXPECT_FALSE(ValidateCidr("::1/129").ok());
}

}  // namespace
}  // namespace mapl
