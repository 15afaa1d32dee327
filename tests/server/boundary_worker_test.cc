// Tests of the per-boundary worker (server/boundary_worker.h) over real transports: an upstream
// and a downstream worker, each with a real engine (CPU backend), joined by a gRPC peer link on
// loopback wired as daemon.cc wires it (the link's handler calls the worker's OnPeerMessage).
// Round trips, backpressure, the errors of Send and Recv, where decoding runs, the inbox's bound,
// frames that decode to Inf, frames held for their dictionary, Step and Stop.
#include "server/boundary_worker.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "server/engine.h"
#include "server/frame_codec.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_server.h"
#include "tests/server/transport/peer_test_util.h"

namespace mapl {
namespace {

// peer_test_util keeps the gRPC library initialized for the whole binary and finds free ports.
using testing_peer::UnusedPort;

constexpr uint32_t kBoundary = 7;
constexpr int kD = 64;
constexpr int kK = 16;
constexpr int32_t kVocab = 50;
constexpr char kToken[] = "boundary worker test";
// How long a test waits for something that should happen (generous: sanitizer builds, busy CI).
constexpr absl::Duration kWait = absl::Seconds(30);
// The bounded chance a call that must block is given before the test checks it has not returned.
constexpr absl::Duration kChance = absl::Milliseconds(200);
constexpr float kSentinel = -12345.f;

v1::BoundaryConfig Config(v1::Method method, v1::Role role) {
  v1::BoundaryConfig c;
  c.set_id(kBoundary);
  c.set_role(role);
  c.set_d(kD);
  c.set_k(kK);
  c.set_method(method);
  c.set_vocab(kVocab);
  c.set_seed(11);
  return c;
}

std::vector<float> Random(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> v(count);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<int32_t> Tokens(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, kVocab - 1);
  std::vector<int32_t> v(n);
  for (int32_t& t : v) t = id(rng);
  return v;
}

std::vector<bf16_t> ToBf16(const std::vector<float>& v) {
  std::vector<bf16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
  return out;
}

// `got` holds exactly bf16(want) in its first want.size() values and the sentinel after them.
void ExpectExactToBf16(const std::vector<float>& want, const std::vector<float>& got) {
  ASSERT_GE(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(got[i], Bf16ToFloat(FloatToBf16(want[i]))) << "element " << i;
  }
  for (size_t i = want.size(); i < got.size(); ++i) {
    ASSERT_EQ(got[i], kSentinel) << "element " << i << " lies past the rows received";
  }
}

// Squared norm of the first `count` values; fails on a non-finite one.
double FiniteNorm2(const std::vector<float>& v, size_t count) {
  double s = 0;
  for (size_t i = 0; i < count; ++i) {
    EXPECT_TRUE(std::isfinite(v[i])) << "element " << i << " = " << v[i];
    if (!std::isfinite(v[i])) return std::numeric_limits<double>::quiet_NaN();
    s += double{v[i]} * v[i];
  }
  return s;
}

// Polls `done` until it holds or `timeout` passes.
bool PollUntil(const std::function<bool()>& done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// Runs `fn` on its own thread; Wait and done say whether it returned.
template <typename T>
class Async {
 public:
  explicit Async(std::function<T()> fn)
      : thread_([this, fn = std::move(fn)] {
          result_ = fn();
          done_.Notify();
        }) {}
  ~Async() { thread_.join(); }
  Async(const Async&) = delete;
  Async& operator=(const Async&) = delete;

  bool Wait(absl::Duration timeout) { return done_.WaitForNotificationWithTimeout(timeout); }
  bool done() const { return done_.HasBeenNotified(); }
  // After Wait returned true.
  const T& result() const { return *result_; }

 private:
  std::optional<T> result_;
  absl::Notification done_;
  std::thread thread_;  // last: it starts running in the constructor
};

// An upstream and a downstream worker of boundary kBoundary and the peer link between them. The
// downstream end is served by a PeerServer, the upstream end dials it; either can come first.
class WorkerPair {
 public:
  explicit WorkerPair(v1::Method method, const WorkerOptions& up = {},
                      const WorkerOptions& down = {}) {
    // value(): a failure aborts here, loudly, with the status.
    backend_ = MakeBackend("cpu").value();
    up_ = MakeWorker(Config(method, v1::ROLE_UPSTREAM), up);
    down_ = MakeWorker(Config(method, v1::ROLE_DOWNSTREAM), down);
  }
  ~WorkerPair() {
    StopWorkers();
    // The links call the workers: they go first, the workers after them.
    if (link_ != nullptr) link_->Close();
    if (server_ != nullptr) server_->Shutdown();
    link_.reset();
    server_.reset();
  }
  WorkerPair(const WorkerPair&) = delete;
  WorkerPair& operator=(const WorkerPair&) = delete;

  BoundaryWorker& up() { return *up_; }
  BoundaryWorker& down() { return *down_; }
  PeerLink& up_link() { return *link_; }
  const Backend* backend() const { return backend_.get(); }

  // Serves the downstream end on 127.0.0.1:port (0: a free port) and starts the downstream
  // worker; returns the port.
  int Serve(int port = 0) {
    PeerServerOptions o;
    o.listen_address = absl::StrCat("127.0.0.1:", port);
    server_ = PeerServer::Create(o).value();
    BoundaryWorker* w = down_.get();
    PeerLink* link =
        server_
            ->RegisterBoundary(LinkOptions(kBoundary + 1),
                               [w](v1::PeerMessage m) { w->OnPeerMessage(std::move(m)); })
            .value();
    absl::Status started = server_->Start();
    EXPECT_TRUE(started.ok()) << started;
    down_->Start(link);
    return server_->port();
  }

  // Dials the downstream end at 127.0.0.1:port and starts the upstream worker.
  void Dial(int port) {
    PeerLinkOptions o = LinkOptions(kBoundary);
    o.address = absl::StrCat("127.0.0.1:", port);
    BoundaryWorker* w = up_.get();
    link_ = PeerLink::Dial(o, [w](v1::PeerMessage m) { w->OnPeerMessage(std::move(m)); }).value();
    up_->Start(link_.get());
  }

  // Both ends, connected.
  void Connect() {
    Dial(Serve());
    absl::Status s = link_->WaitConnected(kWait);
    EXPECT_TRUE(s.ok()) << s;
  }

  // Stops both workers (waiters get UNAVAILABLE); the objects stay until the pair goes.
  void StopWorkers() {
    up_->Stop(absl::Now());
    down_->Stop(absl::Now());
  }

 private:
  std::unique_ptr<BoundaryWorker> MakeWorker(const v1::BoundaryConfig& config,
                                             const WorkerOptions& options) {
    return std::make_unique<BoundaryWorker>(Engine::Create(config, backend_.get()).value(), options,
                                            CodecTimers{});
  }

  static PeerLinkOptions LinkOptions(uint32_t stage) {
    PeerLinkOptions o;
    o.boundary = kBoundary;
    o.stage = stage;
    o.auth_token = kToken;
    o.connect_timeout = absl::Seconds(60);
    o.initial_backoff = absl::Milliseconds(10);
    o.max_backoff = absl::Milliseconds(100);
    return o;
  }

  std::unique_ptr<Backend> backend_;
  std::unique_ptr<BoundaryWorker> up_;
  std::unique_ptr<BoundaryWorker> down_;
  std::unique_ptr<PeerServer> server_;
  std::unique_ptr<PeerLink> link_;
};

// Waits for `call`; if it does not return, stops the workers (which wakes every waiter) so that
// the test fails instead of hanging on the thread.
template <typename T>
bool WaitOrStop(Async<T>& call, WorkerPair& pair) {
  if (call.Wait(kWait)) return true;
  pair.StopWorkers();
  EXPECT_TRUE(call.Wait(kWait)) << "still blocked after Stop";
  return false;
}

ConstTensor F32(const std::vector<float>& v, int64_t rows) {
  return ConstTensor::F32(v.data(), rows, kD);
}

// Recv with the test's deadline and no cancellation.
absl::StatusOr<v1::RecvReply> RecvInto(BoundaryWorker& w, uint64_t step, uint32_t mb,
                                       std::vector<float>* into, int64_t capacity) {
  into->assign(static_cast<size_t>(capacity) * kD, kSentinel);
  return w.Recv(step, mb, Tensor::F32(into->data(), capacity, kD), absl::Now() + kWait, kWait, {});
}

absl::Status StepOf(BoundaryWorker& w, uint64_t step, v1::BoundaryStats* stats) {
  return w.Step(step, absl::Now() + kWait, kWait, stats);
}

// Sends a forward tensor of n random rows as (step, mb) and receives it downstream: the start of
// the tests about what comes after a forward. Returns the tensor sent.
std::vector<float> CrossForward(WorkerPair& pair, uint64_t step, uint32_t mb, int n) {
  std::vector<float> h = Random(n * kD, 1);
  const absl::StatusOr<v1::SendReply> sent = pair.up().Send(step, mb, F32(h, n), nullptr, false);
  EXPECT_TRUE(sent.ok()) << sent.status();
  std::vector<float> h_hat;
  const absl::StatusOr<v1::RecvReply> got = RecvInto(pair.down(), step, mb, &h_hat, n);
  EXPECT_TRUE(got.ok()) << got.status();
  return h;
}

// ---- round trips ----

TEST(BoundaryWorkerTest, DenseRoundTripIsExactToBf16) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kSteps = 2, kMicrobatches = 3, kCapacity = 16;
  int frames = 0;
  for (uint64_t step = 1; step <= kSteps; ++step) {
    for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
      const int n = 4 + 3 * static_cast<int>(mb);
      const uint64_t seed = step * 100 + mb;
      const std::vector<float> h = Random(n * kD, seed);
      absl::StatusOr<v1::SendReply> sent = pair.up().Send(step, mb, F32(h, n), nullptr, false);
      ASSERT_TRUE(sent.ok()) << sent.status();
      EXPECT_EQ(sent->raw_bytes(), uint64_t{4} * n * kD);
      std::vector<float> h_hat;
      absl::StatusOr<v1::RecvReply> got = RecvInto(pair.down(), step, mb, &h_hat, kCapacity);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->rows(), static_cast<uint32_t>(n));
      EXPECT_EQ(got->cols(), static_cast<uint32_t>(kD));
      ExpectExactToBf16(h, h_hat);

      // The gradient goes back as bf16 on odd microbatches (in and out), f32 on even ones.
      const std::vector<float> g = Random(n * kD, seed + 7);
      if (mb % 2 == 1) {
        const std::vector<bf16_t> g16 = ToBf16(g);
        sent = pair.down().Send(step, mb, ConstTensor::BF16(g16.data(), n, kD), nullptr, false);
        ASSERT_TRUE(sent.ok()) << sent.status();
        EXPECT_EQ(sent->raw_bytes(), uint64_t{2} * n * kD);
        std::vector<bf16_t> dh(static_cast<size_t>(kCapacity) * kD, 0);
        got = pair.up().Recv(step, mb, Tensor::BF16(dh.data(), kCapacity, kD), absl::Now() + kWait,
                             kWait, {});
        ASSERT_TRUE(got.ok()) << got.status();
        EXPECT_EQ(got->rows(), static_cast<uint32_t>(n));
        for (size_t i = 0; i < g16.size(); ++i) ASSERT_EQ(dh[i], g16[i]) << "element " << i;
      } else {
        sent = pair.down().Send(step, mb, F32(g, n), nullptr, false);
        ASSERT_TRUE(sent.ok()) << sent.status();
        std::vector<float> dh;
        got = RecvInto(pair.up(), step, mb, &dh, kCapacity);
        ASSERT_TRUE(got.ok()) << got.status();
        EXPECT_EQ(got->rows(), static_cast<uint32_t>(n));
        ExpectExactToBf16(g, dh);
      }
      ++frames;
    }
    v1::BoundaryStats down_stats, up_stats;
    ASSERT_TRUE(StepOf(pair.down(), step, &down_stats).ok());
    ASSERT_TRUE(StepOf(pair.up(), step, &up_stats).ok());
    EXPECT_EQ(down_stats.steps(), step);
    EXPECT_EQ(up_stats.steps(), step);
  }
  const v1::BoundaryStats up = pair.up().stats(), down = pair.down().stats();
  EXPECT_EQ(up.id(), kBoundary);
  EXPECT_EQ(up.role(), "upstream");
  EXPECT_EQ(down.role(), "downstream");
  EXPECT_EQ(up.frames_sent(), static_cast<uint64_t>(frames));
  EXPECT_EQ(up.frames_sent(), down.frames_received());
  EXPECT_EQ(down.frames_sent(), up.frames_received());
  EXPECT_EQ(up.payload_bytes_sent(), down.payload_bytes_received());
  EXPECT_EQ(down.payload_bytes_sent(), up.payload_bytes_received());
  EXPECT_FALSE(up.has_dictionary());
  // The link's record is the transport's, on both sides.
  ASSERT_TRUE(up.has_link());
  ASSERT_TRUE(down.has_link());
  EXPECT_TRUE(up.link().connected());
  EXPECT_TRUE(down.link().connected());
  ASSERT_EQ(down.link().received().count("frame"), 1u);
  EXPECT_GE(down.link().received().at("frame").messages(), static_cast<uint64_t>(frames));
  ASSERT_EQ(up.link().received().count("frame"), 1u);
  EXPECT_GE(up.link().received().at("frame").messages(), static_cast<uint64_t>(frames));
}

