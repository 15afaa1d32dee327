#include "common/check.h"

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace mapl {

void CheckFailed(const char* condition, const char* file, int line, absl::string_view details) {
  Log(LogLevel::kError, "broken invariant: stopping",
      {{"check", condition},
       {"at", absl::StrCat(file, ":", line)},
       {"details", std::string(details)}});
  std::abort();
}

}  // namespace mapl
