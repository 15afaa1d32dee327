// The one conversion between absl::Status and grpc::Status. The two code spaces are the same
// numbers (both follow google.rpc.Code), so a code crosses unchanged and so does the message.
#ifndef MAPL_COMMON_GRPC_STATUS_H_
#define MAPL_COMMON_GRPC_STATUS_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace mapl {

inline grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

inline absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace mapl

#endif  // MAPL_COMMON_GRPC_STATUS_H_
