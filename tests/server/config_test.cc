// Config loading: text format, --set overrides, defaults, and errors that name the field.
#include "server/config.h"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "server/transport/network_policy.h"

namespace mapl {
namespace {

constexpr char kStage1[] = R"pb(
  stage: 1
  auth_token: "t"
  boundaries { id: 0 role: ROLE_DOWNSTREAM d: 512 vocab: 256 }
)pb";

absl::StatusOr<v1::DaemonConfig> Finalized(const std::string& text,
                                           const std::vector<std::string>& overrides = {}) {
  absl::StatusOr<v1::DaemonConfig> c = ParseConfig(text);
  if (!c.ok()) return c.status();
  for (const std::string& o : overrides) {
    absl::Status s = ApplyOverride(o, &*c);
    if (!s.ok()) return s;
  }
  return FinalizeConfig(*c);
}

void ExpectError(const absl::StatusOr<v1::DaemonConfig>& c, const std::string& says) {
  ASSERT_FALSE(c.ok()) << "expected an error containing '" << says << "'";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_NE(std::string(c.status().message()).find(says), std::string::npos) << c.status();
}

TEST(Config, MissingFieldsTakeTheirDefaults) {
  absl::StatusOr<v1::DaemonConfig> c = Finalized(kStage1);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->local_socket(), DefaultSocketPath(1));
  EXPECT_EQ(c->peer_listen(), "127.0.0.1:0");
  EXPECT_EQ(c->client_buffers(), 8u);
  EXPECT_EQ(c->recv_timeout_ms(), 60000u);
  EXPECT_EQ(c->backend(), "cpu");
  EXPECT_EQ(c->compute_threads(), 1u);
  EXPECT_EQ(c->max_sessions(), 16u);
  const v1::BoundaryConfig& b = c->boundaries(0);
  EXPECT_EQ(b.k(), 32u);  // d / 16
  EXPECT_EQ(b.method(), v1::METHOD_MAPL);
  EXPECT_EQ(b.forward_codec(), v1::CODEC_RVQ);
  EXPECT_EQ(b.backward_codec(), v1::CODEC_INT8);
  EXPECT_EQ(b.rvq_levels(), 4u);
}

TEST(Config, PeerLimitsTakeTheirDefaultsAndTlsFilesAreChecked) {
  absl::StatusOr<v1::DaemonConfig> c = Finalized(kStage1, {"recv_timeout_ms=7000"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->peer_hello_timeout_ms(), 10000u);
  EXPECT_EQ(c->peer_max_pending_streams(), 32u);
  EXPECT_EQ(c->peer_keepalive_ms(), 10000u);
  EXPECT_EQ(c->send_timeout_ms(), 7000u);  // recv_timeout_ms unless set.
  EXPECT_EQ(c->max_transport_queue_ms(), 4000u);
  EXPECT_FALSE(c->has_tls());
  ExpectError(Finalized(kStage1, {"peer_keepalive_ms=10"}), "peer_keepalive_ms: at least 1000");
  ExpectError(Finalized(kStage1, {"tls.cert_file=/nonexistent/tls.crt"}),
              "tls.cert_file: cannot read '/nonexistent/tls.crt'");
  ExpectError(Finalized(kStage1, {"tls.ca_file=/etc/hostname"}), "tls.cert_file: required");
}

TEST(Config, PrintedConfigHidesTheToken) {
  absl::StatusOr<v1::DaemonConfig> c = Finalized(kStage1, {"auth_token=s3cret-token"});
  ASSERT_TRUE(c.ok()) << c.status();
  const std::string printed = RedactedConfig(*c).DebugString();
  EXPECT_EQ(printed.find("s3cret-token"), std::string::npos) << printed;
  EXPECT_NE(printed.find("<redacted>"), std::string::npos) << printed;
  EXPECT_EQ(c->auth_token(), "s3cret-token");  // The config itself keeps it.
}

TEST(Config, TokenFromAFileWithoutItsTrailingNewline) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/mapl-config-test-token";
  {
    std::ofstream out(path, std::ios::trunc);
    out << "s3cret-from-file\n";
  }
  absl::StatusOr<v1::DaemonConfig> c =
      Finalized("stage: 1 boundaries { id: 0 role: ROLE_DOWNSTREAM d: 512 vocab: 256 }",
                {"auth_token_file=" + path});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->auth_token(), "s3cret-from-file");
  EXPECT_EQ(RedactedConfig(*c).DebugString().find("s3cret"), std::string::npos);
  ExpectError(Finalized(kStage1, {"auth_token_file=" + path}), "not both");
  ExpectError(Finalized("stage: 1 boundaries { id: 0 role: ROLE_DOWNSTREAM d: 512 vocab: 256 }",
                        {"auth_token_file=" + dir + "/no-such-token"}),
              "auth_token_file: cannot read");
  {
    std::ofstream out(path, std::ios::trunc);
    out << "\n";
  }
  ExpectError(Finalized("stage: 1 boundaries { id: 0 role: ROLE_DOWNSTREAM d: 512 vocab: 256 }",
                        {"auth_token_file=" + path}),
              "is empty");
  std::remove(path.c_str());
}

