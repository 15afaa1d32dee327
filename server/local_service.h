// The local API (proto/mapl/v1/local.proto) as a gRPC service over the daemon. Statuses cross
// unchanged (common/grpc_status.h).
#ifndef MAPL_SERVER_LOCAL_SERVICE_H_
#define MAPL_SERVER_LOCAL_SERVICE_H_

#include <memory>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace mapl {

class Daemon;

std::unique_ptr<grpc::Service> MakeLocalService(Daemon* daemon);

}  // namespace mapl

#endif  // MAPL_SERVER_LOCAL_SERVICE_H_