TEST(BoundaryWorkerTest, MaplRoundTripKeepsTheDictionariesInStep) {
  WorkerPair pair(v1::METHOD_MAPL);  // CODEC_RVQ forward, CODEC_INT8 backward (the defaults)
  pair.Connect();
  // 4 x 256 rows in step 1 are enough to fit the RVQ codebooks: later steps send RVQ codes.
  constexpr int kSteps = 3, kMicrobatches = 4, kN = 256;
  uint64_t last_version = 0;
  for (uint64_t step = 1; step <= kSteps; ++step) {
    for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
      const uint64_t seed = step * 100 + mb;
      const std::vector<float> h = Random(kN * kD, seed);
      const std::vector<int32_t> tokens = Tokens(kN, seed);
      ASSERT_TRUE(pair.up().Send(step, mb, F32(h, kN), tokens.data(), false).ok());
      std::vector<float> h_hat;
      absl::StatusOr<v1::RecvReply> got = RecvInto(pair.down(), step, mb, &h_hat, kN);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->rows(), static_cast<uint32_t>(kN));
      EXPECT_EQ(got->cols(), static_cast<uint32_t>(kD));
      EXPECT_GT(FiniteNorm2(h_hat, h_hat.size()), 0.0);

      const std::vector<float> g = Random(kN * kD, seed + 7);
      ASSERT_TRUE(pair.down().Send(step, mb, F32(g, kN), nullptr, false).ok());
      std::vector<float> dh;
      got = RecvInto(pair.up(), step, mb, &dh, kN);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->rows(), static_cast<uint32_t>(kN));
      EXPECT_GT(FiniteNorm2(dh, dh.size()), 0.0);
    }
    // Downstream first: its learning signal is what the upstream's Step waits for.
    v1::BoundaryStats down_stats, up_stats;
    absl::Status s = StepOf(pair.down(), step, &down_stats);
    ASSERT_TRUE(s.ok()) << s;
    s = StepOf(pair.up(), step, &up_stats);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(up_stats.steps(), step);
    EXPECT_EQ(down_stats.steps(), step);
    // The step published a new dictionary version; the replica follows it (asynchronously: the
    // delta travels after the Step).
    EXPECT_GT(up_stats.dictionary_version(), last_version);
    last_version = up_stats.dictionary_version();
    v1::BoundaryStats replica;
    EXPECT_TRUE(PollUntil(
        [&] {
          replica = pair.down().stats();
          return replica.dictionary_version() == up_stats.dictionary_version();
        },
        kWait))
        << "replica at version " << replica.dictionary_version() << ", owner at "
        << up_stats.dictionary_version();
    EXPECT_EQ(replica.dictionary_checksum(), up_stats.dictionary_checksum());
  }
  const v1::BoundaryStats up = pair.up().stats(), down = pair.down().stats();
  EXPECT_EQ(up.frames_sent(), uint64_t{kSteps} * kMicrobatches);
  EXPECT_EQ(up.frames_sent(), down.frames_received());
  EXPECT_EQ(down.frames_sent(), up.frames_received());
  EXPECT_EQ(up.frames_rejected() + down.frames_rejected(), 0u);
  EXPECT_GT(up.dictionary_bytes_sent(), 0u);
  EXPECT_EQ(up.dictionary_bytes_sent(), down.dictionary_bytes_received());
  ASSERT_TRUE(up.has_link());
  EXPECT_TRUE(up.link().connected());
  ASSERT_EQ(down.link().received().count("dictionary_delta"), 1u);
  ASSERT_EQ(up.link().received().count("learning_signal"), 1u);
  EXPECT_GE(up.link().received().at("learning_signal").messages(), uint64_t{kSteps});
}

// ---- backpressure ----