TEST(Config, MaxPeerMessageBytesCoversTheLargestMessage) {
  absl::StatusOr<v1::DaemonConfig> c = Finalized(kStage1);
  ASSERT_TRUE(c.ok()) << c.status();
  const v1::BoundaryConfig& b = c->boundaries(0);
  // A dense float32 frame of max_tokens rows and its ids, plus room for the envelope.
  EXPECT_GT(MaxPeerMessageBytes(b), static_cast<int>(b.max_tokens() * (b.d() + 1) * 4));
  EXPECT_LE(MaxPeerMessageBytes(b), static_cast<int>(b.max_tokens() * (b.d() + 1) * 4) + (2 << 20));
}

TEST(Config, OverridesReachAnyField) {
  absl::StatusOr<v1::DaemonConfig> c =
      Finalized(kStage1, {"boundaries[0].k=64", "boundaries[0].method=METHOD_FIXED",
                          "recv_timeout_ms=5", "local_socket=/tmp/x.sock"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->boundaries(0).k(), 64u);
  EXPECT_EQ(c->boundaries(0).method(), v1::METHOD_FIXED);
  EXPECT_EQ(c->recv_timeout_ms(), 5u);
  EXPECT_EQ(c->local_socket(), "/tmp/x.sock");
  // Index == size appends a boundary.
  c = Finalized(kStage1,
                {"boundaries[1].id=1", "boundaries[1].role=ROLE_UPSTREAM", "boundaries[1].d=64",
                 "boundaries[1].vocab=10", "boundaries[1].peer_address=127.0.0.1:7000"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->boundaries_size(), 2);
}

TEST(Config, BadOverridesSayWhatIsWrong) {
  ExpectError(Finalized(kStage1, {"stage"}), "expected path=value");
  ExpectError(Finalized(kStage1, {"nosuch=1"}), "has no field 'nosuch'");
  ExpectError(Finalized(kStage1, {"boundaries.k=1"}), "give an index");
  ExpectError(Finalized(kStage1, {"boundaries[3].k=1"}), "past the end");
  ExpectError(Finalized(kStage1, {"boundaries[0].k=many"}), "not a valid");
  ExpectError(Finalized(kStage1, {"boundaries[0].method=METHOD_MAGIC"}), "not a valid");
}

TEST(Config, InvalidFieldsStopStartupNamingTheField) {
  ExpectError(Finalized(kStage1, {"boundaries[0].k=600"}), "boundaries[0].k");
  ExpectError(Finalized(kStage1, {"boundaries[0].d=0"}), "boundaries[0].d");
  ExpectError(Finalized(kStage1, {"auth_token="}), "auth_token");
  ExpectError(Finalized(kStage1, {"peer_listen=nowhere"}), "peer_listen");
  ExpectError(Finalized(kStage1, {"compute_threads=1000"}), "compute_threads");
  ExpectError(Finalized(kStage1, {"max_sessions=1025"}), "max_sessions: at most 1024");
  ExpectError(Finalized(kStage1, {"boundaries[0].role=ROLE_UPSTREAM"}), "boundaries[0].role");
  ExpectError(Finalized(kStage1, {"boundaries[0].role=ROLE_UPSTREAM", "stage=0"}),
              "boundaries[0].peer_address");
  ExpectError(Finalized(kStage1, {"boundaries[1].id=0", "boundaries[1].role=ROLE_DOWNSTREAM",
                                  "boundaries[1].d=8"}),
              "appears twice");
  ExpectError(Finalized("stage: 1 auth_token: \"t\""), "boundaries");
  ExpectError(Finalized(kStage1, {"client_buffer_bytes=1000000"}), "client_buffer_bytes");
  ExpectError(Finalized("stage: 1\nauth_token: \"t\"\nboundaries { d: -3 }"), "line 3");
  // An unknown backend names the ones this build has.
  ExpectError(Finalized(kStage1, {"backend=tpu"}), "backend: 'tpu' is not a backend");
  ExpectError(Finalized(kStage1, {"backend=tpu"}),
              absl::StrCat("(it has: ", absl::StrJoin(BackendNames(), ", "), ")"));
}

// BoundaryConfig.dial: unset, the upstream dials and the downstream listens; a downstream that
// dials needs the upstream's address, and an upstream that listens an explicit peer_listen.
TEST(Config, DialSaysWhichSideOpensTheLinkAndWhatEachSideNeeds) {
  constexpr char kStage0[] = R"pb(
    stage: 0
    auth_token: "t"
    boundaries { id: 0 role: ROLE_UPSTREAM d: 512 vocab: 256 }
  )pb";
  absl::StatusOr<v1::DaemonConfig> c = Finalized(kStage1);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(DialsPeer(c->boundaries(0)));
  c = Finalized(kStage0, {"boundaries[0].peer_address=10.0.0.2:7000"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(DialsPeer(c->boundaries(0)));
  ExpectError(Finalized(kStage0), "unless the downstream dials: then set dial: false here");

  // The downstream dials the upstream's listener.
  ExpectError(Finalized(kStage1, {"boundaries[0].dial=true"}),
              "boundaries[0].peer_address: required with dial: true (this downstream dials its "
              "upstream)");
  ExpectError(Finalized(kStage1, {"boundaries[0].dial=true", "boundaries[0].peer_address=up"}),
              "boundaries[0].peer_address");
  c = Finalized(kStage1, {"boundaries[0].dial=true", "boundaries[0].peer_address=10.0.0.1:7000"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(DialsPeer(c->boundaries(0)));
  c = Finalized(kStage1, {"boundaries[0].dial=false"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(DialsPeer(c->boundaries(0)));

  // The upstream listens for it: the loopback default would not be reachable from another host.
  ExpectError(Finalized(kStage0, {"boundaries[0].dial=false"}),
              "peer_listen: required because boundaries[0] has dial: false");
  c = Finalized(kStage0, {"boundaries[0].dial=false", "peer_listen=0.0.0.0:7000"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(DialsPeer(c->boundaries(0)));
  EXPECT_EQ(c->peer_listen(), "0.0.0.0:7000");
  c = Finalized(kStage0, {"boundaries[0].dial=true", "boundaries[0].peer_address=10.0.0.2:7000"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(DialsPeer(c->boundaries(0)));
}

TEST(Config, Int4IsAcceptedForBothDirectionsOfProjectedMethods) {
  for (const char* method : {"METHOD_MAPL", "METHOD_FIXED"}) {
    absl::StatusOr<v1::DaemonConfig> c =
        Finalized(kStage1, {absl::StrCat("boundaries[0].method=", method),
                            "boundaries[0].forward_codec=CODEC_INT4",
                            "boundaries[0].backward_codec=CODEC_INT4"});
    ASSERT_TRUE(c.ok()) << method << ": " << c.status();
    EXPECT_EQ(c->boundaries(0).forward_codec(), v1::CODEC_INT4) << method;
    EXPECT_EQ(c->boundaries(0).backward_codec(), v1::CODEC_INT4) << method;
  }
  // Dense sends bf16 and takes no codec; the error budget is RVQ's.
  ExpectError(Finalized(kStage1, {"boundaries[0].method=METHOD_DENSE",
                                  "boundaries[0].backward_codec=CODEC_INT4"}),
              "boundaries[0].backward_codec");
  ExpectError(Finalized(kStage1, {"boundaries[0].forward_codec=CODEC_INT4",
                                  "boundaries[0].forward_error_budget=0.1"}),
              "boundaries[0].forward_error_budget");
  // The codecs that are not projected codes are still refused, and the message lists int4.
  ExpectError(Finalized(kStage1, {"boundaries[0].backward_codec=CODEC_RVQ"}),
              "must be CODEC_INT8, CODEC_INT4 or CODEC_BF16");
  ExpectError(Finalized(kStage1, {"boundaries[0].forward_codec=CODEC_DENSE"}),
              "must be CODEC_BF16, CODEC_INT8, CODEC_INT4 or CODEC_RVQ");
}

// The data plane: gRPC unless set; UCX only in a build with it, and its section's networks are
// checked (the link refuses UCX peers outside them).
TEST(Config, TransportAndTheUcxSectionTakeDefaultsAndAreChecked) {
  absl::StatusOr<v1::DaemonConfig> c = Finalized(kStage1);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->boundaries(0).transport(), v1::TRANSPORT_GRPC);
  EXPECT_EQ(c->ucx().max_inflight_mib(), 64u);
  EXPECT_TRUE(c->ucx().trusted_networks().empty());
  EXPECT_FALSE(c->ucx().allow_untrusted_networks());

  auto with_networks = [](const std::string& networks) {
    return Finalized(absl::StrCat(kStage1, "ucx { ", networks, " }"), {"ucx.max_inflight_mib=16"});
  };
  c = with_networks(R"pb(trusted_networks: "10.0.0.0/8" trusted_networks: "fd00::/8")pb");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->ucx().trusted_networks_size(), 2);
  EXPECT_EQ(c->ucx().max_inflight_mib(), 16u);
  ExpectError(with_networks(R"pb(trusted_networks: "10.0.0.0/8" trusted_networks: "10.0.0.0")pb"),
              "ucx.trusted_networks[1]: '10.0.0.0' is not a network in CIDR notation");
  ExpectError(with_networks(R"pb(trusted_networks: "10.0.0.0/33")pb"),
              "ucx.trusted_networks[0]: '10.0.0.0/33': the prefix length must be 0 to 32");
  ExpectError(with_networks(R"pb(trusted_networks: "eth0/24")pb"), "'eth0' is not an IP address");
  ExpectError(Finalized(kStage1, {"ucx.max_inflight_mib=5000"}), "ucx.max_inflight_mib");

  c = Finalized(kStage1, {"boundaries[0].transport=TRANSPORT_UCX"});
  if (kUcxBuilt) {
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->boundaries(0).transport(), v1::TRANSPORT_UCX);
  } else {
    ExpectError(c, "boundaries[0].transport: TRANSPORT_UCX, but this mapld was built without UCX");
  }
}

TEST(Config, LoadConfigNamesAMissingFile) {
  absl::StatusOr<v1::DaemonConfig> c = LoadConfig("/nonexistent/stage.textproto", {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("/nonexistent/stage.textproto"),
            std::string::npos);
}

}  // namespace
}  // namespace mapl
