// Tests of the gRPC peer link (server/transport/peer_link.h) over loopback: ordering and
// exactly-once delivery, large messages, the send-rate cap, late servers, drain, backpressure,
// heartbeats, close, reconnect with resend, the LinkStats record, and a downstream that dials its
// upstream (delivery across breaks, restarts of either end, the stage check). Refusals, protocol
// violations and the health service are in peer_server_test.cc.
#include "server/transport/peer_link.h"

#include <cstdint>
#include <initializer_list>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/mapl/v1/peer.grpc.pb.h"
#include "server/transport/peer_server.h"
#include "tests/server/transport/peer_test_util.h"

namespace mapl {
namespace {

using ::testing::HasSubstr;
using testing_peer::Connect;
using testing_peer::DialerSide;
using testing_peer::Ignore;
using testing_peer::kBoundary;
using testing_peer::kToken;
using testing_peer::kWait;
using testing_peer::MakeFrame;
using testing_peer::MakeServer;
using testing_peer::Pair;
using testing_peer::RandomBytes;
using testing_peer::Recorder;
using testing_peer::SendFrames;
using testing_peer::ServerSide;
using testing_peer::UnusedPort;
using testing_peer::WireBytes;

uint64_t Messages(const google::protobuf::Map<std::string, v1::Traffic>& by_body,
                  const std::string& body) {
  auto it = by_body.find(body);
  return it == by_body.end() ? 0 : it->second.messages();
}

TEST(PeerLinkTest, TenThousandRandomFramesEachWayArriveOnceAndInOrder) {
  constexpr int64_t kCount = 10000;
  const std::string pool = RandomBytes(256 << 10, 1);
  Recorder at_down(kCount, &pool);
  Recorder at_up(kCount, &pool);
  Pair p = Connect(at_down.handler(), at_up.handler());

  const absl::Time start = absl::Now();
  std::thread up_sender([&] { SendFrames(p.up.get(), kCount, 64 << 10, pool, 11); });
  std::thread down_sender([&] { SendFrames(p.down, kCount, 64 << 10, pool, 12); });
  up_sender.join();
  down_sender.join();
  ASSERT_TRUE(at_down.WaitDone()) << at_down.received();
  ASSERT_TRUE(at_up.WaitDone()) << at_up.received();
  EXPECT_TRUE(p.up->Drain(kWait).ok());
  EXPECT_TRUE(p.down->Drain(kWait).ok());
  const absl::Duration took = absl::Now() - start;

  EXPECT_EQ(at_down.errors(), "");
  EXPECT_EQ(at_up.errors(), "");
  for (PeerLink* link : {p.up.get(), p.down}) {
    const v1::LinkStats s = link->stats();
    EXPECT_EQ(Messages(s.sent(), "frame"), static_cast<uint64_t>(kCount));
    EXPECT_EQ(Messages(s.received(), "frame"), static_cast<uint64_t>(kCount));
    EXPECT_EQ(s.duplicates_dropped(), 0u);
    EXPECT_EQ(s.resent(), 0u);
    EXPECT_EQ(s.queued_messages(), 0u);
    EXPECT_EQ(s.queued_bytes(), 0u);
    EXPECT_EQ(s.last_acked_seq(), static_cast<uint64_t>(kCount));
    EXPECT_EQ(s.last_applied_seq(), static_cast<uint64_t>(kCount));
    EXPECT_GT(s.acks_received(), 0u);
    EXPECT_EQ(s.connections(), 1u);
    std::cout << "boundary link: " << s.bytes_sent() / 1e6 << " MB sent in " << s.messages_sent()
              << " messages, " << s.acks_sent() << " acks, " << absl::FormatDuration(took)
              << " for both directions\n";
  }
}

TEST(PeerLinkTest, EightMebibyteFrameEachWayArrivesIntact) {
  const std::string pool = RandomBytes(8 << 20, 2);
  Recorder at_down(1, &pool);
  Recorder at_up(1, &pool);
  Pair p = Connect(at_down.handler(), at_up.handler());
  ASSERT_TRUE(p.up->Send(MakeFrame(0, pool.size(), 0, pool)).ok());
  ASSERT_TRUE(p.down->Send(MakeFrame(0, pool.size(), 0, pool)).ok());
  ASSERT_TRUE(at_down.WaitDone());
  ASSERT_TRUE(at_up.WaitDone());
  EXPECT_EQ(at_down.errors(), "");
  EXPECT_EQ(at_up.errors(), "");
  EXPECT_TRUE(p.up->Drain(kWait).ok());
  EXPECT_GT(p.up->stats().bytes_received(), 8u << 20);
}

// The cap from both sides, over ~3 s of frames. A bucket of rate R and burst b lets out at most
// b + R t bytes by time t, so the rate achieved beyond the burst, (B - b) / t for the B bytes the
// capped side wrote until the last frame arrived, cannot exceed R; and a writer that never idles
// while frames queue keeps up with R (the bucket makes up for late wake-ups of up to b / R =
// 33 ms). So a cap 20 % off in either direction fails. Spread over 5 runs next to 4 busy builders
// on 2 cores: 0.994 to 0.997 of R; under ASan and UBSan 0.987 to 0.999.
TEST(PeerLinkTest, RateCappedLinkAchievesItsCapWithinFivePercentOverThreeSeconds) {
  constexpr double kRate = 2e6;
  constexpr int64_t kBurst = 64 << 10;
  constexpr int kFrames = 240;
  constexpr size_t kPayload = 25000;
  const std::string pool = RandomBytes(64 << 10, 13);
  Recorder at_up(kFrames, &pool);
  PeerLinkOptions down = ServerSide();
  down.send_rate_bytes_per_second = kRate;
  down.send_burst_bytes = kBurst;
  Pair p = Connect(Ignore, at_up.handler(), down);
  // Let the connection's first heartbeats go by, so the bucket is full at the start.
  ASSERT_TRUE(
      p.down->AwaitStats([](const v1::LinkStats& s) { return s.heartbeats_sent() >= 2; }, kWait));
  absl::SleepFor(absl::Milliseconds(100));
  const uint64_t bytes_before = p.down->stats().bytes_sent();

  const absl::Time start = absl::Now();
  for (int i = 0; i < kFrames; ++i) {
    ASSERT_TRUE(p.down->Send(MakeFrame(i, kPayload, 0, pool)).ok());
  }
  ASSERT_TRUE(at_up.WaitDone()) << at_up.received();
  const absl::Duration took = at_up.done_at() - start;
  EXPECT_EQ(at_up.errors(), "");
  // The writer counts a message once its write returns, which can be after the peer read it.
  ASSERT_TRUE(p.down->AwaitStats(
      [&](const v1::LinkStats& s) {
        return s.bytes_sent() - bytes_before >= uint64_t{kFrames} * kPayload;
      },
      kWait));
  const double bytes = static_cast<double>(p.down->stats().bytes_sent() - bytes_before);
  EXPECT_GT(bytes, static_cast<double>(kFrames * kPayload));
  const double achieved = (bytes - kBurst) / absl::ToDoubleSeconds(took);
  EXPECT_GE(achieved, 0.95 * kRate) << bytes << " bytes in " << absl::FormatDuration(took);
  EXPECT_LE(achieved, 1.05 * kRate) << bytes << " bytes in " << absl::FormatDuration(took);
  std::cout << "rate-capped link: " << bytes / 1e6 << " MB in " << absl::FormatDuration(took)
            << ", " << achieved / kRate << " of the 2 MB/s cap beyond the burst\n";
}

TEST(PeerLinkTest, DialerStartedBeforeTheServerConnectsWhenItAppears) {
  const std::string pool = RandomBytes(4096, 3);
  const int port = UnusedPort();
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(DialerSide(port), Ignore);
  ASSERT_TRUE(up.ok());
  // Nobody there yet: not connected, still trying; messages queue meanwhile.
  EXPECT_EQ((*up)->WaitConnected(absl::Milliseconds(200)).code(),
            absl::StatusCode::kDeadlineExceeded);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE((*up)->Send(MakeFrame(i, 100, i, pool)).ok());

  Recorder at_down(5, &pool);
  std::unique_ptr<PeerServer> server = MakeServer(port);
  ASSERT_TRUE(server->RegisterBoundary(ServerSide(), at_down.handler()).ok());
  ASSERT_TRUE(server->Start().ok());
  EXPECT_TRUE((*up)->WaitConnected(kWait).ok()) << (*up)->status();
  ASSERT_TRUE(at_down.WaitDone());
  EXPECT_EQ(at_down.errors(), "");
  EXPECT_TRUE((*up)->Drain(kWait).ok());
}

TEST(PeerLinkTest, DialerReportsAnUnreachablePeerAndNeverGivesUp) {
  const std::string pool = RandomBytes(4096, 31);
  const int port = UnusedPort();
  PeerLinkOptions o = DialerSide(port);
  o.connect_timeout = absl::Milliseconds(300);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(o, Ignore);
  ASSERT_TRUE(up.ok());
  const absl::Status connected = (*up)->WaitConnected(absl::Seconds(1));
  EXPECT_EQ(connected.code(), absl::StatusCode::kUnavailable) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("still trying"));
  // Sends are kept, not dropped: they go out once the peer appears, however late.
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*up)->Send(MakeFrame(i, 100, i, pool)).ok());
  absl::SleepFor(absl::Seconds(1));
  EXPECT_GE((*up)->stats().dial_failures(), 2u);
  Recorder at_down(3, &pool);
  std::unique_ptr<PeerServer> server = MakeServer(port);
  ASSERT_TRUE(server->RegisterBoundary(ServerSide(), at_down.handler()).ok());
  ASSERT_TRUE(server->Start().ok());
  EXPECT_TRUE((*up)->WaitConnected(kWait).ok()) << (*up)->status();
  ASSERT_TRUE(at_down.WaitDone());
  EXPECT_EQ(at_down.errors(), "");
}

