// Early-return helpers for absl::Status / absl::StatusOr, in the style of Abseil's internal macros.
//
//   MAPL_RETURN_IF_ERROR(CheckShape(h, "h", n, d));
//   MAPL_ASSIGN_OR_RETURN(RvqCodebooks cb, backend->RvqFit(x, options));
#ifndef MAPL_COMMON_STATUS_MACROS_H_
#define MAPL_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MAPL_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status mapl_status_ = (expr);        \
    if (!mapl_status_.ok()) return mapl_status_; \
  } while (0)

#define MAPL_STATUS_CONCAT_INNER_(a, b) a##b
#define MAPL_STATUS_CONCAT_(a, b) MAPL_STATUS_CONCAT_INNER_(a, b)

#define MAPL_ASSIGN_OR_RETURN(lhs, expr) \
  MAPL_ASSIGN_OR_RETURN_IMPL_(MAPL_STATUS_CONCAT_(mapl_statusor_, __LINE__), lhs, expr)

#define MAPL_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                \
  if (!statusor.ok()) return statusor.status();          \
  lhs = std::move(statusor).value()

#endif  // MAPL_COMMON_STATUS_MACROS_H_