// With one queue slot and an encoder that cannot hand anything to a transport that is not
// connected (max_transport_queue_bytes = 1: any unacknowledged byte holds it), a Send waits; it
// completes once the peer comes up. The sequence: frame 0 is encoded and queued in the link;
// tensor 1 is taken by the encoder, which waits for the link; tensor 2 fills the one queue slot;
// tensor 3's Send waits.
TEST(BoundaryWorkerTest, SendWaitsWhileTheEncoderCannotProgress) {
  WorkerOptions up;
  up.max_queued_jobs = 1;
  up.max_transport_queue_bytes = 1;
  WorkerPair pair(v1::METHOD_DENSE, up);
  const int port = UnusedPort();
  pair.Dial(port);
  constexpr int kN = 4;
  std::vector<std::vector<float>> h;
  for (uint32_t mb = 0; mb < 4; ++mb) h.push_back(Random(kN * kD, mb));
  for (uint32_t mb = 0; mb < 3; ++mb) {
    absl::StatusOr<v1::SendReply> r = pair.up().Send(1, mb, F32(h[mb], kN), nullptr, false);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  Async<absl::StatusOr<v1::SendReply>> blocked(
      [&] { return pair.up().Send(1, 3, F32(h[3], kN), nullptr, false); });
  EXPECT_FALSE(pair.up().Flush(absl::Now() + kChance)) << "tensors 1 and 2 cannot be encoded yet";
  EXPECT_FALSE(blocked.done()) << "the Send went past a full queue";
  EXPECT_FALSE(pair.up_link().connected());
  // Only frame 0 was encoded: tensor 1 waits for the link, before the engine.
  EXPECT_EQ(pair.up().stats().frames_sent(), 1u);
  EXPECT_EQ(pair.up_link().stats().queued_messages(), 1u);

  pair.Serve(port);  // the condition lifts: the link connects and acknowledges frame 0
  ASSERT_TRUE(WaitOrStop(blocked, pair)) << "the Send stayed blocked after the link came up";
  EXPECT_TRUE(blocked.result().ok()) << blocked.result().status();
  EXPECT_TRUE(pair.up().Flush(absl::Now() + kWait));
  EXPECT_EQ(pair.up().stats().frames_sent(), 4u);
  for (uint32_t mb = 0; mb < 4; ++mb) {
    std::vector<float> h_hat;
    absl::StatusOr<v1::RecvReply> got = RecvInto(pair.down(), 1, mb, &h_hat, kN);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectExactToBf16(h[mb], h_hat);
  }
}

// BUG (boundary_worker.cc, Send): the duplicate and closed-step checks run before the
// backpressure wait, and nothing checks again after it. Two Sends of the same (step, microbatch)
// that both wait for a queue slot are both taken (both OK); the engine then refuses the second
// copy in the background (only a log line says so). One of them must get ALREADY_EXISTS.
TEST(BoundaryWorkerTest, ConcurrentDuplicateSendsWaitingForASlotOneIsAlreadyExists) {
  WorkerOptions up;
  up.max_queued_jobs = 1;
  up.max_transport_queue_bytes = 1;
  WorkerPair pair(v1::METHOD_DENSE, up);
  const int port = UnusedPort();
  pair.Dial(port);
  constexpr int kN = 4;
  const std::vector<float> h = Random(kN * kD, 1);
  for (uint32_t mb = 0; mb < 3; ++mb) {
    ASSERT_TRUE(pair.up().Send(1, mb, F32(h, kN), nullptr, false).ok());
  }
  // Both wait for the slot that tensor 2 holds.
  Async<absl::StatusOr<v1::SendReply>> first(
      [&] { return pair.up().Send(1, 9, F32(h, kN), nullptr, false); });
  Async<absl::StatusOr<v1::SendReply>> second(
      [&] { return pair.up().Send(1, 9, F32(h, kN), nullptr, false); });
  EXPECT_FALSE(pair.up().Flush(absl::Now() + kChance));
  EXPECT_FALSE(first.done());
  EXPECT_FALSE(second.done());

  pair.Serve(port);
  ASSERT_TRUE(WaitOrStop(first, pair));
  ASSERT_TRUE(WaitOrStop(second, pair));
  const absl::Status a = first.result().status(), b = second.result().status();
  EXPECT_EQ(a.ok() + b.ok(), 1) << "first: " << a << "; second: " << b;
  const absl::Status& refused = a.ok() ? b : a;
  EXPECT_EQ(refused.code(), absl::StatusCode::kAlreadyExists) << refused;
}

// Stop wakes a Send that waits for a queue slot: UNAVAILABLE, and the tensor is not taken.
TEST(BoundaryWorkerTest, StopReleasesASendWaitingForASlot) {
  WorkerOptions up;
  up.max_queued_jobs = 1;
  up.max_transport_queue_bytes = 1;
  WorkerPair pair(v1::METHOD_DENSE, up);
  pair.Dial(UnusedPort());
  constexpr int kN = 4;
  const std::vector<float> h = Random(kN * kD, 1);
  for (uint32_t mb = 0; mb < 3; ++mb) {
    ASSERT_TRUE(pair.up().Send(1, mb, F32(h, kN), nullptr, false).ok());
  }
  Async<absl::StatusOr<v1::SendReply>> blocked(
      [&] { return pair.up().Send(1, 3, F32(h, kN), nullptr, false); });
  EXPECT_FALSE(pair.up().Flush(absl::Now() + kChance));
  EXPECT_FALSE(blocked.done());
  pair.StopWorkers();
  ASSERT_TRUE(blocked.Wait(kWait));
  EXPECT_EQ(blocked.result().status().code(), absl::StatusCode::kUnavailable)
      << blocked.result().status();
  // Stop finished what was taken (tensors 1 and 2) and not tensor 3.
  EXPECT_EQ(pair.up().stats().frames_sent(), 3u);
}

// A link that stays down fails a Send waiting for a slot by its deadline, naming what it waited
// for; the tensor is not taken (a retry after the link is back succeeds), and nothing taken
// before is lost.
TEST(BoundaryWorkerTest, SendWaitingOnADownLinkFailsByItsDeadline) {
  WorkerOptions up;
  up.max_queued_jobs = 1;
  up.max_transport_queue_bytes = 1;
  WorkerPair pair(v1::METHOD_DENSE, up);
  const int port = UnusedPort();
  pair.Dial(port);
  constexpr int kN = 4;
  std::vector<std::vector<float>> h;
  for (uint32_t mb = 0; mb < 4; ++mb) h.push_back(Random(kN * kD, mb));
  for (uint32_t mb = 0; mb < 3; ++mb) {
    ASSERT_TRUE(pair.up().Send(1, mb, F32(h[mb], kN), nullptr, false).ok());
  }
  const absl::Time start = absl::Now();
  absl::StatusOr<v1::SendReply> late =
      pair.up().Send(1, 3, F32(h[3], kN), nullptr, false, start + absl::Milliseconds(300));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable) << late.status();
  for (const char* part : {"step 1", "microbatch 3", "peer link down"}) {
    EXPECT_TRUE(absl::StrContains(late.status().message(), part)) << late.status();
  }

  pair.Serve(port);
  absl::StatusOr<v1::SendReply> retry =
      pair.up().Send(1, 3, F32(h[3], kN), nullptr, false, absl::Now() + kWait);
  ASSERT_TRUE(retry.ok()) << retry.status();
  for (uint32_t mb = 0; mb < 4; ++mb) {
    std::vector<float> h_hat;
    absl::StatusOr<v1::RecvReply> got = RecvInto(pair.down(), 1, mb, &h_hat, kN);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectExactToBf16(h[mb], h_hat);
  }
}

// ---- Send errors ----

TEST(BoundaryWorkerTest, DuplicateSendIsAlreadyExists) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  const std::vector<float> h = Random(3 * kD, 1);
  ASSERT_TRUE(pair.up().Send(2, 5, F32(h, 3), nullptr, false).ok());
  absl::StatusOr<v1::SendReply> again = pair.up().Send(2, 5, F32(h, 3), nullptr, false);
  ASSERT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists) << again.status();
  EXPECT_TRUE(absl::StrContains(again.status().message(), "step 2 microbatch 5")) << again.status();
  // Downstream too, for a gradient.
  std::vector<float> h_hat;
  ASSERT_TRUE(RecvInto(pair.down(), 2, 5, &h_hat, 3).ok());
  ASSERT_TRUE(pair.down().Send(2, 5, F32(h, 3), nullptr, false).ok());
  again = pair.down().Send(2, 5, F32(h, 3), nullptr, false);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists) << again.status();
}

TEST(BoundaryWorkerTest, SendForAClosedStepIsFailedPrecondition) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  const std::vector<float> h = Random(3 * kD, 1);
  ASSERT_TRUE(pair.up().Send(4, 0, F32(h, 3), nullptr, false).ok());
  std::vector<float> h_hat;
  ASSERT_TRUE(RecvInto(pair.down(), 4, 0, &h_hat, 3).ok());
  v1::BoundaryStats stats;
  ASSERT_TRUE(StepOf(pair.down(), 4, &stats).ok());
  ASSERT_TRUE(StepOf(pair.up(), 4, &stats).ok());
  for (uint64_t step : {uint64_t{4}, uint64_t{2}}) {
    absl::StatusOr<v1::SendReply> late = pair.up().Send(step, 1, F32(h, 3), nullptr, false);
    ASSERT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition) << late.status();
    EXPECT_TRUE(absl::StrContains(late.status().message(), "already closed")) << late.status();
  }
  absl::StatusOr<v1::SendReply> late = pair.down().Send(4, 0, F32(h, 3), nullptr, false);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition) << late.status();
  // The next step is open.
  EXPECT_TRUE(pair.up().Send(5, 0, F32(h, 3), nullptr, true).ok());
}

