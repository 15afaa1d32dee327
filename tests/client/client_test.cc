// The local-API client (client/mapl_client.h) against a missing daemon, and the local API of two
// real daemons (mapl::Daemon in this process: stage 0 upstream and stage 1 downstream of
// boundary 0, linked over loopback): the happy path, deadlines, and every kind of bad input,
// after which the daemon keeps serving.
#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "client/mapl_client.h"
#include "kernels/tensor.h"
#include "server/config.h"
#include "server/daemon.h"

namespace mapl {
namespace client {
namespace {

// A temp dir for sockets, short enough for sun_path (108 bytes).
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/mapl-client-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    for (const char* f : {"/s.sock", "/s.sock0", "/s.sock1", "/s.sock0.fds", "/s.sock1.fds"}) {
      unlink((path_ + f).c_str());
    }
    rmdir(path_.c_str());
  }
  std::string socket() const { return path_ + "/s.sock"; }

 private:
  std::string path_;
};

TEST(ClientTest, MissingDaemonIsUnavailableAndNamesTheSocket) {
  TempDir dir;
  std::unique_ptr<Client> c;
  const auto start = std::chrono::steady_clock::now();
  Status s = Client::Connect(dir.socket(), "test", /*timeout_ms=*/200, &c);
  EXPECT_EQ(s.code, kUnavailable);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(c, nullptr);
  EXPECT_NE(s.message.find("unix:" + dir.socket()), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("mapld"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("no socket file"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("start mapld"), std::string::npos) << s.message;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_STREQ(StatusCodeName(s.code), "UNAVAILABLE");
}

TEST(ClientTest, EmptySocketPathIsInvalid) {
  std::unique_ptr<Client> c;
  EXPECT_EQ(Client::Connect("", "test", 100, &c).code, kInvalidArgument);
}

// Two daemons of boundary 0 (d = 16, k = 4, METHOD_MAPL) and one client on each.
class TwoDaemonsTest : public ::testing::Test {
 protected:
  static constexpr uint32_t kD = 16, kMaxTokens = 64, kVocab = 50;

  void SetUp() override {
    absl::StatusOr<v1::DaemonConfig> down = Config(1, "ROLE_DOWNSTREAM", "");
    ASSERT_TRUE(down.ok()) << down.status();
    absl::StatusOr<std::unique_ptr<Daemon>> d = Daemon::Start(*down);
    ASSERT_TRUE(d.ok()) << d.status();
    down_ = *std::move(d);
    absl::StatusOr<v1::DaemonConfig> up =
        Config(0, "ROLE_UPSTREAM", "127.0.0.1:" + std::to_string(down_->peer_port()));
    ASSERT_TRUE(up.ok()) << up.status();
    d = Daemon::Start(*up);
    ASSERT_TRUE(d.ok()) << d.status();
    up_ = *std::move(d);
    ASSERT_TRUE(Client::Connect(up_->config().local_socket(), "up", 5000, &up_client_).ok());
    ASSERT_TRUE(Client::Connect(down_->config().local_socket(), "down", 5000, &down_client_).ok());
  }

  void TearDown() override {
    up_client_.reset();
    down_client_.reset();
    if (up_) up_->Shutdown(absl::Seconds(1));
    if (down_) down_->Shutdown(absl::Seconds(1));
  }

  absl::StatusOr<v1::DaemonConfig> Config(int stage, const std::string& role,
                                          const std::string& peer) {
    std::vector<std::string> o = {
        "stage=" + std::to_string(stage),
        "local_socket=" + dir_.socket() + std::to_string(stage),
        "metrics_address=off",
        "peer_listen=127.0.0.1:0",
        "auth_token=t",
        "client_buffers=2",
        "client_buffer_bytes=65536",
        "max_sessions=3",
        "recv_timeout_ms=5000",
        "boundaries[0].id=0",
        "boundaries[0].role=" + role,
        "boundaries[0].d=16",
        "boundaries[0].k=4",
        "boundaries[0].vocab=50",
        "boundaries[0].max_tokens=64",
        "boundaries[0].forward_codec=CODEC_BF16",
    };
    if (!peer.empty()) o.push_back("boundaries[0].peer_address=" + peer);
    return LoadConfig("", o);
  }

  // Writes an (n, kD) f32 ramp at byte `offset` of buffer 0 and n token ids after it.
  std::pair<TensorRef, TensorRef> Fill(Client* c, uint32_t n, uint64_t offset = 0) {
    float* h = reinterpret_cast<float*>(static_cast<char*>(c->data(0)) + offset);
    for (uint32_t i = 0; i < n * kD; ++i) h[i] = 0.01f * static_cast<float>(i % 97) - 0.3f;
    const uint64_t ids_at = offset + n * kD * 4;
    int32_t* ids = reinterpret_cast<int32_t*>(static_cast<char*>(c->data(0)) + ids_at);
    for (uint32_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>(i % kVocab);
    return {TensorRef{0, offset, n, kD, DType::kF32}, TensorRef{0, ids_at, n, 1, DType::kI32}};
  }

  TempDir dir_;
  std::unique_ptr<Daemon> up_, down_;
  std::unique_ptr<Client> up_client_, down_client_;
};

TEST_F(TwoDaemonsTest, ForwardAndBackwardArriveForExactlyTheirStepAndMicrobatch) {
  SendResult sent;
  // Microbatches with different row counts, so a mix-up would show in the shape.
  for (uint32_t mb = 0; mb < 3; ++mb) {
    auto [h, ids] = Fill(up_client_.get(), 8 + mb, 4096 * mb);
    ASSERT_TRUE(up_client_
                    ->Send(0, Direction::kForward, 1, mb, h, ids, &sent,
                           /*wait_encoded=*/mb == 0)
                    .ok());
    EXPECT_EQ(sent.raw_bytes, (8 + mb) * kD * 4);
    if (mb > 0) continue;  // only a waiting Send learns the frame's size
    EXPECT_GT(sent.wire_bytes, 0u);
    EXPECT_LT(sent.wire_bytes, sent.raw_bytes);
  }
  for (uint32_t mb : {2u, 0u, 1u}) {
    RecvResult r;
    Status s = down_client_->Recv(0, Direction::kForward, 1, mb,
                                  TensorRef{1, 0, kMaxTokens, kD, DType::kF32}, 0, &r);
    ASSERT_TRUE(s.ok()) << s.message;
    EXPECT_EQ(r.rows, 8 + mb);
    EXPECT_EQ(r.cols, kD);
    // Gradient back, as bf16 from the downstream's buffer.
    std::vector<bf16_t> g(r.rows * kD, FloatToBf16(0.5f));
    std::memcpy(down_client_->data(0), g.data(), g.size() * 2);
    ASSERT_TRUE(down_client_
                    ->Send(0, Direction::kBackward, 1, mb,
                           TensorRef{0, 0, r.rows, kD, DType::kBF16}, std::nullopt, &sent)
                    .ok());
    RecvResult back;
    s = up_client_->Recv(0, Direction::kBackward, 1, mb,
                         TensorRef{1, 0, kMaxTokens, kD, DType::kF32}, 0, &back);
    ASSERT_TRUE(s.ok()) << s.message;
    EXPECT_EQ(back.rows, 8 + mb);
  }
}

TEST_F(TwoDaemonsTest, RecvThatNeverComesFailsAtItsDeadlineNamingIt) {
  RecvResult r;
  const absl::Time start = absl::Now();
  Status s = down_client_->Recv(0, Direction::kForward, 7, 3,
                                TensorRef{0, 0, kMaxTokens, kD, DType::kF32}, 300, &r);
  EXPECT_EQ(s.code, kDeadlineExceeded) << s.message;
  EXPECT_NE(s.message.find("boundary 0"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("step 7"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("microbatch 3"), std::string::npos) << s.message;
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(290));
}

TEST_F(TwoDaemonsTest, BadInputIsRejectedClearlyAndTheDaemonKeepsServing) {
  SendResult sent;
  auto [h, ids] = Fill(up_client_.get(), 8);
  struct Case {
    const char* name;
    TensorRef tensor;
    std::optional<TensorRef> ids;
    Direction dir;
    uint32_t boundary;
    int code;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"unknown buffer", TensorRef{9, 0, 8, kD, DType::kF32}, ids, Direction::kForward, 0,
       kInvalidArgument, "is not attached"},
      {"offset past the end", TensorRef{0, 65536 - 64, 8, kD, DType::kF32}, ids,
       Direction::kForward, 0, kInvalidArgument, "runs past the end"},
      {"misaligned offset", TensorRef{0, 2, 8, kD, DType::kF32}, ids, Direction::kForward, 0,
       kInvalidArgument, "not a multiple"},
      {"wrong width", TensorRef{0, 0, 8, kD + 1, DType::kF32}, ids, Direction::kForward, 0,
       kInvalidArgument, "hidden size d = 16"},
      {"too many rows", TensorRef{0, 0, kMaxTokens + 1, kD, DType::kF32}, ids, Direction::kForward,
       0, kInvalidArgument, "max_tokens"},
      {"wrong dtype", TensorRef{0, 0, 8, kD, DType::kI32}, ids, Direction::kForward, 0,
       kInvalidArgument, "dtype"},
      {"ids of wrong length", h, TensorRef{0, ids.offset, 7, 1, DType::kI32}, Direction::kForward,
       0, kInvalidArgument, "one id per row"},
      {"missing ids", h, std::nullopt, Direction::kForward, 0, kInvalidArgument, "token ids"},
      {"wrong direction for the role", h, std::nullopt, Direction::kBackward, 0, kInvalidArgument,
       "upstream"},
      {"unknown boundary", h, ids, Direction::kForward, 5, kInvalidArgument, "boundary 5"},
  };
  for (const Case& c : cases) {
    Status s = up_client_->Send(c.boundary, c.dir, 1, 0, c.tensor, c.ids, &sent);
    EXPECT_EQ(s.code, c.code) << c.name << ": " << s.message;
    EXPECT_NE(s.message.find(c.says), std::string::npos) << c.name << ": " << s.message;
  }
  // Token id out of the vocabulary.
  int32_t* id0 = reinterpret_cast<int32_t*>(static_cast<char*>(up_client_->data(0)) + ids.offset);
  id0[3] = kVocab;
  Status s = up_client_->Send(0, Direction::kForward, 1, 0, h, ids, &sent);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("50"), std::string::npos) << s.message;
  id0[3] = 1;
  // NaN in the activation.
  static_cast<float*>(up_client_->data(0))[5] = std::nanf("");
  s = up_client_->Send(0, Direction::kForward, 1, 0, h, ids, &sent);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  static_cast<float*>(up_client_->data(0))[5] = 0.f;
  // After all that the daemon serves, and a second Send of the same microbatch is refused.
  ASSERT_TRUE(up_client_->Send(0, Direction::kForward, 1, 0, h, ids, &sent).ok());
  s = up_client_->Send(0, Direction::kForward, 1, 0, h, ids, &sent);
  EXPECT_EQ(s.code, kAlreadyExists) << s.message;
  EXPECT_NE(s.message.find("already sent"), std::string::npos) << s.message;
  RecvResult r;
  ASSERT_TRUE(
      down_client_
          ->Recv(0, Direction::kForward, 1, 0, TensorRef{0, 0, kMaxTokens, kD, DType::kF32}, 0, &r)
          .ok());
  EXPECT_EQ(r.rows, 8u);
  // Recv into a region too small, or into another session's view of things.
  s = down_client_->Recv(0, Direction::kForward, 1, 1, TensorRef{0, 65536 - 8, 64, kD, DType::kF32},
                         100, &r);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
}

TEST_F(TwoDaemonsTest, SendForAClosedStepIsRefusedAtOnce) {
  SendResult sent;
  auto [h, ids] = Fill(up_client_.get(), 8);
  ASSERT_TRUE(up_client_->Send(0, Direction::kForward, 1, 0, h, ids, &sent).ok());
  RecvResult r;
  ASSERT_TRUE(
      down_client_
          ->Recv(0, Direction::kForward, 1, 0, TensorRef{0, 0, kMaxTokens, kD, DType::kF32}, 0, &r)
          .ok());
  ASSERT_TRUE(down_client_
                  ->Send(0, Direction::kBackward, 1, 0, TensorRef{0, 0, r.rows, kD, DType::kF32},
                         std::nullopt, &sent)
                  .ok());
  ASSERT_TRUE(
      up_client_
          ->Recv(0, Direction::kBackward, 1, 0, TensorRef{1, 0, kMaxTokens, kD, DType::kF32}, 0, &r)
          .ok());
  StepResult stepped;
  ASSERT_TRUE(down_client_->Step(1, 5000, &stepped).ok());
  Status s = up_client_->Step(1, 5000, &stepped);
  ASSERT_TRUE(s.ok()) << s.message;
  s = up_client_->Send(0, Direction::kForward, 1, 1, h, ids, &sent);
  EXPECT_EQ(s.code, kFailedPrecondition) << s.message;
  EXPECT_NE(s.message.find("already closed"), std::string::npos) << s.message;
  EXPECT_TRUE(up_client_->Send(0, Direction::kForward, 2, 0, h, ids, &sent).ok());
}

// Step and Stats hand back the daemon's records (local.proto BoundaryStats) as they are: one
// forward microbatch and its gradient show on both sides, each counted once.
TEST_F(TwoDaemonsTest, StepAndStatsReturnTheDaemonsRecords) {
  constexpr uint32_t kRows = 10;
  SendResult sent;
  auto [h, ids] = Fill(up_client_.get(), kRows);
  ASSERT_TRUE(up_client_->Send(0, Direction::kForward, 1, 0, h, ids, &sent).ok());
  RecvResult r;
  ASSERT_TRUE(
      down_client_
          ->Recv(0, Direction::kForward, 1, 0, TensorRef{0, 0, kMaxTokens, kD, DType::kF32}, 0, &r)
          .ok());
  ASSERT_TRUE(down_client_
                  ->Send(0, Direction::kBackward, 1, 0, TensorRef{0, 0, r.rows, kD, DType::kF32},
                         std::nullopt, &sent)
                  .ok());
  ASSERT_TRUE(
      up_client_
          ->Recv(0, Direction::kBackward, 1, 0, TensorRef{1, 0, kMaxTokens, kD, DType::kF32}, 0, &r)
          .ok());
  StepResult down_step, up_step;
  ASSERT_TRUE(down_client_->Step(1, 5000, &down_step).ok());
  Status s = up_client_->Step(1, 5000, &up_step);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_EQ(up_step.boundaries_size(), 1);
  ASSERT_EQ(down_step.boundaries_size(), 1);
  EXPECT_EQ(up_step.boundaries(0).role(), "upstream");
  EXPECT_EQ(down_step.boundaries(0).role(), "downstream");

  StatsResult up, down;
  ASSERT_TRUE(up_client_->Stats(&up).ok());
  ASSERT_TRUE(down_client_->Stats(&down).ok());
  EXPECT_EQ(up.stage(), 0u);
  EXPECT_EQ(down.stage(), 1u);
  ASSERT_EQ(up.boundaries_size(), 1);
  ASSERT_EQ(down.boundaries_size(), 1);
  const BoundaryStats& u = up.boundaries(0);
  const BoundaryStats& d = down.boundaries(0);
  EXPECT_EQ(u.id(), 0u);
  EXPECT_EQ(u.role(), "upstream");
  // Raw bytes count the tensor as dense bf16: rows x d x 2, each way.
  constexpr uint64_t kRaw = kRows * kD * 2;
  EXPECT_EQ(u.raw_bytes_sent(), kRaw);
  EXPECT_EQ(u.raw_bytes_received(), kRaw);
  EXPECT_EQ(d.raw_bytes_received(), kRaw);
  EXPECT_EQ(d.raw_bytes_sent(), kRaw);
  EXPECT_EQ(u.frames_sent(), 1u);
  EXPECT_EQ(u.frames_received(), 1u);
  EXPECT_EQ(d.frames_sent(), 1u);
  EXPECT_EQ(d.frames_received(), 1u);
  // What one side put on the wire is what the other took off it.
  EXPECT_GT(u.payload_bytes_sent(), 0u);
  EXPECT_EQ(u.payload_bytes_sent(), d.payload_bytes_received());
  EXPECT_EQ(d.payload_bytes_sent(), u.payload_bytes_received());
  // The step's record and the later Stats agree on what the step left behind.
  EXPECT_EQ(up_step.boundaries(0).frames_sent(), u.frames_sent());
  EXPECT_EQ(up_step.boundaries(0).raw_bytes_sent(), u.raw_bytes_sent());
}

// grpc.health.v1.Health/Check with service "" (an empty request message) on both servers of the
// downstream daemon; the reply HealthCheckResponse{status: SERVING} serializes to 08 01.
TEST_F(TwoDaemonsTest, BothServersAnswerTheStandardHealthCheck) {
  for (const std::string& target : {"unix:" + down_->config().local_socket(),
                                    "127.0.0.1:" + std::to_string(down_->peer_port())}) {
    auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
    grpc::GenericStub stub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::ByteBuffer request, response;
    grpc::Slice empty("");
    request = grpc::ByteBuffer(&empty, 1);
    grpc::CompletionQueue cq;
    std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
        stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
    call->StartCall();
    grpc::Status status;
    call->Finish(&response, &status, reinterpret_cast<void*>(1));
    void* tag;
    bool ok;
    ASSERT_TRUE(cq.Next(&tag, &ok));
    ASSERT_TRUE(status.ok()) << target << ": " << status.error_message();
    std::vector<grpc::Slice> slices;
    ASSERT_TRUE(response.Dump(&slices).ok());
    std::string bytes;
    for (const grpc::Slice& sl : slices)
      bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    EXPECT_EQ(bytes, std::string("\x08\x01", 2)) << target;
  }
}

// Mappings and fds of this process of the memfd `name` (the daemon runs in this process too).
int MemfdUses(const std::string& name) {
  const std::string path = "/memfd:" + name + " (deleted)";
  int n = 0;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) n += absl::EndsWith(line, path);
  for (int fd = 0; fd < 4096; ++fd) {
    char target[512];
    const ssize_t len =
        readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), target, sizeof(target) - 1);
    if (len > 0 && std::string(target, len) == path) ++n;
  }
  return n;
}