// A listener that completes the handshake, then sends bytes that do not parse as a PeerMessage
// (as one corrupted byte in flight can make them; plaintext gRPC has no integrity check past TCP's
// checksum) and keeps its end of the stream open, saying nothing more: a listener that never
// learns its message was lost. Raw, so that it can send what the generated code would not.
class GarblingListener final : public v1::Peer::WithRawCallbackMethod_Link<v1::Peer::Service> {
 public:
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Link(
      grpc::CallbackServerContext*) override {
    return new Garbler(this);
  }
  int garbled() const {
    absl::MutexLock l(&mu_);
    return garbled_;
  }

 private:
  class Garbler final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Garbler(GarblingListener* owner) : owner_(owner) { StartRead(&in_); }
    void OnReadDone(bool ok) override {
      if (!ok) {  // the dialer went
        reading_ = false;
        if (!writing_) Finish(grpc::Status::OK);
        return;
      }
      if (!replied_) {
        replied_ = true;
        v1::PeerMessage reply;
        reply.set_protocol_version(kPeerProtocolVersion);
        v1::Hello* hello = reply.mutable_hello();
        hello->set_protocol_version(kPeerProtocolVersion);
        hello->set_stage(kBoundary + 1);
        hello->set_boundary(kBoundary);
        hello->set_auth_token(kToken);
        hello->set_instance_id(77);
        Write(reply.SerializeAsString());
      }
      StartRead(&in_);
    }
    void OnWriteDone(bool ok) override {
      writing_ = false;
      if (ok && !garbled_) {
        garbled_ = true;
        // Field 1 as a varint of more than ten bytes: no protobuf parser accepts it.
        Write("\x08" + std::string(10, '\xff') + "\x01");
        return;
      }
      if (ok) {
        absl::MutexLock l(&owner_->mu_);
        ++owner_->garbled_;
      }
      if (!reading_) Finish(grpc::Status::OK);
    }
    void OnDone() override { delete this; }