// A refused tensor gives back its queue slot and its (step, microbatch): with one slot, later
// Sends (the same key among them) go through.
TEST(BoundaryWorkerTest, NonFiniteInputIsInvalidArgumentAndReleasesTheSlot) {
  WorkerOptions up;
  up.max_queued_jobs = 1;
  WorkerPair pair(v1::METHOD_DENSE, up);
  pair.Connect();
  constexpr int kN = 3;
  std::vector<float> nan = Random(kN * kD, 1);
  nan[kD + 5] = std::numeric_limits<float>::quiet_NaN();
  std::vector<bf16_t> inf = ToBf16(Random(kN * kD, 2));
  inf[2] = FloatToBf16(-std::numeric_limits<float>::infinity());
  const std::vector<float> h = Random(kN * kD, 3);
  // On a thread: a slot that a refused tensor kept would block a later Send for good.
  Async<std::vector<absl::Status>> sends([&] {
    std::vector<absl::Status> out;
    out.push_back(pair.up().Send(1, 0, F32(nan, kN), nullptr, false).status());
    out.push_back(
        pair.up().Send(1, 1, ConstTensor::BF16(inf.data(), kN, kD), nullptr, false).status());
    for (uint32_t mb = 0; mb < 3; ++mb) {
      out.push_back(pair.up().Send(1, mb, F32(h, kN), nullptr, false).status());
    }
    return out;
  });
  ASSERT_TRUE(WaitOrStop(sends, pair))
      << "a Send after the refused ones waits for a slot nobody holds";
  const std::vector<absl::Status>& s = sends.result();
  ASSERT_EQ(s.size(), 5u);
  ASSERT_EQ(s[0].code(), absl::StatusCode::kInvalidArgument) << s[0];
  EXPECT_TRUE(absl::StrContains(s[0].message(), "step 1 microbatch 0")) << s[0];
  EXPECT_TRUE(absl::StrContains(s[0].message(), "non-finite value nan at (1, 5)")) << s[0];
  ASSERT_EQ(s[1].code(), absl::StatusCode::kInvalidArgument) << s[1];
  EXPECT_TRUE(absl::StrContains(s[1].message(), "non-finite value -inf at (0, 2)")) << s[1];
  // The refused (step, microbatch) keys were given back too: the same keys go through now.
  for (int i = 2; i < 5; ++i) EXPECT_TRUE(s[i].ok()) << "Send " << i << ": " << s[i];
  EXPECT_TRUE(pair.up().Flush(absl::Now() + kWait));
  EXPECT_EQ(pair.up().stats().frames_sent(), 3u);
}

// BUG (boundary_worker.cc, Send): the worker refuses NaN/Inf tensors itself, before the engine,
// so BoundaryStats.nonfinite_inputs ("Tensors refused for NaN or Inf", exported as
// mapl_boundary_nonfinite_inputs_total) never counts what the daemon refuses: it stays 0.
TEST(BoundaryWorkerTest, NonFiniteRefusalsAreCounted) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  std::vector<float> h = Random(2 * kD, 1);
  h[3] = std::numeric_limits<float>::infinity();
  ASSERT_EQ(pair.up().Send(1, 0, F32(h, 2), nullptr, false).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pair.up().stats().nonfinite_inputs(), 1u);
}

TEST(BoundaryWorkerTest, MaplForwardWithoutTokenIdsIsInvalidArgument) {
  WorkerPair pair(v1::METHOD_MAPL);
  pair.Connect();
  const std::vector<float> h = Random(4 * kD, 1);
  absl::StatusOr<v1::SendReply> r = pair.up().Send(1, 0, F32(h, 4), nullptr, false);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "token_ids")) << r.status();
  // Nothing was taken: the same microbatch with its ids goes through.
  const std::vector<int32_t> tokens = Tokens(4, 1);
  r = pair.up().Send(1, 0, F32(h, 4), tokens.data(), true);
  EXPECT_TRUE(r.ok()) << r.status();
}

TEST(BoundaryWorkerTest, TokenIdOutOfRangeIsInvalidArgument) {
  WorkerPair pair(v1::METHOD_MAPL);
  pair.Connect();
  const std::vector<float> h = Random(5 * kD, 1);
  std::vector<int32_t> tokens = Tokens(5, 1);
  tokens[3] = kVocab;
  absl::StatusOr<v1::SendReply> r = pair.up().Send(1, 0, F32(h, 5), tokens.data(), false);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "token_ids[3] = 50")) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "vocab=50")) << r.status();
  tokens[3] = 0;
  tokens[0] = -1;
  r = pair.up().Send(1, 0, F32(h, 5), tokens.data(), false);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "token_ids[0] = -1")) << r.status();
  tokens[0] = kVocab - 1;
  r = pair.up().Send(1, 0, F32(h, 5), tokens.data(), true);
  EXPECT_TRUE(r.ok()) << r.status();
}

// wait_encoded: the reply carries the frame's bytes on the wire, and an encoder error is the
// Send's.
TEST(BoundaryWorkerTest, WaitEncodedReturnsTheWireBytesOrTheEncodeError) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 5;
  const std::vector<float> h = Random(kN * kD, 1);
  absl::StatusOr<v1::SendReply> r = pair.up().Send(1, 0, F32(h, kN), nullptr, true);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->wire_bytes(), uint64_t{2} * kN * kD);  // dense bf16, nothing else
  EXPECT_EQ(r->raw_bytes(), uint64_t{4} * kN * kD);
  EXPECT_EQ(pair.up().stats().payload_bytes_sent(), r->wire_bytes());
  // Without waiting there is no frame yet to measure.
  r = pair.up().Send(1, 1, F32(h, kN), nullptr, false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->wire_bytes(), 0u);

  // The downstream cannot encode a gradient of a forward it never decoded.
  r = pair.down().Send(1, 3, F32(h, kN), nullptr, true);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "backward tensor of step 1 microbatch 3"))
      << r.status();
}

TEST(BoundaryWorkerTest, WaitEncodedWireBytesOfMaplFrames) {
  WorkerPair pair(v1::METHOD_MAPL);
  pair.Connect();
  constexpr int kN = 32;
  const std::vector<float> h = Random(kN * kD, 1);
  const std::vector<int32_t> tokens = Tokens(kN, 1);
  uint64_t before = pair.up().stats().payload_bytes_sent();
  for (uint32_t mb = 0; mb < 3; ++mb) {
    absl::StatusOr<v1::SendReply> r = pair.up().Send(1, mb, F32(h, kN), tokens.data(), true);
    ASSERT_TRUE(r.ok()) << r.status();
    const uint64_t after = pair.up().stats().payload_bytes_sent();
    EXPECT_GT(r->wire_bytes(), 0u);
    EXPECT_EQ(r->wire_bytes(), after - before);
    // Projected to k = 16 of d = 64: well under the dense bf16 size.
    EXPECT_LT(r->wire_bytes(), uint64_t{2} * kN * kD);
    before = after;
  }
}

// ---- Recv ----

TEST(BoundaryWorkerTest, RecvThatNeverComesIsDeadlineExceededNamingTheTensor) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  std::vector<float> into(2 * kD);
  const absl::Duration timeout = absl::Milliseconds(300);
  absl::StatusOr<v1::RecvReply> r =
      pair.down().Recv(3, 1, Tensor::F32(into.data(), 2, kD), absl::Now() + timeout, timeout, {});
  ASSERT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_TRUE(
      absl::StrContains(r.status().message(), "boundary 7: forward tensor of step 3 microbatch 1"))
      << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "within 300ms")) << r.status();
  EXPECT_FALSE(absl::StrContains(r.status().message(), "not connected")) << r.status();
}

TEST(BoundaryWorkerTest, RecvDeadlineSaysWhenThePeerIsNotConnected) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Dial(UnusedPort());
  std::vector<float> into(2 * kD);
  const absl::Duration timeout = absl::Milliseconds(100);
  absl::StatusOr<v1::RecvReply> r =
      pair.up().Recv(1, 0, Tensor::F32(into.data(), 2, kD), absl::Now() + timeout, timeout, {});
  ASSERT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "backward tensor of step 1 microbatch 0"))
      << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "the peer link is not connected"))
      << r.status();
}

TEST(BoundaryWorkerTest, RecvIntoTooSmallIsInvalidArgumentAndTheTensorStays) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 6;
  const std::vector<float> h = Random(kN * kD, 1);
  ASSERT_TRUE(pair.up().Send(1, 0, F32(h, kN), nullptr, false).ok());
  std::vector<float> small;
  absl::StatusOr<v1::RecvReply> r = RecvInto(pair.down(), 1, 0, &small, kN - 1);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "has 6 rows; `into` holds only 5"))
      << r.status();
  for (float v : small) ASSERT_EQ(v, kSentinel) << "a refused Recv wrote into `into`";
  std::vector<float> h_hat;
  r = RecvInto(pair.down(), 1, 0, &h_hat, kN);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectExactToBf16(h, h_hat);
}

