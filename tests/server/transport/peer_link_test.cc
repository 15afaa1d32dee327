// Tests of the peer link (server/peer_link.h) over loopback: ordering and exactly-once delivery,
// large messages, authentication and rejection statuses, late servers, drain, heartbeats, close,
// reconnect with resend, stream replacement and protocol violations.
#include "server/transport/peer_link.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpc/grpc.h"
#include "gtest/gtest.h"

namespace mapl {
namespace {

using ::testing::HasSubstr;

// Keeps the gRPC library initialized for the whole binary. Otherwise the last gRPC object of each
// test shuts the library down (grpc_shutdown in ~Server), which can wait seconds for gRPC's
// executor threads once a health service has been enabled.
class GrpcEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { grpc_init(); }
};
[[maybe_unused]] ::testing::Environment* const kGrpcEnvironment =
    ::testing::AddGlobalTestEnvironment(new GrpcEnvironment);

constexpr uint32_t kBoundary = 3;
constexpr char kToken[] = "correct horse battery staple";
constexpr absl::Duration kWait = absl::Seconds(10);

PeerLinkOptions ServerSide() {
  PeerLinkOptions o;
  o.boundary = kBoundary;
  o.stage = kBoundary + 1;
  o.auth_token = kToken;
  o.heartbeat_interval = absl::Milliseconds(200);
  return o;
}

PeerLinkOptions DialerSide(int port) {
  PeerLinkOptions o;
  o.boundary = kBoundary;
  o.stage = kBoundary;
  o.address = absl::StrCat("127.0.0.1:", port);
  o.auth_token = kToken;
  o.connect_timeout = absl::Seconds(10);
  o.initial_backoff = absl::Milliseconds(10);
  o.max_backoff = absl::Milliseconds(100);
  o.heartbeat_interval = absl::Milliseconds(200);
  return o;
}

std::unique_ptr<PeerServer> StartServer(int port = 0) {
  PeerServerOptions o;
  o.listen_address = absl::StrCat("127.0.0.1:", port);
  absl::StatusOr<std::unique_ptr<PeerServer>> server = PeerServer::Create(o);
  EXPECT_TRUE(server.ok()) << server.status();
  return std::move(server).value();
}

// A port nothing listens on (a server bound it and went away).
int UnusedPort() {
  std::unique_ptr<PeerServer> server = StartServer();
  EXPECT_TRUE(server->Start().ok());
  return server->port();
}

// Frame `index` carries pool[offset, offset + size) with the offset in `microbatch`, so the
// receiver can check every byte.
v1::PeerMessage MakeFrame(uint64_t index, size_t size, size_t offset, const std::string& pool) {
  v1::PeerMessage m;
  v1::Frame* f = m.mutable_frame();
  f->set_boundary(kBoundary);
  f->set_direction(v1::DIRECTION_FORWARD);
  f->set_step(index);
  f->set_microbatch(static_cast<uint32_t>(offset));
  f->set_payload(pool.substr(offset, size));
  return m;
}

std::string RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i + 8 <= n; i += 8) {
    const uint64_t v = gen();
    std::memcpy(&s[i], &v, 8);
  }
  return s;
}

// Checks what a link's handler sees: frames 0, 1, 2, ... with seq 1, 2, 3, ... and intact payloads.
class Recorder {
 public:
  Recorder(int64_t expected, const std::string* pool) : expected_(expected), pool_(pool) {}

  PeerLink::Handler handler() {
    return [this](const v1::PeerMessage& m) { Receive(m); };
  }
  bool WaitDone() { return done_.WaitForNotificationWithTimeout(kWait); }
  int64_t received() const {
    absl::MutexLock lock(&mu_);
    return received_;
  }
  std::string errors() const {
    absl::MutexLock lock(&mu_);
    return errors_;
  }
  // Runs on the reader thread with message number `n` (0-based) before it is counted.
  std::function<void(int64_t)> on_message;

 private:
  void Receive(const v1::PeerMessage& m) {
    int64_t n;
    {
      absl::MutexLock lock(&mu_);
      n = received_;
      std::string error;
      if (m.seq() != static_cast<uint64_t>(n) + 1) {
        error = absl::StrCat("message ", n, " has seq ", m.seq());
      } else if (!m.has_frame() || m.frame().step() != static_cast<uint64_t>(n)) {
        error = absl::StrCat("message ", n, " is not frame ", n);
      } else if (m.frame().payload() !=
                 pool_->substr(m.frame().microbatch(), m.frame().payload().size())) {
        error = absl::StrCat("message ", n, ": payload corrupt");
      }
      if (!error.empty() && errors_.size() < 1000) absl::StrAppend(&errors_, error, "; ");
    }
    if (on_message) on_message(n);
    absl::MutexLock lock(&mu_);
    if (++received_ == expected_) done_.Notify();
  }

