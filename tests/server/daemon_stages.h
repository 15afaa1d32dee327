// Real daemons for tests and benchmarks: the config of one stage with its boundaries
// (server/config.h's LoadConfig from overrides, as an operator writes them), started in this
// process, with sockets in a temporary folder.
//
//   TempDir dir;
//   Shape shape;  // d, k, method, codecs, vocab, max_tokens, client buffers
//   MAPL_ASSIGN_OR_RETURN(auto down, StartStage(dir, 1, {{0, false, ""}}, shape));
//   MAPL_ASSIGN_OR_RETURN(auto up, StartStage(dir, 0, {{0, true, Loopback(down->peer_port())}},
//                                             shape));
#ifndef MAPL_TESTS_SERVER_DAEMON_STAGES_H_
#define MAPL_TESTS_SERVER_DAEMON_STAGES_H_

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "server/config.h"
#include "server/daemon.h"

namespace mapl::test {

// A temp dir for sockets, short enough for sun_path (108 bytes); removed with what is left in it.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/mapl-daemon-test-XXXXXX";
    const char* made = ::mkdtemp(tmpl);
    path_ = made != nullptr ? made : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The shape of the boundaries a test runs.
struct Shape {
  uint32_t d = 32;
  uint32_t k = 8;
  std::string method = "METHOD_MAPL";
  std::string forward_codec = "CODEC_INT8";  // empty: the config's default
  uint32_t vocab = 50;
  uint32_t max_tokens = 64;
  uint64_t client_buffer_bytes = 65536;  // each of a trainer's two buffers
};

struct Side {
  uint32_t boundary;
  bool upstream;
  std::string peer;  // the downstream's host:port, upstream sides only
};

inline absl::StatusOr<v1::DaemonConfig> StageConfig(const TempDir& dir, uint32_t stage,
                                                    const std::vector<Side>& sides,
                                                    const Shape& shape,
                                                    const std::vector<std::string>& extra = {}) {
  std::vector<std::string> o = {
      absl::StrCat("stage=", stage),
      absl::StrCat("local_socket=", dir.path(), "/s", stage, ".sock"),
      "metrics_address=127.0.0.1:0",
      "peer_listen=127.0.0.1:0",
      "auth_token=t",
      "client_buffers=2",
      absl::StrCat("client_buffer_bytes=", shape.client_buffer_bytes),
      "recv_timeout_ms=10000",
  };
  for (size_t i = 0; i < sides.size(); ++i) {
    const std::string b = absl::StrCat("boundaries[", i, "].");
    o.push_back(absl::StrCat(b, "id=", sides[i].boundary));
    o.push_back(b + (sides[i].upstream ? "role=ROLE_UPSTREAM" : "role=ROLE_DOWNSTREAM"));
    if (sides[i].upstream) o.push_back(b + "peer_address=" + sides[i].peer);
    o.push_back(absl::StrCat(b, "d=", shape.d));
    o.push_back(absl::StrCat(b, "k=", shape.k));
    o.push_back(b + "method=" + shape.method);
    if (!shape.forward_codec.empty()) o.push_back(b + "forward_codec=" + shape.forward_codec);
    o.push_back(absl::StrCat(b, "vocab=", shape.vocab));
    o.push_back(absl::StrCat(b, "max_tokens=", shape.max_tokens));
  }
  for (const std::string& e : extra) o.push_back(e);
  return LoadConfig("", o);
}

inline absl::StatusOr<std::unique_ptr<Daemon>> StartStage(
    const TempDir& dir, uint32_t stage, const std::vector<Side>& sides, const Shape& shape,
    const std::vector<std::string>& extra = {}) {
  absl::StatusOr<v1::DaemonConfig> config = StageConfig(dir, stage, sides, shape, extra);
  if (!config.ok()) return config.status();
  return Daemon::Start(*config);
}

inline std::string Loopback(int port) { return absl::StrCat("127.0.0.1:", port); }

}  // namespace mapl::test

#endif  // MAPL_TESTS_SERVER_DAEMON_STAGES_H_