   private:
    void Write(const std::string& bytes) {
      grpc::Slice slice(bytes);
      out_ = grpc::ByteBuffer(&slice, 1);
      writing_ = true;
      StartWrite(&out_);
    }

    GarblingListener* const owner_;
    grpc::ByteBuffer in_;
    grpc::ByteBuffer out_;
    bool replied_ = false;
    bool garbled_ = false;
    bool reading_ = true;
    bool writing_ = false;
  };

  mutable absl::Mutex mu_;
  int garbled_ ABSL_GUARDED_BY(mu_) = 0;
};

// The dialer's Read fails on a message that does not parse, while the listener's end of the
// stream stays open: the dialer cuts the stream after close_grace and redials, rather than wait
// for the listener's status forever (a soak run once hung so, its link down for good).
TEST(PeerLinkTest, DialerCutsAStreamWhoseMessageDidNotParseAndRedials) {
  MAPL_SKIP_UNDER_UCX(
      "garbles gRPC frames; ucx_stream_test covers a UCX message that does not "
      "parse");
  GarblingListener listener;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&listener);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  PeerLinkOptions o = DialerSide(port);
  o.close_grace = absl::Milliseconds(300);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(o, Ignore);
  ASSERT_TRUE(up.ok());
  // A third connection comes only after the first two streams were cut.
  EXPECT_TRUE((*up)->AwaitStats([](const v1::LinkStats& s) { return s.connections() >= 3; }, kWait))
      << (*up)->stats().DebugString();
  EXPECT_GE(listener.garbled(), 2);
  up->reset();
  server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
}

// A restarted dialer (a new instance) is seen by the server side: on_peer_restart runs once,
// after the old instance's messages and before the new one's, and the sequence starts afresh.
TEST(PeerLinkTest, ARestartedPeerIsAnnouncedBetweenItsTwoLives) {
  const std::string pool = RandomBytes(4096, 41);
  absl::Mutex mu;
  std::vector<std::string> seen;  // "frame <step>" and "restart", in order.
  PeerLinkOptions down_options = ServerSide();
  down_options.on_peer_restart = [&] {
    absl::MutexLock l(&mu);
    seen.push_back("restart");
  };
  auto record = [&](v1::PeerMessage m) {
    absl::MutexLock l(&mu);
    seen.push_back(absl::StrCat("frame ", m.frame().step()));
  };
  std::unique_ptr<PeerServer> server = MakeServer();
  absl::StatusOr<PeerLink*> down = server->RegisterBoundary(down_options, record);
  ASSERT_TRUE(down.ok());
  ASSERT_TRUE(server->Start().ok());
  for (int life = 0; life < 2; ++life) {
    absl::StatusOr<std::unique_ptr<PeerLink>> up =
        PeerLink::Dial(DialerSide(server->port()), Ignore);
    ASSERT_TRUE(up.ok());
    for (int i = 0; i < 3; ++i)
      ASSERT_TRUE((*up)->Send(MakeFrame(10 * life + i, 10, i, pool)).ok());
    ASSERT_TRUE((*up)->Drain(kWait).ok());
    (*up)->Close();
  }
  absl::MutexLock l(&mu);
  EXPECT_EQ(absl::StrJoin(seen, ", "),
            "frame 0, frame 1, frame 2, restart, frame 10, frame 11, frame 12");
  EXPECT_EQ((*down)->stats().peer_restarts(), 1u);
}

