// The local-API client (client/mapl_client.h) against a missing daemon, and the local API of two
// real daemons (mapl::Daemon in this process: stage 0 upstream and stage 1 downstream of
// boundary 0, linked over loopback): the happy path, deadlines, and every kind of bad input,
// after which the daemon keeps serving. Some tests play a hostile trainer on the raw protocol:
// gRPC for Attach and Send, the buffer socket (server/fd_passing.h) for the memfds.
#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "client/mapl_client.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/local.grpc.pb.h"
#include "server/config.h"
#include "server/daemon.h"
#include "server/fd_passing.h"

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
  const std::string& path() const { return path_; }

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

TEST(ClientTest, WrongCudaOptionsAreInvalidBeforeAnythingIsDialed) {
  // No daemon at the path: had the client dialed, it would be UNAVAILABLE.
  TempDir dir;
  std::unique_ptr<Client> c;
  ConnectOptions o;
  o.cuda_buffers = 1;
  o.cuda_buffer_bytes = 4096;
  o.cuda_device_uuid = "abc";
  Status s = Client::Connect(dir.socket(), "test", 200, o, &c);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("16"), std::string::npos) << s.message;
  ConnectOptions events_only;
  events_only.cuda_events = 4;
  s = Client::Connect(dir.socket(), "test", 200, events_only, &c);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("without cuda_buffers"), std::string::npos) << s.message;
  EXPECT_EQ(c, nullptr);
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
// downstream daemon; the reply HealthCheckResponse{status: SERVING} serializes to 08 01. Service
// "" is readiness: SERVING once the boundary's link is up, which the loop waits for.
TEST_F(TwoDaemonsTest, BothServersAnswerTheStandardHealthCheck) {
  for (const std::string& target : {"unix:" + down_->config().local_socket(),
                                    "127.0.0.1:" + std::to_string(down_->peer_port())}) {
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    for (bool serving = false; !serving && absl::Now() < deadline;) {
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
      serving = bytes == std::string("\x08\x01", 2);
      if (!serving && absl::Now() >= deadline) ADD_FAILURE() << target << " never SERVING";
    }
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

TEST_F(TwoDaemonsTest, CudaRefsTheSessionCannotHaveAreRefusedByTheClient) {
  ASSERT_EQ(up_client_->cuda(), nullptr);  // a host-only session
  auto [h, ids] = Fill(up_client_.get(), 8);
  TensorRef cuda_ids = ids;
  cuda_ids.memory = Memory::kCuda;
  SendResult sent;
  // Token ids are host memory, whatever the session.
  Status s = up_client_->Send(0, Direction::kForward, 1, 0, h, cuda_ids, &sent);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("token_ids in CUDA memory"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("always in host memory"), std::string::npos) << s.message;
  RecvOptions recv_options;
  recv_options.token_ids = cuda_ids;
  RecvResult r;
  s = down_client_->Recv(0, Direction::kForward, 1, 0, TensorRef{0, 0, kMaxTokens, kD, DType::kF32},
                         100, recv_options, &r);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("always in host memory"), std::string::npos) << s.message;
  // A device tensor on a session without device buffers.
  TensorRef cuda_h = h;
  cuda_h.memory = Memory::kCuda;
  cuda_h.event = 1;
  s = up_client_->Send(0, Direction::kForward, 1, 0, cuda_h, ids, &sent);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("no CUDA buffers"), std::string::npos) << s.message;
  s = down_client_->Recv(0, Direction::kForward, 1, 0, cuda_h, 100, &r);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("no CUDA buffers"), std::string::npos) << s.message;
  // An event on a host ref orders nothing.
  TensorRef host_event = h;
  host_event.event = 2;
  s = up_client_->Send(0, Direction::kForward, 1, 0, host_event, ids, &sent);
  EXPECT_EQ(s.code, kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("host-memory ref"), std::string::npos) << s.message;
  // None of them reached the daemon: the microbatch is still unsent, and goes through.
  ASSERT_TRUE(up_client_->Send(0, Direction::kForward, 1, 0, h, ids, &sent).ok());
  ASSERT_TRUE(
      down_client_
          ->Recv(0, Direction::kForward, 1, 0, TensorRef{0, 0, kMaxTokens, kD, DType::kF32}, 0, &r)
          .ok());
  EXPECT_EQ(r.rows, 8u);
}

