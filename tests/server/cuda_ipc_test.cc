// CUDA IPC intake on a GPU (ctest label gpu; skipped, with the reason, where CUDA cannot run):
// two real daemons in this process, and GPU trainers as processes of their own
// (cuda_ipc_trainer) that attach with device buffers, open the IPC handles and hand tensors over
// in device memory, ordered by the shared events, in both directions.
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "tests/server/cuda_ipc_run.h"

namespace mapl::test {
namespace {

// Skips the test, with the driver's reason, where the CUDA module cannot use a device.
#define SKIP_WITHOUT_CUDA()                                                               \
  do {                                                                                    \
    absl::StatusOr<std::unique_ptr<Backend>> cuda = MakeBackend("cuda");                  \
    if (!cuda.ok()) GTEST_SKIP() << "no usable CUDA device: " << cuda.status().message(); \
  } while (0)

uint64_t BoundaryFramesSent(Daemon& daemon) {
  absl::StatusOr<v1::StatsReply> stats = daemon.Stats(v1::StatsRequest());
  return stats.ok() && stats->boundaries_size() > 0 ? stats->boundaries(0).frames_sent() : 0;
}

TEST(CudaIpcTest, AnAttachWithDeviceBuffersGetsHandlesOfEachOnTheDevice) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  absl::StatusOr<DensePair> pair = StartDensePair(dir, 256, 64, 1 << 20);
  ASSERT_TRUE(pair.ok()) << pair.status();
  v1::AttachRequest want;
  want.set_client_name("gpu");
  want.set_cuda_buffers(3);
  want.set_cuda_buffer_bytes(5 << 20);
  want.set_cuda_events(7);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> s = pair->up->Attach(want, &event);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE(event.has_cuda());
  EXPECT_EQ(event.cuda().device_uuid().size(), 16u);
  EXPECT_EQ(event.cuda().buffer_bytes(), uint64_t{5} << 20);
  ASSERT_EQ(event.cuda().memory_handles_size(), 3);
  for (const std::string& h : event.cuda().memory_handles()) EXPECT_EQ(h.size(), 64u);
  ASSERT_EQ(event.cuda().event_handles_size(), 7);
  for (const std::string& h : event.cuda().event_handles()) EXPECT_EQ(h.size(), 64u);
  EXPECT_NE(event.cuda().memory_handles(0), event.cuda().memory_handles(1));

  // The device named by its UUID is found; a UUID no device has is refused, naming the field.
  want.set_cuda_device_uuid(event.cuda().device_uuid());
  v1::AttachEvent same;
  EXPECT_TRUE(pair->up->Attach(want, &same).ok());
  EXPECT_EQ(same.cuda().device_uuid(), event.cuda().device_uuid());
  want.set_cuda_device_uuid(std::string(16, '\0'));
  v1::AttachEvent none;
  absl::StatusOr<std::shared_ptr<Session>> refused = pair->up->Attach(want, &none);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "cuda_device_uuid"))
      << refused.status();
  pair->up->Shutdown(absl::Seconds(1));
  pair->down->Shutdown(absl::Seconds(1));
}

// The sending trainer's stream is held for 20 ms before it writes the tensor, so a daemon whose
// copy did not wait for the event would send the previous step's values (zeros at first). On the
// receiving side the daemon replies before its copy into the device buffer is done (about a
// millisecond for these 32 MiB), and the trainer reads as soon as its stream has waited on the
// event: a missing record would likely show as values of the previous step, though that side is
// a race, not forced. Odd steps use events, even steps none.
TEST(CudaIpcTest, TensorsCrossBothWaysInDeviceMemoryOrderedByTheEvents) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  constexpr uint32_t kD = 4096, kRows = 4096;  // 32 MiB: a copy of about a millisecond
  absl::StatusOr<DensePair> pair = StartDensePair(dir, kD, kRows, 1 << 20);
  ASSERT_TRUE(pair.ok()) << pair.status();
  const std::vector<std::string> common = {absl::StrCat("--rows=", kRows), absl::StrCat("--d=", kD),
                                           "--steps=4"};
  std::vector<std::string> up = {"--socket=" + pair->up->config().local_socket(), "--role=up"};
  std::vector<std::string> down = {"--socket=" + pair->down->config().local_socket(),
                                   "--role=down"};
  up.insert(up.end(), common.begin(), common.end());
  down.insert(down.end(), common.begin(), common.end());
  const std::vector<TrainerRun> runs = RunTrainers(dir.path(), {up, down});
  for (const TrainerRun& r : runs) {
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_TRUE(absl::StrContains(r.output, "result=ok")) << r.output;
  }
  EXPECT_EQ(BoundaryFramesSent(*pair->up), 4u);
  EXPECT_EQ(BoundaryFramesSent(*pair->down), 4u);
  pair->up->Shutdown(absl::Seconds(1));
  pair->down->Shutdown(absl::Seconds(1));
}

}  // namespace
}  // namespace mapl::test
