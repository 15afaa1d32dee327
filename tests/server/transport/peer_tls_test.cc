// The peer link over TLS (server/transport/tls.h) with certificates made at test time by the
// openssl command: mutual TLS carries frames; a plaintext peer, a peer without a client
// certificate, a certificate from another CA and a certificate with the wrong identity are refused
// and counted; a rotated certificate is picked up without a restart; a downstream that dials its
// upstream is the TLS client.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "gtest/gtest.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_server.h"
#include "server/transport/tls.h"
#include "tests/server/transport/peer_test_util.h"

namespace mapl {
namespace {

using ::testing::HasSubstr;
using testing_peer::DialerSide;
using testing_peer::Ignore;
using testing_peer::kBoundary;
using testing_peer::kWait;
using testing_peer::MakeFrame;
using testing_peer::RandomBytes;
using testing_peer::Recorder;
using testing_peer::ServerSide;

constexpr char kDownIdentity[] = "stage-4.mapl.test";
constexpr char kUpIdentity[] = "spiffe://mapl.test/stage/3";

// A scratch folder with two CAs and leaf certificates (EC P-256, one day), made once per test
// binary by the openssl command line: "ca" signs the real peers' certificates (the downstream's
// with DNS SAN kDownIdentity, the upstream's with URI SAN kUpIdentity) and an intruder's with
// another name; "other" is a second CA with a certificate for the upstream's name.
class Certs {
 public:
  static const Certs& Get() {
    static const Certs* certs = new Certs();
    return *certs;
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  TlsFiles Files(const std::string& leaf, const std::string& ca = "ca") const {
    TlsFiles f;
    f.cert_file = path(leaf + ".crt");
    f.key_file = path(leaf + ".key");
    f.ca_file = path(ca + ".crt");
    f.reload_seconds = 1;
    return f;
  }
  // Makes leaf `name` signed by `ca` with subjectAltName `san`.
  void Leaf(const std::string& name, const std::string& ca, const std::string& san) const {
    Run(absl::StrCat("openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ",
                     "-subj /CN=", name, " -keyout ", path(name + ".key"), " -out ",
                     path(name + ".csr"), " && printf 'subjectAltName=", san, "\\n' > ",
                     path(name + ".ext"), " && openssl x509 -req -in ", path(name + ".csr"),
                     " -CA ", path(ca + ".crt"), " -CAkey ", path(ca + ".key"),
                     " -CAcreateserial -days 1 -extfile ", path(name + ".ext"), " -out ",
                     path(name + ".crt")));
  }

 private:
  Certs() {
    char tmpl[] = "/tmp/mapl-tls-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    for (const char* ca : {"ca", "other"}) {
      Run(absl::StrCat("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 ",
                       "-nodes -days 1 -subj /CN=mapl-test-", ca, " -keyout ", path(ca),
                       ".key -out ", path(ca), ".crt"));
    }
    Leaf("down", "ca", absl::StrCat("DNS:", kDownIdentity));
    Leaf("up", "ca", absl::StrCat("URI:", kUpIdentity));
    Leaf("intruder", "ca", "DNS:intruder.mapl.test");
    Leaf("up-other-ca", "other", absl::StrCat("URI:", kUpIdentity));
  }
  static void Run(const std::string& command) {
    const std::string quiet = "(" + command + ") >/dev/null 2>&1";
    if (std::system(quiet.c_str()) != 0) {
      std::cerr << "certificate command failed: " << command << "\n";
      std::abort();
    }
  }
  std::string dir_;
};

// A started TLS server serving the downstream end of boundary 3, expecting kUpIdentity.
struct TlsServer {
  std::unique_ptr<PeerServer> server;
  PeerLink* down = nullptr;
};
TlsServer StartTlsServer(Transport::Handler handler, const TlsFiles& files) {
  PeerServerOptions o;
  o.listen_address = "127.0.0.1:0";
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      TlsServerCredentials(files);
  EXPECT_TRUE(credentials.ok()) << credentials.status();
  o.credentials = *credentials;
  TlsServer s;
  s.server = *PeerServer::Create(o);
  PeerLinkOptions down = ServerSide();
  down.peer_identity = kUpIdentity;
  s.down = *s.server->RegisterBoundary(down, std::move(handler));
  EXPECT_TRUE(s.server->Start().ok());
  return s;
}

std::unique_ptr<PeerLink> DialTls(int port, const TlsFiles& files,
                                  const std::string& expected = kDownIdentity,
                                  Transport::Handler handler = Ignore) {
  PeerLinkOptions o = DialerSide(port);
  o.peer_identity = expected;
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      TlsChannelCredentials(files, expected);
  EXPECT_TRUE(credentials.ok()) << credentials.status();
  o.channel_credentials = *credentials;
  return *PeerLink::Dial(o, std::move(handler));
}

TEST(PeerTlsTest, MutualTlsCarriesFramesAndChecksBothIdentities) {
  const Certs& certs = Certs::Get();
  const std::string pool = RandomBytes(1 << 16, 1);
  Recorder at_down(200, &pool);
  TlsServer s = StartTlsServer(at_down.handler(), certs.Files("down"));
  std::unique_ptr<PeerLink> up = DialTls(s.server->port(), certs.Files("up"));
  ASSERT_TRUE(up->WaitConnected(kWait).ok()) << up->status();
  for (int i = 0; i < 200; ++i) ASSERT_TRUE(up->Send(MakeFrame(i, 1000, i, pool)).ok());
  ASSERT_TRUE(at_down.WaitDone());
  EXPECT_EQ(at_down.errors(), "");
  EXPECT_TRUE(up->Drain(kWait).ok());
  EXPECT_EQ(s.down->stats().handshakes_rejected(), 0u);
  EXPECT_EQ(s.server->stats().streams_accepted(), 1u);
}

TEST(PeerTlsTest, PlaintextPeerIsRefusedAndCounted) {
  const Certs& certs = Certs::Get();
  TlsServer s = StartTlsServer(Ignore, certs.Files("down"));
  const uint64_t failures_before = TlsHandshakeFailures();
  PeerLinkOptions o = DialerSide(s.server->port());  // No credentials: plaintext.
  o.connect_timeout = absl::Seconds(1);
  std::unique_ptr<PeerLink> up = *PeerLink::Dial(o, Ignore);
  EXPECT_FALSE(up->WaitConnected(absl::Seconds(2)).ok());
  EXPECT_FALSE(up->connected());
  EXPECT_EQ(s.server->stats().streams_accepted(), 0u);
  EXPECT_GT(TlsHandshakeFailures(), failures_before);
  EXPECT_GT(s.server->stats().tls_handshake_failures(), 0u);
}

TEST(PeerTlsTest, PeerWithoutClientCertificateIsRefusedUnderMutualTls) {
  const Certs& certs = Certs::Get();
  TlsServer s = StartTlsServer(Ignore, certs.Files("down"));
  const uint64_t failures_before = TlsHandshakeFailures();
  // Verifies the server but presents no certificate of its own.
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(
      std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(certs.path("ca.crt"),
                                                                           1));
  options.watch_root_certs();
  options.set_certificate_verifier(std::make_shared<grpc::experimental::NoOpCertificateVerifier>());
  options.set_check_call_host(false);
  PeerLinkOptions o = DialerSide(s.server->port());
  o.channel_credentials = grpc::experimental::TlsCredentials(options);
  o.connect_timeout = absl::Seconds(1);
  std::unique_ptr<PeerLink> up = *PeerLink::Dial(o, Ignore);
  EXPECT_FALSE(up->WaitConnected(absl::Seconds(2)).ok());
  EXPECT_EQ(s.server->stats().streams_accepted(), 0u);
  EXPECT_GT(TlsHandshakeFailures(), failures_before);
}

TEST(PeerTlsTest, CertificateFromAnotherCaIsRefused) {
  const Certs& certs = Certs::Get();
  TlsServer s = StartTlsServer(Ignore, certs.Files("down"));
  const uint64_t failures_before = TlsHandshakeFailures();
  // Its certificate chains to "other"; it trusts the right CA, so only the server refuses.
  std::unique_ptr<PeerLink> up = DialTls(s.server->port(), certs.Files("up-other-ca", "ca"));
  EXPECT_FALSE(up->WaitConnected(absl::Seconds(2)).ok());
  EXPECT_EQ(s.server->stats().streams_accepted(), 0u);
  EXPECT_GT(TlsHandshakeFailures(), failures_before);
}

TEST(PeerTlsTest, CertificateWithTheWrongIdentityIsRefusedByTheServer) {
  const Certs& certs = Certs::Get();
  TlsServer s = StartTlsServer(Ignore, certs.Files("down"));
  std::unique_ptr<PeerLink> up = DialTls(s.server->port(), certs.Files("intruder"));
  const absl::Status connected = up->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kPermissionDenied) << connected;
  EXPECT_THAT(connected.message(), HasSubstr(kUpIdentity));
  EXPECT_THAT(connected.message(), HasSubstr("intruder.mapl.test"));
  ASSERT_TRUE(
      s.down->AwaitStats([](const v1::LinkStats& l) { return l.identity_rejected() >= 1; }, kWait));
  EXPECT_EQ(s.down->stats().connections(), 0u);
}

TEST(PeerTlsTest, DialerRefusesAServerWithTheWrongIdentity) {
  const Certs& certs = Certs::Get();
  // A server whose certificate is valid (same CA) but names someone else.
  TlsServer s = StartTlsServer(Ignore, certs.Files("intruder"));
  std::unique_ptr<PeerLink> up = DialTls(s.server->port(), certs.Files("up"));
  const absl::Status connected = up->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kPermissionDenied) << connected;
  EXPECT_THAT(connected.message(), HasSubstr(kDownIdentity));
  EXPECT_GE(up->stats().identity_rejected(), 1u);
}

