#include "tests/server/transport/peer_test_util.h"

#include <cstdlib>
#include <cstring>
#include <random>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/grpc.h"
#include "gtest/gtest.h"

namespace mapl {
namespace testing_peer {
namespace {

// Keeps the gRPC library initialized for the whole binary. Otherwise the last gRPC object of each
// test shuts the library down (grpc_shutdown in ~Server), which can wait seconds for gRPC's
// executor threads once a health service has been enabled.
class GrpcEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { grpc_init(); }
};
[[maybe_unused]] ::testing::Environment* const kGrpcEnvironment =
    ::testing::AddGlobalTestEnvironment(new GrpcEnvironment);

bool ReadUcxDataPlane() {
  const char* plane = std::getenv("MAPL_TEST_DATA_PLANE");
  return plane != nullptr && std::string(plane) == "ucx";
}

}  // namespace

bool UcxDataPlane() {
  static const bool ucx = ReadUcxDataPlane();
  return ucx;
}

PeerLinkOptions ServerSide() {
  PeerLinkOptions o;
  o.boundary = kBoundary;
  o.stage = kBoundary + 1;
  o.auth_token = kToken;
  o.heartbeat_interval = absl::Milliseconds(200);
  if (UcxDataPlane()) o.data_plane = v1::DATA_PLANE_UCX;
  return o;
}

PeerLinkOptions DialerSide(int port) {
  PeerLinkOptions o;
  o.boundary = kBoundary;
  o.stage = kBoundary;
  if (port != 0) o.address = absl::StrCat("127.0.0.1:", port);
  o.auth_token = kToken;
  o.connect_timeout = absl::Seconds(10);
  o.initial_backoff = absl::Milliseconds(10);
  o.max_backoff = absl::Milliseconds(100);
  o.heartbeat_interval = absl::Milliseconds(200);
  if (UcxDataPlane()) o.data_plane = v1::DATA_PLANE_UCX;
  return o;
}

std::unique_ptr<PeerServer> MakeServer(int port) {
  PeerServerOptions o;
  o.listen_address = absl::StrCat("127.0.0.1:", port);
  absl::StatusOr<std::unique_ptr<PeerServer>> server = PeerServer::Create(o);
  EXPECT_TRUE(server.ok()) << server.status();
  return std::move(server).value();
}

int UnusedPort() {
  std::unique_ptr<PeerServer> server = MakeServer();
  EXPECT_TRUE(server->Start().ok());
  return server->port();
}

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

int64_t WireBytes(v1::PeerMessage msg, uint64_t seq) {
  msg.set_protocol_version(kPeerProtocolVersion);
  msg.set_seq(seq);
  return static_cast<int64_t>(msg.ByteSizeLong());
}

int64_t Recorder::received() const {
  absl::MutexLock lock(&mu_);
  return received_;
}

std::string Recorder::errors() const {
  absl::MutexLock lock(&mu_);
  return errors_;
}

absl::Time Recorder::done_at() const {
  absl::MutexLock lock(&mu_);
  return done_at_;
}

void Recorder::Receive(v1::PeerMessage m) {
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
  if (++received_ == expected_) {
    done_at_ = absl::Now();
    done_.Notify();
  }
}

void SendFrames(PeerLink* link, int64_t count, size_t max_size, const std::string& pool,
                uint64_t seed, int64_t window) {
  absl::BitGen gen(std::seed_seq{seed});
  for (int64_t i = 0; i < count; ++i) {
    ASSERT_TRUE(link->WaitQueueBelow(window, kWait));
    const size_t size = absl::Uniform<size_t>(absl::IntervalClosed, gen, 0, max_size);
    const size_t offset = absl::Uniform<size_t>(absl::IntervalClosed, gen, 0, pool.size() - size);
    ASSERT_TRUE(link->Send(MakeFrame(static_cast<uint64_t>(i), size, offset, pool)).ok());
  }
}

Pair Connect(Transport::Handler down_handler, Transport::Handler up_handler,
             PeerLinkOptions down_options, PeerLinkOptions up_options) {
  Pair p;
  p.server = MakeServer();
  absl::StatusOr<PeerLink*> down =
      p.server->RegisterBoundary(down_options, std::move(down_handler));
  EXPECT_TRUE(down.ok()) << down.status();
  p.down = *down;
  EXPECT_TRUE(p.server->Start().ok());
  if (up_options.address.empty()) {
    up_options.address = absl::StrCat("127.0.0.1:", p.server->port());
  }
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(up_options, std::move(up_handler));
  EXPECT_TRUE(up.ok()) << up.status();
  p.up = std::move(up).value();
  EXPECT_TRUE(p.up->WaitConnected(kWait).ok()) << p.up->status();
  EXPECT_TRUE(p.down->WaitConnected(kWait).ok()) << p.down->status();
  return p;
}

}  // namespace testing_peer
}  // namespace mapl
