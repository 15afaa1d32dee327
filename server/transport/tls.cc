// gRPC's TLS credentials (the experimental TlsCredentialsOptions API of gRPC 1.51, the one with a
// file-watching certificate provider) and the identity check of a peer's certificate.
#include "server/transport/tls.h"

#include <atomic>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/base/call_once.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "grpc/grpc_security_constants.h"
#include "grpc/support/log.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_certificate_verifier.h"
#include "grpcpp/security/tls_credentials_options.h"

namespace mapl {
namespace {

using grpc::experimental::FileWatcherCertificateProvider;

absl::Status CheckPemFile(const std::string& path, const char* field, const char* marker) {
  if (path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("tls.", field, ": required when TLS is on"));
  }
  std::ifstream in(path);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("tls.", field, ": cannot read '", path,
                     "' (does it exist, and may mapld's user read it?)"));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().find(marker) == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("tls.", field, ": '", path, "' holds no PEM block (", marker, "...)"));
  }
  return absl::OkStatus();
}

std::shared_ptr<FileWatcherCertificateProvider> Provider(const TlsFiles& files) {
  return std::make_shared<FileWatcherCertificateProvider>(files.key_file, files.cert_file,
                                                          files.ca_file, files.reload_seconds);
}

std::atomic<uint64_t> tls_handshake_failures{0};

void GrpcLogToMapl(gpr_log_func_args* args) {
  const absl::string_view message(args->message == nullptr ? "" : args->message);
  // gRPC 1.51 reports a failed TLS handshake at INFO ("Handshake failed with fatal error
  // SSL_ERROR_SSL: ...") from the TSI layer, and once more per connection ("Security handshake
  // failed: ..."); the first is counted.
  if (absl::StrContains(message, "Handshake failed with fatal error")) {
    const uint64_t count = tls_handshake_failures.fetch_add(1, std::memory_order_relaxed) + 1;
    // At most one line a second: a peer (or a scanner) retrying fast must not flood the log.
    static std::atomic<int64_t> last_logged_ns{0};
    static std::atomic<uint64_t> logged_at_count{0};
    const int64_t now_ns = absl::GetCurrentTimeNanos();
    int64_t last = last_logged_ns.load(std::memory_order_relaxed);
    if (now_ns - last >= 1000000000 &&
        last_logged_ns.compare_exchange_strong(last, now_ns, std::memory_order_relaxed)) {
      const uint64_t before = logged_at_count.exchange(count, std::memory_order_relaxed);
      Log(LogLevel::kWarning, "tls handshake failed",
          {{"grpc", std::string(message)},
           {"suppressed_since_last", absl::StrCat(before == 0 ? 0 : count - before - 1)}});
    }
    return;
  }
  // The bridge lowers gRPC's verbosity to INFO to see those lines; other INFO lines stay quiet.
  if (args->severity == GPR_LOG_SEVERITY_INFO || args->severity == GPR_LOG_SEVERITY_DEBUG) return;
  // The listener logs this at ERROR for every dialer that names it by an address its certificate
  // does not carry (SNI): it then presents its one certificate, whose identity the link checks.
  if (absl::StrContains(message, "No match found for server name")) return;
  Log(args->severity == GPR_LOG_SEVERITY_ERROR ? LogLevel::kError : LogLevel::kWarning, "grpc",
      {{"message", std::string(message)},
       {"at", absl::StrCat(args->file == nullptr ? "?" : args->file, ":", args->line)}});
}

}  // namespace

void InstallGrpcLogBridge() {
  static absl::once_flag once;
  absl::call_once(once, [] {
    gpr_set_log_function(GrpcLogToMapl);
    gpr_set_log_verbosity(GPR_LOG_SEVERITY_INFO);
  });
}

uint64_t TlsHandshakeFailures() { return tls_handshake_failures.load(std::memory_order_relaxed); }

absl::Status ValidateTlsFiles(const TlsFiles& files) {
  if (absl::Status s = CheckPemFile(files.cert_file, "cert_file", "-----BEGIN CERTIFICATE");
      !s.ok()) {
    return s;
  }
  // "-----BEGIN " covers PRIVATE KEY, RSA PRIVATE KEY and EC PRIVATE KEY.
  if (absl::Status s = CheckPemFile(files.key_file, "key_file", "PRIVATE KEY-----"); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckPemFile(files.ca_file, "ca_file", "-----BEGIN CERTIFICATE"); !s.ok()) {
    return s;
  }
  if (files.reload_seconds == 0) {
    return absl::InvalidArgumentError("tls.reload_seconds: must be positive");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TlsServerCredentials(
    const TlsFiles& files) {
  if (absl::Status s = ValidateTlsFiles(files); !s.ok()) return s;
  grpc::experimental::TlsServerCredentialsOptions options(Provider(files));
  options.watch_identity_key_cert_pairs();
  options.watch_root_certs();
  options.set_cert_request_type(files.mutual
                                    ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                    : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  std::shared_ptr<grpc::ServerCredentials> credentials =
      grpc::experimental::TlsServerCredentials(options);
  if (credentials == nullptr) {
    return absl::InvalidArgumentError("tls: gRPC refused the server's TLS settings");
  }
  return credentials;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> TlsChannelCredentials(
    const TlsFiles& files, const std::string& expected_identity) {
  if (absl::Status s = ValidateTlsFiles(files); !s.ok()) return s;
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(Provider(files));
  options.watch_identity_key_cert_pairs();
  options.watch_root_certs();
  options.set_verify_server_certs(true);  // The chain, against ca_file: always.
  if (!expected_identity.empty()) {
    // The link checks the identity the boundary expects (CheckPeerIdentity); the dialled name
    // need not be in the certificate.
    options.set_certificate_verifier(
        std::make_shared<grpc::experimental::NoOpCertificateVerifier>());
    options.set_check_call_host(false);
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::experimental::TlsCredentials(options);
  if (credentials == nullptr) {
    return absl::InvalidArgumentError("tls: gRPC refused the dialer's TLS settings");
  }
  return credentials;
}

std::vector<std::string> PeerIdentities(const grpc::AuthContext& context) {
  std::vector<std::string> names;
  if (!context.IsPeerAuthenticated()) return names;
  for (const char* property :
       {GRPC_X509_SAN_PROPERTY_NAME, GRPC_PEER_URI_PROPERTY_NAME, GRPC_PEER_IP_PROPERTY_NAME}) {
    for (const grpc::string_ref& value : context.FindPropertyValues(property)) {
      std::string name(value.data(), value.size());
      bool seen = false;
      for (const std::string& n : names) seen |= n == name;
      if (!seen) names.push_back(std::move(name));
    }
  }
  return names;
}

absl::Status CheckPeerIdentity(const std::shared_ptr<const grpc::AuthContext>& context,
                               const std::string& expected, const std::string& what) {
  if (expected.empty()) return absl::OkStatus();
  if (context == nullptr || !context->IsPeerAuthenticated()) {
    return absl::PermissionDeniedError(
        absl::StrCat(what, ": expects the peer identity '", expected,
                     "' but the peer presented no certificate (is TLS on at both ends?)"));
  }
  const std::vector<std::string> names = PeerIdentities(*context);
  for (const std::string& name : names) {
    if (name == expected) return absl::OkStatus();
  }
  return absl::PermissionDeniedError(absl::StrCat(
      what, ": expects the peer identity '", expected, "' but the peer's certificate names ",
      names.empty() ? std::string("none") : absl::StrJoin(names, ", ")));
}

}  // namespace mapl