// A downstream behind NAT dials its upstream's TLS listener (BoundaryConfig.dial): the dialer is
// the TLS client and the listener the server whatever their stages, each checks the other's
// identity, and frames go both ways. A certificate of the same CA with another name, dialing as
// the downstream, is refused by the listening upstream.
TEST(PeerTlsTest, DownstreamDialingItsUpstreamIsTheTlsClientAndBothIdentitiesAreChecked) {
  const Certs& certs = Certs::Get();
  const std::string pool = RandomBytes(1 << 16, 7);
  Recorder at_up(100, &pool);
  Recorder at_down(100, &pool);
  PeerServerOptions server_options;
  server_options.listen_address = "127.0.0.1:0";
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> server_credentials =
      TlsServerCredentials(certs.Files("up"));
  ASSERT_TRUE(server_credentials.ok()) << server_credentials.status();
  server_options.credentials = *server_credentials;
  std::unique_ptr<PeerServer> server = *PeerServer::Create(server_options);
  PeerLinkOptions up_options = ServerSide();
  up_options.stage = kBoundary;
  up_options.peer_identity = kDownIdentity;
  absl::StatusOr<PeerLink*> up = server->RegisterBoundary(up_options, at_up.handler());
  ASSERT_TRUE(up.ok()) << up.status();
  ASSERT_TRUE(server->Start().ok());

  auto dial_as_downstream = [&](const std::string& leaf, Transport::Handler handler) {
    PeerLinkOptions o = DialerSide(server->port());
    o.stage = kBoundary + 1;
    o.peer_identity = kUpIdentity;
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
        TlsChannelCredentials(certs.Files(leaf), kUpIdentity);
    EXPECT_TRUE(credentials.ok()) << credentials.status();
    o.channel_credentials = *credentials;
    return *PeerLink::Dial(o, std::move(handler));
  };
  std::unique_ptr<PeerLink> down = dial_as_downstream("down", at_down.handler());
  ASSERT_TRUE(down->WaitConnected(kWait).ok()) << down->status();
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE((*up)->Send(MakeFrame(i, 1000, i, pool)).ok());
    ASSERT_TRUE(down->Send(MakeFrame(i, 1000, 2 * i, pool)).ok());
  }
  ASSERT_TRUE(at_up.WaitDone());
  ASSERT_TRUE(at_down.WaitDone());
  EXPECT_EQ(at_up.errors(), "");
  EXPECT_EQ(at_down.errors(), "");
  EXPECT_EQ((*up)->stats().handshakes_rejected(), 0u);

  std::unique_ptr<PeerLink> intruder = dial_as_downstream("intruder", Ignore);
  const absl::Status connected = intruder->WaitConnected(kWait);
  EXPECT_EQ(connected.code(), absl::StatusCode::kPermissionDenied) << connected;
  EXPECT_THAT(connected.message(), HasSubstr(kDownIdentity));
  EXPECT_THAT(connected.message(), HasSubstr("intruder.mapl.test"));
  EXPECT_GE((*up)->stats().identity_rejected(), 1u);
  EXPECT_TRUE(down->connected());
}