// A mapld of this build has no CUDA device to share (no GPU or driver where the tests run; its
// CUDA backend is not built with MAPL_WITH_CUDA=OFF): it refuses the Attach itself, with
// FAILED_PRECONDITION saying why, and keeps serving host sessions. (A mapld that attached without
// the buffers would be refused by the client, in its own words, which this test tells apart.)
TEST_F(TwoDaemonsTest, AMapldThatCannotUseCudaRefusesCudaBuffers) {
  ConnectOptions o;
  o.cuda_buffers = 2;
  o.cuda_buffer_bytes = 1 << 20;
  o.cuda_events = 4;
  std::unique_ptr<Client> gpu;
  Status s = Client::Connect(up_->config().local_socket(), "gpu", 5000, o, &gpu);
  EXPECT_EQ(s.code, kFailedPrecondition) << s.message;
  EXPECT_EQ(gpu, nullptr);
  EXPECT_NE(s.message.find("CUDA"), std::string::npos) << s.message;
  EXPECT_EQ(s.message.find("predates CUDA buffers"), std::string::npos)
      << "the daemon attached without the CUDA buffers instead of refusing: " << s.message;
  std::unique_ptr<Client> host;
  Status h = Client::Connect(up_->config().local_socket(), "host", 5000, &host);
  ASSERT_TRUE(h.ok()) << h.message;
  EXPECT_EQ(host->cuda(), nullptr);
}