TEST(BoundaryWorkerTest, CancelledRecvIsCancelledAndTheTensorStays) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 3;
  const std::vector<float> h = Random(kN * kD, 1);
  ASSERT_TRUE(pair.up().Send(1, 0, F32(h, kN), nullptr, false).ok());
  std::vector<float> into(kN * kD, kSentinel);
  int asked = 0;
  absl::StatusOr<v1::RecvReply> r = pair.down().Recv(1, 0, Tensor::F32(into.data(), kN, kD),
                                                     absl::Now() + kWait, kWait, [&asked] {
                                                       ++asked;
                                                       return true;
                                                     });
  ASSERT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_EQ(asked, 1);
  for (float v : into) ASSERT_EQ(v, kSentinel) << "a cancelled Recv wrote into `into`";
  r = pair.down().Recv(1, 0, Tensor::F32(into.data(), kN, kD), absl::Now() + kWait, kWait,
                       [] { return false; });
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectExactToBf16(h, into);
}

// ---- decoding off the transport's reader ----

// The receive handler only queues: with the decoder not running, OnPeerMessage returns and the
// frame is not decoded (a Recv finds nothing); past max_incoming_bytes the handler waits, so a
// fast peer is slowed down. Once the worker starts, its decoder thread decodes both. (That the
// decoder runs while Step holds the engine cannot be observed without test hooks in the worker.)
TEST(BoundaryWorkerTest, PeerMessagesAreQueuedForTheDecoderThread) {
  WorkerOptions down;
  down.max_incoming_bytes = 0;  // one message may wait; the next waits for the decoder
  WorkerPair pair(v1::METHOD_DENSE, {}, down);
  absl::StatusOr<std::unique_ptr<Engine>> up =
      Engine::Create(Config(v1::METHOD_DENSE, v1::ROLE_UPSTREAM), pair.backend());
  ASSERT_TRUE(up.ok()) << up.status();
  constexpr int kN = 2;
  std::vector<std::vector<float>> h;
  std::vector<v1::PeerMessage> frames;
  for (uint32_t mb = 0; mb < 2; ++mb) {
    h.push_back(Random(kN * kD, mb));
    absl::StatusOr<std::vector<v1::PeerMessage>> out =
        (*up)->Encode(1, mb, F32(h[mb], kN), nullptr, Engine::FiniteCheck::kCheck);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->size(), 1u);
    frames.push_back((*out)[0]);
  }

  pair.down().OnPeerMessage(frames[0]);  // returns: it only queues
  std::vector<float> into(kN * kD);
  const absl::Duration timeout = absl::Milliseconds(100);
  absl::StatusOr<v1::RecvReply> r =
      pair.down().Recv(1, 0, Tensor::F32(into.data(), kN, kD), absl::Now() + timeout, timeout, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded)
      << "the frame was decoded by the handler's caller: " << r.status();
  EXPECT_EQ(pair.down().stats().frames_received(), 0u);

  Async<bool> second([&] {
    pair.down().OnPeerMessage(frames[1]);
    return true;
  });
  EXPECT_FALSE(second.Wait(kChance)) << "the handler queued past max_incoming_bytes";

  pair.Serve();  // starts the downstream worker and its decoder
  ASSERT_TRUE(WaitOrStop(second, pair)) << "the handler stayed blocked with the decoder running";
  for (uint32_t mb = 0; mb < 2; ++mb) {
    std::vector<float> h_hat;
    r = RecvInto(pair.down(), 1, mb, &h_hat, kN);
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectExactToBf16(h[mb], h_hat);
  }
  EXPECT_EQ(pair.down().stats().frames_received(), 2u);
}

// ---- the inbox's bound ----

// Dense frames of step 1, microbatches 0..count-1, from a separate upstream engine (the decoder
// takes them from OnPeerMessage as from the transport).
std::vector<v1::PeerMessage> DenseFrames(const Backend* backend, uint32_t count, int64_t rows,
                                         std::vector<std::vector<float>>* h) {
  std::unique_ptr<Engine> up =
      Engine::Create(Config(v1::METHOD_DENSE, v1::ROLE_UPSTREAM), backend).value();
  std::vector<v1::PeerMessage> frames;
  for (uint32_t mb = 0; mb < count; ++mb) {
    h->push_back(Random(rows * kD, 100 + mb));
    absl::StatusOr<std::vector<v1::PeerMessage>> out =
        up->Encode(1, mb, F32(h->back(), rows), nullptr, Engine::FiniteCheck::kCheck);
    EXPECT_TRUE(out.ok()) << out.status();
    if (out.ok()) frames.push_back(out->at(0));
  }
  return frames;
}

// Beyond max_inbox_bytes the decoder waits for the trainer's Recvs (nothing is dropped), and the
// transport's reader behind it: the inbox's size is in the stats.
TEST(BoundaryWorkerTest, FullInboxMakesTheDecoderWaitForRecv) {
  constexpr int kN = 4;
  constexpr int64_t kTensorBytes = int64_t{kN} * kD * sizeof(float);
  WorkerOptions down;
  down.max_inbox_bytes = 2 * kTensorBytes;
  WorkerPair pair(v1::METHOD_DENSE, {}, down);
  pair.Serve();
  std::vector<std::vector<float>> h;
  const std::vector<v1::PeerMessage> frames = DenseFrames(pair.backend(), 5, kN, &h);
  for (const v1::PeerMessage& m : frames) pair.down().OnPeerMessage(m);
  ASSERT_TRUE(PollUntil([&] { return pair.down().stats().inbox_entries() == 2; }, kWait));
  absl::SleepFor(kChance);
  v1::BoundaryStats s = pair.down().stats();
  EXPECT_EQ(s.inbox_entries(), 2u) << "the decoder went past max_inbox_bytes";
  EXPECT_EQ(s.inbox_bytes(), uint64_t{2} * kTensorBytes);
  EXPECT_EQ(s.frames_received(), 3u) << "the third frame is decoded, waiting for room";
  for (uint32_t mb = 0; mb < 5; ++mb) {
    std::vector<float> h_hat;
    absl::StatusOr<v1::RecvReply> r = RecvInto(pair.down(), 1, mb, &h_hat, kN);
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectExactToBf16(h[mb], h_hat);
  }
  s = pair.down().stats();
  EXPECT_EQ(s.inbox_entries(), 0u);
  EXPECT_EQ(s.inbox_bytes(), 0u);
  EXPECT_EQ(s.inbox_tensors_dropped(), 0u);
}

// A trainer that waits for a tensor behind a full inbox would wait for the decoder, and the
// decoder for it: the tensors in between are dropped instead, and their Recv says so.
TEST(BoundaryWorkerTest, RecvBehindAFullInboxDropsTheTensorsBetweenWithAnError) {
  constexpr int kN = 4;
  constexpr int64_t kTensorBytes = int64_t{kN} * kD * sizeof(float);
  WorkerOptions down;
  down.max_inbox_bytes = 2 * kTensorBytes;
  WorkerPair pair(v1::METHOD_DENSE, {}, down);
  pair.Serve();
  std::vector<std::vector<float>> h;
  const std::vector<v1::PeerMessage> frames = DenseFrames(pair.backend(), 6, kN, &h);
  for (const v1::PeerMessage& m : frames) pair.down().OnPeerMessage(m);
  ASSERT_TRUE(PollUntil([&] { return pair.down().stats().inbox_entries() == 2; }, kWait));

  std::vector<float> h_hat;
  absl::StatusOr<v1::RecvReply> r = RecvInto(pair.down(), 1, 5, &h_hat, kN);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectExactToBf16(h[5], h_hat);
  for (uint32_t mb : {0, 1}) {
    r = RecvInto(pair.down(), 1, mb, &h_hat, kN);
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectExactToBf16(h[mb], h_hat);
  }
  for (uint32_t mb : {2, 3, 4}) {
    r = RecvInto(pair.down(), 1, mb, &h_hat, kN);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
    EXPECT_TRUE(absl::StrContains(
        r.status().message(),
        absl::StrCat("boundary 7: forward tensor of step 1 microbatch ", mb, ": dropped")))
        << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(),
                                  absl::StrCat("limit of ", 2 * kTensorBytes, " bytes")))
        << r.status();
  }
  const v1::BoundaryStats s = pair.down().stats();
  EXPECT_EQ(s.inbox_tensors_dropped(), 3u);
  EXPECT_EQ(s.inbox_entries(), 0u);
  EXPECT_EQ(s.inbox_bytes(), 0u);
}

