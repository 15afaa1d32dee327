// The local API (proto/mapl/v1/local.proto) as a gRPC service over the daemon. This is the one
// place where absl::Status becomes grpc::Status for trainers.
#ifndef MAPL_SERVER_LOCAL_SERVICE_H_
#define MAPL_SERVER_LOCAL_SERVICE_H_

#include <memory>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace mapl {

class Daemon;

// absl and gRPC status codes share google.rpc.Code numbering.
grpc::Status ToGrpcStatus(const absl::Status& s);

std::unique_ptr<grpc::Service> MakeLocalService(Daemon* daemon);

}  // namespace mapl

#endif  // MAPL_SERVER_LOCAL_SERVICE_H_