// A trainer on the raw protocol: its own Attach stream, the memfds from the buffer socket.
class RawTrainer {
 public:
  explicit RawTrainer(const std::string& socket) : socket_(socket) {
    stub_ = v1::Local::NewStub(
        grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));
    reader_ = stub_->Attach(&ctx_, v1::AttachRequest());
    attached_ = reader_->Read(&event_);
  }
  ~RawTrainer() {
    ctx_.TryCancel();
    reader_->Finish();
  }

  bool attached() const { return attached_; }
  const v1::AttachEvent& event() const { return event_; }
  FdSecret secret() const {
    FdSecret k{};
    std::memcpy(k.data(), event_.buffer_secret().data(),
                std::min(k.size(), event_.buffer_secret().size()));
    return k;
  }

  // Sends `request` on a new connection to the buffer socket; returns the reply's status and
  // count (kFdRefused when the daemon closed without a reply) and every fd that came.
  uint32_t Request(const void* request, size_t size, std::vector<UniqueFd>* fds,
                   uint32_t* count = nullptr) {
    UniqueFd sock(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    const timeval timeout{5, 0};  // a daemon that never answers fails the test, not hangs it
    setsockopt(sock.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const std::string path = FdSocketPath(socket_);
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    EXPECT_EQ(connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0)
        << path << ": " << strerror(errno);
    EXPECT_EQ(SendFdMessage(sock.get(), request, size, {}), 0);
    uint8_t message[64];
    size_t got = 0;
    uint32_t status = kFdRefused, n = 0;
    if (ReceiveFdMessage(sock.get(), message, sizeof(message), &got, fds) != 0 ||
        !DecodeFdPair(message, got, &status, &n)) {
      return kFdRefused;
    }
    if (count != nullptr) *count = n;
    // Everything else the daemon sends before it closes: the fd batches, if any.
    while (ReceiveFdMessage(sock.get(), message, sizeof(message), &got, fds) == 0 && got > 0) {
    }
    return status;
  }
  uint32_t Request(uint64_t session, const FdSecret& secret, std::vector<UniqueFd>* fds) {
    const auto request = EncodeFdRequest(session, secret);
    return Request(request.data(), request.size(), fds);
  }

  grpc::Status Send(const v1::SendRequest& request) {
    grpc::ClientContext ctx;
    v1::SendReply reply;
    return stub_->Send(&ctx, request, &reply);
  }

 private:
  std::string socket_;
  std::unique_ptr<v1::Local::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::AttachEvent>> reader_;
  v1::AttachEvent event_;
  bool attached_ = false;
};

// The buffer socket hands fds only for the right session and secret, once; nothing else gets
// any, whatever it sends, and the daemon keeps serving.
TEST_F(TwoDaemonsTest, TheBufferSocketGivesNoFdsWithoutTheSessionsSecret) {
  const std::string path = FdSocketPath(up_->config().local_socket());
  struct stat st;
  ASSERT_EQ(lstat(path.c_str(), &st), 0) << path;
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "only the daemon's user may ask for buffers";

  RawTrainer t(up_->config().local_socket());
  ASSERT_TRUE(t.attached());
  ASSERT_EQ(t.event().buffer_secret().size(), kFdSecretBytes);
  ASSERT_EQ(t.event().buffers_size(), 2);
  const uint64_t session = t.event().session();
  FdSecret wrong = t.secret();
  wrong[7] ^= 0x40;
  std::vector<UniqueFd> fds;
  EXPECT_EQ(t.Request(session, wrong, &fds), kFdRefused);
  EXPECT_TRUE(fds.empty());
  EXPECT_EQ(t.Request(session ^ 1, t.secret(), &fds), kFdRefused);
  EXPECT_EQ(t.Request(0, t.secret(), &fds), kFdRefused);
  // Malformed requests: too short, too long, another magic, fds attached.
  const auto good = EncodeFdRequest(session, t.secret());
  EXPECT_EQ(t.Request(good.data(), good.size() - 1, &fds), kFdRefused);
  std::vector<uint8_t> longer(good.begin(), good.end());
  longer.push_back(0);
  EXPECT_EQ(t.Request(longer.data(), longer.size(), &fds), kFdRefused);
  auto magic = good;
  magic[0] = 'X';
  EXPECT_EQ(t.Request(magic.data(), magic.size(), &fds), kFdRefused);
  EXPECT_EQ(t.Request(good.data(), 0, &fds), kFdRefused);
  {
    UniqueFd sock(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    ASSERT_EQ(connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ASSERT_EQ(SendFdMessage(sock.get(), good.data(), good.size(), {STDIN_FILENO}), 0);
    uint8_t message[64];
    size_t got = 0;
    std::vector<UniqueFd> none;
    ASSERT_EQ(ReceiveFdMessage(sock.get(), message, sizeof(message), &got, &none), 0);
    uint32_t status = 0, count = 0;
    ASSERT_TRUE(DecodeFdPair(message, got, &status, &count));
    EXPECT_EQ(status, kFdRefused);
    EXPECT_TRUE(none.empty());
  }
  {  // One that connects and leaves at once.
    UniqueFd sock(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    ASSERT_EQ(connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  }
  EXPECT_TRUE(fds.empty()) << "a refused request got fds";

  // None of that used up the right secret; it works once.
  uint32_t count = 0;
  EXPECT_EQ(t.Request(good.data(), good.size(), &fds, &count), kFdOk);
  EXPECT_EQ(count, 2u);
  ASSERT_EQ(fds.size(), 2u);
  for (const UniqueFd& fd : fds) {
    EXPECT_EQ(fcntl(fd.get(), F_GET_SEALS), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  }
  std::vector<UniqueFd> again;
  EXPECT_EQ(t.Request(session, t.secret(), &again), kFdRefused);
  EXPECT_TRUE(again.empty());
  // The daemon serves the next trainer.
  std::unique_ptr<Client> next;
  Status s = Client::Connect(up_->config().local_socket(), "next", 5000, &next);
  EXPECT_TRUE(s.ok()) << s.message;
}

// SO_PEERCRED: a peer of another uid gets no fds even with the right session and secret. Only
// root can play the other user (setresuid in a child); the socket file is opened up for it, as
// a misconfigured directory or a root-owned daemon's socket might be.
TEST_F(TwoDaemonsTest, ThePeerMustHaveTheDaemonsUid) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to connect as another user";
  RawTrainer t(up_->config().local_socket());
  ASSERT_TRUE(t.attached());
  const std::string path = FdSocketPath(up_->config().local_socket());
  ASSERT_EQ(chmod(path.c_str(), 0666), 0);
  ASSERT_EQ(chmod(dir_.path().c_str(), 0777), 0);
  const auto request = EncodeFdRequest(t.event().session(), t.secret());
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // only syscalls here: the parent has threads
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(10);
    UniqueFd sock(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    const timeval timeout{5, 0};
    setsockopt(sock.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) _exit(11);
    if (SendFdMessage(sock.get(), request.data(), request.size(), {}) != 0) _exit(12);
    uint8_t message[64];
    size_t got = 0;
    std::vector<UniqueFd> fds;
    uint32_t status = 0, count = 0;
    if (ReceiveFdMessage(sock.get(), message, sizeof(message), &got, &fds) != 0 ||
        !DecodeFdPair(message, got, &status, &count)) {
      _exit(13);
    }
    _exit(status == kFdRefused && fds.empty() ? 0 : 14);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), 0) << "10 setresuid, 11 connect, 12 send, 13 no reply, 14 fds";
  // The right user still gets them.
  std::vector<UniqueFd> fds;
  EXPECT_EQ(t.Request(t.event().session(), t.secret(), &fds), kFdOk);
  EXPECT_EQ(fds.size(), 2u);
}

// What used to crash the daemon with SIGBUS: a trainer that shrinks its shared memory while the
// daemon copies a tensor out of its end. The trainer's ftruncate fails (the buffer is sealed);
// punching holes only zeroes pages, which the daemon reads as zeros. The daemon (this process)
// stays up and serves the next Send.
TEST_F(TwoDaemonsTest, ATrainerThatShrinksItsBufferCannotCrashTheDaemon) {
  RawTrainer t(up_->config().local_socket());
  ASSERT_TRUE(t.attached());
  std::vector<UniqueFd> fds;
  ASSERT_EQ(t.Request(t.event().session(), t.secret(), &fds), kFdOk);
  ASSERT_EQ(fds.size(), 2u);
  constexpr size_t kBuffer = 65536;
  const int fd = fds[0].get();
  void* p = mmap(nullptr, kBuffer, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_NE(p, MAP_FAILED);
  // The tensor and its ids at the very end of the buffer: the pages a shrink would take away.
  constexpr uint32_t kRows = 32;
  const uint64_t ids_at = kBuffer - kRows * 4;
  const uint64_t h_at = ids_at - kRows * kD * 4;
  float* h = reinterpret_cast<float*>(static_cast<char*>(p) + h_at);
  int32_t* ids = reinterpret_cast<int32_t*>(static_cast<char*>(p) + ids_at);
  for (uint32_t i = 0; i < kRows * kD; ++i) h[i] = 0.01f * static_cast<float>(i % 89);
  for (uint32_t i = 0; i < kRows; ++i) ids[i] = static_cast<int32_t>(i % kVocab);
  auto request = [&](uint32_t mb) {
    v1::SendRequest r;
    r.set_session(t.event().session());
    r.set_boundary(0);
    r.set_direction(v1::DIRECTION_FORWARD);
    r.set_step(1);
    r.set_microbatch(mb);
    v1::TensorRef* ref = r.mutable_tensor();
    ref->set_buffer(0);
    ref->set_offset(h_at);
    ref->set_rows(kRows);
    ref->set_cols(kD);
    ref->set_dtype(v1::DTYPE_F32);
    ref = r.mutable_token_ids();
    ref->set_buffer(0);
    ref->set_offset(ids_at);
    ref->set_rows(kRows);
    ref->set_cols(1);
    ref->set_dtype(v1::DTYPE_I32);
    return r;
  };
  ASSERT_TRUE(t.Send(request(0)).ok());

  // Shrink it as the daemon reads, from another thread, every way the trainer can try.
  std::atomic<bool> stop{false};
  std::atomic<int> shrunk{0}, refused{0};
  std::thread shrinker([&] {
    while (!stop.load()) {
      for (off_t size : {off_t{0}, off_t{4096}, static_cast<off_t>(h_at)}) {
        if (ftruncate(fd, size) == 0) {
          shrunk.fetch_add(1);
        } else if (errno == EPERM) {
          refused.fetch_add(1);
        }
      }
      fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(h_at),
                static_cast<off_t>(kBuffer - h_at));
    }
  });
  for (uint32_t mb = 1; mb <= 20; ++mb) {
    const grpc::Status s = t.Send(request(mb));
    // Punched pages read as zeros: still a valid tensor. Nothing else may go wrong.
    EXPECT_TRUE(s.ok()) << mb << ": " << s.error_message();
  }
  stop = true;
  shrinker.join();
  EXPECT_EQ(shrunk.load(), 0) << "a sealed buffer was shrunk";
  EXPECT_GT(refused.load(), 0);
  struct stat st;
  ASSERT_EQ(fstat(fd, &st), 0);
  EXPECT_EQ(st.st_size, static_cast<off_t>(kBuffer));
  munmap(p, kBuffer);

  // The daemon serves the next Send, this trainer's and another's, end to end.
  EXPECT_TRUE(t.Send(request(21)).ok());
  SendResult sent;
  auto [h2, ids2] = Fill(up_client_.get(), 8);
  ASSERT_TRUE(up_client_->Send(0, Direction::kForward, 1, 22, h2, ids2, &sent).ok());
  RecvResult r;
  Status s = down_client_->Recv(0, Direction::kForward, 1, 22,
                                TensorRef{0, 0, kMaxTokens, kD, DType::kF32}, 0, &r);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(r.rows, 8u);
}

}  // namespace
}  // namespace client
}  // namespace mapl
