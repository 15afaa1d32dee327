// Structured one-line logs on stderr, logfmt style, for the daemon's operators:
//   2026-11-28T21:40:00.123Z level=INFO msg="listening" peer=127.0.0.1:41234
//
//   mapl::Log(mapl::LogLevel::kInfo, "listening", {{"peer", address}});
// Abseil's logging library is newer than Debian 12's Abseil, hence this small helper.
#ifndef MAPL_COMMON_LOG_H_
#define MAPL_COMMON_LOG_H_

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"

namespace mapl {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Messages below this level are dropped (default kInfo).
void SetLogLevel(LogLevel level);

using LogField = std::pair<absl::string_view, std::string>;

// Thread-safe; one write(2) per line, so lines from threads never interleave.
void Log(LogLevel level, absl::string_view msg, std::initializer_list<LogField> fields = {});

}  // namespace mapl

#endif  // MAPL_COMMON_LOG_H_
