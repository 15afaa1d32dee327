// Kernel tests run over every registered backend, the way ggml's test-backend-ops does: a test is
// written once against mapl::Backend and runs for each name in BackendNames(), checking that
// backend against the naive references of tests/kernels/reference.h.
//
//   class ProjectionTest : public BackendTest {};
//   TEST_P(ProjectionTest, ProjectMatchesNaive) { ... be_->Project(h, u, z) ... }
//   INSTANTIATE_TEST_SUITE_P(Backends, ProjectionTest, ::testing::ValuesIn(BackendNames()),
//                            BackendTestName);
//
// Test names read ProjectionTest.ProjectMatchesNaive/cpu.
#ifndef MAPL_TESTS_KERNELS_BACKEND_TEST_H_
#define MAPL_TESTS_KERNELS_BACKEND_TEST_H_

#include <cctype>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/registry.h"

namespace mapl {

// A fixture whose parameter is a registered backend name; be_ is that backend, const as the
// interface promises callers may hold it. A backend that is compiled in but cannot run on this
// machine (UNAVAILABLE: a CUDA backend without a device) skips with the reason.
class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> be = MakeBackend(GetParam());
    if (be.status().code() == absl::StatusCode::kUnavailable) {
      GTEST_SKIP() << "backend " << GetParam() << " cannot run here: " << be.status();
    }
    ASSERT_TRUE(be.ok()) << be.status();
    ASSERT_EQ(std::string((*be)->name()), GetParam());
    be_ = *std::move(be);
  }

  // For fixtures that extend SetUp: true when the backend is usable.
  bool BackendReady() const { return be_ != nullptr; }

  std::unique_ptr<const Backend> be_;
};

// gtest names may hold only letters, digits and '_'.
inline std::string BackendTestName(const ::testing::TestParamInfo<std::string>& info) {
  std::string name = info.param;
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

}  // namespace mapl

#endif  // MAPL_TESTS_KERNELS_BACKEND_TEST_H_
