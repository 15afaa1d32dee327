// Checks of invariants that only a bug can break. A broken invariant stops the process at once,
// loudly, with the condition, where it is and what it means; it is never turned into an error
// status (Envoy's RELEASE_ASSERT is the model). Errors a user or a peer can cause are
// absl::Status values instead.
//
//   MAPL_CHECK(pending_.size() <= kMaxPending, "the pending map outgrew its bound");
//
// The check runs in every build (not only in debug builds).
#ifndef MAPL_COMMON_CHECK_H_
#define MAPL_COMMON_CHECK_H_

#include "absl/strings/string_view.h"

namespace mapl {

// Logs "broken invariant" with the condition, file, line and details, then aborts.
[[noreturn]] void CheckFailed(const char* condition, const char* file, int line,
                              absl::string_view details);

}  // namespace mapl

#define MAPL_CHECK(condition, details)                                \
  do {                                                                \
    if (!(condition)) {                                               \
      ::mapl::CheckFailed(#condition, __FILE__, __LINE__, (details)); \
    }                                                                 \
  } while (0)

#endif  // MAPL_COMMON_CHECK_H_
