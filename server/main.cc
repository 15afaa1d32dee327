// mapld: parses flags into a validated config and hands it to mapl::Daemon.
//
//   mapld --config stage0.textproto [--set boundaries[0].k=64 --set stage=0]
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "common/check.h"
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

// The write end of the pipe that SIGTERM and SIGINT are reported through (non-blocking).
int signal_pipe = -1;

// Runs on whatever thread the kernel picks and only calls write(2), which is async-signal-safe,
// so it cannot interrupt a lock holder into a deadlock. A full pipe drops the byte: enough
// signals are already queued.
void OnSignal(int sig) {
  const int saved_errno = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  if (write(signal_pipe, &b, 1) < 0) {
    // Nothing to do in a handler.
  }
  errno = saved_errno;
}

// Routes SIGTERM and SIGINT to OnSignal; returns the pipe's read end, or -1 with errno.
//
// Why not block the signals and sigwait() on one thread: a process-directed signal goes to any
// thread that does not block it, and libraries start threads before main can block anything
// (OpenBLAS starts a pool of one thread a core when OPENBLAS_NUM_THREADS is unset). Such a
// thread received SIGTERM with its default action, and the daemon died without draining. A
// handler runs wherever the signal lands.
int RouteSignalsToPipe() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return -1;
  if (fcntl(fds[1], F_SETFL, O_NONBLOCK) != 0) return -1;
  signal_pipe = fds[1];
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  if (sigaction(SIGTERM, &sa, nullptr) != 0 || sigaction(SIGINT, &sa, nullptr) != 0) return -1;
  return fds[0];
}

// The next signal's number from the pipe (blocks).
int NextSignal(int pipe_read) {
  unsigned char b = 0;
  while (read(pipe_read, &b, 1) != 1) {
    MAPL_CHECK(errno == EINTR, absl::StrCat("reading the signal pipe: ", std::strerror(errno)));
  }
  return b;
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
  // One arena for every thread. glibc gives threads arenas of their own, whose heaps hold no
  // chunk above 64 MiB: every larger buffer a worker or gRPC thread allocates (a dense frame,
  // its serialized message, a 128 MiB tensor) was then a fresh mmap, zero-filled page by page
  // on first touch, whatever the threshold above. Measured on 2 cores, METHOD_DENSE with 128
  // MiB tensors (bench/e2e_loopback.py): the daemons' CPU a microbatch fell from 3.3 s to
  // 0.78 s; METHOD_MAPL did not change (bench/README.md). Threads still keep their own caches
  // of small blocks (tcache), so they rarely meet on the arena's lock.
  mallopt(M_ARENA_MAX, 1);
  // Every peer connection is a descriptor. The soft limit (often 1024) would let a crowd of
  // connections that never authenticate starve the real peer's reconnect of descriptors; the
  // hard limit is what the operator allows. The peer server's own limits bound the rest.
  struct rlimit files;
  if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }
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
    std::printf("%s", mapl::RedactedConfig(*config).DebugString().c_str());
    return 0;
  }

  // A signal that arrives during startup waits in the pipe and starts the drain once serving.
  const int signal_read = RouteSignalsToPipe();
  if (signal_read < 0) {
    std::fprintf(stderr, "mapld: cannot install the signal handlers: %s\n", std::strerror(errno));
    return 1;
  }
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
  std::thread waiter([signal_read, &first_signal] {
    const int sig = NextSignal(signal_read);
    mapl::Log(mapl::LogLevel::kInfo, "signal received, draining",
              {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
    first_signal.Notify();
    NextSignal(signal_read);
    mapl::Log(mapl::LogLevel::kWarning, "second signal: exiting without finishing the drain");
    _exit(1);
  });
  waiter.detach();
  first_signal.WaitForNotification();
  d->Shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)));
  d->Wait();
  return 0;
}