TEST_F(TwoDaemonsTest, AClientThatGoesAwayHasItsBuffersFreed) {
  const std::string name = up_client_->buffer_name(0);
  // The client's mapping and the daemon's; no fd is left open on either side.
  EXPECT_EQ(MemfdUses(name), 2) << name;
  up_client_.reset();  // closes the Attach stream
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline && MemfdUses(name) > 0) absl::SleepFor(absl::Milliseconds(20));
  EXPECT_EQ(MemfdUses(name), 0) << name << " still mapped after the client went away";
  // A new client attaches fine.
  ASSERT_TRUE(Client::Connect(up_->config().local_socket(), "again", 5000, &up_client_).ok());
}

TEST_F(TwoDaemonsTest, AttachBeyondMaxSessionsIsResourceExhaustedNamingTheLimit) {
  // up_client_ holds one of the 3 sessions.
  std::unique_ptr<Client> second, third, fourth;
  ASSERT_TRUE(Client::Connect(up_->config().local_socket(), "2", 5000, &second).ok());
  ASSERT_TRUE(Client::Connect(up_->config().local_socket(), "3", 5000, &third).ok());
  Status s = Client::Connect(up_->config().local_socket(), "4", 5000, &fourth);
  EXPECT_EQ(s.code, 8) << s.message;  // RESOURCE_EXHAUSTED
  EXPECT_NE(s.message.find("max_sessions = 3"), std::string::npos) << s.message;
  EXPECT_EQ(fourth, nullptr);
  // A session that ends frees its place (the daemon notices within ~50 ms).
  third.reset();
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  s = Client::Connect(up_->config().local_socket(), "4", 5000, &fourth);
  while (!s.ok() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
    s = Client::Connect(up_->config().local_socket(), "4", 5000, &fourth);
  }
  EXPECT_TRUE(s.ok()) << s.message;
}

}  // namespace
}  // namespace client
}  // namespace mapl
