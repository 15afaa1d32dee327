// Tests of the downstream's PeerServer (server/transport/peer_server.h) and of how both ends
// refuse what they must: wrong tokens, unknown boundaries, invalid options, protocol violations
// from a hand-driven peer, a second stream for a served boundary, and the standard health service.
#include "server/transport/peer_server.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"
#include "server/transport/peer_link.h"
#include "tests/server/transport/peer_test_util.h"

namespace mapl {
namespace {

using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;
using ::testing::HasSubstr;
using ::testing::Not;
using testing_peer::Connect;
using testing_peer::DialerSide;
using testing_peer::Ignore;
using testing_peer::kBoundary;
using testing_peer::kToken;
using testing_peer::kWait;
using testing_peer::MakeFrame;
using testing_peer::MakeServer;
using testing_peer::Pair;
using testing_peer::ServerSide;

TEST(PeerServerTest, WrongAuthTokenIsRejectedAndLearnsNothing) {
  std::unique_ptr<PeerServer> server = MakeServer();
  absl::StatusOr<PeerLink*> down = server->RegisterBoundary(ServerSide(), Ignore);
  ASSERT_TRUE(down.ok());
  ASSERT_TRUE(server->Start().ok());
  PeerLinkOptions o = DialerSide(server->port());
  o.auth_token = "wrong";
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(o, Ignore);
  ASSERT_TRUE(up.ok());

  // A refusal is reported at once (no waiting out a timeout); the link keeps redialing, and what
  // is sent meanwhile waits in its queue rather than being dropped.
  const absl::Status connected = (*up)->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kUnauthenticated) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("auth token"));
  EXPECT_THAT(connected.message(), HasSubstr("boundary 3"));
  // Nothing about the server: no version, no boundaries served.
  EXPECT_THAT(connected.message(), Not(HasSubstr("version")));
  EXPECT_THAT(connected.message(), Not(HasSubstr("serving")));
  EXPECT_TRUE((*up)->Send(MakeFrame(0, 0, 0, "")).ok());
  EXPECT_EQ((*up)->stats().queued_messages(), 1u);
  EXPECT_FALSE((*down)->connected());
  EXPECT_EQ((*down)->stats().connections(), 0u);
  EXPECT_GE(server->stats().rejected_unauthenticated(), 1u);
  EXPECT_EQ(server->stats().streams_accepted(), 0u);
}

