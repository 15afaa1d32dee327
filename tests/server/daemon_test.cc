// Daemon-level tests: real mapl::Daemons in this process, linked over loopback gRPC, driven
// through the real client (client/mapl_client.h, shared memory included) or the Daemon's own
// methods, with metrics read over real HTTP:
//   - the metrics endpoint's content after traffic in both directions and a step;
//   - a downstream that loses a delta asks for exactly one snapshot and follows the one it gets
//     (the upstream is this test, dialing with its own PeerLink);
//   - a send-rate cap holds on the wire;
//   - a downstream that dials its listening upstream (BoundaryConfig.dial) carries both
//     directions;
//   - a boundary with transport: TRANSPORT_UCX carries both directions and a step (UCX builds);
//   - three stages step in order, including a Step retried on the middle stage after a timeout;
//   - every deploy/examples config starts and shuts down.
// Waits poll with a deadline; nothing sleeps to synchronise.
#include "server/daemon.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/mapl_client.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "server/config.h"
#include "server/dictionary.h"
#include "server/engine.h"
#include "server/transport/network_policy.h"
#include "server/transport/peer_link.h"
#include "server/upstream_engine.h"
#include "tests/server/daemon_stages.h"
#include "tests/server/http_get.h"

#ifndef MAPL_SOURCE_DIR
#error "MAPL_SOURCE_DIR must name the repository root (tests/server/CMakeLists.txt sets it)"
#endif

namespace mapl {
namespace {

using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

namespace mc = ::mapl::client;
using LabelMap = std::map<std::string, std::string>;

using test::Loopback;
using test::Shape;
using test::Side;
using test::StageConfig;
using test::StartStage;
using test::TempDir;

// ---- plumbing ----

// Calls `done` until it returns true or `timeout` passes; returns its last answer. The short pause
// between calls only spaces the polls out.
bool PollUntil(const std::function<bool()>& done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    if (done()) return true;
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(2));
  }
}

// The record of boundary `id` as the daemon reports it now.
v1::BoundaryStats BoundaryOf(Daemon& daemon, uint32_t id) {
  absl::StatusOr<v1::StatsReply> reply = daemon.Stats(v1::StatsRequest());
  EXPECT_TRUE(reply.ok()) << reply.status();
  if (reply.ok()) {
    for (const v1::BoundaryStats& b : reply->boundaries()) {
      if (b.id() == id) return b;
    }
  }
  ADD_FAILURE() << "stage " << daemon.config().stage() << " reports no boundary " << id;
  return v1::BoundaryStats();
}

