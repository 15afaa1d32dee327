// Backends by name, so that a daemon's config (DaemonConfig.backend), the Python package and the
// kernel tests pick one with a string and every registered backend is tested the same way.
//
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::Backend> be, mapl::MakeBackend("cpu"));
//   for (const std::string& name : mapl::BackendNames()) { ... }
//
// Only "cpu" exists today. A backend is registered by one entry in the table in registry.cc; a
// CUDA backend is the entry under #ifdef MAPL_WITH_CUDA there.
#ifndef MAPL_KERNELS_REGISTRY_H_
#define MAPL_KERNELS_REGISTRY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"

namespace mapl {

// A new backend of the registered name. NOT_FOUND, listing the registered names, when `name` is
// not one of them; a backend that is compiled in but cannot run here (a CUDA backend without a
// device) returns its own error, UNAVAILABLE.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(absl::string_view name);

// The names MakeBackend accepts, in registration order ("cpu" first).
std::vector<std::string> BackendNames();

}  // namespace mapl

#endif  // MAPL_KERNELS_REGISTRY_H_