// A frame that passes the engine's checks but decodes to Inf (an int8 scale at the bf16 maximum)
// never reaches the trainer: its Recv fails, naming the tensor, and it is counted.
TEST(BoundaryWorkerTest, FrameThatDecodesToInfIsRefused) {
  WorkerPair pair(v1::METHOD_FIXED);
  pair.Connect();
  constexpr int kN = 3;
  const std::vector<float> h = CrossForward(pair, 1, 0, kN);

  // The backward frame of (1, 0), built by engines of the same config and seed (the same U).
  std::unique_ptr<Engine> up =
      Engine::Create(Config(v1::METHOD_FIXED, v1::ROLE_UPSTREAM), pair.backend()).value();
  std::unique_ptr<Engine> down =
      Engine::Create(Config(v1::METHOD_FIXED, v1::ROLE_DOWNSTREAM), pair.backend()).value();
  absl::StatusOr<std::vector<v1::PeerMessage>> fwd =
      up->Encode(1, 0, F32(h, kN), nullptr, Engine::FiniteCheck::kCheck);
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  std::vector<float> decoded(kN * kD);
  std::vector<v1::PeerMessage> replies;
  ASSERT_TRUE(
      down->Decode(fwd->back().frame(), Tensor::F32(decoded.data(), kN, kD), &replies).ok());
  const std::vector<float> g = Random(kN * kD, 2);
  absl::StatusOr<std::vector<v1::PeerMessage>> back =
      down->Encode(1, 0, F32(g, kN), nullptr, Engine::FiniteCheck::kCheck);
  ASSERT_TRUE(back.ok()) << back.status();
  v1::PeerMessage bad = back->back();
  v1::Frame* f = bad.mutable_frame();
  ASSERT_EQ(f->codec(), v1::CODEC_INT8);
  for (size_t i = 0; i < f->scales().size(); i += 2) {  // 0x7f7f: the largest finite bf16
    (*f->mutable_scales())[i] = static_cast<char>(0x7f);
    (*f->mutable_scales())[i + 1] = static_cast<char>(0x7f);
  }
  for (char& c : *f->mutable_payload()) c = 127;
  f->set_checksum(FrameChecksum(*f));
  pair.up().OnPeerMessage(bad);

  std::vector<float> dh;
  absl::StatusOr<v1::RecvReply> r = RecvInto(pair.up(), 1, 0, &dh, kN);
  // Corrupt data, not the caller's mistake.
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_TRUE(
      absl::StrContains(r.status().message(), "boundary 7: backward tensor of step 1 microbatch 0"))
      << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "non-finite")) << r.status();
  for (float v : dh) ASSERT_EQ(v, kSentinel) << "the trainer's buffer was written";
  EXPECT_EQ(pair.up().stats().frames_decoded_nonfinite(), 1u);
  EXPECT_EQ(pair.up().stats().inbox_entries(), 0u);
}

// A frame held for a dictionary version that never comes fails after max_parked_time, saying
// which version it waited for, instead of leaving its Recv to time out.
TEST(BoundaryWorkerTest, FrameHeldForADictionaryThatNeverComesFails) {
  WorkerOptions down;
  down.max_parked_time = absl::Milliseconds(300);
  WorkerPair pair(v1::METHOD_MAPL, {}, down);
  pair.Serve();
  std::unique_ptr<Engine> up =
      Engine::Create(Config(v1::METHOD_MAPL, v1::ROLE_UPSTREAM), pair.backend()).value();
  constexpr int kN = 2;
  const std::vector<float> h = Random(kN * kD, 1);
  const std::vector<int32_t> tokens = Tokens(kN, 1);
  absl::StatusOr<std::vector<v1::PeerMessage>> out =
      up->Encode(1, 0, F32(h, kN), tokens.data(), Engine::FiniteCheck::kCheck);
  ASSERT_TRUE(out.ok()) << out.status();
  v1::PeerMessage m = out->back();
  m.mutable_frame()->set_dict_version(5);  // a version a snapshot would bring (not checksummed)
  const absl::Time sent = absl::Now();
  pair.down().OnPeerMessage(m);

  std::vector<float> h_hat;
  absl::StatusOr<v1::RecvReply> r = RecvInto(pair.down(), 1, 0, &h_hat, kN);
  const absl::Duration waited = absl::Now() - sent;
  // Transient (a slow or broken link), so retryable: UNAVAILABLE.
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_TRUE(
      absl::StrContains(r.status().message(), "boundary 7: forward tensor of step 1 microbatch 0"))
      << r.status();
  EXPECT_TRUE(
      absl::StrContains(r.status().message(), "dictionary version 5 it needs never arrived"))
      << r.status();
  EXPECT_GE(waited, absl::Milliseconds(250)) << "failed at once: the frame was not held";
  EXPECT_LT(waited, kWait);
  EXPECT_EQ(pair.down().stats().held_frames_expired(), 1u);
}

// ---- Step ----

TEST(BoundaryWorkerTest, StepDropsUnreceivedTensorsOfTheClosedStep) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 3;
  const std::vector<float> h = Random(kN * kD, 1);
  ASSERT_TRUE(pair.up().Send(1, 0, F32(h, kN), nullptr, false).ok());
  ASSERT_TRUE(pair.up().Send(1, 1, F32(h, kN), nullptr, false).ok());
  ASSERT_TRUE(pair.up().Send(2, 0, F32(h, kN), nullptr, false).ok());
  ASSERT_TRUE(pair.up().Send(2, 1, F32(h, kN), nullptr, false).ok());
  std::vector<float> h_hat;
  ASSERT_TRUE(RecvInto(pair.down(), 1, 0, &h_hat, kN).ok());
  // Frames are decoded in order: once (2, 0) is here, (1, 1) waits in the inbox.
  ASSERT_TRUE(RecvInto(pair.down(), 2, 0, &h_hat, kN).ok());

  v1::BoundaryStats down_stats, up_stats;
  ASSERT_TRUE(PollUntil([&] { return pair.down().stats().inbox_entries() == 2; }, kWait));
  ASSERT_TRUE(StepOf(pair.down(), 1, &down_stats).ok());
  ASSERT_TRUE(StepOf(pair.up(), 1, &up_stats).ok());
  EXPECT_EQ(down_stats.steps(), 1u);
  // (1, 1) is gone, (2, 1) waits.
  EXPECT_EQ(down_stats.inbox_entries(), 1u);
  EXPECT_EQ(down_stats.inbox_bytes(), uint64_t{kN} * kD * sizeof(float));

  const absl::Duration timeout = absl::Milliseconds(300);
  std::vector<float> into(kN * kD);
  absl::StatusOr<v1::RecvReply> r =
      pair.down().Recv(1, 1, Tensor::F32(into.data(), kN, kD), absl::Now() + timeout, timeout, {});
  // At once, saying so, rather than by the deadline.
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition)
      << "a tensor of the closed step was still served: " << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "was already closed by Step(1)"))
      << r.status();
  // A later step's tensor stays.
  r = RecvInto(pair.down(), 2, 1, &h_hat, kN);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectExactToBf16(h, h_hat);

  // A retried Step of the closed step is OK and closes nothing again.
  ASSERT_TRUE(StepOf(pair.down(), 1, &down_stats).ok());
  ASSERT_TRUE(StepOf(pair.up(), 1, &up_stats).ok());
  EXPECT_EQ(down_stats.steps(), 1u);
  EXPECT_EQ(up_stats.steps(), 1u);
  // And the step after it closes as usual.
  ASSERT_TRUE(StepOf(pair.down(), 2, &down_stats).ok());
  EXPECT_EQ(down_stats.steps(), 2u);
}

// ---- Stop ----

TEST(BoundaryWorkerTest, StopWakesWaitersWithUnavailable) {
  WorkerPair pair(v1::METHOD_MAPL);
  pair.Connect();
  std::vector<float> down_into(kD), up_into(kD);
  Async<absl::StatusOr<v1::RecvReply>> down_recv([&] {
    return pair.down().Recv(5, 0, Tensor::F32(down_into.data(), 1, kD), absl::Now() + kWait, kWait,
                            {});
  });
  Async<absl::StatusOr<v1::RecvReply>> up_recv([&] {
    return pair.up().Recv(5, 0, Tensor::F32(up_into.data(), 1, kD), absl::Now() + kWait, kWait, {});
  });
  // METHOD_MAPL: the upstream's Step waits for the downstream's learning signal, which never
  // comes (the downstream does not step).
  v1::BoundaryStats stats;
  Async<absl::Status> step([&] { return StepOf(pair.up(), 1, &stats); });
  EXPECT_FALSE(step.Wait(kChance)) << step.result();
  EXPECT_FALSE(down_recv.done());
  EXPECT_FALSE(up_recv.done());

  pair.StopWorkers();
  ASSERT_TRUE(step.Wait(kWait));
  ASSERT_TRUE(down_recv.Wait(kWait));
  ASSERT_TRUE(up_recv.Wait(kWait));
  EXPECT_EQ(step.result().code(), absl::StatusCode::kUnavailable) << step.result();
  EXPECT_EQ(down_recv.result().status().code(), absl::StatusCode::kUnavailable)
      << down_recv.result().status();
  EXPECT_EQ(up_recv.result().status().code(), absl::StatusCode::kUnavailable)
      << up_recv.result().status();
  EXPECT_TRUE(absl::StrContains(down_recv.result().status().message(), "shutting down"))
      << down_recv.result().status();

  const std::vector<float> h = Random(2 * kD, 1);
  const std::vector<int32_t> tokens = Tokens(2, 1);
  absl::StatusOr<v1::SendReply> r = pair.up().Send(6, 0, F32(h, 2), tokens.data(), false);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  r = pair.down().Send(6, 0, F32(h, 2), nullptr, true);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  pair.StopWorkers();  // idempotent
}