TEST(PeerTlsTest, RotatedServerCertificateIsUsedWithoutARestart) {
  const Certs& certs = Certs::Get();
  // The server starts with a certificate that names the wrong identity, from files that are
  // then rewritten in place with the right one: the dialer, redialing, gets in.
  certs.Leaf("rotating", "ca", "DNS:before-rotation.mapl.test");
  TlsServer s = StartTlsServer(Ignore, certs.Files("rotating"));
  PeerLinkOptions o = DialerSide(s.server->port());
  o.peer_identity = kDownIdentity;
  o.max_backoff = absl::Milliseconds(300);
  o.channel_credentials = *TlsChannelCredentials(certs.Files("up"), kDownIdentity);
  std::unique_ptr<PeerLink> up = *PeerLink::Dial(o, Ignore);
  EXPECT_EQ(up->WaitConnected(kWait).code(), absl::StatusCode::kPermissionDenied);
  certs.Leaf("rotating", "ca", absl::StrCat("DNS:", kDownIdentity));
  const absl::Time deadline = absl::Now() + absl::Seconds(15);
  while (!up->connected() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(100));
  EXPECT_TRUE(up->connected()) << up->status();
}

TEST(PeerTlsTest, MissingOrNonPemFilesAreNamed) {
  const Certs& certs = Certs::Get();
  TlsFiles f = certs.Files("up");
  f.cert_file = certs.path("nope.crt");
  absl::Status s = ValidateTlsFiles(f);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tls.cert_file"));
  EXPECT_THAT(s.message(), HasSubstr("nope.crt"));
  f = certs.Files("up");
  f.key_file = certs.path("up.ext");  // Readable, not PEM.
  s = ValidateTlsFiles(f);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tls.key_file"));
  EXPECT_THAT(s.message(), HasSubstr("no PEM block"));
}

}  // namespace
}  // namespace mapl