TEST(PeerServerTest, UnknownBoundaryIsNotFound) {
  std::unique_ptr<PeerServer> server = MakeServer();
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

TEST(PeerServerTest, InvalidUseIsRejected) {
  PeerLinkOptions o = DialerSide(1);
  o.auth_token.clear();
  EXPECT_EQ(PeerLink::Dial(o, Ignore).status().code(), absl::StatusCode::kInvalidArgument);
  // Either side of the boundary may dial or listen, but it must be one of its two sides.
  o = DialerSide(1);
  o.stage = kBoundary + 2;
  const absl::Status wrong_stage = PeerLink::Dial(o, Ignore).status();
  EXPECT_EQ(wrong_stage.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong_stage.message(),
              HasSubstr("stage must be 3 (upstream) or 4 (downstream), not 5"));
  EXPECT_EQ(PeerLink::Dial(DialerSide(1), nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);

  std::unique_ptr<PeerServer> server = MakeServer();
  PeerLinkOptions other_stage = ServerSide();
  other_stage.stage = kBoundary - 1;
  EXPECT_EQ(server->RegisterBoundary(other_stage, Ignore).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(server->RegisterBoundary(ServerSide(), Ignore).ok());
  EXPECT_EQ(server->RegisterBoundary(ServerSide(), Ignore).status().code(),
            absl::StatusCode::kAlreadyExists);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(DialerSide(1), Ignore);
  ASSERT_TRUE(up.ok());
  v1::PeerMessage ack;
  ack.mutable_ack()->set_seq(1);
  EXPECT_EQ((*up)->Send(ack).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*up)->Send(v1::PeerMessage()).code(), absl::StatusCode::kInvalidArgument);
  PeerLinkOptions small = DialerSide(1);
  small.max_message_bytes = 1000;
  absl::StatusOr<std::unique_ptr<PeerLink>> small_up = PeerLink::Dial(small, Ignore);
  ASSERT_TRUE(small_up.ok());
  const absl::Status too_big = (*small_up)->Send(MakeFrame(0, 1000, 0, std::string(1000, 'x')));
  EXPECT_EQ(too_big.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(too_big.message(), HasSubstr("exceeds max_message_bytes 1000"));
  EXPECT_EQ((*small_up)->stats().queued_messages(), 0u);
}

// A hand-driven client for the Peer service, to play a misbehaving or second peer.
class RawPeer {
 public:
  // Each on its own connection, as separate clients would be.
  explicit RawPeer(int port)
      : stub_(v1::Peer::NewStub(grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                                          grpc::InsecureChannelCredentials(),
                                                          OwnConnection()))),
        stream_(stub_->Link(&context_)) {}
  ~RawPeer() {
    if (finished_) return;
    context_.TryCancel();
    stream_->Finish();
  }

  static grpc::ChannelArguments OwnConnection() {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return args;
  }
  static v1::PeerMessage Hello(absl::string_view token = kToken,
                               uint32_t version = kPeerProtocolVersion) {
    v1::PeerMessage m;
    m.set_protocol_version(version);
    v1::Hello* h = m.mutable_hello();
    h->set_protocol_version(version);
    h->set_stage(kBoundary);
    h->set_boundary(kBoundary);
    h->set_auth_token(std::string(token));
    h->set_instance_id(42);
    h->set_resume_from_seq(1);
    if (testing_peer::UcxDataPlane()) {
      // Enough to pass the Hello's checks; no test lets the server connect to it.
      h->set_data_plane(v1::DATA_PLANE_UCX);
      h->set_ucx_worker_address("not a worker");
      h->set_ucx_token(std::string(16, 't'));
    }
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

TEST(PeerServerTest, ProtocolViolationsEndTheStreamWithAClearStatus) {
  MAPL_SKIP_UNDER_UCX(
      "writes messages on the gRPC stream by hand; the UCX plane's own checks are "
      "in ucx_stream_test");
  std::unique_ptr<PeerServer> server = MakeServer();
  absl::StatusOr<PeerLink*> down = server->RegisterBoundary(ServerSide(), Ignore);
  ASSERT_TRUE(down.ok());
  ASSERT_TRUE(server->Start().ok());
  {
    RawPeer peer(server->port());
    v1::PeerMessage ack;
    ack.set_protocol_version(kPeerProtocolVersion);
    ack.mutable_ack()->set_seq(1);
    ASSERT_TRUE(peer.Write(ack));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_THAT(s.error_message(), HasSubstr("must be a Hello"));
  }
  {
    RawPeer peer(server->port());
    // Version 1: a peer of the release before FrameFailed.
    ASSERT_TRUE(peer.Write(RawPeer::Hello(kToken, /*version=*/1)));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(s.error_message(), HasSubstr("protocol_version 1"));
  }
  {
    // A Hello whose envelope lacks protocol_version: the message names that field, not the
    // Hello's (which is right).
    RawPeer peer(server->port());
    v1::PeerMessage hello = RawPeer::Hello();
    hello.clear_protocol_version();
    ASSERT_TRUE(peer.Write(hello));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(s.error_message(), HasSubstr("envelope has protocol_version 0 (missing)"));
  }
  {
    RawPeer peer(server->port());
    v1::PeerMessage hello = RawPeer::Hello();
    hello.mutable_hello()->set_protocol_version(3);
    ASSERT_TRUE(peer.Write(hello));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(s.error_message(), HasSubstr("Hello has protocol_version 3"));
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
    frame.set_protocol_version(kPeerProtocolVersion);
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
    ack.set_protocol_version(kPeerProtocolVersion);
    ack.mutable_ack()->set_seq(9);
    ASSERT_TRUE(peer.Write(ack));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("acknowledged seq 9 but only seqs up to 0"));
  }
  {
    // A connection-level message after the handshake.
    RawPeer peer(server->port());
    ASSERT_TRUE(peer.Write(RawPeer::Hello()));
    v1::PeerMessage reply;
    ASSERT_TRUE(peer.Read(&reply));
    ASSERT_TRUE(peer.Write(RawPeer::Hello()));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("unexpected 'hello'"));
  }
  EXPECT_EQ((*down)->stats().connections(), 3u);
  {
    // The upstream's stage of another boundary.
    RawPeer peer(server->port());
    v1::PeerMessage hello = RawPeer::Hello();
    hello.mutable_hello()->set_stage(kBoundary + 1);
    ASSERT_TRUE(peer.Write(hello));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(s.error_message(), HasSubstr("says stage 4, expected 3"));
  }
  {
    RawPeer peer(server->port());
    v1::PeerMessage hello = RawPeer::Hello();
    hello.mutable_hello()->set_instance_id(0);
    ASSERT_TRUE(peer.Write(hello));
    const grpc::Status s = peer.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("Hello has no instance_id"));
  }
  EXPECT_EQ((*down)->stats().connections(), 3u);
  EXPECT_EQ((*down)->stats().handshakes_rejected(), 2u);
}

TEST(PeerServerTest, SecondPeerIsRefusedWhileTheFirstIsLive) {
  Pair p = Connect(Ignore, Ignore);
  {
    RawPeer second(p.server->port());
    ASSERT_TRUE(second.Write(RawPeer::Hello()));  // Right token, another instance.
    const grpc::Status s = second.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS);
    EXPECT_THAT(s.error_message(), HasSubstr("a live stream from another peer instance"));
  }
  EXPECT_EQ(p.down->stats().streams_refused_live(), 1u);
  EXPECT_EQ(p.down->stats().connections(), 1u);
  EXPECT_TRUE(p.up->connected());
  EXPECT_EQ(p.up->stats().disconnects(), 0u);
}