// Writes an (n, d) f32 activation at byte `offset` of buffer `buffer`, different for each `seed`,
// and n token ids in [0, vocab) right after it.
std::pair<mc::TensorRef, mc::TensorRef> FillActivation(mc::Client* c, uint32_t buffer,
                                                       uint64_t offset, uint32_t n,
                                                       const Shape& shape, uint64_t seed) {
  char* base = static_cast<char*>(c->data(buffer));
  float* h = reinterpret_cast<float*>(base + offset);
  for (uint32_t i = 0; i < n * shape.d; ++i) {
    h[i] = 0.5f * std::sin(0.37f * static_cast<float>(i) + static_cast<float>(seed));
  }
  const uint64_t ids_at = offset + uint64_t{n} * shape.d * 4;
  int32_t* ids = reinterpret_cast<int32_t*>(base + ids_at);
  for (uint32_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((7 * i + seed) % shape.vocab);
  return {mc::TensorRef{buffer, offset, n, shape.d, mc::DType::kF32},
          mc::TensorRef{buffer, ids_at, n, 1, mc::DType::kI32}};
}

// Through the boundary 0 of two started daemons: an activation forward and its gradient
// backward, then a step on both sides, until the step's delta is applied downstream and
// everything sequenced is acknowledged both ways.
void CrossForwardBackwardAndStep(Daemon& up, Daemon& down, const Shape& shape) {
  std::unique_ptr<mc::Client> up_client, down_client;
  ASSERT_TRUE(mc::Client::Connect(up.config().local_socket(), "up", 5000, &up_client).ok());
  ASSERT_TRUE(mc::Client::Connect(down.config().local_socket(), "down", 5000, &down_client).ok());
  constexpr uint32_t kRows = 8;
  auto [h, ids] = FillActivation(up_client.get(), 0, 0, kRows, shape, 1);
  mc::SendResult sent;
  mc::Status s = up_client->Send(0, mc::Direction::kForward, 1, 0, h, ids, &sent,
                                 /*wait_encoded=*/true);
  ASSERT_TRUE(s.ok()) << s.message;
  mc::RecvResult r;
  s = down_client->Recv(0, mc::Direction::kForward, 1, 0,
                        mc::TensorRef{1, 0, shape.max_tokens, shape.d, mc::DType::kF32}, 0, &r);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_EQ(r.rows, kRows);
  // The gradient: the decoded activation itself, scaled down (any finite tensor will do).
  float* g = static_cast<float*>(down_client->data(1));
  for (uint32_t i = 0; i < kRows * shape.d; ++i) g[i] *= 0.1f;
  s = down_client->Send(0, mc::Direction::kBackward, 1, 0,
                        mc::TensorRef{1, 0, kRows, shape.d, mc::DType::kF32}, std::nullopt, &sent,
                        /*wait_encoded=*/true);
  ASSERT_TRUE(s.ok()) << s.message;
  s = up_client->Recv(0, mc::Direction::kBackward, 1, 0,
                      mc::TensorRef{1, 0, shape.max_tokens, shape.d, mc::DType::kF32}, 0, &r);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_EQ(r.rows, kRows);
  const float* grad = static_cast<const float*>(up_client->data(1));
  for (uint32_t i = 0; i < kRows * shape.d; ++i) ASSERT_TRUE(std::isfinite(grad[i])) << i;
  mc::StepResult stepped;
  s = down_client->Step(1, 10000, &stepped);
  ASSERT_TRUE(s.ok()) << s.message;
  s = up_client->Step(1, 10000, &stepped);
  ASSERT_TRUE(s.ok()) << s.message;
  // The step's delta applied downstream, and everything sequenced acknowledged both ways.
  ASSERT_TRUE(PollUntil(
      [&] {
        const v1::BoundaryStats u = BoundaryOf(up, 0), d = BoundaryOf(down, 0);
        return u.dictionary_version() > 0 && d.dictionary_version() == u.dictionary_version() &&
               u.link().last_acked_seq() == u.link().last_seq() &&
               d.link().last_acked_seq() == d.link().last_seq();
      },
      absl::Seconds(10)));
}

// ---- Prometheus over HTTP ----

// GET http://127.0.0.1:<port>/metrics: the body of a 200 reply, or an error.
absl::StatusOr<std::string> HttpGetMetrics(int port) {
  return testing_internal::HttpGet(port, "/metrics");
}

struct Sample {
  std::string name;
  LabelMap labels;
  double value = 0;
};

// One scrape in the Prometheus text format, parsed.
class Scrape {
 public:
  static absl::StatusOr<Scrape> Get(int port) {
    absl::StatusOr<std::string> body = HttpGetMetrics(port);
    if (!body.ok()) return body.status();
    Scrape s;
    s.text_ = *body;
    for (absl::string_view line : absl::StrSplit(*body, '\n')) {
      if (line.empty()) continue;
      if (absl::ConsumePrefix(&line, "# TYPE ")) {
        std::vector<std::string> parts = absl::StrSplit(line, ' ');
        if (parts.size() == 2) s.types_[parts[0]] = parts[1];
        continue;
      }
      if (line[0] == '#') continue;
      const size_t space = line.rfind(' ');
      if (space == absl::string_view::npos) {
        return absl::DataLossError(absl::StrCat("bad line: ", line));
      }
      Sample sample;
      absl::string_view series = line.substr(0, space);
      const std::string value(line.substr(space + 1));
      sample.value = value == "+Inf" ? INFINITY : std::strtod(value.c_str(), nullptr);
      const size_t brace = series.find('{');
      sample.name = std::string(series.substr(0, brace));
      if (brace != absl::string_view::npos) {
        absl::string_view labels = series.substr(brace + 1, series.size() - brace - 2);
        // name="value" pairs; our label values hold no quotes or commas.
        for (absl::string_view pair : absl::StrSplit(labels, ',', absl::SkipEmpty())) {
          const size_t eq = pair.find('=');
          if (eq == absl::string_view::npos || pair.size() < eq + 3) {
            return absl::DataLossError(absl::StrCat("bad label in: ", line));
          }
          sample.labels[std::string(pair.substr(0, eq))] =
              std::string(pair.substr(eq + 2, pair.size() - eq - 3));
        }
      }
      s.samples_.push_back(std::move(sample));
    }
    return s;
  }

  // Samples named `name` whose labels include all of `want`.
  std::vector<const Sample*> Find(const std::string& name, const LabelMap& want) const {
    std::vector<const Sample*> out;
    for (const Sample& s : samples_) {
      if (s.name != name) continue;
      bool all = true;
      for (const auto& [k, v] : want) {
        auto it = s.labels.find(k);
        all &= it != s.labels.end() && it->second == v;
      }
      if (all) out.push_back(&s);
    }
    return out;
  }
  // The value of the one sample `name` with labels including `want`; fails the test otherwise.
  double Value(const std::string& name, const LabelMap& want) const {
    std::vector<const Sample*> found = Find(name, want);
    if (found.size() != 1) {
      ADD_FAILURE() << found.size() << " samples of " << name << " with the labels asked for";
      return -1;
    }
    return found[0]->value;
  }
  // The type named by the family's # TYPE line ("" if none).
  std::string Type(const std::string& family) const {
    auto it = types_.find(family);
    return it == types_.end() ? "" : it->second;
  }
  const std::vector<Sample>& samples() const { return samples_; }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  std::vector<Sample> samples_;
  std::map<std::string, std::string> types_;
};

LabelMap With(LabelMap labels, const std::string& name, const std::string& value) {
  labels[name] = value;
  return labels;
}

// The sum over bodies of mapl_link_<dir>_<field>_total for one boundary.
double SumOverBodies(const Scrape& s, const std::string& family, const LabelMap& labels) {
  double sum = 0;
  for (const Sample* sample : s.Find(family, labels)) sum += sample->value;
  return sum;
}

// Checks one codec histogram (op "encode" or "decode") of one boundary: `count` observations,
// cumulative buckets ending at +Inf with all of them, a positive sum.
void ExpectCodecHistogram(const Scrape& s, const LabelMap& labels, const std::string& op,
                          double count) {
  const LabelMap l = With(labels, "op", op);
  EXPECT_EQ(s.Value("mapl_codec_seconds_count", l), count) << op;
  EXPECT_GT(s.Value("mapl_codec_seconds_sum", l), 0) << op;
  std::vector<std::pair<double, double>> buckets;  // (le, count)
  for (const Sample* b : s.Find("mapl_codec_seconds_bucket", l)) {
    const std::string& le = b->labels.at("le");
    buckets.emplace_back(le == "+Inf" ? INFINITY : std::strtod(le.c_str(), nullptr), b->value);
  }
  ASSERT_GE(buckets.size(), 2u) << op;
  std::sort(buckets.begin(), buckets.end());
  EXPECT_TRUE(std::isinf(buckets.back().first)) << op;
  EXPECT_EQ(buckets.back().second, count) << op;
  for (size_t i = 1; i < buckets.size(); ++i) {
    EXPECT_LE(buckets[i - 1].second, buckets[i].second) << op << " le=" << buckets[i].first;
  }
}

// ---- two daemons of boundary 0 ----

// One boundary with transport: TRANSPORT_UCX end to end: the Hello on the gRPC stream, the
// frames, deltas and acks as UCX active messages (over TCP loopback here).
TEST(DaemonUcxTest, ABoundaryOverUcxCarriesBothDirectionsAndAStep) {
  if (!kUcxBuilt) GTEST_SKIP() << "this build has no UCX (MAPL_WITH_UCX=OFF)";
  TempDir dir;
  Shape shape;
  const std::vector<std::string> ucx = {"boundaries[0].transport=TRANSPORT_UCX"};
  absl::StatusOr<std::unique_ptr<Daemon>> down = StartStage(dir, 1, {{0, false, ""}}, shape, ucx);
  ASSERT_TRUE(down.ok()) << down.status();
  absl::StatusOr<std::unique_ptr<Daemon>> up =
      StartStage(dir, 0, {{0, true, Loopback((*down)->peer_port())}}, shape, ucx);
  ASSERT_TRUE(up.ok()) << up.status();

  ASSERT_NO_FATAL_FAILURE(CrossForwardBackwardAndStep(**up, **down, shape));
  const v1::BoundaryStats u = BoundaryOf(**up, 0);
  EXPECT_EQ(u.link().data_plane(), "ucx");
  EXPECT_EQ(u.link().ucx_lanes(), "tcp/lo");
  EXPECT_EQ(u.link().ucx_foreign_dropped(), 0u);
  EXPECT_EQ(BoundaryOf(**down, 0).link().data_plane(), "ucx");

  (*up)->Shutdown(absl::Seconds(1));
  (*down)->Shutdown(absl::Seconds(1));
}

class DaemonPairTest : public ::testing::Test {
 protected:
  void StartPair(const Shape& shape, const std::vector<std::string>& up_extra = {}) {
    shape_ = shape;
    absl::StatusOr<std::unique_ptr<Daemon>> d = StartStage(dir_, 1, {{0, false, ""}}, shape);
    ASSERT_TRUE(d.ok()) << d.status();
    down_ = *std::move(d);
    d = StartStage(dir_, 0, {{0, true, Loopback(down_->peer_port())}}, shape, up_extra);
    ASSERT_TRUE(d.ok()) << d.status();
    up_ = *std::move(d);
    ASSERT_TRUE(mc::Client::Connect(up_->config().local_socket(), "up", 5000, &up_client_).ok());
    ASSERT_TRUE(
        mc::Client::Connect(down_->config().local_socket(), "down", 5000, &down_client_).ok());
  }

  void TearDown() override {
    up_client_.reset();
    down_client_.reset();
    if (up_) up_->Shutdown(absl::Seconds(1));
    if (down_) down_->Shutdown(absl::Seconds(1));
  }

  TempDir dir_;
  Shape shape_;
  std::unique_ptr<Daemon> up_, down_;
  std::unique_ptr<mc::Client> up_client_, down_client_;
};

// The health status of `service` on 127.0.0.1:port (UNKNOWN when the call fails).
HealthCheckResponse::ServingStatus Health(int port, const std::string& service) {
  std::unique_ptr<grpc::health::v1::Health::Stub> stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(Loopback(port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  // A new channel's first connection may fail under load (TSan, a busy host): wait for it
  // rather than read the failed call as a status.
  context.set_wait_for_ready(true);
  HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  if (!stub->Check(&context, request, &response).ok()) return HealthCheckResponse::UNKNOWN;
  return response.status();
}

// Polls until `service` reports `want` (or 10 s pass); returns the last status.
HealthCheckResponse::ServingStatus AwaitHealth(int port, const std::string& service,
                                               HealthCheckResponse::ServingStatus want) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  HealthCheckResponse::ServingStatus got = Health(port, service);
  while (got != want && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
    got = Health(port, service);
  }
  return got;
}

// Readiness ("") follows the links; liveness stays SERVING while the link is down (a probe must
// not restart a daemon whose peer is away); each boundary has its own service. The peer server's
// own counters reach the metrics.
TEST(DaemonHealthTest, ReadinessFollowsTheLinkAndLivenessDoesNot) {
  TempDir dir;
  Shape shape;
  absl::StatusOr<std::unique_ptr<Daemon>> down = StartStage(dir, 1, {{0, false, ""}}, shape);
  ASSERT_TRUE(down.ok()) << down.status();
  const int port = (*down)->peer_port();
  EXPECT_EQ(AwaitHealth(port, "", HealthCheckResponse::NOT_SERVING),
            HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(AwaitHealth(port, "boundary/0", HealthCheckResponse::NOT_SERVING),
            HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(port, "liveness"), HealthCheckResponse::SERVING);

  absl::StatusOr<std::unique_ptr<Daemon>> up =
      StartStage(dir, 0, {{0, true, Loopback(port)}}, shape);
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(AwaitHealth(port, "", HealthCheckResponse::SERVING), HealthCheckResponse::SERVING);
  EXPECT_EQ(AwaitHealth(port, "boundary/0", HealthCheckResponse::SERVING),
            HealthCheckResponse::SERVING);
  absl::StatusOr<std::string> metrics = HttpGetMetrics((*down)->metrics_port());
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_NE(metrics->find("mapl_peer_server_streams_accepted_total{stage=\"1\"} 1"),
            std::string::npos)
      << *metrics;

  (*up)->Shutdown(absl::Seconds(1));
  EXPECT_EQ(AwaitHealth(port, "", HealthCheckResponse::NOT_SERVING),
            HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(Health(port, "liveness"), HealthCheckResponse::SERVING);
  (*down)->Shutdown(absl::Seconds(1));
}

// A downstream that cannot be reached (behind NAT) dials its upstream (BoundaryConfig.dial): the
// upstream listens and serves the health service on its peer port, the downstream has no
// listener, and a tensor goes forward and its gradient backward, then a step's delta.
TEST(DaemonDialTest, ADownstreamThatDialsCarriesBothDirectionsThroughTheUpstreamsListener) {
  TempDir dir;
  Shape shape;
  absl::StatusOr<std::unique_ptr<Daemon>> up =
      StartStage(dir, 0, {{0, true, ""}}, shape, {"boundaries[0].dial=false"});
  ASSERT_TRUE(up.ok()) << up.status();
  const int port = (*up)->peer_port();
  ASSERT_GT(port, 0);
  EXPECT_EQ(AwaitHealth(port, "", HealthCheckResponse::NOT_SERVING),
            HealthCheckResponse::NOT_SERVING);
  absl::StatusOr<std::unique_ptr<Daemon>> down =
      StartStage(dir, 1, {{0, false, ""}}, shape,
                 {"boundaries[0].dial=true", "boundaries[0].peer_address=" + Loopback(port)});
  ASSERT_TRUE(down.ok()) << down.status();
  EXPECT_EQ((*down)->peer_port(), 0);  // Nothing listens downstream.
  EXPECT_EQ(AwaitHealth(port, "", HealthCheckResponse::SERVING), HealthCheckResponse::SERVING);
  EXPECT_EQ(Health(port, "boundary/0"), HealthCheckResponse::SERVING);

  ASSERT_NO_FATAL_FAILURE(CrossForwardBackwardAndStep(**up, **down, shape));

  // The listening upstream sees the dialer go away: not ready any more.
  (*down)->Shutdown(absl::Seconds(1));
  EXPECT_EQ(AwaitHealth(port, "", HealthCheckResponse::NOT_SERVING),
            HealthCheckResponse::NOT_SERVING);
  (*up)->Shutdown(absl::Seconds(1));
}

TEST_F(DaemonPairTest, MetricsOverHttpCountTrafficInBothDirectionsOnTheRightSide) {
  ASSERT_NO_FATAL_FAILURE(StartPair(Shape{}));
  constexpr uint32_t kMicrobatches = 3;
  uint64_t raw = 0, wire_forward = 0, wire_backward = 0;
  for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
    const uint32_t n = 8 + mb;  // different sizes, so the byte counts tell them apart
    auto [h, ids] = FillActivation(up_client_.get(), 0, 0, n, shape_, mb);
    mc::SendResult sent;
    mc::Status s = up_client_->Send(0, mc::Direction::kForward, 1, mb, h, ids, &sent,
                                    /*wait_encoded=*/true);
    ASSERT_TRUE(s.ok()) << s.message;
    wire_forward += sent.wire_bytes;
    raw += uint64_t{n} * shape_.d * 2;  // the dense-bf16 reference
    mc::RecvResult r;
    s = down_client_->Recv(0, mc::Direction::kForward, 1, mb,
                           mc::TensorRef{1, 0, shape_.max_tokens, shape_.d, mc::DType::kF32}, 0,
                           &r);
    ASSERT_TRUE(s.ok()) << s.message;
    ASSERT_EQ(r.rows, n);
    // The gradient: the decoded activation itself, scaled down (any finite tensor will do).
    float* g = static_cast<float*>(down_client_->data(1));
    for (uint32_t i = 0; i < n * shape_.d; ++i) g[i] *= 0.1f;
    s = down_client_->Send(0, mc::Direction::kBackward, 1, mb,
                           mc::TensorRef{1, 0, n, shape_.d, mc::DType::kF32}, std::nullopt, &sent,
                           /*wait_encoded=*/true);
    ASSERT_TRUE(s.ok()) << s.message;
    wire_backward += sent.wire_bytes;
    s = up_client_->Recv(0, mc::Direction::kBackward, 1, mb,
                         mc::TensorRef{1, 0, shape_.max_tokens, shape_.d, mc::DType::kF32}, 0, &r);
    ASSERT_TRUE(s.ok()) << s.message;
    ASSERT_EQ(r.rows, n);
  }
  ASSERT_GT(wire_forward, 0u);
  ASSERT_GT(wire_backward, 0u);
  mc::StepResult stepped;
  mc::Status s = down_client_->Step(1, 10000, &stepped);
  ASSERT_TRUE(s.ok()) << s.message;
  s = up_client_->Step(1, 10000, &stepped);
  ASSERT_TRUE(s.ok()) << s.message;
  // The step's delta applied downstream, and everything sequenced acknowledged both ways.
  ASSERT_TRUE(PollUntil(
      [&] {
        const v1::BoundaryStats u = BoundaryOf(*up_, 0), d = BoundaryOf(*down_, 0);
        return u.dictionary_version() > 0 && d.dictionary_version() == u.dictionary_version() &&
               u.link().last_acked_seq() == u.link().last_seq() &&
               d.link().last_acked_seq() == d.link().last_seq();
      },
      absl::Seconds(10)));

  absl::StatusOr<Scrape> up = Scrape::Get(up_->metrics_port());
  ASSERT_TRUE(up.ok()) << up.status();
  absl::StatusOr<Scrape> down = Scrape::Get(down_->metrics_port());
  ASSERT_TRUE(down.ok()) << down.status();
  const LabelMap ul = {{"stage", "0"}, {"boundary", "0"}, {"role", "upstream"}};
  const LabelMap dl = {{"stage", "1"}, {"boundary", "0"}, {"role", "downstream"}};

  // Frames: forward sent upstream and received downstream, backward the other way.
  EXPECT_EQ(up->Type("mapl_boundary_frames_sent_total"), "counter");
  EXPECT_EQ(up->Value("mapl_boundary_frames_sent_total", ul), kMicrobatches);
  EXPECT_EQ(up->Value("mapl_boundary_frames_received_total", ul), kMicrobatches);
  EXPECT_EQ(down->Value("mapl_boundary_frames_received_total", dl), kMicrobatches);
  EXPECT_EQ(down->Value("mapl_boundary_frames_sent_total", dl), kMicrobatches);
  EXPECT_EQ(up->Value("mapl_boundary_frames_rejected_total", ul), 0);
  EXPECT_EQ(down->Value("mapl_boundary_frames_rejected_total", dl), 0);
  // Bytes: raw as dense bf16 both ways; payload as the waiting Sends reported them.
  EXPECT_EQ(up->Value("mapl_boundary_raw_bytes_sent_total", ul), raw);
  EXPECT_EQ(down->Value("mapl_boundary_raw_bytes_received_total", dl), raw);
  EXPECT_EQ(down->Value("mapl_boundary_raw_bytes_sent_total", dl), raw);
  EXPECT_EQ(up->Value("mapl_boundary_raw_bytes_received_total", ul), raw);
  EXPECT_EQ(up->Value("mapl_boundary_payload_bytes_sent_total", ul), wire_forward);
  EXPECT_EQ(down->Value("mapl_boundary_payload_bytes_received_total", dl), wire_forward);
  EXPECT_EQ(down->Value("mapl_boundary_payload_bytes_sent_total", dl), wire_backward);
  EXPECT_EQ(up->Value("mapl_boundary_payload_bytes_received_total", ul), wire_backward);
  // The dictionary (METHOD_MAPL): the step's delta, sent upstream and applied downstream.
  const double dict_bytes = up->Value("mapl_boundary_dictionary_bytes_sent_total", ul);
  EXPECT_GT(dict_bytes, 0);
  EXPECT_EQ(down->Value("mapl_boundary_dictionary_bytes_received_total", dl), dict_bytes);
  EXPECT_EQ(up->Value("mapl_boundary_dictionary_version", ul),
            down->Value("mapl_boundary_dictionary_version", dl));
  EXPECT_EQ(up->Type("mapl_boundary_dictionary_version"), "gauge");
  EXPECT_EQ(down->Value("mapl_boundary_has_dictionary", dl), 1);
  EXPECT_EQ(up->Value("mapl_boundary_steps_total", ul), 1);
  EXPECT_EQ(down->Value("mapl_boundary_steps_total", dl), 1);
  EXPECT_EQ(up->Value("mapl_boundary_bad_peer_messages_total", ul), 0);
  EXPECT_EQ(down->Value("mapl_boundary_bad_peer_messages_total", dl), 0);
  EXPECT_EQ(down->Value("mapl_boundary_snapshot_requests_sent_total", dl), 0);

  // The links: per body, the totals, and the acknowledgements.
  const LabelMap uf = With(ul, "body", "frame"), df = With(dl, "body", "frame");
  EXPECT_EQ(up->Value("mapl_link_sent_messages_total", uf), kMicrobatches);
  EXPECT_EQ(down->Value("mapl_link_received_messages_total", df), kMicrobatches);
  EXPECT_EQ(down->Value("mapl_link_sent_messages_total", df), kMicrobatches);
  EXPECT_EQ(up->Value("mapl_link_received_messages_total", uf), kMicrobatches);
  // The same serialized frames on both ends.
  EXPECT_EQ(up->Value("mapl_link_sent_bytes_total", uf),
            down->Value("mapl_link_received_bytes_total", df));
  EXPECT_GT(up->Value("mapl_link_sent_bytes_total", uf), wire_forward);
  EXPECT_EQ(up->Value("mapl_link_sent_messages_total", With(ul, "body", "dictionary_delta")), 1);
  EXPECT_EQ(down->Value("mapl_link_received_messages_total", With(dl, "body", "dictionary_delta")),
            1);
  EXPECT_EQ(down->Value("mapl_link_sent_messages_total", With(dl, "body", "learning_signal")), 1);
  EXPECT_EQ(up->Value("mapl_link_received_messages_total", With(ul, "body", "learning_signal")), 1);
  const std::vector<std::pair<const Scrape*, LabelMap>> sides = {{&*up, ul}, {&*down, dl}};
  for (const auto& [scrape, labels] : sides) {
    const std::string who = labels.at("role");
    EXPECT_EQ(scrape->Value("mapl_link_connected", labels), 1) << who;
    EXPECT_EQ(scrape->Value("mapl_link_messages_sent_total", labels),
              SumOverBodies(*scrape, "mapl_link_sent_messages_total", labels))
        << who;
    EXPECT_EQ(scrape->Value("mapl_link_bytes_sent_total", labels),
              SumOverBodies(*scrape, "mapl_link_sent_bytes_total", labels))
        << who;
    EXPECT_EQ(scrape->Value("mapl_link_messages_received_total", labels),
              SumOverBodies(*scrape, "mapl_link_received_messages_total", labels))
        << who;
    EXPECT_GE(scrape->Value("mapl_link_messages_sent_total", labels), kMicrobatches + 1) << who;
    EXPECT_GT(scrape->Value("mapl_link_acks_sent_total", labels), 0) << who;
    EXPECT_GT(scrape->Value("mapl_link_acks_received_total", labels), 0) << who;
    EXPECT_EQ(scrape->Value("mapl_link_last_acked_seq", labels),
              scrape->Value("mapl_link_last_seq", labels))
        << who;
    EXPECT_EQ(scrape->Value("mapl_link_connections_total", labels), 1) << who;
  }
  // Encode and decode times, on each side.
  ExpectCodecHistogram(*up, ul, "encode", kMicrobatches);
  ExpectCodecHistogram(*up, ul, "decode", kMicrobatches);
  ExpectCodecHistogram(*down, dl, "encode", kMicrobatches);
  ExpectCodecHistogram(*down, dl, "decode", kMicrobatches);
  EXPECT_EQ(up->Type("mapl_codec_seconds"), "histogram");
  // Every mapl series names its daemon's stage.
  for (const auto& [scrape, labels] : sides) {
    const std::string& stage = labels.at("stage");
    int series = 0;
    for (const Sample& sample : scrape->samples()) {
      if (sample.name.rfind("mapl_", 0) != 0) continue;
      ++series;
      auto it = sample.labels.find("stage");
      ASSERT_NE(it, sample.labels.end()) << sample.name;
      EXPECT_EQ(it->second, stage) << sample.name;
    }
    EXPECT_GT(series, 50) << scrape->text();
  }
}

// A fake upstream of boundary 0: a PeerLink dialed by the test, whose handler keeps what the
// downstream daemon sends.
class FakeUpstream {
 public:
  // Dials the downstream daemon at `port` as the upstream of its boundary `config`.
  absl::Status Dial(int port, const v1::BoundaryConfig& config) {
    PeerLinkOptions o;
    o.fingerprint = BoundaryFingerprintOf(config);
    o.boundary = 0;
    o.stage = 0;
    o.address = Loopback(port);
    o.auth_token = "t";
    o.connect_timeout = absl::Seconds(10);
    absl::StatusOr<std::unique_ptr<PeerLink>> link = PeerLink::Dial(o, [this](v1::PeerMessage m) {
      absl::MutexLock l(&mu_);
      received_.push_back(std::move(m));
    });
    if (!link.ok()) return link.status();
    link_ = *std::move(link);
    return link_->WaitConnected(absl::Seconds(10));
  }
  absl::Status Send(v1::PeerMessage m) { return link_->Send(std::move(m)); }
  std::vector<v1::SnapshotRequest> requests() const {
    absl::MutexLock l(&mu_);
    std::vector<v1::SnapshotRequest> out;
    for (const v1::PeerMessage& m : received_) {
      if (m.has_snapshot_request()) out.push_back(m.snapshot_request());
    }
    return out;
  }
  std::vector<v1::PeerMessage> received() const {
    absl::MutexLock l(&mu_);
    return received_;
  }
  void Close() {
    if (link_) link_->Close();
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<v1::PeerMessage> received_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<PeerLink> link_;
};

v1::PeerMessage Wrap(v1::DictionaryDelta delta) {
  v1::PeerMessage m;
  *m.mutable_dictionary_delta() = std::move(delta);
  return m;
}

// A delta of boundary 0's forward dictionary that confirms `base` without rows: it applies only
// on top of `base`.
v1::PeerMessage EmptyDelta(uint64_t base) {
  v1::DictionaryDelta d;
  d.set_boundary(0);
  d.set_direction(v1::DIRECTION_FORWARD);
  d.set_base_version(base);
  d.set_new_version(base);
  d.set_checksum(1);
  return Wrap(std::move(d));
}

TEST(DaemonSnapshotTest, ALostDeltaAsksForOneSnapshotAndTheReplicaFollowsTheOneItGets) {
  TempDir dir;
  const Shape shape;
  absl::StatusOr<std::unique_ptr<Daemon>> started = StartStage(dir, 1, {{0, false, ""}}, shape);
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<Daemon> down = *std::move(started);
  FakeUpstream up;
  ASSERT_TRUE(up.Dial(down->peer_port(), down->config().boundaries(0)).ok());

  // The owner of the same dictionary, from the same config and seed.
  absl::StatusOr<v1::BoundaryConfig> config =
      BoundaryConfigWithDefaults(down->config().boundaries(0));
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<DictionaryOwner> made =
      DictionaryOwner::Create({0, v1::DIRECTION_FORWARD}, DictionaryTables(*config),
                              SeededDictionary(*config), config->dictionary_precision());
  ASSERT_TRUE(made.ok()) << made.status();
  DictionaryOwner owner = *std::move(made);
  v1::BoundaryStats s = BoundaryOf(*down, 0);
  ASSERT_TRUE(s.has_dictionary());
  EXPECT_EQ(s.dictionary_version(), 0u);
  EXPECT_EQ(s.dictionary_checksum(), owner.published()->Checksum());

  // A delta on top of a version the downstream never had: one request, counted.
  ASSERT_TRUE(up.Send(EmptyDelta(5)).ok());
  ASSERT_TRUE(PollUntil([&] { return !up.requests().empty(); }, absl::Seconds(10)));
  s = BoundaryOf(*down, 0);
  EXPECT_EQ(s.snapshot_requests_sent(), 1u);
  EXPECT_EQ(s.bad_peer_messages(), 1u);
  EXPECT_EQ(s.dictionary_version(), 0u);
  // A second bad delta at the same held version: rejected, no second request.
  ASSERT_TRUE(up.Send(EmptyDelta(6)).ok());
  ASSERT_TRUE(
      PollUntil([&] { return BoundaryOf(*down, 0).bad_peer_messages() == 2; }, absl::Seconds(10)));
  EXPECT_EQ(BoundaryOf(*down, 0).snapshot_requests_sent(), 1u);

  // The snapshot the request asked for, at version 1 (the owner learned one row).
  owner.mutable_learner(0)[0] += 0.5f;
  absl::StatusOr<v1::DictionaryDelta> unsent = owner.MakeDelta(1 << 20);
  ASSERT_TRUE(unsent.ok()) << unsent.status();
  ASSERT_EQ(owner.version(), 1u);
  v1::PeerMessage snapshot;
  *snapshot.mutable_dictionary_snapshot() = owner.Snapshot();
  const uint64_t snapshot_bytes = snapshot.dictionary_snapshot().ByteSizeLong();
  ASSERT_TRUE(up.Send(snapshot).ok());
  ASSERT_TRUE(
      PollUntil([&] { return BoundaryOf(*down, 0).dictionary_version() == 1; }, absl::Seconds(10)));
  s = BoundaryOf(*down, 0);
  EXPECT_EQ(s.dictionary_checksum(), owner.published()->Checksum());
  EXPECT_EQ(s.dictionary_bytes_received(), snapshot_bytes);

  // After a snapshot that applied, the next loss may ask again: a stale delta (base 0).
  ASSERT_TRUE(up.Send(EmptyDelta(0)).ok());
  ASSERT_TRUE(PollUntil([&] { return up.requests().size() >= 2; }, absl::Seconds(10)));
  // The link keeps order, so a request for the second bad delta would have come before this one.
  const std::vector<v1::SnapshotRequest> requests = up.requests();
  ASSERT_EQ(requests.size(), 2u);
  for (const v1::SnapshotRequest& r : requests) {
    EXPECT_EQ(r.boundary(), 0u);
    EXPECT_EQ(r.direction(), v1::DIRECTION_FORWARD);
    EXPECT_FALSE(r.detail().empty());
  }
  EXPECT_EQ(requests[0].have_version(), 0u);
  EXPECT_EQ(requests[1].have_version(), 1u);
  EXPECT_EQ(requests[0].reason(), v1::SNAPSHOT_REASON_BASE_VERSION_MISMATCH);
  EXPECT_EQ(requests[1].reason(), v1::SNAPSHOT_REASON_BASE_VERSION_MISMATCH);
  s = BoundaryOf(*down, 0);
  EXPECT_EQ(s.snapshot_requests_sent(), 2u);
  EXPECT_EQ(s.bad_peer_messages(), 3u);
  EXPECT_EQ(s.dictionary_version(), 1u);

  // A valid delta on top of the snapshot: the replica follows it, checksum and all.
  owner.mutable_learner(0)[3 * config->k()] -= 0.25f;
  absl::StatusOr<v1::DictionaryDelta> delta = owner.MakeDelta(1 << 20);
  ASSERT_TRUE(delta.ok()) << delta.status();
  ASSERT_EQ(delta->base_version(), 1u);
  ASSERT_EQ(delta->new_version(), 2u);
  const uint64_t delta_bytes = delta->ByteSizeLong();
  ASSERT_TRUE(up.Send(Wrap(*delta)).ok());
  ASSERT_TRUE(
      PollUntil([&] { return BoundaryOf(*down, 0).dictionary_version() == 2; }, absl::Seconds(10)));
  s = BoundaryOf(*down, 0);
  EXPECT_EQ(s.dictionary_checksum(), owner.published()->Checksum());
  EXPECT_EQ(s.dictionary_bytes_received(), snapshot_bytes + delta_bytes);

  // A frame naming a version the downstream does not hold: rejected, and one more request (the
  // held version changed since the last one); a second such frame asks nothing more.
  absl::StatusOr<std::unique_ptr<Backend>> backend = MakeBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  v1::BoundaryConfig up_config = *config;
  up_config.set_role(v1::ROLE_UPSTREAM);
  up_config.set_peer_address(Loopback(down->peer_port()));
  absl::StatusOr<std::unique_ptr<Engine>> encoder = Engine::Create(up_config, backend->get());
  ASSERT_TRUE(encoder.ok()) << encoder.status();
  constexpr int64_t kRows = 8;
  std::vector<float> h(kRows * shape.d);
  for (size_t i = 0; i < h.size(); ++i) h[i] = 0.01f * static_cast<float>(i % 13);
  std::vector<int32_t> ids(kRows, 3);
  for (uint32_t mb = 0; mb < 2; ++mb) {
    absl::StatusOr<std::vector<v1::PeerMessage>> out = (*encoder)->Encode(
        1, mb, ConstTensor::F32(h.data(), kRows, shape.d), ids.data(), Engine::FiniteCheck::kCheck);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->size(), 1u);
    v1::PeerMessage frame = (*out)[0];
    ASSERT_TRUE(frame.has_frame());
    frame.mutable_frame()->set_dict_version(9);  // not covered by the frame's checksum
    ASSERT_TRUE(up.Send(frame).ok());
  }
  ASSERT_TRUE(
      PollUntil([&] { return BoundaryOf(*down, 0).frames_rejected() == 2; }, absl::Seconds(10)));
  ASSERT_TRUE(PollUntil([&] { return up.requests().size() >= 3; }, absl::Seconds(10)));
  const v1::SnapshotRequest third = up.requests()[2];
  EXPECT_EQ(third.have_version(), 2u);
  EXPECT_EQ(third.reason(), v1::SNAPSHOT_REASON_UNKNOWN_VERSION);
  EXPECT_NE(third.detail().find("version 9"), std::string::npos) << third.detail();
  EXPECT_EQ(BoundaryOf(*down, 0).snapshot_requests_sent(), 3u);
  // The trainer's Recv of such a frame says why at once, as a transient fault (retryable).
  std::unique_ptr<mc::Client> trainer;
  ASSERT_TRUE(mc::Client::Connect(down->config().local_socket(), "down", 5000, &trainer).ok());
  mc::RecvResult r;
  mc::Status recv = trainer->Recv(0, mc::Direction::kForward, 1, 0,
                                  mc::TensorRef{0, 0, kRows, shape.d, mc::DType::kF32}, 5000, &r);
  EXPECT_EQ(recv.code, mc::kUnavailable) << recv.message;
  EXPECT_NE(recv.message.find("rejected"), std::string::npos) << recv.message;

  // The same, as exported.
  absl::StatusOr<Scrape> scrape = Scrape::Get(down->metrics_port());
  ASSERT_TRUE(scrape.ok()) << scrape.status();
  const LabelMap dl = {{"stage", "1"}, {"boundary", "0"}, {"role", "downstream"}};
  EXPECT_EQ(scrape->Value("mapl_boundary_bad_peer_messages_total", dl), 3);
  EXPECT_EQ(scrape->Value("mapl_boundary_snapshot_requests_sent_total", dl), 3);
  EXPECT_EQ(scrape->Value("mapl_boundary_frames_rejected_total", dl), 2);
  EXPECT_EQ(scrape->Value("mapl_boundary_dictionary_version", dl), 2);
  EXPECT_EQ(
      scrape->Value("mapl_link_received_messages_total", With(dl, "body", "dictionary_delta")), 4);
  EXPECT_EQ(
      scrape->Value("mapl_link_received_messages_total", With(dl, "body", "dictionary_snapshot")),
      1);
  EXPECT_EQ(scrape->Value("mapl_link_sent_messages_total", With(dl, "body", "snapshot_request")),
            3);
  trainer.reset();
  up.Close();
  down->Shutdown(absl::Seconds(1));
}

// send_rate_mbit on the upstream: a burst of Sends returns at once (the tensors wait in the
// transport), and the wire carries them at the configured rate: 4 Mbit/s = 500,000 bytes/s.
// Through the client and two daemons: a tensor's shape, dtype and token ids (optional with
// METHOD_FIXED) reach the downstream trainer; a Recv expecting another shape leaves the tensor
// for a later one; an encode failure after a non-waiting Send fails the peer's Recv at once
// (ABORTED) and the sender's next Send and Step (once each).
TEST_F(DaemonPairTest, FramesCarryShapeDtypeAndIdsAndEncodeFailuresReachBothTrainers) {
  Shape shape;
  shape.method = "METHOD_FIXED";
  ASSERT_NO_FATAL_FAILURE(StartPair(shape));
  constexpr uint32_t kN = 8;
  auto [h, ids] = FillActivation(up_client_.get(), 0, 0, kN, shape_, 3);
  const int32_t* sent_ids =
      reinterpret_cast<const int32_t*>(static_cast<const char*>(up_client_->data(0)) + ids.offset);
  mc::SendOptions send;
  send.shape = {2, 4, shape_.d};
  mc::SendResult sent;
  mc::Status s = up_client_->Send(0, mc::Direction::kForward, 1, 0, h, ids, send, &sent);
  ASSERT_TRUE(s.ok()) << s.message;
  // A shape that does not describe the tensor: refused before it is taken.
  send.shape = {3, 4, shape_.d};
  s = up_client_->Send(0, mc::Direction::kForward, 1, 1, h, ids, send, &sent);
  EXPECT_EQ(s.code, mc::kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("[3, 4, 32]"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("(8, 32)"), std::string::npos) << s.message;

  const mc::TensorRef into{1, 0, shape_.max_tokens, shape_.d, mc::DType::kBF16};
  const uint64_t ids_at = 4096;
  mc::RecvOptions recv;
  recv.token_ids = mc::TensorRef{1, ids_at, shape_.max_tokens, 1, mc::DType::kI32};
  recv.expect_shape = {kN, shape_.d};
  mc::RecvResult r;
  s = down_client_->Recv(0, mc::Direction::kForward, 1, 0, into, 5000, recv, &r);
  EXPECT_EQ(s.code, mc::kInvalidArgument) << s.message;
  EXPECT_NE(s.message.find("[2, 4, 32]"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("[8, 32]"), std::string::npos) << s.message;
  recv.expect_shape = {2, 4, shape_.d};
  s = down_client_->Recv(0, mc::Direction::kForward, 1, 0, into, 5000, recv, &r);
  ASSERT_TRUE(s.ok()) << s.message;
  EXPECT_EQ(r.rows, kN);
  EXPECT_EQ(r.shape, (std::vector<uint32_t>{2, 4, shape_.d}));
  ASSERT_TRUE(r.dtype.has_value());
  EXPECT_EQ(*r.dtype, mc::DType::kF32);
  ASSERT_TRUE(r.has_token_ids);
  const int32_t* got_ids =
      reinterpret_cast<const int32_t*>(static_cast<const char*>(down_client_->data(1)) + ids_at);
  for (uint32_t i = 0; i < kN; ++i) EXPECT_EQ(got_ids[i], sent_ids[i]) << "id " << i;

  // The downstream never received (1, 7): its encoder refuses the gradient after Send returned.
  s = down_client_->Send(0, mc::Direction::kBackward, 1, 7,
                         mc::TensorRef{1, 0, kN, shape_.d, mc::DType::kBF16}, std::nullopt, &sent);
  ASSERT_TRUE(s.ok()) << s.message;
  const absl::Time start = absl::Now();
  s = up_client_->Recv(0, mc::Direction::kBackward, 1, 7,
                       mc::TensorRef{1, 0, shape_.max_tokens, shape_.d, mc::DType::kF32}, 0, &r);
  EXPECT_EQ(s.code, 10 /* ABORTED */) << s.message;
  EXPECT_LT(absl::Now() - start, absl::Seconds(5)) << "the Recv waited for its deadline";
  absl::SleepFor(absl::Milliseconds(200));  // the encoder has failed by now (the peer heard)
  s = down_client_->Send(0, mc::Direction::kBackward, 1, 0,
                         mc::TensorRef{1, 0, kN, shape_.d, mc::DType::kBF16}, std::nullopt, &sent);
  EXPECT_EQ(s.code, mc::kFailedPrecondition) << s.message;
  EXPECT_NE(s.message.find("an earlier Send failed in the background"), std::string::npos)
      << s.message;
  mc::StepResult step;
  s = down_client_->Step(1, 5000, &step);
  EXPECT_EQ(s.code, mc::kFailedPrecondition) << s.message;
  EXPECT_NE(s.message.find("an earlier Send failed in the background"), std::string::npos)
      << s.message;
  s = down_client_->Step(1, 5000, &step);
  EXPECT_TRUE(s.ok()) << s.message;
}

// Device memory where this mapld cannot use CUDA: the Attach that asks for device buffers is
// refused saying why, and a reference to device memory from a host-only session is refused
// before anything is taken, so the tensor is still there for the call that gets it right.
TEST_F(DaemonPairTest, DeviceMemoryIsRefusedBeforeAnyTensorIsTakenWhereCudaIsMissing) {
  if (MakeBackend("cuda").ok()) GTEST_SKIP() << "CUDA works here: cuda_ipc_test covers it";
  Shape shape;
  shape.method = "METHOD_FIXED";  // no token ids needed
  ASSERT_NO_FATAL_FAILURE(StartPair(shape));
  v1::AttachRequest gpu;
  gpu.set_client_name("gpu-trainer");
  gpu.set_cuda_buffers(2);
  gpu.set_cuda_buffer_bytes(1 << 20);
  gpu.set_cuda_events(8);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> refused = up_->Attach(gpu, &event);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_NE(refused.status().message().find("CUDA"), std::string::npos) << refused.status();

  v1::AttachEvent up_event, down_event;
  ASSERT_TRUE(up_->Attach(v1::AttachRequest(), &up_event).ok());
  ASSERT_TRUE(down_->Attach(v1::AttachRequest(), &down_event).ok());
  v1::SendRequest send;
  send.set_session(up_event.session());
  send.set_boundary(0);
  send.set_direction(v1::DIRECTION_FORWARD);
  send.set_step(1);
  v1::TensorRef* t = send.mutable_tensor();
  t->set_rows(4);
  t->set_cols(Shape().d);
  t->set_dtype(v1::DTYPE_F32);
  t->set_memory(v1::MEMORY_CUDA);
  absl::StatusOr<v1::SendReply> sent = up_->Send(send);
  ASSERT_EQ(sent.status().code(), absl::StatusCode::kInvalidArgument) << sent.status();
  EXPECT_NE(sent.status().message().find("no device buffers"), std::string::npos) << sent.status();
  EXPECT_EQ(BoundaryOf(*up_, 0).frames_sent(), 0u);

  // A host tensor crosses; a Recv into device memory is refused and leaves it in the inbox.
  t->set_memory(v1::MEMORY_HOST);
  send.set_wait_encoded(true);
  sent = up_->Send(send);
  ASSERT_TRUE(sent.ok()) << sent.status();
  v1::RecvRequest recv;
  recv.set_session(down_event.session());
  recv.set_boundary(0);
  recv.set_direction(v1::DIRECTION_FORWARD);
  recv.set_step(1);
  recv.set_timeout_ms(10000);
  v1::TensorRef* into = recv.mutable_into();
  into->set_rows(Shape().max_tokens);
  into->set_cols(Shape().d);
  into->set_dtype(v1::DTYPE_F32);
  into->set_memory(v1::MEMORY_CUDA);
  into->set_event(1);
  absl::StatusOr<v1::RecvReply> got = down_->Recv(recv, [] { return false; });
  ASSERT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << got.status();
  EXPECT_NE(got.status().message().find("into.memory"), std::string::npos) << got.status();
  into->set_memory(v1::MEMORY_HOST);
  into->set_event(0);
  got = down_->Recv(recv, [] { return false; });
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->rows(), 4u);
}

TEST_F(DaemonPairTest, SendRateCapHoldsOnTheWireAfterABurst) {
  Shape shape;
  shape.d = 256;
  shape.method = "METHOD_DENSE";
  shape.forward_codec = "";
  shape.client_buffer_bytes = 262144;
  shape.max_tokens = 128;
  constexpr double kMbit = 4;
  constexpr double kBytesPerSecond = kMbit * 125000;
  ASSERT_NO_FATAL_FAILURE(StartPair(shape, {absl::StrCat("send_rate_mbit=", kMbit)}));
  ASSERT_TRUE(PollUntil([&] { return BoundaryOf(*up_, 0).link().connected(); }, absl::Seconds(10)));
  // 40 frames of 128 x 256 dense bf16 (64 KiB of payload each): about 5 s at the rate.
  constexpr uint32_t kFrames = 40, kRows = 128;
  auto [h, ids] = FillActivation(up_client_.get(), 0, 0, kRows, shape, 1);
  const absl::Time start = absl::Now();
  for (uint32_t mb = 0; mb < kFrames; ++mb) {
    mc::SendResult sent;
    mc::Status s = up_client_->Send(0, mc::Direction::kForward, 1, mb, h, std::nullopt, &sent);
    ASSERT_TRUE(s.ok()) << s.message;
  }
  const absl::Duration sending = absl::Now() - start;
  // The trainer did not wait for the wire: most frames are still queued on the link.
  const v1::BoundaryStats after_sends = BoundaryOf(*up_, 0);
  EXPECT_GE(after_sends.link().queued_messages(), kFrames / 2)
      << "Sends took " << sending << "; the link had written " << after_sends.link().messages_sent()
      << " messages";

  // The rate between the 5th and the 35th frame's write (past the bucket's initial burst).
  auto frames_sent = [&](uint64_t* bytes) {
    const v1::LinkStats link = BoundaryOf(*up_, 0).link();
    *bytes = link.bytes_sent();
    auto it = link.sent().find("frame");
    return it == link.sent().end() ? uint64_t{0} : it->second.messages();
  };
  uint64_t bytes0 = 0, bytes1 = 0;
  ASSERT_TRUE(PollUntil([&] { return frames_sent(&bytes0) >= 5; }, absl::Seconds(10)));
  const absl::Time t0 = absl::Now();
  ASSERT_TRUE(PollUntil([&] { return frames_sent(&bytes1) >= 35; }, absl::Seconds(15)));
  const absl::Time t1 = absl::Now();
  const double rate = static_cast<double>(bytes1 - bytes0) / absl::ToDoubleSeconds(t1 - t0);
  std::printf("wire rate %.0f bytes/s (cap %.0f) over %s; %u Sends took %s\n", rate,
              kBytesPerSecond, absl::FormatDuration(t1 - t0).c_str(), kFrames,
              absl::FormatDuration(sending).c_str());
  EXPECT_GT(rate, 0.8 * kBytesPerSecond) << rate << " bytes/s over " << (t1 - t0);
  EXPECT_LT(rate, 1.2 * kBytesPerSecond) << rate << " bytes/s over " << (t1 - t0);

  // Everything arrives, in order.
  for (uint32_t mb = 0; mb < kFrames; ++mb) {
    mc::RecvResult r;
    mc::Status s =
        down_client_->Recv(0, mc::Direction::kForward, 1, mb,
                           mc::TensorRef{1, 0, kRows, shape.d, mc::DType::kF32}, 10000, &r);
    ASSERT_TRUE(s.ok()) << "microbatch " << mb << ": " << s.message;
    EXPECT_EQ(r.rows, kRows);
  }
}

// ---- three stages ----

class ThreeStagesTest : public ::testing::Test {
 protected:
  static constexpr uint32_t kMicrobatches = 2, kRows = 16;

  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Daemon>> d = StartStage(dir_, 2, {{1, false, ""}}, shape_);
    ASSERT_TRUE(d.ok()) << d.status();
    stages_[2] = *std::move(d);
    d = StartStage(dir_, 1, {{0, false, ""}, {1, true, Loopback(stages_[2]->peer_port())}}, shape_);
    ASSERT_TRUE(d.ok()) << d.status();
    stages_[1] = *std::move(d);
    d = StartStage(dir_, 0, {{0, true, Loopback(stages_[1]->peer_port())}}, shape_);
    ASSERT_TRUE(d.ok()) << d.status();
    stages_[0] = *std::move(d);
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(mc::Client::Connect(stages_[i]->config().local_socket(),
                                      absl::StrCat("trainer-", i), 5000, &clients_[i])
                      .ok());
    }
  }

  void TearDown() override {
    for (auto& c : clients_) c.reset();
    for (auto& d : stages_) {
      if (d) d->Shutdown(absl::Seconds(1));
    }
  }

  // One step of every trainer, each on its own thread: forward through the chain, backward back,
  // then Step unless `step` is false. Returns the first error of each stage ("" if none).
  std::vector<std::string> RunStep(uint64_t s, bool step) {
    std::vector<std::string> errors(3);
    auto fail = [&](int stage, const std::string& what, const mc::Status& st) {
      if (errors[stage].empty()) {
        errors[stage] = absl::StrCat(what, ": ", mc::StatusCodeName(st.code), " ", st.message);
      }
    };
    const uint64_t region = uint64_t{kRows} * shape_.d * 4 + kRows * 4;  // h and its ids
    std::thread t0([&] {
      mc::Client* c = clients_[0].get();
      for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
        auto [h, ids] = FillActivation(c, 0, mb * region, kRows, shape_, s * 10 + mb);
        mc::SendResult sent;
        mc::Status st = c->Send(0, mc::Direction::kForward, s, mb, h, ids, &sent);
        if (!st.ok()) return fail(0, "send forward", st);
      }
      for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
        mc::RecvResult r;
        mc::Status st = c->Recv(0, mc::Direction::kBackward, s, mb,
                                mc::TensorRef{1, 0, kRows, shape_.d, mc::DType::kF32}, 0, &r);
        if (!st.ok()) return fail(0, "recv backward", st);
      }
      mc::StepResult out;
      if (step) {
        mc::Status st = c->Step(s, 10000, &out);
        if (!st.ok()) return fail(0, "step", st);
      }
    });
    std::thread t1([&] {
      mc::Client* c = clients_[1].get();
      for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
        // h_hat of boundary 0 lands in buffer 1; it goes on over boundary 1 with the same ids.
        mc::RecvResult r;
        const mc::TensorRef into{1, mb * region, kRows, shape_.d, mc::DType::kF32};
        mc::Status st = c->Recv(0, mc::Direction::kForward, s, mb, into, 0, &r);
        if (!st.ok()) return fail(1, "recv forward", st);
        auto [unused, ids] = FillActivation(c, 0, mb * region, kRows, shape_, s * 10 + mb);
        mc::SendResult sent;
        st = c->Send(1, mc::Direction::kForward, s, mb, into, ids, &sent);
        if (!st.ok()) return fail(1, "send forward", st);
      }
      for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
        mc::RecvResult r;
        const mc::TensorRef g{1, mb * region, kRows, shape_.d, mc::DType::kF32};
        mc::Status st = c->Recv(1, mc::Direction::kBackward, s, mb, g, 0, &r);
        if (!st.ok()) return fail(1, "recv backward", st);
        mc::SendResult sent;
        st = c->Send(0, mc::Direction::kBackward, s, mb, g, std::nullopt, &sent);
        if (!st.ok()) return fail(1, "send backward", st);
      }
      mc::StepResult out;
      if (step) {
        mc::Status st = c->Step(s, 10000, &out);
        if (!st.ok()) return fail(1, "step", st);
      }
    });
    std::thread t2([&] {
      mc::Client* c = clients_[2].get();
      for (uint32_t mb = 0; mb < kMicrobatches; ++mb) {
        mc::RecvResult r;
        const mc::TensorRef into{1, mb * region, kRows, shape_.d, mc::DType::kF32};
        mc::Status st = c->Recv(1, mc::Direction::kForward, s, mb, into, 0, &r);
        if (!st.ok()) return fail(2, "recv forward", st);
        // The gradient: the activation, scaled down.
        float* g = reinterpret_cast<float*>(static_cast<char*>(c->data(1)) + mb * region);
        for (uint32_t i = 0; i < kRows * shape_.d; ++i) g[i] *= 0.1f;
        mc::SendResult sent;
        st = c->Send(1, mc::Direction::kBackward, s, mb, into, std::nullopt, &sent);
        if (!st.ok()) return fail(2, "send backward", st);
      }
      mc::StepResult out;
      if (step) {
        mc::Status st = c->Step(s, 10000, &out);
        if (!st.ok()) return fail(2, "step", st);
      }
    });
    t0.join();
    t1.join();
    t2.join();
    return errors;
  }

  // Waits until the downstream of each boundary holds the upstream's published dictionary, and
  // checks that they are the same state; returns the versions (boundary 0, boundary 1).
  std::pair<uint64_t, uint64_t> ExpectDictionariesAgree(uint64_t step) {
    std::pair<uint64_t, uint64_t> versions;
    const std::pair<int, int> sides[] = {{0, 1}, {1, 2}};  // (upstream stage, downstream stage)
    for (uint32_t b = 0; b < 2; ++b) {
      Daemon& up = *stages_[sides[b].first];
      Daemon& down = *stages_[sides[b].second];
      v1::BoundaryStats u, d;
      EXPECT_TRUE(PollUntil(
          [&] {
            u = BoundaryOf(up, b);
            d = BoundaryOf(down, b);
            return d.dictionary_version() == u.dictionary_version();
          },
          absl::Seconds(10)))
          << "step " << step << ", boundary " << b << ": upstream at version "
          << u.dictionary_version() << ", downstream at " << d.dictionary_version();
      EXPECT_EQ(d.dictionary_checksum(), u.dictionary_checksum())
          << "step " << step << ", boundary " << b;
      EXPECT_EQ(u.steps(), step) << "boundary " << b;
      EXPECT_EQ(d.steps(), step) << "boundary " << b;
      (b == 0 ? versions.first : versions.second) = u.dictionary_version();
    }
    return versions;
  }

  TempDir dir_;
  Shape shape_;
  std::unique_ptr<Daemon> stages_[3];
  std::unique_ptr<mc::Client> clients_[3];
};

