// mapld: parses flags into a validated config and hands it to mapl::Daemon.
//
//   mapld --config stage0.textproto [--set boundaries[0].k=64 --set stage=0]
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "server/config.h"
#include "server/daemon.h"

ABSL_FLAG(std::string, config, "", "Text-format mapl.v1.DaemonConfig (proto/mapl/v1/config.proto)");
ABSL_FLAG(std::vector<std::string>, set, {},
          "Override a config field, path=value; repeat the flag for more: --set stage=1 "
          "--set boundaries[0].k=64 (a value may contain commas)");
ABSL_FLAG(int32_t, drain_seconds, 30, "On SIGTERM, wait this long for in-flight frames");
ABSL_FLAG(bool, verbose, false, "Log debug messages too");
ABSL_FLAG(bool, print_config, false, "Print the complete config (defaults filled) and exit");
ABSL_FLAG(std::string, ready_file, "",
          "Once serving, write {\"socket\", \"peer_port\", \"metrics_port\", \"pid\"} as JSON "
          "here (atomically): how scripts learn the ports a config with port 0 got");

namespace {

// Every --set value in order. Abseil keeps only the last occurrence of a flag and splits list
// flags at commas; overrides need all occurrences, verbatim.
std::vector<std::string> RepeatedFlag(int argc, char** argv, const std::string& name) {
  std::vector<std::string> values;
  const std::string eq = "--" + name + "=", bare = "--" + name;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") break;
    if (a.rfind(eq, 0) == 0) {
      values.push_back(a.substr(eq.size()));
    } else if (a == bare && i + 1 < argc) {
      values.push_back(argv[++i]);
    }
  }
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  // The daemon's large buffers (tensors of up to max_tokens x d floats, their projections, the
  // learners' samples) are allocated and freed at the microbatch rate. With glibc's defaults
  // each one is a fresh mmap whose pages the kernel zero-fills on first touch, then an munmap
  // (docs/ARCHITECTURE.md, Memory, has the measurements). Keeping freed memory in the heap for
  // reuse avoids that; the peak stays what the queues bound. Set here, not by environment, so
  // every start behaves the same.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  absl::SetProgramUsageMessage(
      "mapl sidecar daemon: one per pipeline stage.\n  mapld --config stage.textproto "
      "[--set path=value ...]\nSee deploy/examples/ for configs.");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_verbose)) mapl::SetLogLevel(mapl::LogLevel::kDebug);

  absl::StatusOr<mapl::v1::DaemonConfig> config =
      mapl::LoadConfig(absl::GetFlag(FLAGS_config), RepeatedFlag(argc, argv, "set"));
  if (!config.ok()) {
    std::fprintf(stderr, "mapld: invalid configuration: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  if (absl::GetFlag(FLAGS_print_config)) {
    std::printf("%s", config->DebugString().c_str());
    return 0;
  }

  // Signals go to one waiting thread, never to a handler that could interrupt a lock holder.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<std::unique_ptr<mapl::Daemon>> daemon = mapl::Daemon::Start(*config);
  if (!daemon.ok()) {
    mapl::Log(mapl::LogLevel::kError, "startup failed",
              {{"error", std::string(daemon.status().message())}});
    return 1;
  }
  mapl::Daemon* d = daemon->get();
  if (const std::string path = absl::GetFlag(FLAGS_ready_file); !path.empty()) {
    const std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    if (f == nullptr ||
        std::fprintf(f,
                     "{\"socket\": \"%s\", \"peer_port\": %d, \"metrics_port\": %d, \"pid\": %d}\n",
                     d->config().local_socket().c_str(), d->peer_port(), d->metrics_port(),
                     static_cast<int>(getpid())) < 0 ||
        std::fclose(f) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
      mapl::Log(mapl::LogLevel::kError, "cannot write --ready_file", {{"path", path}});
      d->Shutdown(absl::ZeroDuration());
      return 1;
    }
  }
  // One thread takes every signal: the first drains and stops the daemon; a second one (an
  // impatient Ctrl-C) exits at once.
  absl::Notification first_signal;
  std::thread waiter([&signals, &first_signal] {
    int sig = 0;
    sigwait(&signals, &sig);
    mapl::Log(mapl::LogLevel::kInfo, "signal received, draining",
              {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
    first_signal.Notify();
    sigwait(&signals, &sig);
    mapl::Log(mapl::LogLevel::kWarning, "second signal: exiting without finishing the drain");
    _exit(1);
  });
  waiter.detach();
  first_signal.WaitForNotification();
  d->Shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)));
  d->Wait();
  return 0;
}
