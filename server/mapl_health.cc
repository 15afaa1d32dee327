// mapl-health: asks a running mapld whether it is serving, through the standard gRPC health
// service on its local Unix socket. For container HEALTHCHECKs and Kubernetes exec probes: a
// stage that only dials has no TCP port a kubelet's gRPC probe could reach, and the peer port may
// require TLS; the local socket is always there.
//
//   mapl-health --socket /run/mapl/mapld.sock [--service ""|liveness|boundary/0]
//
// Exit status: 0 SERVING; 1 NOT_SERVING or an unknown service name; 2 the daemon could not be
// reached within --timeout_ms (not running, wrong path, or not allowed to connect).
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "proto/grpc/health/v1/health.grpc.pb.h"

ABSL_FLAG(std::string, socket, "", "mapld's local_socket (a path), or unix:PATH, or host:port");
ABSL_FLAG(std::string, service, "",
          "Health service name: \"\" readiness (every boundary's link up, not draining), "
          "\"liveness\" (the process serves), \"boundary/<id>\" (one link)");
ABSL_FLAG(int32_t, timeout_ms, 3000, "Give up (exit 2) after this long");

namespace {

constexpr int kServing = 0;
constexpr int kNotServing = 1;
constexpr int kUnreachable = 2;

std::string Target(const std::string& socket) {
  if (socket.rfind("unix:", 0) == 0 || socket.find('/') == std::string::npos) return socket;
  return absl::StrCat("unix:", socket);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Asks mapld's gRPC health service whether it is serving; exit 0 SERVING, 1 NOT_SERVING or "
      "unknown service, 2 unreachable.\n  mapl-health --socket /run/mapl/mapld.sock "
      "[--service liveness]");
  absl::ParseCommandLine(argc, argv);
  const std::string socket = absl::GetFlag(FLAGS_socket);
  const std::string service = absl::GetFlag(FLAGS_service);
  if (socket.empty()) {
    std::fprintf(stderr, "mapl-health: --socket is required (mapld's local_socket)\n");
    return kUnreachable;
  }
  auto channel = grpc::CreateChannel(Target(socket), grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  const std::string name = service.empty() ? "readiness" : service;
  if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
    std::printf("%s: SERVICE_UNKNOWN (mapld serves \"\", liveness and boundary/<id>)\n",
                name.c_str());
    return kNotServing;
  }
  if (!status.ok()) {
    std::printf("%s: UNREACHABLE: %s (is mapld running with local_socket %s?)\n", name.c_str(),
                status.error_message().c_str(), socket.c_str());
    return kUnreachable;
  }
  const bool serving = response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  std::printf("%s: %s\n", name.c_str(),
              grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()).c_str());
  return serving ? kServing : kNotServing;
}