TEST_F(ThreeStagesTest, StepsCompleteInOrderAndDictionariesAgreeAfterEachStep) {
  constexpr uint64_t kSteps = 3;
  std::pair<uint64_t, uint64_t> versions;
  for (uint64_t s = 1; s <= kSteps; ++s) {
    const std::vector<std::string> errors = RunStep(s, /*step=*/true);
    for (int i = 0; i < 3; ++i) ASSERT_EQ(errors[i], "") << "step " << s << ", stage " << i;
    const std::pair<uint64_t, uint64_t> now = ExpectDictionariesAgree(s);
    EXPECT_GE(now.first, versions.first);
    EXPECT_GE(now.second, versions.second);
    versions = now;
  }
  // The projectors learned on both boundaries, and the deltas carried it.
  EXPECT_GT(versions.first, 0u);
  EXPECT_GT(versions.second, 0u);
}

TEST_F(ThreeStagesTest, AStepRetriedOnTheMiddleStageAfterATimeoutSucceeds) {
  const std::vector<std::string> first = RunStep(1, /*step=*/true);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(first[i], "") << "stage " << i;
  ExpectDictionariesAgree(1);
  const std::vector<std::string> errors = RunStep(2, /*step=*/false);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(errors[i], "") << "stage " << i;

  // Stage 2 has not stepped: the middle stage's upstream side of boundary 1 waits for its
  // learning signal in vain.
  mc::StepResult out;
  const absl::Time start = absl::Now();
  mc::Status s = clients_[1]->Step(2, 300, &out);
  EXPECT_EQ(s.code, mc::kDeadlineExceeded) << s.message;
  EXPECT_NE(s.message.find("learning signal"), std::string::npos) << s.message;
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(290));
  // Its downstream side of boundary 0 closed the step already (and sent its learning signal).
  EXPECT_EQ(BoundaryOf(*stages_[1], 0).steps(), 2u);
  EXPECT_EQ(BoundaryOf(*stages_[1], 1).steps(), 1u);

  s = clients_[2]->Step(2, 10000, &out);
  ASSERT_TRUE(s.ok()) << s.message;
  s = clients_[1]->Step(2, 10000, &out);
  ASSERT_TRUE(s.ok()) << s.message;
  ASSERT_EQ(out.boundaries_size(), 2);
  s = clients_[0]->Step(2, 10000, &out);
  ASSERT_TRUE(s.ok()) << s.message;
  // Boundary 0 was closed once on the middle stage, not twice.
  ExpectDictionariesAgree(2);

  // And the pipeline goes on.
  const std::vector<std::string> next = RunStep(3, /*step=*/true);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(next[i], "") << "stage " << i;
  ExpectDictionariesAgree(3);
}