TEST(PeerServerTest, TheSamePeersNewStreamReplacesItsOldOne) {
  MAPL_SKIP_UNDER_UCX("the hand-written peer that attaches has no UCX worker to connect to");
  Pair p = Connect(Ignore, Ignore);
  {
    // The dialer's own instance: a reconnect whose old stream the server still holds.
    RawPeer again(p.server->port());
    v1::PeerMessage hello = RawPeer::Hello();
    hello.mutable_hello()->set_instance_id(p.up->instance_id());
    ASSERT_TRUE(again.Write(hello));
    v1::PeerMessage reply;
    ASSERT_TRUE(again.Read(&reply));  // Attached: the old stream was cancelled.
    ASSERT_TRUE(reply.has_hello());
    EXPECT_TRUE(
        p.up->AwaitStats([](const v1::LinkStats& s) { return s.disconnects() >= 1; }, kWait));
    EXPECT_TRUE(
        p.down->AwaitStats([](const v1::LinkStats& s) { return s.connections() >= 2; }, kWait));
  }
  EXPECT_EQ(p.down->stats().streams_replaced(), 1u);
  // The dialer comes back (and in turn replaces the raw stream if it is still attached).
  EXPECT_TRUE(p.up->AwaitStats([](const v1::LinkStats& s) { return s.connections() >= 2; }, kWait));
  EXPECT_TRUE(p.up->WaitConnected(kWait).ok());
}

// Both ends check the other's config fingerprint and name the field that differs; the dialer
// reports it at once (a refusal) and keeps redialing.
TEST(PeerServerTest, DifferentBoundaryConfigsAreRefusedNamingTheField) {
  v1::BoundaryFingerprint config;
  config.set_d(64);
  config.set_k(8);
  config.set_seed(1);
  PeerLinkOptions down_options = ServerSide();
  down_options.fingerprint = config;
  std::unique_ptr<PeerServer> server = MakeServer();
  absl::StatusOr<PeerLink*> down = server->RegisterBoundary(down_options, Ignore);
  ASSERT_TRUE(down.ok());
  ASSERT_TRUE(server->Start().ok());

  PeerLinkOptions up_options = DialerSide(server->port());
  up_options.fingerprint = config;
  up_options.fingerprint->set_seed(2);
  absl::StatusOr<std::unique_ptr<PeerLink>> up = PeerLink::Dial(up_options, Ignore);
  ASSERT_TRUE(up.ok());
  const absl::Status connected = (*up)->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kInvalidArgument) << connected;
  EXPECT_THAT(connected.message(), HasSubstr("seed = 1 here, 2 at the upstream"));
  EXPECT_GE((*down)->stats().handshakes_rejected(), 1u);

  // A peer that sends no fingerprint at all is refused too.
  RawPeer bare(server->port());
  ASSERT_TRUE(bare.Write(RawPeer::Hello()));
  const grpc::Status s = bare.Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("no config fingerprint"));
}

