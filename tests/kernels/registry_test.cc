// The registry of backends by name (kernels/registry.h).
#include "kernels/registry.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/kernels/backend_test.h"

namespace mapl {
namespace {

TEST(Registry, CpuIsRegisteredFirstAndNamesAreUnique) {
  const std::vector<std::string> names = BackendNames();
  ASSERT_FALSE(names.empty());
  EXPECT_EQ(names.front(), "cpu");
  std::vector<std::string> sorted = names;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end());
}

TEST(Registry, UnknownNameIsNotFoundAndListsTheRegisteredNames) {
  for (const char* bad : {"gpu", "", "CPU", "cpu "}) {
    const absl::StatusOr<std::unique_ptr<Backend>> be = MakeBackend(bad);
    ASSERT_FALSE(be.ok()) << "\"" << bad << "\"";
    EXPECT_EQ(be.status().code(), absl::StatusCode::kNotFound) << be.status();
    const std::string msg(be.status().message());
    EXPECT_NE(msg.find(std::string("\"") + bad + "\""), std::string::npos) << msg;
    for (const std::string& name : BackendNames()) {
      EXPECT_NE(msg.find(name), std::string::npos) << msg;
    }
    EXPECT_NE(msg.find("cpu"), std::string::npos) << msg;
  }
}

TEST(Registry, MakeCpuBackendIsTheCpuEntry) {
  const std::unique_ptr<Backend> direct = MakeCpuBackend();
  ASSERT_NE(direct, nullptr);
  EXPECT_STREQ(direct->name(), "cpu");
  absl::StatusOr<std::unique_ptr<Backend>> by_name = MakeBackend("cpu");
  ASSERT_TRUE(by_name.ok()) << by_name.status();
  EXPECT_STREQ((*by_name)->name(), "cpu");
}

#ifdef MAPL_WITH_CUDA
// A build with the CUDA backend registers "cuda": MakeBackend makes it, or says why this machine
// cannot run it (UNAVAILABLE, naming the CUDA error), but never answers NOT_FOUND.
TEST(Registry, CudaIsRegisteredWhenBuilt) {
  const std::vector<std::string> names = BackendNames();
  EXPECT_NE(std::find(names.begin(), names.end(), "cuda"), names.end());
  const absl::StatusOr<std::unique_ptr<Backend>> be = MakeBackend("cuda");
  if (be.ok()) {
    EXPECT_STREQ((*be)->name(), "cuda");
    return;
  }
  EXPECT_EQ(be.status().code(), absl::StatusCode::kUnavailable) << be.status();
  EXPECT_FALSE(be.status().message().empty());
}

// A malformed MAPL_CUDA_DEVICE is a configuration error, reported before any device is touched.
TEST(Registry, CudaRejectsAMalformedDeviceIndex) {
  const char* old = std::getenv("MAPL_CUDA_DEVICE");
  const std::string saved = old != nullptr ? old : "";
  for (const char* bad : {"x", "-1", "1.5"}) {
    ASSERT_EQ(setenv("MAPL_CUDA_DEVICE", bad, 1), 0);
    const absl::StatusOr<std::unique_ptr<Backend>> be = MakeBackend("cuda");
    EXPECT_EQ(be.status().code(), absl::StatusCode::kInvalidArgument) << bad << ": " << be.status();
    EXPECT_NE(std::string(be.status().message()).find("MAPL_CUDA_DEVICE"), std::string::npos)
        << be.status();
  }
  if (old != nullptr) {
    setenv("MAPL_CUDA_DEVICE", saved.c_str(), 1);
  } else {
    unsetenv("MAPL_CUDA_DEVICE");
  }
}
#endif  // MAPL_WITH_CUDA

// Each registered name makes a fresh backend that reports that name (BackendTest::SetUp checks
// it); two calls give two objects, since backends are created, not shared.
class RegistryEntryTest : public BackendTest {};

TEST_P(RegistryEntryTest, MakesAFreshBackendOfThatName) {
  absl::StatusOr<std::unique_ptr<Backend>> other = MakeBackend(GetParam());
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_NE(other->get(), be_.get());
  EXPECT_EQ(std::string((*other)->name()), GetParam());
}

INSTANTIATE_TEST_SUITE_P(Backends, RegistryEntryTest, ::testing::ValuesIn(BackendNames()),
                         BackendTestName);

}  // namespace
}  // namespace mapl