  const int64_t expected_;
  const std::string* const pool_;
  mutable absl::Mutex mu_;
  int64_t received_ ABSL_GUARDED_BY(mu_) = 0;
  std::string errors_ ABSL_GUARDED_BY(mu_);
  absl::Notification done_;
};

// Sends `count` frames of random size in [0, max_size], keeping at most `window` bytes
// unacknowledged (a stand-in for the daemon's backpressure, to bound the test's memory).
void SendFrames(PeerLink* link, int64_t count, size_t max_size, const std::string& pool,
                uint64_t seed, int64_t window = 32 << 20) {
  absl::BitGen gen(std::seed_seq{seed});
  for (int64_t i = 0; i < count; ++i) {
    ASSERT_TRUE(link->AwaitStats(
        [window](const PeerLinkStats& s) { return s.queued_bytes < window; }, kWait));
    const size_t size = absl::Uniform<size_t>(absl::IntervalClosed, gen, 0, max_size);
    const size_t offset = absl::Uniform<size_t>(absl::IntervalClosed, gen, 0, pool.size() - size);
    ASSERT_TRUE(link->Send(MakeFrame(static_cast<uint64_t>(i), size, offset, pool)).ok());
  }
}

// A connected pair: server side (downstream) and dialer (upstream).
struct Pair {
  std::unique_ptr<PeerServer> server;
  PeerLink* down = nullptr;
  std::unique_ptr<PeerLink> up;
};

Pair Connect(PeerLink::Handler down_handler, PeerLink::Handler up_handler,
             PeerLinkOptions down_options = ServerSide(), int up_heartbeat_ms = 200) {
  Pair p;
  p.server = StartServer();
  absl::StatusOr<PeerLink*> down = p.server->RegisterBoundary(down_options, down_handler);
  EXPECT_TRUE(down.ok()) << down.status();
  p.down = *down;
  EXPECT_TRUE(p.server->Start().ok());
  PeerLinkOptions up_options = DialerSide(p.server->port());
  up_options.heartbeat_interval = absl::Milliseconds(up_heartbeat_ms);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(up_options, up_handler);
  EXPECT_TRUE(up.ok()) << up.status();
  p.up = std::move(up).value();
  EXPECT_TRUE(p.up->WaitConnected(kWait).ok()) << p.up->status();
  EXPECT_TRUE(p.down->WaitConnected(kWait).ok()) << p.down->status();
  return p;
}

void Ignore(const v1::PeerMessage&) {}

TEST(PeerLinkTest, TenThousandMessagesEachWayArriveOnceAndInOrder) {
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
    const PeerLinkStats s = link->stats();
    EXPECT_EQ(s.sent.at(v1::PeerMessage::kFrame).messages, kCount);
    EXPECT_EQ(s.received.at(v1::PeerMessage::kFrame).messages, kCount);
    EXPECT_EQ(s.duplicates_dropped, 0);
    EXPECT_EQ(s.resent, 0);
    EXPECT_EQ(s.queued_messages, 0);
    EXPECT_EQ(s.queued_bytes, 0);
    EXPECT_EQ(s.last_acked_seq, static_cast<uint64_t>(kCount));
    EXPECT_EQ(s.last_applied_seq, static_cast<uint64_t>(kCount));
    EXPECT_GT(s.acks_received, 0);
    EXPECT_EQ(s.connections, 1);
    std::cout << "boundary link: " << s.sent_total.bytes / 1e6 << " MB sent in "
              << s.sent_total.messages << " messages, " << s.acks_sent << " acks, "
              << absl::FormatDuration(took) << " for both directions\n";
  }
}

TEST(PeerLinkTest, LargeMessageEachWay) {
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
  EXPECT_GT(p.up->stats().received_total.bytes, 8 << 20);
}

