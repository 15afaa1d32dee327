// config_fuzzer: the daemon's config path (server/config.h): ParseConfig of the config text,
// ApplyOverride of each --set, FinalizeConfig, then what main and the daemon derive from the
// result (MaxPeerMessageBytes, TlsFilesOf, RedactedConfig, the --print_config text).
//
// Beyond crashes and sanitizer reports it checks that finalizing is idempotent (a finalized
// config finalizes to itself: --print_config's output is a valid config of the same daemon) and
// that the printed text parses back to the same config.
//
// FinalizeConfig reads the TLS files a config names. The fuzzer never lets it read a path of the
// input: each TLS path is replaced by one of four files of a private temporary directory (a
// certificate-like PEM, a key-like PEM, junk, and a missing one), chosen by the path's hash.
//
// Input: the config text, then NUL-separated --set assignments (at most 16).
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "server/config.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

const std::string& TlsDir() {
  static const std::string* const dir =
      [] {
        char tmpl[] = "/tmp/mapl-config-fuzz-XXXXXX";
        if (::mkdtemp(tmpl) == nullptr) mapl::fuzz::Fail("mkdtemp");
        const std::string d = tmpl;
        std::ofstream(d + "/cert.pem")
            << "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::ofstream(d + "/key.pem")
            << "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        std::ofstream(d + "/junk.pem") << "not a pem file\n";
        return new std::string(d);
      }();
  return *dir;
}

std::string Sandboxed(const std::string& path) {
  if (path.empty()) return path;
  static const char* const kFiles[] = {"cert.pem", "key.pem", "junk.pem", "missing.pem"};
  return TlsDir() + "/" + kFiles[absl::Hash<std::string>()(path) % 4];
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Pinned: DefaultSocketPath reads it, and the result must not depend on the environment.
  ::setenv("XDG_RUNTIME_DIR", "/run/user/1000", 1);
  TlsDir();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mapl;
  const std::string input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> parts = absl::StrSplit(input, '\0');
  absl::StatusOr<v1::DaemonConfig> parsed = ParseConfig(parts[0]);
  v1::DaemonConfig config = parsed.ok() ? *std::move(parsed) : v1::DaemonConfig();
  for (size_t i = 1; i < parts.size() && i <= 16; ++i) (void)ApplyOverride(parts[i], &config);
  if (config.has_tls()) {
    v1::TlsConfig* tls = config.mutable_tls();
    tls->set_cert_file(Sandboxed(tls->cert_file()));
    tls->set_key_file(Sandboxed(tls->key_file()));
    tls->set_ca_file(Sandboxed(tls->ca_file()));
  }
  absl::StatusOr<v1::DaemonConfig> final_config = FinalizeConfig(config);
  if (!final_config.ok()) return 0;

  using google::protobuf::util::MessageDifferencer;
  absl::StatusOr<v1::DaemonConfig> again = FinalizeConfig(*final_config);
  FUZZ_EXPECT(again.ok(), "a finalized config finalizes again: " + again.status().ToString());
  FUZZ_EXPECT(MessageDifferencer::Equals(*again, *final_config),
              "finalizing is idempotent:\n" + final_config->DebugString() + "\nthen\n" +
                  again->DebugString());
  std::string text;
  FUZZ_EXPECT(google::protobuf::TextFormat::PrintToString(*final_config, &text), "printed");
  absl::StatusOr<v1::DaemonConfig> reparsed = ParseConfig(text);
  FUZZ_EXPECT(reparsed.ok(), "the printed config parses: " + reparsed.status().ToString());
  FUZZ_EXPECT(MessageDifferencer::Equals(*reparsed, *final_config),
              "the printed config parses to itself:\n" + text);
  for (const v1::BoundaryConfig& b : final_config->boundaries()) {
    const int max_bytes = MaxPeerMessageBytes(b);
    FUZZ_EXPECT(max_bytes >= (4 << 20) && max_bytes <= (1 << 30), "MaxPeerMessageBytes bounds");
  }
  if (final_config->has_tls()) (void)TlsFilesOf(final_config->tls());
  (void)RedactedConfig(*final_config);
  return 0;
}