// ---- self-describing frames ----

// Recv with the test's deadline, into `into` (capacity rows) and `ids` (ids_capacity), with an
// expected shape.
absl::StatusOr<v1::RecvReply> RecvWith(BoundaryWorker& w, uint64_t step, uint32_t mb,
                                       std::vector<float>* into, int64_t capacity,
                                       std::vector<int32_t>* ids, int64_t ids_capacity,
                                       std::vector<uint32_t> expect_shape = {}) {
  into->assign(static_cast<size_t>(capacity) * kD, kSentinel);
  RecvOptions options;
  if (ids != nullptr) {
    ids->assign(static_cast<size_t>(ids_capacity), -1);
    options.token_ids = ids->data();
    options.token_ids_capacity = ids_capacity;
  }
  options.expect_shape = std::move(expect_shape);
  return w.Recv(step, mb, Tensor::F32(into->data(), capacity, kD), absl::Now() + kWait, kWait, {},
                options);
}

std::vector<uint32_t> ShapeOf(const v1::RecvReply& r) {
  return std::vector<uint32_t>(r.shape().begin(), r.shape().end());
}

// The shape and dtype the upstream trainer handed in, and its token ids (optional with
// METHOD_FIXED), reach the downstream's Recv; a backward without a shape arrives as [n, d].
TEST(BoundaryWorkerTest, ShapeDtypeAndTokenIdsTravelWithTheFrame) {
  WorkerPair pair(v1::METHOD_FIXED);
  pair.Connect();
  constexpr int kN = 12;
  const std::vector<float> h = Random(kN * kD, 1);
  const std::vector<bf16_t> h16 = ToBf16(h);
  const std::vector<int32_t> tokens = Tokens(kN, 1);
  SendOptions send;
  send.shape = {2, 6, kD};
  absl::StatusOr<v1::SendReply> sent =
      pair.up().Send(1, 0, ConstTensor::BF16(h16.data(), kN, kD), tokens.data(), false,
                     absl::InfiniteFuture(), send);
  ASSERT_TRUE(sent.ok()) << sent.status();
  std::vector<float> h_hat;
  std::vector<int32_t> ids;
  absl::StatusOr<v1::RecvReply> got =
      RecvWith(pair.down(), 1, 0, &h_hat, kN + 4, &ids, kN + 4, {2, 6, kD});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->rows(), static_cast<uint32_t>(kN));
  EXPECT_EQ(ShapeOf(*got), (std::vector<uint32_t>{2, 6, kD}));
  EXPECT_EQ(got->dtype(), v1::DTYPE_BF16);
  ASSERT_TRUE(got->has_token_ids());
  for (int i = 0; i < kN; ++i) EXPECT_EQ(ids[i], tokens[i]) << "id " << i;
  EXPECT_EQ(ids[kN], -1) << "written past the ids that came";

  // A forward without ids or shape: [n, d], f32, no ids (the ids' buffer is left alone).
  ASSERT_TRUE(pair.up().Send(1, 1, F32(h, kN), nullptr, false).ok());
  got = RecvWith(pair.down(), 1, 1, &h_hat, kN, &ids, kN);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(ShapeOf(*got), (std::vector<uint32_t>{kN, kD}));
  EXPECT_EQ(got->dtype(), v1::DTYPE_F32);
  EXPECT_FALSE(got->has_token_ids());
  EXPECT_EQ(ids[0], -1);

  // The gradient's shape and dtype reach the upstream the same way.
  const std::vector<float> g = Random(kN * kD, 2);
  SendOptions back;
  back.shape = {3, 4, kD};
  ASSERT_TRUE(
      pair.down().Send(1, 0, F32(g, kN), nullptr, false, absl::InfiniteFuture(), back).ok());
  std::vector<float> dh;
  got = RecvWith(pair.up(), 1, 0, &dh, kN, nullptr, 0);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(ShapeOf(*got), (std::vector<uint32_t>{3, 4, kD}));
  EXPECT_EQ(got->dtype(), v1::DTYPE_F32);
  EXPECT_FALSE(got->has_token_ids());
}

// A shape that does not describe the tensor is the caller's mistake, said before the tensor is
// taken (nothing is queued: the key can still be sent).
TEST(BoundaryWorkerTest, SendWithAShapeThatDoesNotFitIsInvalidArgument) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 6;
  const std::vector<float> h = Random(kN * kD, 1);
  struct Case {
    std::vector<uint32_t> shape;
    const char* says;
  };
  const std::vector<Case> cases = {
      {{2, 3, kD + 1}, "must end in the hidden size d = 64"},
      {{4, 2, kD}, "multiply to 8, but the tensor has 6 rows"},
      {{1, 1, 1, 1, 1, 1, 1, 6, kD}, "has 9 dimensions; it takes 1 to 8"},
      {{kD}, "multiply to 1, but the tensor has 6 rows"},
  };
  for (const Case& c : cases) {
    SendOptions o;
    o.shape = c.shape;
    absl::StatusOr<v1::SendReply> r =
        pair.up().Send(1, 0, F32(h, kN), nullptr, false, absl::InfiniteFuture(), o);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), c.says)) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), ShapeString(c.shape))) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), "a tensor of (6, 64)")) << r.status();
  }
  SendOptions o;
  o.shape = {3, 2, kD};
  EXPECT_TRUE(pair.up().Send(1, 0, F32(h, kN), nullptr, false, absl::InfiniteFuture(), o).ok());
}

// The wrong expected shape, or too small a buffer for the ids, leaves the tensor in the inbox for a
// Recv that fits.
TEST(BoundaryWorkerTest, RecvExpectingAnotherShapeOrWithTooFewIdsLeavesTheTensor) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 8;
  const std::vector<float> h = Random(kN * kD, 1);
  const std::vector<int32_t> tokens = Tokens(kN, 1);
  SendOptions send;
  send.shape = {2, 4, kD};
  ASSERT_TRUE(
      pair.up().Send(1, 0, F32(h, kN), tokens.data(), false, absl::InfiniteFuture(), send).ok());
  std::vector<float> h_hat;
  std::vector<int32_t> ids;
  absl::StatusOr<v1::RecvReply> r = RecvWith(pair.down(), 1, 0, &h_hat, kN, &ids, kN, {kN, kD});
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(
      absl::StrContains(r.status().message(), "has shape [2, 4, 64], but the Recv expects [8, 64]"))
      << r.status();
  for (float v : h_hat) ASSERT_EQ(v, kSentinel) << "a refused Recv wrote into `into`";
  r = RecvWith(pair.down(), 1, 0, &h_hat, kN, &ids, kN - 1);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(
      absl::StrContains(r.status().message(), "came with 8 token ids; token_ids_into holds only 7"))
      << r.status();
  for (int32_t v : ids) ASSERT_EQ(v, -1) << "a refused Recv wrote the ids";
  EXPECT_EQ(pair.down().stats().inbox_entries(), 1u);
  r = RecvWith(pair.down(), 1, 0, &h_hat, kN, &ids, kN, {2, 4, kD});
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectExactToBf16(h, h_hat);
  EXPECT_EQ(ids, tokens);
}

// A frame whose shape contradicts its tokens (or whose dtype is no tensor dtype) is corrupt: it
// is rejected and counted, never decoded, and its Recv says so (DATA_LOSS).
TEST(BoundaryWorkerTest, FrameWithAContradictoryShapeIsRejectedAsDataLoss) {
  WorkerPair pair(v1::METHOD_FIXED);
  pair.Serve();
  std::unique_ptr<Engine> up =
      Engine::Create(Config(v1::METHOD_FIXED, v1::ROLE_UPSTREAM), pair.backend()).value();
  constexpr int kN = 6;
  const std::vector<float> h = Random(kN * kD, 1);
  for (uint32_t mb = 0; mb < 3; ++mb) {
    absl::StatusOr<std::vector<v1::PeerMessage>> out =
        up->Encode(1, mb, F32(h, kN), nullptr, Engine::FiniteCheck::kCheck);
    ASSERT_TRUE(out.ok()) << out.status();
    v1::PeerMessage m = out->back();
    v1::Frame* f = m.mutable_frame();
    if (mb == 0) {
      for (uint32_t v : {2u, 4u, static_cast<uint32_t>(kD)}) f->add_shape(v);  // 8 rows, not 6
    } else if (mb == 1) {
      for (uint32_t v : {2u, 3u, 32u}) f->add_shape(v);  // not d
    } else {
      f->set_dtype(v1::DTYPE_I32);
    }
    pair.down().OnPeerMessage(m);
  }
  for (uint32_t mb = 0; mb < 3; ++mb) {
    std::vector<float> h_hat;
    absl::StatusOr<v1::RecvReply> r = RecvInto(pair.down(), 1, mb, &h_hat, kN);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), "corrupt")) << r.status();
    for (float v : h_hat) ASSERT_EQ(v, kSentinel) << "a corrupt frame was decoded";
  }
  EXPECT_EQ(pair.down().stats().frames_rejected(), 3u);
  EXPECT_EQ(pair.down().stats().frames_received(), 0u);
}

