// What handing a tensor over in device memory (CUDA IPC) costs beyond the copy it implies, per
// call, against the same tensor in shared host memory: two real daemons on a dense bf16
// boundary, and two GPU trainers (tests/server/cuda_ipc_trainer.cc) as processes of their own.
//
//   cuda_ipc_bench            (needs a CUDA device; bench/gpu_check.sh runs it)
//
// For each size, the upstream times Send from host memory and from device memory (an event
// recorded on an idle stream), the downstream times Recv into each once every tensor has
// arrived (for device memory: until its stream has waited on the daemon's event). Each prints
// the medians and the median of a plain cudaMemcpy of the same bytes in the daemon's direction
// (device to host for Send, host to device for Recv); handoff_extra_us = device - host - copy,
// what the hand-off adds beyond the copy.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/registry.h"
#include "tests/server/cuda_ipc_run.h"

int main() {
  using mapl::test::DensePair;
  using mapl::test::TempDir;
  absl::StatusOr<std::unique_ptr<mapl::Backend>> cuda = mapl::MakeBackend("cuda");
  if (!cuda.ok()) {
    std::fprintf(stderr, "cuda_ipc_bench: no usable CUDA device: %s\n",
                 std::string(cuda.status().message()).c_str());
    return 1;
  }
  constexpr uint32_t kD = 4096;
  struct Size {
    uint32_t rows, repeat;
  };
  int failed = 0;
  for (const Size size : {Size{16, 100}, Size{1024, 10}}) {
    TempDir dir;
    absl::StatusOr<DensePair> pair =
        mapl::test::StartDensePair(dir, kD, size.rows, uint64_t{size.rows} * kD * 2);
    if (!pair.ok()) {
      std::fprintf(stderr, "cuda_ipc_bench: %s\n", pair.status().ToString().c_str());
      return 1;
    }
    const std::vector<std::string> common = {absl::StrCat("--rows=", size.rows),
                                             absl::StrCat("--d=", kD),
                                             absl::StrCat("--repeat=", size.repeat), "--time"};
    std::vector<std::string> up = {"--socket=" + pair->up->config().local_socket(), "--role=up"};
    std::vector<std::string> down = {"--socket=" + pair->down->config().local_socket(),
                                     "--role=down"};
    up.insert(up.end(), common.begin(), common.end());
    down.insert(down.end(), common.begin(), common.end());
    for (const mapl::test::TrainerRun& r :
         mapl::test::RunTrainers(dir.path(), {up, down}, /*limit_s=*/70)) {
      std::fputs(r.output.c_str(), stdout);
      if (r.exit_code != 0) ++failed;
    }
    pair->up->Shutdown(absl::Seconds(1));
    pair->down->Shutdown(absl::Seconds(1));
  }
  std::fflush(stdout);
  return failed == 0 ? 0 : 1;
}
