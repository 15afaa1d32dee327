// The harness of the CUDA IPC test and benchmark (tests/server/cuda_ipc_test.cc,
// bench/cuda_ipc_bench.cc): two real daemons in this process on a METHOD_DENSE boundary, and
// the two trainers as processes of their own (tests/server/cuda_ipc_trainer.cc), since CUDA
// opens an IPC handle only in another process than the one that exported it.
#ifndef MAPL_TESTS_SERVER_CUDA_IPC_RUN_H_
#define MAPL_TESTS_SERVER_CUDA_IPC_RUN_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "tests/server/daemon_stages.h"

extern char** environ;

namespace mapl::test {

// Daemons of stages 0 (upstream) and 1 of boundary 0, dense bf16 on the wire (every bf16 value
// arrives unchanged), with host buffers of `buffer_bytes` for the trainers' host-memory calls.
struct DensePair {
  std::unique_ptr<Daemon> up, down;
};
inline absl::StatusOr<DensePair> StartDensePair(const TempDir& dir, uint32_t d, uint32_t max_tokens,
                                                uint64_t buffer_bytes,
                                                const std::vector<std::string>& extra = {}) {
  Shape shape;
  shape.d = d;
  shape.method = "METHOD_DENSE";
  shape.forward_codec = "";
  shape.max_tokens = max_tokens;
  shape.client_buffer_bytes = buffer_bytes;
  DensePair pair;
  absl::StatusOr<std::unique_ptr<Daemon>> started =
      StartStage(dir, 1, {{0, false, ""}}, shape, extra);
  if (!started.ok()) return started.status();
  pair.down = *std::move(started);
  started = StartStage(dir, 0, {{0, true, Loopback(pair.down->peer_port())}}, shape, extra);
  if (!started.ok()) return started.status();
  pair.up = *std::move(started);
  return pair;
}

// The trainer program: $MAPL_CUDA_IPC_TRAINER, else next to this executable (a device bundle
// keeps every binary in one folder), else where this build made it.
inline std::string TrainerPath() {
  if (const char* env = std::getenv("MAPL_CUDA_IPC_TRAINER"); env != nullptr && *env != '\0') {
    return env;
  }
  char exe[4096];
  const ssize_t len = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len > 0) {
    std::string dir(exe, static_cast<size_t>(len));
    dir = dir.substr(0, dir.rfind('/') + 1);
    if (::access((dir + "cuda_ipc_trainer").c_str(), X_OK) == 0) return dir + "cuda_ipc_trainer";
  }
  return MAPL_CUDA_IPC_TRAINER_PATH;
}

struct TrainerRun {
  int exit_code = -1;  // the exit status; 128 + the signal when killed
  std::string output;  // stdout and stderr together
};

// Runs one trainer per argument list at once (the trainer program, then `args`), each with
// stdout and stderr in a file of `dir`, and waits for all of them. A trainer still running after
// `limit_s` seconds is killed (exit_code 128 + SIGKILL, and its output says so), so that a hang
// fails the caller with what the trainers printed rather than running into the caller's own
// timeout, which would lose their logs.
inline std::vector<TrainerRun> RunTrainers(const std::string& dir,
                                           const std::vector<std::vector<std::string>>& args,
                                           int limit_s = 40) {
  const std::string program = TrainerPath();
  std::vector<pid_t> pids;
  std::vector<std::string> logs;
  for (size_t i = 0; i < args.size(); ++i) {
    logs.push_back(absl::StrCat(dir, "/trainer-", i, ".log"));
    std::vector<std::string> argv_s = {program};
    argv_s.insert(argv_s.end(), args[i].begin(), args[i].end());
    std::vector<char*> argv;
    for (std::string& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 1, logs.back().c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0600);
    posix_spawn_file_actions_adddup2(&files, 1, 2);
    pid_t pid = -1;
    if (posix_spawn(&pid, program.c_str(), &files, nullptr, argv.data(), environ) != 0) pid = -1;
    posix_spawn_file_actions_destroy(&files);
    pids.push_back(pid);
  }
  std::vector<TrainerRun> runs(args.size());
  std::vector<bool> done(args.size(), false), killed(args.size(), false);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(limit_s);
  for (size_t left = args.size();;) {
    for (size_t i = 0; i < args.size(); ++i) {
      if (done[i]) continue;
      int status = 0;
      if (pids[i] < 0) {
        runs[i].output = "posix_spawn of " + program + " failed";
      } else if (::waitpid(pids[i], &status, WNOHANG) == pids[i]) {
        runs[i].exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      } else {
        continue;
      }
      done[i] = true;
      --left;
    }
    if (left == 0) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      for (size_t i = 0; i < args.size(); ++i) {
        if (done[i]) continue;
        ::kill(pids[i], SIGKILL);
        int status = 0;
        ::waitpid(pids[i], &status, 0);
        runs[i].exit_code = 128 + SIGKILL;
        killed[i] = true;
        done[i] = true;
      }
      break;
    }
    ::usleep(20000);
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (pids[i] < 0) continue;
    std::ifstream in(logs[i]);
    std::stringstream text;
    text << in.rdbuf();
    runs[i].output = text.str();
    if (killed[i]) {
      absl::StrAppend(&runs[i].output, "[killed by the harness: still running after ", limit_s,
                      " s]\n");
    }
  }
  return runs;
}

}  // namespace mapl::test

#endif  // MAPL_TESTS_SERVER_CUDA_IPC_RUN_H_