TEST(PeerLinkTest, DrainReturnsOnceEverythingIsAcknowledged) {
  const std::string pool = RandomBytes(4096, 4);
  Recorder at_down(1000, &pool);
  Pair p = Connect(at_down.handler(), Ignore);
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(p.up->Send(MakeFrame(i, 64, i, pool)).ok());
  ASSERT_TRUE(p.up->Drain(kWait).ok());
  const v1::LinkStats s = p.up->stats();
  EXPECT_EQ(s.queued_messages(), 0u);
  EXPECT_EQ(s.last_acked_seq(), 1000u);
  EXPECT_EQ(at_down.received(), 1000);  // Acknowledged means applied.
}

TEST(PeerLinkTest, DrainTimesOutNamingWhatIsLeft) {
  const std::string pool = RandomBytes(4096, 5);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(DialerSide(UnusedPort()), Ignore);
  ASSERT_TRUE(up.ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE((*up)->Send(MakeFrame(i, 10, 0, pool)).ok());
  const absl::Status drained = (*up)->Drain(absl::Milliseconds(50));
  EXPECT_EQ(drained.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(drained.message(), HasSubstr("3 message(s) unacknowledged"));
}

TEST(PeerLinkTest, WaitQueueBelowFollowsTheUnacknowledgedBytes) {
  const std::string pool = RandomBytes(4096, 8);
  const int port = UnusedPort();
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(DialerSide(port), Ignore);
  ASSERT_TRUE(up.ok());
  EXPECT_TRUE((*up)->WaitQueueBelow(1, absl::ZeroDuration()));  // Empty.
  int64_t bytes = 0;
  for (int i = 0; i < 4; ++i) {
    v1::PeerMessage frame = MakeFrame(i, 1000, 0, pool);
    bytes += WireBytes(frame, i + 1);
    ASSERT_TRUE((*up)->Send(std::move(frame)).ok());
  }
  EXPECT_EQ((*up)->stats().queued_bytes(), static_cast<uint64_t>(bytes));
  // Nobody acknowledges yet: below bytes + 1 holds, below bytes does not (it waits the timeout).
  EXPECT_TRUE((*up)->WaitQueueBelow(bytes + 1, absl::ZeroDuration()));
  const absl::Time before = absl::Now();
  EXPECT_FALSE((*up)->WaitQueueBelow(bytes, absl::Milliseconds(100)));
  EXPECT_GE(absl::Now() - before, absl::Milliseconds(100));
  // A server appears and acknowledges everything: the queue empties.
  Recorder at_down(4, &pool);
  std::unique_ptr<PeerServer> server = MakeServer(port);
  ASSERT_TRUE(server->RegisterBoundary(ServerSide(), at_down.handler()).ok());
  ASSERT_TRUE(server->Start().ok());
  EXPECT_TRUE((*up)->WaitQueueBelow(1, kWait));
  EXPECT_EQ(at_down.received(), 4);
}

TEST(PeerLinkTest, HeartbeatsMeasureRoundTripTime) {
  PeerLinkOptions down = ServerSide();
  down.heartbeat_interval = absl::Milliseconds(20);
  PeerLinkOptions up = DialerSide();
  up.heartbeat_interval = absl::Milliseconds(20);
  Pair p = Connect(Ignore, Ignore, down, up);
  for (PeerLink* link : {p.up.get(), p.down}) {
    EXPECT_TRUE(link->AwaitStats(
        [](const v1::LinkStats& s) {
          return s.heartbeats_received() >= 6 && s.last_rtt_seconds() > 0;
        },
        kWait));
    EXPECT_LT(link->stats().last_rtt_seconds(), 1.0);
  }
}

TEST(PeerLinkTest, ClosingTheDialerIsSeenByTheServerSide) {
  Pair p = Connect(Ignore, Ignore);
  p.up->Close();
  EXPECT_FALSE(p.up->connected());
  EXPECT_FALSE(p.up->stats().connected());
  EXPECT_EQ(p.up->Send(MakeFrame(0, 0, 0, "")).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(
      p.down->AwaitStats([](const v1::LinkStats& s) { return s.disconnects() == 1; }, kWait));
  EXPECT_FALSE(p.down->connected());
  EXPECT_THAT(p.down->status().message(), HasSubstr("the upstream closed the link"));
}

TEST(PeerLinkTest, ClosingTheServerSideIsSeenByTheDialer) {
  Pair p = Connect(Ignore, Ignore);
  p.down->Close();
  EXPECT_FALSE(p.down->connected());
  // The dialer loses the stream and redials (a draining downstream may be replaced by a new one);
  // its status says why it is not connected.
  ASSERT_TRUE(p.up->AwaitStats([](const v1::LinkStats& s) { return s.disconnects() == 1; }, kWait));
  ASSERT_TRUE(
      p.up->AwaitStats([](const v1::LinkStats& s) { return s.dial_failures() >= 1; }, kWait));
  const absl::Status connected = p.up->WaitConnected(absl::Milliseconds(200));
  EXPECT_EQ(connected.code(), absl::StatusCode::kDeadlineExceeded) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("is closed"));
}

TEST(PeerLinkTest, ThreeBrokenConnectionsUnderLoadLoseAndDuplicateNothing) {
  constexpr int64_t kCount = 3000;
  const std::string pool = RandomBytes(64 << 10, 6);
  Recorder at_down(kCount, &pool);
  Recorder at_up(kCount, &pool);
  PeerLink* down = nullptr;
  PeerLink* up = nullptr;
  // Break the connection from either side while both directions are busy.
  at_down.on_message = [&down](int64_t n) {
    if (n == 700 || n == 2100) down->BreakConnectionForTesting();
  };
  at_up.on_message = [&up](int64_t n) {
    if (n == 1400) up->BreakConnectionForTesting();
  };
  Pair p = Connect(at_down.handler(), at_up.handler());
  down = p.down;
  up = p.up.get();
  std::thread up_sender([&] { SendFrames(up, kCount, 4096, pool, 21, 1 << 20); });
  std::thread down_sender([&] { SendFrames(down, kCount, 4096, pool, 22, 1 << 20); });
  up_sender.join();
  down_sender.join();
  ASSERT_TRUE(at_down.WaitDone()) << at_down.received();
  ASSERT_TRUE(at_up.WaitDone()) << at_up.received();
  EXPECT_TRUE(up->Drain(kWait).ok());
  EXPECT_TRUE(down->Drain(kWait).ok());
  EXPECT_EQ(at_down.errors(), "");
  EXPECT_EQ(at_up.errors(), "");
  // Three breaks; two can hit the same connection.
  EXPECT_GE(up->stats().reconnects(), 2u);
  EXPECT_EQ(up->stats().peer_restarts(), 0u);
  std::cout << "resent up/down: " << up->stats().resent() << "/" << down->stats().resent()
            << ", duplicates dropped: " << up->stats().duplicates_dropped() << "/"
            << down->stats().duplicates_dropped() << "\n";
}

// Options for exact counts: one heartbeat each way per connection (the first, sent on connecting;
// the next would be an hour later), and acks only every 10 applied messages.
PeerLinkOptions Quiet(PeerLinkOptions o) {
  o.heartbeat_interval = absl::Hours(1);
  o.peer_timeout = absl::InfiniteDuration();
  o.ack_every = 10;
  o.ack_delay = absl::Hours(1);
  return o;
}

int64_t FrameBytes(const std::string& pool, int first_seq, int last_seq) {
  int64_t sum = 0;
  for (int seq = first_seq; seq <= last_seq; ++seq) {
    sum += WireBytes(MakeFrame(seq - 1, 100 + seq, seq, pool), seq);
  }
  return sum;
}

int64_t AckBytes(std::initializer_list<uint64_t> seqs) {
  int64_t sum = 0;
  for (uint64_t seq : seqs) {
    v1::PeerMessage ack;
    ack.mutable_ack()->set_seq(seq);
    sum += WireBytes(ack, 0);
  }
  return sum;
}

// Every LinkStats counter against what the traffic implies: 25 frames upstream -> downstream, a
// break while frames 22 to 25 are written but not applied (the downstream's handler holds frame
// 21), a reconnect that resends exactly those four, and 6 more frames.
TEST(PeerLinkTest, StatsCountExactlyTheTrafficAcrossABreakAndResend) {
  const std::string pool = RandomBytes(4096, 7);
  Recorder at_down(31, &pool);
  absl::Notification holding, release;
  at_down.on_message = [&holding, &release](int64_t n) {
    if (n != 20) return;
    holding.Notify();  // Frame 21 (seq 21) waits in the handler.
    release.WaitForNotification();
  };
  Pair p = Connect(at_down.handler(), Ignore, Quiet(ServerSide()), Quiet(DialerSide()));
  // A failed ASSERT must not leave the handler waiting: closing the link waits for it.
  absl::Cleanup release_on_exit = [&release] {
    if (!release.HasBeenNotified()) release.Notify();
  };
  auto heartbeats_received = [](uint64_t n) {
    return [n](const v1::LinkStats& s) { return s.heartbeats_received() == n; };
  };
  // Each side's first heartbeat and the echo of it: two each way.
  ASSERT_TRUE(p.up->AwaitStats(heartbeats_received(2), kWait));
  ASSERT_TRUE(p.down->AwaitStats(heartbeats_received(2), kWait));

  // Acks are cumulative: a writer that wakes late acknowledges 20 frames at once. Sending in
  // tens and waiting for each ack makes them exactly two (for 10 and for 20).
  auto acks_received = [](uint64_t n) {
    return [n](const v1::LinkStats& s) { return s.acks_received() == n; };
  };
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(p.up->Send(MakeFrame(i, 101 + i, i + 1, pool)).ok());
  ASSERT_TRUE(p.up->AwaitStats(acks_received(1), kWait));
  for (int i = 10; i < 20; ++i) ASSERT_TRUE(p.up->Send(MakeFrame(i, 101 + i, i + 1, pool)).ok());
  ASSERT_TRUE(p.up->AwaitStats(acks_received(2), kWait));
  for (int i = 20; i < 25; ++i) ASSERT_TRUE(p.up->Send(MakeFrame(i, 101 + i, i + 1, pool)).ok());
  // All 25 written; frame 21 held in the handler, 22 to 25 not applied.
  ASSERT_TRUE(p.up->AwaitStats(
      [](const v1::LinkStats& s) { return Messages(s.sent(), "frame") == 25; }, kWait));
  ASSERT_TRUE(holding.WaitForNotificationWithTimeout(kWait));
  EXPECT_EQ(p.up->stats().last_acked_seq(), 20u);
  EXPECT_EQ(p.up->stats().queued_messages(), 5u);
  EXPECT_EQ(static_cast<int64_t>(p.up->stats().queued_bytes()), FrameBytes(pool, 21, 25));
  p.down->BreakConnectionForTesting();
  release.Notify();  // Frame 21 is applied; the broken stream delivers nothing after it.

  // The upstream redials; the downstream asks to resume from 22, so 22 to 25 are written again.
  ASSERT_TRUE(p.up->AwaitStats([](const v1::LinkStats& s) { return s.connections() == 2; }, kWait));
  ASSERT_TRUE(p.up->WaitConnected(kWait).ok());
  ASSERT_TRUE(p.up->AwaitStats(heartbeats_received(4), kWait));
  ASSERT_TRUE(p.down->AwaitStats(heartbeats_received(4), kWait));
  for (int i = 25; i < 31; ++i) ASSERT_TRUE(p.up->Send(MakeFrame(i, 101 + i, i + 1, pool)).ok());
  ASSERT_TRUE(p.up->Drain(kWait).ok());  // Frames 22..31 applied: the ack for 31.
  ASSERT_TRUE(at_down.WaitDone());
  EXPECT_EQ(at_down.errors(), "");

  // A writer counts a message once its write returned, which can be after the peer read it: wait
  // until the writers' counts reach what the test expects (a count short of it fails here, one
  // beyond it below).
  ASSERT_TRUE(p.up->AwaitStats(
      [](const v1::LinkStats& s) {
        return Messages(s.sent(), "frame") >= 35 && s.heartbeats_sent() >= 4;
      },
      kWait));
  ASSERT_TRUE(p.down->AwaitStats(
      [](const v1::LinkStats& s) { return s.acks_sent() >= 3 && s.heartbeats_sent() >= 4; },
      kWait));
  const v1::LinkStats up = p.up->stats();
  const v1::LinkStats down = p.down->stats();
  for (const v1::LinkStats* s : {&up, &down}) {
    EXPECT_TRUE(s->connected());
    EXPECT_EQ(s->connections(), 2u);
    EXPECT_EQ(s->reconnects(), 1u);
    EXPECT_EQ(s->disconnects(), 1u);
    EXPECT_EQ(s->heartbeats_sent(), 4u);  // Per connection: its own first one and one echo.
    EXPECT_EQ(s->heartbeats_received(), 4u);
    EXPECT_GT(s->last_rtt_seconds(), 0);
    EXPECT_EQ(s->handshakes_rejected(), 0u);
    EXPECT_EQ(s->peer_restarts(), 0u);
    EXPECT_EQ(s->duplicates_dropped(), 0u);
    EXPECT_EQ(s->queued_messages(), 0u);
    EXPECT_EQ(s->queued_bytes(), 0u);
    uint64_t messages = 0, bytes = 0;
    for (const auto& [body, t] : s->sent()) messages += t.messages(), bytes += t.bytes();
    EXPECT_EQ(s->messages_sent(), messages);
    EXPECT_EQ(s->bytes_sent(), bytes);
    messages = bytes = 0;
    for (const auto& [body, t] : s->received()) messages += t.messages(), bytes += t.bytes();
    EXPECT_EQ(s->messages_received(), messages);
    EXPECT_EQ(s->bytes_received(), bytes);
  }
  // Upstream: 31 frames and 4 resent; 3 acks back (10, 20, 31).
  ASSERT_THAT(up.sent(), ::testing::SizeIs(2));
  EXPECT_EQ(up.sent().at("frame").messages(), 35u);
  EXPECT_EQ(static_cast<int64_t>(up.sent().at("frame").bytes()),
            FrameBytes(pool, 1, 31) + FrameBytes(pool, 22, 25));
  EXPECT_EQ(up.resent(), 4u);
  EXPECT_EQ(up.acks_sent(), 0u);
  EXPECT_EQ(up.acks_received(), 3u);
  EXPECT_EQ(up.received().at("ack").messages(), 3u);
  EXPECT_EQ(static_cast<int64_t>(up.received().at("ack").bytes()), AckBytes({10, 20, 31}));
  EXPECT_EQ(up.last_seq(), 31u);
  EXPECT_EQ(up.last_acked_seq(), 31u);
  EXPECT_EQ(up.last_applied_seq(), 0u);
  // Downstream: each of the 31 frames read once (the resent four were never read before).
  ASSERT_THAT(down.received(), ::testing::SizeIs(2));
  EXPECT_EQ(down.received().at("frame").messages(), 31u);
  EXPECT_EQ(static_cast<int64_t>(down.received().at("frame").bytes()), FrameBytes(pool, 1, 31));
  EXPECT_EQ(down.resent(), 0u);
  EXPECT_EQ(down.acks_sent(), 3u);
  EXPECT_EQ(down.acks_received(), 0u);
  EXPECT_EQ(down.sent().at("ack").messages(), 3u);
  EXPECT_EQ(static_cast<int64_t>(down.sent().at("ack").bytes()), AckBytes({10, 20, 31}));
  EXPECT_EQ(down.last_seq(), 0u);
  EXPECT_EQ(down.last_applied_seq(), 31u);
  // Heartbeats: what one side wrote, the other read, byte for byte.
  EXPECT_EQ(up.sent().at("heartbeat").messages(), 4u);
  EXPECT_EQ(up.sent().at("heartbeat").bytes(), down.received().at("heartbeat").bytes());
  EXPECT_EQ(down.sent().at("heartbeat").bytes(), up.received().at("heartbeat").bytes());
  EXPECT_THAT(up.received(), ::testing::SizeIs(2));
  EXPECT_THAT(down.sent(), ::testing::SizeIs(2));
}

// ---- the downstream dials (a downstream behind NAT dials its upstream's listener) ----

// `o` moved to the other side of the boundary (stage 3 <-> 4), keeping its role settings:
// ServerSide() becomes a listening upstream, DialerSide() a dialing downstream.
PeerLinkOptions OtherSide(PeerLinkOptions o) {
  o.stage = o.stage == kBoundary ? kBoundary + 1 : kBoundary;
  return o;
}

// The downstream (stage 4) dials, the upstream (stage 3) listens: frames go both ways exactly once
// and in order across connections broken from either side, as in the usual direction.
TEST(PeerLinkTest, DownstreamThatDialsAndUpstreamThatListensDeliverBothWaysAcrossBreaks) {
  constexpr int64_t kCount = 2000;
  const std::string pool = RandomBytes(64 << 10, 61);
  Recorder at_up(kCount, &pool);
  Recorder at_down(kCount, &pool);
  PeerLink* up = nullptr;    // Listening, stage 3.
  PeerLink* down = nullptr;  // Dialing, stage 4.
  at_up.on_message = [&up](int64_t n) {
    if (n == 500 || n == 1500) up->BreakConnectionForTesting();
  };
  at_down.on_message = [&down](int64_t n) {
    if (n == 1000) down->BreakConnectionForTesting();
  };
  // Connect registers its first options on its server and dials with the second.
  Pair p =
      Connect(at_up.handler(), at_down.handler(), OtherSide(ServerSide()), OtherSide(DialerSide()));
  up = p.down;
  down = p.up.get();
  std::thread up_sender([&] { SendFrames(up, kCount, 4096, pool, 62, 1 << 20); });
  std::thread down_sender([&] { SendFrames(down, kCount, 4096, pool, 63, 1 << 20); });
  up_sender.join();
  down_sender.join();
  ASSERT_TRUE(at_up.WaitDone()) << at_up.received();
  ASSERT_TRUE(at_down.WaitDone()) << at_down.received();
  EXPECT_TRUE(up->Drain(kWait).ok());
  EXPECT_TRUE(down->Drain(kWait).ok());
  EXPECT_EQ(at_up.errors(), "");
  EXPECT_EQ(at_down.errors(), "");
  // The dialer (here the downstream) redials after each break; nobody restarted.
  EXPECT_GE(down->stats().reconnects(), 2u);
  EXPECT_EQ(down->stats().peer_restarts(), 0u);
  EXPECT_EQ(up->stats().peer_restarts(), 0u);
  // Closing the listening upstream is seen by the dialing downstream, named by its side.
  up->Close();
  ASSERT_TRUE(down->WaitDisconnected(kWait));
  EXPECT_THAT(up->status().message(), HasSubstr("(upstream, stage 3, listening)"));
}

// Restarts in the reversed direction: a new instance of the dialing downstream is announced at
// the listening upstream, and a new instance of the listening upstream at the dialing downstream,
// each between the old instance's last message and the new one's first.
TEST(PeerLinkTest, RestartsOfEitherEndAreAnnouncedWhenTheDownstreamDials) {
  const std::string pool = RandomBytes(4096, 64);
  absl::Mutex mu;
  std::vector<std::string> at_up, at_down;  // "frame <step>" and "restart", in order.
  auto recorder = [&mu](std::vector<std::string>* seen) {
    return [&mu, seen](v1::PeerMessage m) {
      absl::MutexLock l(&mu);
      seen->push_back(absl::StrCat("frame ", m.frame().step()));
    };
  };
  auto restarts = [&mu](std::vector<std::string>* seen) {
    return [&mu, seen] {
      absl::MutexLock l(&mu);
      seen->push_back("restart");
    };
  };
  PeerLinkOptions up_options = OtherSide(ServerSide());
  up_options.on_peer_restart = restarts(&at_up);
  PeerLinkOptions down_options = OtherSide(DialerSide());
  down_options.on_peer_restart = restarts(&at_down);

  // The downstream dials twice, as two instances.
  std::unique_ptr<PeerServer> server = MakeServer();
  absl::StatusOr<PeerLink*> up = server->RegisterBoundary(up_options, recorder(&at_up));
  ASSERT_TRUE(up.ok());
  ASSERT_TRUE(server->Start().ok());
  const int port = server->port();
  down_options.address = absl::StrCat("127.0.0.1:", port);
  for (int life = 0; life < 2; ++life) {
    absl::StatusOr<std::unique_ptr<PeerLink>> down = PeerLink::Dial(down_options, Ignore);
    ASSERT_TRUE(down.ok());
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE((*down)->Send(MakeFrame(10 * life + i, 10, i, pool)).ok());
    }
    ASSERT_TRUE((*down)->Drain(kWait).ok());
    (*down)->Close();
  }
  EXPECT_EQ((*up)->stats().peer_restarts(), 1u);

  // The upstream restarts (a new server and link on the same port) under one dialing downstream.
  absl::StatusOr<std::unique_ptr<PeerLink>> down = PeerLink::Dial(down_options, recorder(&at_down));
  ASSERT_TRUE(down.ok());
  for (int life = 0; life < 2; ++life) {
    server->Shutdown();
    server = MakeServer(port);
    up = server->RegisterBoundary(up_options, Ignore);
    ASSERT_TRUE(up.ok());
    ASSERT_TRUE(server->Start().ok());
    for (int i = 0; i < 3; ++i)
      ASSERT_TRUE((*up)->Send(MakeFrame(10 * life + i, 10, i, pool)).ok());
    ASSERT_TRUE((*up)->Drain(kWait).ok());
  }
  EXPECT_EQ((*down)->stats().peer_restarts(), 1u);
  absl::MutexLock l(&mu);
  EXPECT_EQ(absl::StrJoin(at_up, ", "),
            "frame 0, frame 1, frame 2, restart, frame 10, frame 11, frame 12");
  EXPECT_EQ(absl::StrJoin(at_down, ", "),
            "frame 0, frame 1, frame 2, restart, frame 10, frame 11, frame 12");
}

// Each end expects its peer to be the other side of the boundary, whichever dials: a dialer at
// the listener's own stage is turned away, and the listener names what it expected.
TEST(PeerLinkTest, EachEndExpectsTheOtherSideOfTheBoundaryWhicheverDials) {
  struct Case {
    PeerLinkOptions listener;
    PeerLinkOptions dialer;
    const char* says;
  };
  const Case cases[] = {
      // Two downstreams: the usual listener and a downstream that dials.
      {ServerSide(), OtherSide(DialerSide()),
       "(downstream, stage 4): the upstream says stage 4, expected 3"},
      // Two upstreams: a listening upstream and the usual dialer.
      {OtherSide(ServerSide()), DialerSide(),
       "(upstream, stage 3, listening): the downstream says stage 3, expected 4"},
  };
  for (const Case& c : cases) {
    std::unique_ptr<PeerServer> server = MakeServer();
    absl::StatusOr<PeerLink*> listener = server->RegisterBoundary(c.listener, Ignore);
    ASSERT_TRUE(listener.ok());
    ASSERT_TRUE(server->Start().ok());
    PeerLinkOptions dialer_options = c.dialer;
    dialer_options.address = absl::StrCat("127.0.0.1:", server->port());
    absl::StatusOr<std::unique_ptr<PeerLink>> dialer = PeerLink::Dial(dialer_options, Ignore);
    ASSERT_TRUE(dialer.ok());
    ASSERT_TRUE((*listener)->AwaitStats(
        [](const v1::LinkStats& s) { return s.handshakes_rejected() >= 1; }, kWait));
    EXPECT_THAT((*listener)->status().message(), HasSubstr(c.says));
    EXPECT_EQ((*listener)->status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_FALSE((*dialer)->connected());
  }
}

}  // namespace
}  // namespace mapl