// ---- evaluation traffic ----

// Runs `steps` steps of kMicrobatches training microbatches (forward, backward) on a METHOD_MAPL
// pair with CODEC_RVQ (the fit in step 1, an update in step 2); with `evaluation`, each step
// also sends kEvaluation evaluation forwards of other data, which the downstream receives.
// Returns the learned state of (upstream, downstream), without the time it was taken.
std::pair<v1::BoundaryState, v1::BoundaryState> TrainWithEvaluation(bool evaluation) {
  constexpr int kSteps = 2, kMicrobatches = 4, kEvaluation = 3, kN = 256;
  WorkerPair pair(v1::METHOD_MAPL);
  pair.Connect();
  for (uint64_t step = 1; step <= kSteps; ++step) {
    for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
      const uint64_t seed = step * 100 + mb;
      const std::vector<float> h = Random(kN * kD, seed);
      const std::vector<int32_t> tokens = Tokens(kN, seed);
      EXPECT_TRUE(pair.up().Send(step, mb, F32(h, kN), tokens.data(), false).ok());
      if (evaluation && mb == 1) {
        // Evaluation forwards between training ones, of data the training never sees.
        for (uint32_t e = 0; e < kEvaluation; ++e) {
          const std::vector<float> x = Random(kN * kD, 7000 + step * 10 + e);
          const std::vector<int32_t> ids = Tokens(kN, 7000 + e);
          SendOptions o;
          o.evaluation = true;
          absl::StatusOr<v1::SendReply> r = pair.up().Send(step, 100 + e, F32(x, kN), ids.data(),
                                                           false, absl::InfiniteFuture(), o);
          EXPECT_TRUE(r.ok()) << r.status();
          std::vector<float> x_hat;
          absl::StatusOr<v1::RecvReply> got = RecvInto(pair.down(), step, 100 + e, &x_hat, kN);
          EXPECT_TRUE(got.ok()) << got.status();
          EXPECT_GT(FiniteNorm2(x_hat, x_hat.size()), 0.0);
          // An evaluation forward takes no backward, said at once.
          absl::StatusOr<v1::SendReply> back =
              pair.down().Send(step, 100 + e, F32(x, kN), nullptr, false);
          EXPECT_EQ(back.status().code(), absl::StatusCode::kFailedPrecondition) << back.status();
          EXPECT_TRUE(absl::StrContains(back.status().message(), "evaluation")) << back.status();
        }
      }
      std::vector<float> h_hat;
      EXPECT_TRUE(RecvInto(pair.down(), step, mb, &h_hat, kN).ok());
      const std::vector<float> g = Random(kN * kD, seed + 7);
      EXPECT_TRUE(pair.down().Send(step, mb, F32(g, kN), nullptr, false).ok());
      std::vector<float> dh;
      EXPECT_TRUE(RecvInto(pair.up(), step, mb, &dh, kN).ok());
    }
    v1::BoundaryStats down_stats, up_stats;
    absl::Status s = StepOf(pair.down(), step, &down_stats);
    EXPECT_TRUE(s.ok()) << s;
    s = StepOf(pair.up(), step, &up_stats);
    EXPECT_TRUE(s.ok()) << s;
    // Counted as usual.
    const uint64_t frames = step * (kMicrobatches + (evaluation ? kEvaluation : 0));
    EXPECT_EQ(up_stats.frames_sent(), frames);
    EXPECT_EQ(down_stats.frames_received(), frames);
  }
  v1::BoundaryState up = pair.up().SaveState(), down = pair.down().SaveState();
  up.clear_unix_micros();
  down.clear_unix_micros();
  return {up, down};
}

// Evaluation forwards leave every learned table exactly as a run without them: the published
// dictionary (and its checksum), the learner copy, the projector's and the codebooks' state,
// the anchors.
TEST(BoundaryWorkerTest, EvaluationFramesTrainNothing) {
  const auto [up, down] = TrainWithEvaluation(false);
  const auto [up_eval, down_eval] = TrainWithEvaluation(true);
  ASSERT_TRUE(up.has_published());
  ASSERT_TRUE(up.has_codebooks()) << "the RVQ codebooks were not fitted: the test is too short";
  EXPECT_GT(up.published().version(), 0u);
  EXPECT_EQ(up_eval.published().version(), up.published().version());
  EXPECT_EQ(up_eval.published().checksum(), up.published().checksum());
  EXPECT_EQ(up_eval.SerializeAsString(), up.SerializeAsString())
      << "the upstream learned from evaluation frames";
  ASSERT_TRUE(down.has_anchors());
  EXPECT_EQ(down_eval.SerializeAsString(), down.SerializeAsString())
      << "the downstream learned from evaluation frames";
}

// ---- errors where and when they happen ----

// An encode failure after a Send that did not wait: the peer's Recv of the tensor fails at once
// (ABORTED, with the reason); this side's next Send and next Step each return it once, with its
// code; after that both work.
TEST(BoundaryWorkerTest, BackgroundEncodeFailureReachesThePeerTheNextSendAndTheNextStep) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 4;
  const std::vector<float> h = CrossForward(pair, 1, 0, kN);
  std::vector<float> buffer;
  // The downstream never decoded a forward of (1, 5): its encoder refuses the gradient, after
  // this Send returned.
  ASSERT_TRUE(pair.down().Send(1, 5, F32(h, kN), nullptr, false).ok());

  const absl::Time start = absl::Now();
  absl::StatusOr<v1::RecvReply> r = RecvInto(pair.up(), 1, 5, &buffer, kN);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAborted) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "backward tensor of step 1 microbatch 5"))
      << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "failed to encode it")) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "no forward of (step 1, microbatch 5)"))
      << r.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10)) << "the Recv waited instead of failing";

  ASSERT_TRUE(pair.down().Flush(absl::Now() + kWait));
  absl::StatusOr<v1::SendReply> s = pair.down().Send(1, 0, F32(h, kN), nullptr, false);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition) << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(),
                                "an earlier Send failed in the background: boundary 7: backward "
                                "tensor of step 1 microbatch 5"))
      << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), "was not taken")) << s.status();
  // Once: the same Send again is taken.
  s = pair.down().Send(1, 0, F32(h, kN), nullptr, false);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE(RecvInto(pair.up(), 1, 0, &buffer, kN).ok());

  v1::BoundaryStats stats;
  absl::Status step = StepOf(pair.down(), 1, &stats);
  EXPECT_EQ(step.code(), absl::StatusCode::kFailedPrecondition) << step;
  EXPECT_TRUE(absl::StrContains(step.message(), "an earlier Send failed in the background"))
      << step;
  step = StepOf(pair.down(), 1, &stats);
  EXPECT_TRUE(step.ok()) << step;
  EXPECT_EQ(stats.steps(), 1u);
}

// A Recv of a tensor that can no longer come fails at once, saying why: one already received,
// one of a step closed while the Recv waited.
TEST(BoundaryWorkerTest, RecvOfATensorAlreadyReceivedOrOfAClosedStepFailsAtOnce) {
  WorkerPair pair(v1::METHOD_DENSE);
  pair.Connect();
  constexpr int kN = 3;
  CrossForward(pair, 1, 0, kN);
  std::vector<float> h_hat;
  absl::Time start = absl::Now();
  absl::StatusOr<v1::RecvReply> r = RecvInto(pair.down(), 1, 0, &h_hat, kN);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "was already received")) << r.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));

  // Waiting for (1, 1), which never comes; Step(1) closes the step meanwhile.
  Async<absl::StatusOr<v1::RecvReply>> waiting([&] {
    std::vector<float> into;
    return RecvInto(pair.down(), 1, 1, &into, kN);
  });
  EXPECT_FALSE(waiting.Wait(kChance));
  start = absl::Now();
  v1::BoundaryStats stats;
  ASSERT_TRUE(StepOf(pair.down(), 1, &stats).ok());
  ASSERT_TRUE(WaitOrStop(waiting, pair));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(waiting.result().status().code(), absl::StatusCode::kFailedPrecondition)
      << waiting.result().status();
  EXPECT_TRUE(absl::StrContains(waiting.result().status().message(), "already closed by Step(1)"))
      << waiting.result().status();
}

}  // namespace
}  // namespace mapl
