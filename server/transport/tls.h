// TLS for the peer links: gRPC credentials built from PEM files that are re-read while the daemon
// runs (certificate rotation without a restart), and the check of a peer's certificate identity.
//
//   mapl::TlsFiles files{"/etc/mapl/tls/tls.crt", "/etc/mapl/tls/tls.key", "/etc/mapl/tls/ca.crt"};
//   MAPL_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> server,
//                         mapl::TlsServerCredentials(files));
//   MAPL_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> channel,
//                         mapl::TlsChannelCredentials(files,
//                         /*expected_identity=*/"stage-4.mapl"));
//   ...
//   MAPL_RETURN_IF_ERROR(mapl::CheckPeerIdentity(context->auth_context(), "stage-3.mapl", what));
//
// The certificate chain is verified by gRPC (OpenSSL) against `ca_file` during the handshake. The
// identity a boundary expects of its peer is checked after it, by the link, against the subject
// alternative names (DNS, URI or IP) of the peer's certificate: the link knows which boundary a
// stream is for, so a mismatch is counted and reported for that boundary.
#ifndef MAPL_SERVER_TRANSPORT_TLS_H_
#define MAPL_SERVER_TRANSPORT_TLS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/security/auth_context.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace mapl {

struct TlsFiles {
  std::string cert_file;  // PEM certificate (chain) this side presents.
  std::string key_file;   // PEM private key of cert_file.
  std::string ca_file;    // PEM bundle the peer's certificate must chain to.
  // The server asks for and verifies a client certificate (mutual TLS). false: server-side TLS
  // only; the auth token then authenticates the dialer.
  bool mutual = true;
  // How often the files are re-read; a rotated certificate is used from the next handshake.
  unsigned reload_seconds = 60;
};

// INVALID_ARGUMENT naming the missing or unreadable file (a PEM file that does not parse is
// refused too, so a typo fails at start rather than at the first handshake).
absl::Status ValidateTlsFiles(const TlsFiles& files);

// The server's credentials: its certificate, and with `mutual` a required, verified client
// certificate.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TlsServerCredentials(
    const TlsFiles& files);

// The dialer's credentials: it verifies the server's chain against ca_file and presents its own
// certificate. With an `expected_identity` the link checks the server's identity itself
// (CheckPeerIdentity) and gRPC's host-name check is off, so the dialled address may be an IP or
// a Service name the certificate does not carry; without one, gRPC checks the dialled host name.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsChannelCredentials(
    const TlsFiles& files, const std::string& expected_identity);

// The subject alternative names (DNS, URI, IP) of the peer's verified certificate; empty when the
// connection is not TLS or the peer presented none.
std::vector<std::string> PeerIdentities(const grpc::AuthContext& context);

// OK when `expected` is empty, or is one of the peer's subject alternative names. Otherwise
// PERMISSION_DENIED naming `what` (e.g. "peer link for boundary 3 (downstream, stage 4)"), what
// was expected and what the peer presented ("no certificate" on a plaintext connection).
absl::Status CheckPeerIdentity(const std::shared_ptr<const grpc::AuthContext>& context,
                               const std::string& expected, const std::string& what);

// Routes gRPC's own log lines into mapl's structured log (common/log.h) and counts the TLS
// handshakes that failed in this process, which gRPC reports only there. Idempotent; the peer
// server and the dialer call it.
void InstallGrpcLogBridge();
// TLS handshakes that failed in this process since the bridge was installed, in either role.
uint64_t TlsHandshakeFailures();

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_TLS_H_