TEST(PeerServerTest, StreamsThatNeverSayHelloAreEndedAndBounded) {
  PeerServerOptions o;
  o.listen_address = "127.0.0.1:0";
  o.hello_timeout = absl::Milliseconds(300);
  o.max_pending_streams = 4;
  absl::StatusOr<std::unique_ptr<PeerServer>> server = PeerServer::Create(o);
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE((*server)->RegisterBoundary(ServerSide(), Ignore).ok());
  ASSERT_TRUE((*server)->Start().ok());
  {
    std::vector<std::unique_ptr<RawPeer>> silent;
    for (int i = 0; i < 4; ++i) silent.push_back(std::make_unique<RawPeer>((*server)->port()));
    // Wait until all four are pending, then one more is refused at once.
    for (int i = 0; i < 100 && (*server)->stats().pending_streams() < 4; ++i) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    ASSERT_EQ((*server)->stats().pending_streams(), 4u);
    RawPeer fifth((*server)->port());
    const grpc::Status over = fifth.Finish();
    EXPECT_EQ(over.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << over.error_message();
    // The server cancels a stream blocked on its first read: the peer sees CANCELLED.
    for (auto& peer : silent) {
      const grpc::Status s = peer->Finish();
      EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
    }
  }
  // The peers see the cancellation before the handlers wake up and count it.
  for (int i = 0; i < 200 && ((*server)->stats().rejected_hello_timeout() < 4 ||
                              (*server)->stats().pending_streams() > 0);
       ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  const v1::PeerServerStats stats = (*server)->stats();
  EXPECT_EQ(stats.rejected_hello_timeout(), 4u);
  EXPECT_EQ(stats.rejected_over_limit(), 1u);
  EXPECT_EQ(stats.pending_streams(), 0u);
  // The real peer still gets in.
  absl::StatusOr<std::unique_ptr<PeerLink>> up =
      PeerLink::Dial(DialerSide((*server)->port()), Ignore);
  ASSERT_TRUE(up.ok());
  EXPECT_TRUE((*up)->WaitConnected(kWait).ok()) << (*up)->status();
}

// Calls grpc.health.v1.Health/Check for `service` on 127.0.0.1:port.
grpc::Status CheckHealth(int port, const std::string& service, HealthCheckResponse* response) {
  std::unique_ptr<grpc::health::v1::Health::Stub> stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kWait));
  HealthCheckRequest request;
  request.set_service(service);
  return stub->Check(&context, request, response);
}

TEST(PeerServerTest, HealthServiceAnswersChecksAndFollowsSetServingStatus) {
  PeerServerOptions o;
  o.listen_address = "127.0.0.1:0";
  o.enable_health_service = true;
  absl::StatusOr<std::unique_ptr<PeerServer>> server = PeerServer::Create(o);
  ASSERT_TRUE(server.ok());
  ASSERT_TRUE((*server)->Start().ok());
  grpc::HealthCheckServiceInterface* health = (*server)->health_check_service();
  ASSERT_NE(health, nullptr);
  const int port = (*server)->port();

  HealthCheckResponse response;
  grpc::Status s = CheckHealth(port, "", &response);
  ASSERT_TRUE(s.ok()) << s.error_code() << " " << s.error_message();
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);

  health->SetServingStatus(false);  // As a draining daemon would.
  s = CheckHealth(port, "", &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
  health->SetServingStatus(true);
  s = CheckHealth(port, "", &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.status(), HealthCheckResponse::SERVING);

  // Per service: unknown until set, then what was set.
  EXPECT_EQ(CheckHealth(port, "mapl.v1.Peer", &response).error_code(), grpc::StatusCode::NOT_FOUND);
  health->SetServingStatus("mapl.v1.Peer", false);
  s = CheckHealth(port, "mapl.v1.Peer", &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.status(), HealthCheckResponse::NOT_SERVING);
}

TEST(PeerServerTest, HealthServiceIsAbsentUnlessEnabled) {
  // The daemon enables the default health service process-wide for its local server; a peer
  // server without enable_health_service must still not serve it.
  grpc::EnableDefaultHealthCheckService(true);
  std::unique_ptr<PeerServer> server = MakeServer();
  ASSERT_TRUE(server->Start().ok());
  EXPECT_EQ(server->health_check_service(), nullptr);
  HealthCheckResponse response;
  const grpc::Status s = CheckHealth(server->port(), "", &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
}

}  // namespace
}  // namespace mapl