// ---- the example configs ----

TEST(DeployExamplesTest, EveryExampleLoadsStartsConnectsAndShutsDownCleanly) {
  const std::filesystem::path examples =
      std::filesystem::path(MAPL_SOURCE_DIR) / "deploy" / "examples";
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(examples)) {
    if (entry.path().extension() == ".textproto") files.push_back(entry.path());
  }
  ASSERT_FALSE(files.empty()) << examples;
  TempDir dir;
  std::vector<v1::DaemonConfig> configs;
  for (size_t i = 0; i < files.size(); ++i) {
    absl::StatusOr<v1::DaemonConfig> c = LoadConfig(
        files[i].string(), {absl::StrCat("local_socket=", dir.path(), "/ex", i, ".sock"),
                            "metrics_address=127.0.0.1:0", "peer_listen=127.0.0.1:0",
                            // The examples leave these at their defaults (8 x 64 MiB a trainer);
                            // the trainer attached below needs no more than this.
                            "client_buffers=1", "client_buffer_bytes=4194304"});
    ASSERT_TRUE(c.ok()) << files[i] << ": " << c.status();
    configs.push_back(*std::move(c));
  }
  // Later stages first, so each upstream side can dial the example serving its boundary.
  std::sort(
      configs.begin(), configs.end(),
      [](const v1::DaemonConfig& a, const v1::DaemonConfig& b) { return a.stage() > b.stage(); });
  std::map<uint32_t, int> serving;  // boundary -> peer port of its downstream among the examples
  std::vector<std::unique_ptr<Daemon>> daemons;
  for (v1::DaemonConfig& c : configs) {
    for (v1::BoundaryConfig& b : *c.mutable_boundaries()) {
      if (b.role() != v1::ROLE_UPSTREAM) continue;
      // Not the example's fixed address: only the example daemon started here may answer.
      auto it = serving.find(b.id());
      b.set_peer_address(Loopback(it != serving.end() ? it->second : 1));
    }
    absl::StatusOr<std::unique_ptr<Daemon>> d = Daemon::Start(c);
    ASSERT_TRUE(d.ok()) << "stage " << c.stage() << ": " << d.status();
    for (const v1::BoundaryConfig& b : c.boundaries()) {
      if (b.role() == v1::ROLE_DOWNSTREAM) serving[b.id()] = (*d)->peer_port();
    }
    daemons.push_back(*std::move(d));
  }
  for (const std::unique_ptr<Daemon>& d : daemons) {
    // Each boundary with both of its sides among the examples connects.
    for (const v1::BoundaryConfig& b : d->config().boundaries()) {
      if (b.role() == v1::ROLE_UPSTREAM && serving.count(b.id()) == 0) continue;
      EXPECT_TRUE(
          PollUntil([&] { return BoundaryOf(*d, b.id()).link().connected(); }, absl::Seconds(10)))
          << "stage " << d->config().stage() << ", boundary " << b.id();
    }
    // The metrics endpoint serves the daemon's boundaries; a trainer can attach.
    absl::StatusOr<Scrape> scrape = Scrape::Get(d->metrics_port());
    ASSERT_TRUE(scrape.ok()) << scrape.status();
    EXPECT_EQ(scrape->Find("mapl_boundary_steps_total", {}).size(),
              static_cast<size_t>(d->config().boundaries_size()));
    std::unique_ptr<mc::Client> c;
    mc::Status s = mc::Client::Connect(d->config().local_socket(), "example", 5000, &c);
    ASSERT_TRUE(s.ok()) << s.message;
    EXPECT_EQ(c->stage(), d->config().stage());
    EXPECT_EQ(c->boundaries().size(), static_cast<size_t>(d->config().boundaries_size()));
  }
  // Upstream sides first, as an operator would stop a pipeline.
  for (auto it = daemons.rbegin(); it != daemons.rend(); ++it) {
    Daemon& d = **it;
    d.Shutdown(absl::Seconds(2));
    d.Wait();  // returns: Shutdown finished
    struct stat st;
    EXPECT_NE(::stat(d.config().local_socket().c_str(), &st), 0)
        << d.config().local_socket() << " left behind";
    EXPECT_TRUE(d.shutting_down());
  }
}

}  // namespace
}  // namespace mapl
