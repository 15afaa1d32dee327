// Local API handlers: each one validates nothing itself and forwards to the Daemon, which checks
// every reference against what was attached. Attach holds its stream open for the client's
// lifetime; when the client goes away the stream is cancelled and its buffers are freed.
#include "server/local_service.h"

#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "proto/mapl/v1/local.grpc.pb.h"
#include "server/daemon.h"

namespace mapl {

namespace {

class LocalService final : public v1::Local::Service {
 public:
  explicit LocalService(Daemon* daemon) : daemon_(daemon) {}

  grpc::Status Attach(grpc::ServerContext* context, const v1::AttachRequest* request,
                      grpc::ServerWriter<v1::AttachEvent>* writer) override {
    v1::AttachEvent event;
    absl::StatusOr<std::shared_ptr<Session>> session = daemon_->Attach(*request, &event);
    if (!session.ok()) return ToGrpcStatus(session.status());
    const uint64_t id = (*session)->id;
    session->reset();  // the daemon's map holds it; Detach frees the buffers
    if (writer->Write(event)) {
      // The client keeps this stream open while it lives; poll, since the sync API has no
      // cancellation callback. Sessions outlive the start of a shutdown (a draining daemon
      // still delivers); the server's own shutdown cancels this call at the end.
      while (!context->IsCancelled()) absl::SleepFor(absl::Milliseconds(50));
    }
    daemon_->Detach(id);
    return ToGrpcStatus(daemon_->shutting_down() ? absl::UnavailableError("mapld is shutting down")
                                                 : absl::OkStatus());
  }

  grpc::Status Send(grpc::ServerContext*, const v1::SendRequest* request,
                    v1::SendReply* reply) override {
    return Reply(daemon_->Send(*request), reply);
  }
  grpc::Status Recv(grpc::ServerContext* context, const v1::RecvRequest* request,
                    v1::RecvReply* reply) override {
    return Reply(daemon_->Recv(*request, [context] { return context->IsCancelled(); }), reply);
  }
  grpc::Status Step(grpc::ServerContext*, const v1::StepRequest* request,
                    v1::StepReply* reply) override {
    return Reply(daemon_->Step(*request), reply);
  }
  grpc::Status Stats(grpc::ServerContext*, const v1::StatsRequest* request,
                     v1::StatsReply* reply) override {
    return Reply(daemon_->Stats(*request), reply);
  }
  grpc::Status Checkpoint(grpc::ServerContext*, const v1::CheckpointRequest* request,
                          v1::CheckpointReply* reply) override {
    return Reply(daemon_->Checkpoint(*request), reply);
  }

 private:
  template <typename T>
  static grpc::Status Reply(absl::StatusOr<T> result, T* reply) {
    if (!result.ok()) return ToGrpcStatus(result.status());
    *reply = *std::move(result);
    return grpc::Status::OK;
  }

  Daemon* daemon_;
};

}  // namespace

std::unique_ptr<grpc::Service> MakeLocalService(Daemon* daemon) {
  return std::make_unique<LocalService>(daemon);
}

}  // namespace mapl