// The cap is a lower bound on time: 1 MB at 2 MB/s with a 64 KiB burst cannot arrive in less
// than (1 MB - 64 KiB) / 2 MB/s = 0.47 s, however fast or slow the machine (no upper bound here:
// speed belongs in benchmarks).
TEST(PeerLinkTest, SendRateCapHoldsTheAverageRate) {
  const std::string pool = RandomBytes(64 << 10, 13);
  constexpr int kFrames = 40, kBytes = 25000;
  Recorder at_up(kFrames, &pool);
  PeerLinkOptions down = ServerSide();
  down.send_rate_bytes_per_second = 2e6;
  down.send_burst_bytes = 64 << 10;
  Pair p = Connect(Ignore, at_up.handler(), down);
  const absl::Time start = absl::Now();
  for (int i = 0; i < kFrames; ++i) ASSERT_TRUE(p.down->Send(MakeFrame(i, kBytes, 0, pool)).ok());
  ASSERT_TRUE(at_up.WaitDone()) << at_up.received();
  const absl::Duration took = absl::Now() - start;
  EXPECT_EQ(at_up.errors(), "");
  const double bytes = static_cast<double>(p.down->stats().sent_total.bytes);
  EXPECT_GT(bytes, kFrames * kBytes);
  EXPECT_GE(absl::ToDoubleSeconds(took), (bytes - (64 << 10)) / 2e6 * 0.95)
      << "sent " << bytes << " bytes in " << absl::FormatDuration(took);
  std::cout << "rate-capped link: " << bytes / 1e6 << " MB in " << absl::FormatDuration(took)
            << " at a 2 MB/s cap\n";
}

TEST(PeerLinkTest, WrongAuthTokenIsRejected) {
  std::unique_ptr<PeerServer> server = StartServer();
  absl::StatusOr<PeerLink*> down = server->RegisterBoundary(ServerSide(), Ignore);
  ASSERT_TRUE(down.ok());
  ASSERT_TRUE(server->Start().ok());
  PeerLinkOptions o = DialerSide(server->port());
  o.auth_token = "wrong";
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(o, Ignore);
  ASSERT_TRUE(up.ok());

  const absl::Status connected = (*up)->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kUnauthenticated) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("auth token does not match"));
  EXPECT_THAT(connected.message(), HasSubstr("boundary 3"));
  EXPECT_EQ((*up)->Send(MakeFrame(0, 0, 0, "")).code(), absl::StatusCode::kUnauthenticated);
  EXPECT_FALSE((*down)->connected());
  EXPECT_EQ((*down)->stats().handshakes_rejected, 1);
  EXPECT_EQ((*down)->status().code(), absl::StatusCode::kUnauthenticated);
}

TEST(PeerLinkTest, UnknownBoundaryIsNotFound) {
  std::unique_ptr<PeerServer> server = StartServer();
  ASSERT_TRUE(server->RegisterBoundary(ServerSide(), Ignore).ok());
  ASSERT_TRUE(server->Start().ok());
  PeerLinkOptions o = DialerSide(server->port());
  o.boundary = 7;
  o.stage = 7;
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(o, Ignore);
  ASSERT_TRUE(up.ok());
  const absl::Status connected = (*up)->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kNotFound) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("boundary 7 is not served here (serving: 3)"));
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
  std::unique_ptr<PeerServer> server = StartServer(port);
  ASSERT_TRUE(server->RegisterBoundary(ServerSide(), at_down.handler()).ok());
  ASSERT_TRUE(server->Start().ok());
  EXPECT_TRUE((*up)->WaitConnected(kWait).ok()) << (*up)->status();
  ASSERT_TRUE(at_down.WaitDone());
  EXPECT_EQ(at_down.errors(), "");
  EXPECT_TRUE((*up)->Drain(kWait).ok());
}

TEST(PeerLinkTest, DialerGivesUpAfterConnectTimeout) {
  PeerLinkOptions o = DialerSide(UnusedPort());
  o.connect_timeout = absl::Milliseconds(300);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(o, Ignore);
  ASSERT_TRUE(up.ok());
  const absl::Status connected = (*up)->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kUnavailable) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("could not connect"));
}

