// The backend table.
//
// Registration is an explicit table rather than self-registering static objects on purpose:
// mapl_kernels is a static library, and the linker copies an object file out of a static library
// only when something references a symbol in it. A backend that registered itself from a static
// initializer in its own .cc file would be referenced by nothing, so the linker would silently
// drop it and the backend would be missing from the binary with no error. Here the table names
// each factory, so each backend's code is always linked in, and a backend enabled without its
// factory is a link error, not a silent omission. The table is constant-initialised, so
// BackendNames() is safe to call from other static initialisers (gtest's INSTANTIATE_TEST_SUITE_P).
#include "kernels/registry.h"

#include <iterator>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mapl {

#ifdef MAPL_WITH_CUDA
// kernels/cuda/loader.cc: loads the CUDA backend's module, libmapl_cuda.so; UNAVAILABLE when the
// module or a usable device is missing.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend();
#endif

namespace {

absl::StatusOr<std::unique_ptr<Backend>> MakeCpu() { return MakeCpuBackend(); }

struct Entry {
  const char* name;
  absl::StatusOr<std::unique_ptr<Backend>> (*make)();
};

constexpr Entry kBackends[] = {
    {"cpu", &MakeCpu},
#ifdef MAPL_WITH_CUDA
    {"cuda", &MakeCudaBackend},
#endif
};

}  // namespace

std::vector<std::string> BackendNames() {
  std::vector<std::string> names;
  names.reserve(std::size(kBackends));
  for (const Entry& e : kBackends) names.emplace_back(e.name);
  return names;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view name) {
  for (const Entry& e : kBackends) {
    if (name == e.name) return e.make();
  }
  return absl::NotFoundError(absl::StrCat(
      "backend \"", name,
      "\" is not registered in this build; use one of: ", absl::StrJoin(BackendNames(), ", ")));
}

}  // namespace mapl