TEST(PeerLinkTest, DrainReturnsOnceEverythingIsAcknowledged) {
  const std::string pool = RandomBytes(4096, 4);
  Recorder at_down(1000, &pool);
  Pair p = Connect(at_down.handler(), Ignore);
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(p.up->Send(MakeFrame(i, 64, i, pool)).ok());
  ASSERT_TRUE(p.up->Drain(kWait).ok());
  const PeerLinkStats s = p.up->stats();
  EXPECT_EQ(s.queued_messages, 0);
  EXPECT_EQ(s.last_acked_seq, 1000u);
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

TEST(PeerLinkTest, HeartbeatsMeasureRoundTripTime) {
  PeerLinkOptions down = ServerSide();
  down.heartbeat_interval = absl::Milliseconds(20);
  Pair p = Connect(Ignore, Ignore, down, /*up_heartbeat_ms=*/20);
  for (PeerLink* link : {p.up.get(), p.down}) {
    EXPECT_TRUE(link->AwaitStats(
        [](const PeerLinkStats& s) {
          return s.heartbeats_received >= 6 && s.last_rtt > absl::ZeroDuration();
        },
        kWait));
    EXPECT_LT(link->stats().last_rtt, absl::Seconds(1));
  }
}

TEST(PeerLinkTest, ClosingTheDialerIsSeenByTheServerSide) {
  Pair p = Connect(Ignore, Ignore);
  p.up->Close();
  EXPECT_FALSE(p.up->connected());
  EXPECT_EQ(p.up->Send(MakeFrame(0, 0, 0, "")).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(p.down->AwaitStats([](const PeerLinkStats& s) { return s.disconnects == 1; }, kWait));
  EXPECT_FALSE(p.down->connected());
  EXPECT_THAT(p.down->status().message(), HasSubstr("the upstream closed the link"));
}

TEST(PeerLinkTest, ClosingTheServerSideIsSeenByTheDialer) {
  Pair p = Connect(Ignore, Ignore);
  p.down->Close();
  EXPECT_FALSE(p.down->connected());
  // The dialer loses the stream, redials, and is told the link is closed: it gives up.
  ASSERT_TRUE(p.up->AwaitStats([](const PeerLinkStats& s) { return s.disconnects == 1; }, kWait));
  const absl::Status connected = p.up->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kFailedPrecondition) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("is closed"));
}

TEST(PeerLinkTest, BrokenConnectionsLoseAndDuplicateNothing) {
  constexpr int64_t kCount = 3000;
  const std::string pool = RandomBytes(64 << 10, 6);
  Recorder at_down(kCount, &pool);
  Recorder at_up(kCount, &pool);
  Pair p;
  PeerLink* down = nullptr;
  PeerLink* up = nullptr;
  // Break the connection from either side while both directions are busy.
  at_down.on_message = [&down](int64_t n) {
    if (n == 700 || n == 2100) down->BreakConnectionForTesting();
  };
  at_up.on_message = [&up](int64_t n) {
    if (n == 1400) up->BreakConnectionForTesting();
  };
  p = Connect(at_down.handler(), at_up.handler());
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
  EXPECT_GE(up->stats().reconnects, 2);
  EXPECT_EQ(up->stats().peer_restarts, 0);
  std::cout << "resent up/down: " << up->stats().resent << "/" << down->stats().resent
            << ", duplicates dropped: " << up->stats().duplicates_dropped << "/"
            << down->stats().duplicates_dropped << "\n";
}

// A hand-driven client for the Peer service, to play a misbehaving or second peer.
class RawPeer {
 public:
  explicit RawPeer(int port)
      : stub_(v1::Peer::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                                    grpc::InsecureChannelCredentials()))),
        stream_(stub_->Link(&context_)) {}
  ~RawPeer() {
    if (finished_) return;
    context_.TryCancel();
    stream_->Finish();
  }

  static v1::PeerMessage Hello(absl::string_view token = kToken, uint32_t version = 1) {
    v1::PeerMessage m;
    m.set_protocol_version(version);
    v1::Hello* h = m.mutable_hello();
    h->set_protocol_version(version);
    h->set_stage(kBoundary);
    h->set_boundary(kBoundary);
    h->set_auth_token(std::string(token));
    h->set_instance_id(42);
    h->set_resume_from_seq(1);
    return m;
  }
  bool Write(const v1::PeerMessage& m) { return stream_->Write(m); }
  bool Read(v1::PeerMessage* m) { return stream_->Read(m); }
  // Reads until the server ends the stream; returns its status.
  grpc::Status Finish() {
    v1::PeerMessage ignored;
    while (stream_->Read(&ignored)) {
    }
    finished_ = true;
    return stream_->Finish();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<v1::Peer::Stub> stub_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::PeerMessage, v1::PeerMessage>> stream_;
  bool finished_ = false;
};

TEST(PeerLinkTest, ProtocolViolationsEndTheStreamWithAClearStatus) {
  std::unique_ptr<PeerServer> server = StartServer();
  absl::StatusOr<PeerLink*> down = server->RegisterBoundary(ServerSide(), Ignore);
  ASSERT_TRUE(down.ok());
  ASSERT_TRUE(server->Start().ok());
  {
    RawPeer peer(server->port());
    v1::PeerMessage ack;
    ack.set_protocol_version(1);
    ack.mutable_ack()->set_seq(1);
    ASSERT_TRUE(peer.Write(ack));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(s.error_message(), HasSubstr("must be a Hello"));
  }
  {
    RawPeer peer(server->port());
    ASSERT_TRUE(peer.Write(RawPeer::Hello(kToken, /*version=*/2)));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(s.error_message(), HasSubstr("protocol version 2"));
  }
  {
    // A gap in the sequence is a corrupt stream.
    RawPeer peer(server->port());
    ASSERT_TRUE(peer.Write(RawPeer::Hello()));
    v1::PeerMessage reply;
    ASSERT_TRUE(peer.Read(&reply));
    ASSERT_TRUE(reply.has_hello());
    EXPECT_EQ(reply.hello().resume_from_seq(), 1u);
    v1::PeerMessage frame = MakeFrame(0, 0, 0, "");
    frame.set_protocol_version(1);
    frame.set_seq(5);
    ASSERT_TRUE(peer.Write(frame));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::DATA_LOSS);
    EXPECT_THAT(s.error_message(), HasSubstr("expected seq 1, received 5"));
  }
  {
    // Acknowledging what was never sent.
    RawPeer peer(server->port());
    ASSERT_TRUE(peer.Write(RawPeer::Hello()));
    v1::PeerMessage reply;
    ASSERT_TRUE(peer.Read(&reply));
    v1::PeerMessage ack;
    ack.set_protocol_version(1);
    ack.mutable_ack()->set_seq(9);
    ASSERT_TRUE(peer.Write(ack));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_EQ((*down)->stats().connections, 2);
}

TEST(PeerLinkTest, SecondStreamReplacesTheFirst) {
  Pair p = Connect(Ignore, Ignore);
  {
    RawPeer second(p.server->port());
    ASSERT_TRUE(second.Write(RawPeer::Hello()));
    v1::PeerMessage reply;
    ASSERT_TRUE(second.Read(&reply));  // Attached: the dialer's stream was cancelled.
    ASSERT_TRUE(reply.has_hello());
    EXPECT_TRUE(p.up->AwaitStats([](const PeerLinkStats& s) { return s.disconnects >= 1; }, kWait));
    EXPECT_TRUE(
        p.down->AwaitStats([](const PeerLinkStats& s) { return s.connections >= 2; }, kWait));
  }
  // The dialer comes back (and in turn replaces the raw peer if it is still attached).
  EXPECT_TRUE(p.up->AwaitStats([](const PeerLinkStats& s) { return s.connections >= 2; }, kWait));
  EXPECT_TRUE(p.up->WaitConnected(kWait).ok());
}

TEST(PeerLinkTest, InvalidUseIsRejected) {
  PeerLinkOptions o = DialerSide(1);
  o.auth_token.clear();
  EXPECT_EQ(PeerLink::Dial(o, Ignore).status().code(), absl::StatusCode::kInvalidArgument);
  o = DialerSide(1);
  o.stage = kBoundary + 1;
  EXPECT_EQ(PeerLink::Dial(o, Ignore).status().code(), absl::StatusCode::kInvalidArgument);

  std::unique_ptr<PeerServer> server = StartServer();
  ASSERT_TRUE(server->RegisterBoundary(ServerSide(), Ignore).ok());
  EXPECT_EQ(server->RegisterBoundary(ServerSide(), Ignore).status().code(),
            absl::StatusCode::kAlreadyExists);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(DialerSide(1), Ignore);
  ASSERT_TRUE(up.ok());
  v1::PeerMessage ack;
  ack.mutable_ack()->set_seq(1);
  EXPECT_EQ((*up)->Send(ack).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*up)->Send(v1::PeerMessage()).code(), absl::StatusCode::kInvalidArgument);
}

TEST(PeerLinkTest, HealthServiceCanBeEnabled) {
  PeerServerOptions o;
  o.listen_address = "127.0.0.1:0";
  o.enable_health_service = true;
  absl::StatusOr<std::unique_ptr<PeerServer>> server = PeerServer::Create(o);
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE((*server)->Start().ok());
  ASSERT_NE((*server)->health_check_service(), nullptr);
  (*server)->health_check_service()->SetServingStatus(true);
}

}  // namespace
}  // namespace mapl
