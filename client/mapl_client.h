// The trainer-side client of mapld's local API (proto/mapl/v1/local.proto): it attaches to the
// stage's daemon over its Unix socket, collects the shared-memory buffers (sealed memfds) from
// the daemon's buffer socket next to it (<socket>.fds, server/fd_passing.h), maps them, and
// names tensors in those buffers in Send/Recv/Step/Stats calls.
//
// Dependencies: protobuf is a PUBLIC dependency of mapl_client. Step and Stats hand back the
// daemon's statistics records themselves (mapl::v1::StepReply / StatsReply, whose
// mapl::v1::BoundaryStats is the one declaration of every statistic, in local.proto), so a new
// statistic reaches callers without a change here. gRPC stays private (mapl_client.cc); calls
// report errors with the small Status below.
//
//   std::unique_ptr<mapl::client::Client> c;
//   mapl::client::Status s = mapl::client::Client::Connect(
//       "/run/user/1000/mapld-0.sock", "trainer-0", /*timeout_ms=*/10000, &c);
//   if (!s.ok()) { /* s.code is a gRPC code; s.message says what to do */ }
//   float* h = static_cast<float*>(c->data(0));      // write h (n, d) f32 at offset 0
//   mapl::client::TensorRef ref{0, 0, n, d, mapl::client::DType::kF32};
//   mapl::client::SendResult r;
//   s = c->Send(/*boundary=*/0, mapl::client::Direction::kForward, step, mb, ref, ids_ref, &r);
//   mapl::client::StatsResult st;                      // mapl::v1::StatsReply
//   s = c->Stats(&st);                                 // st.boundaries(0).frames_sent(), ...
//
// A GPU trainer may also ask for device buffers (ConnectOptions::cuda_buffers): mapld then hands
// out CUDA IPC handles (cuda()), which the trainer opens itself; TensorRefs with Memory::kCuda
// name them. The client links nothing of CUDA.
//
// A Client may be used from several threads at once (a Recv blocking on one thread while another
// Sends). Its background thread keeps reading the Attach stream: that open stream is what keeps
// the session and its buffers alive on the daemon side.
#ifndef MAPL_CLIENT_MAPL_CLIENT_H_
#define MAPL_CLIENT_MAPL_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "proto/mapl/v1/local.pb.h"

namespace mapl {
namespace client {

// A gRPC / absl status code (google.rpc.Code) and a message. Errors the daemon returns keep its
// code and message unchanged.
struct Status {
  int code = 0;
  std::string message;

  bool ok() const { return code == 0; }
};

// google.rpc.Code values this client produces itself (the daemon may return any other).
inline constexpr int kOk = 0;
inline constexpr int kInvalidArgument = 3;
inline constexpr int kDeadlineExceeded = 4;
inline constexpr int kAlreadyExists = 6;
inline constexpr int kFailedPrecondition = 9;
inline constexpr int kInternal = 13;
inline constexpr int kUnavailable = 14;

// The canonical name of a code ("UNAVAILABLE"), for messages and logs.
const char* StatusCodeName(int code);

enum class Direction { kForward = 1, kBackward = 2 };
enum class DType { kF32 = 1, kBF16 = 2, kI32 = 3 };

// Bytes of one element of `dtype` (4, 2, 4).
size_t DTypeSize(DType dtype);

// Which of a session's buffers a TensorRef names (local.proto Memory).
enum class Memory {
  kHost = 0,  // The shared-memory buffers: data(i), bytes(i).
  kCuda = 1,  // The device buffers of a CUDA session: cuda()->memory_handles(i).
};

// A row-major (rows, cols) tensor in attached buffer `buffer`, starting `offset` bytes in; the
// offset must be a multiple of the element size. Token ids are (n, 1) kI32, always kHost.
struct TensorRef {
  uint32_t buffer = 0;
  uint64_t offset = 0;
  uint32_t rows = 0;
  uint32_t cols = 0;
  DType dtype = DType::kF32;
  Memory memory = Memory::kHost;
  // kCuda only: 1 + an index into cuda()->event_handles(), 0 for none. Send: the trainer recorded
  // it on its stream after writing the tensor (with none it has synchronized). Recv: the daemon
  // records it after writing `into`; the trainer's stream waits on it before reading (with none
  // the write is complete when Recv returns). One event is named by one call at a time
  // (local.proto TensorRef.event).
  uint32_t event = 0;
};

// Connect's optional parts (local.proto AttachRequest).
struct ConnectOptions {
  // A GPU trainer's device buffers: mapld allocates `cuda_buffers` buffers of
  // `cuda_buffer_bytes` each and `cuda_events` interprocess events on the device whose UUID is
  // `cuda_device_uuid` (16 bytes, as cuDeviceGetUuid gives it; empty: the daemon's default
  // device), and hands them out as CUDA IPC handles (Client::cuda()). The client opens none of
  // them: the trainer does (cudaIpcOpenMemHandle / cudaIpcOpenEventHandle), in its own CUDA
  // context. 0 buffers: a host-only session. A mapld that cannot use CUDA refuses the Attach
  // with FAILED_PRECONDITION saying why.
  uint32_t cuda_buffers = 0;
  uint64_t cuda_buffer_bytes = 0;
  uint32_t cuda_events = 0;
  std::string cuda_device_uuid;
};

// One boundary this stage takes part in, as the daemon configured it.
struct BoundaryInfo {
  uint32_t id = 0;
  std::string role;  // "upstream" or "downstream"
  uint32_t d = 0;
  uint32_t k = 0;
  std::string method;
  uint32_t vocab = 0;
  uint32_t max_tokens = 0;
};

struct SendResult {
  uint64_t wire_bytes = 0;  // Payload bytes of the frame put on the wire.
  uint64_t raw_bytes = 0;   // Bytes of the tensor as handed in.
};

struct RecvResult {
  uint32_t rows = 0;  // n actually written.
  uint32_t cols = 0;  // d.
  // The shape the sender handed the tensor in as ([n, d] when it gave none), its dtype then
  // (kF32 or kBF16; unset when the frame did not say), and whether token ids came with it and
  // were written into RecvOptions::token_ids.
  std::vector<uint32_t> shape;
  std::optional<DType> dtype;
  bool has_token_ids = false;
};

// Send's optional parts (local.proto SendRequest).
struct SendOptions {
  bool wait_encoded = false;
  // The tensor's shape as the trainer holds it, e.g. {batch, seq, d}; empty: (n, d). The last
  // dimension must be d and the product of the others n (INVALID_ARGUMENT otherwise).
  std::vector<uint32_t> shape;
  // Evaluation traffic: encoded and decoded as usual, but it trains nothing on either side.
  bool evaluation = false;
};

// Recv's optional parts (local.proto RecvRequest).
struct RecvOptions {
  // Where the token ids that came with the tensor go: (capacity, 1) kI32.
  std::optional<TensorRef> token_ids;
  // The shape expected; another one is INVALID_ARGUMENT and the tensor stays for a later Recv.
  std::vector<uint32_t> expect_shape;
};

// The statistics record of one boundary (local.proto BoundaryStats), as the daemon sent it.
using BoundaryStats = ::mapl::v1::BoundaryStats;
// Step's result: the record of each boundary of this stage after the step.
using StepResult = ::mapl::v1::StepReply;
// Stats' result: the stage and the record of each of its boundaries.
using StatsResult = ::mapl::v1::StatsReply;
using CheckpointResult = ::mapl::v1::CheckpointReply;

class Client {
 public:
  // Dials unix:`socket_path`, opens the Attach stream and waits for its first event, then takes
  // the buffers' fds from `socket_path`.fds with the event's secret, checks each is sealed
  // against shrinking (FAILED_PRECONDITION otherwise), maps it read/write and closes the fd.
  // Waits up to `timeout_ms` (0: 10 s) for the daemon to accept the connection, so a trainer may
  // start before its daemon. No daemon: UNAVAILABLE naming the socket. More trainers than the
  // daemon's max_sessions: the daemon's RESOURCE_EXHAUSTED.
  static Status Connect(const std::string& socket_path, const std::string& client_name,
                        uint32_t timeout_ms, std::unique_ptr<Client>* out);
  // The same with device buffers (ConnectOptions). INVALID_ARGUMENT for a cuda_device_uuid that
  // is neither empty nor 16 bytes, or CUDA fields without cuda_buffers; FAILED_PRECONDITION when
  // mapld refuses them, or attaches without them (a mapld that predates CUDA buffers); INTERNAL
  // when its CudaBuffers do not match the request (handle sizes, counts, buffer size, device).
  static Status Connect(const std::string& socket_path, const std::string& client_name,
                        uint32_t timeout_ms, const ConnectOptions& options,
                        std::unique_ptr<Client>* out);

  // Closes the session (Close()) and unmaps the buffers.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Ends the session: cancels the Attach stream, which tells the daemon to free this client's
  // buffers, and joins the reader thread. The mappings stay valid until the Client is destroyed
  // (memory already handed out is not pulled away), but later calls fail. Idempotent.
  void Close();

  // Whether the Attach stream is still open. When it is not, AttachStatus() says why.
  bool attached() const;
  Status AttachStatus() const;

  const std::string& socket_path() const;
  uint64_t session() const;
  uint32_t stage() const;
  const std::vector<BoundaryInfo>& boundaries() const;

  // The attached buffers, mapped read/write. data(i) is page-aligned.
  size_t buffer_count() const;
  void* data(size_t i) const;
  size_t bytes(size_t i) const;
  // The memfd's name, for logs (/proc/self/maps shows /memfd:<name>); it opens nothing.
  const std::string& buffer_name(size_t i) const;

  // A CUDA session's device buffers and events as mapld handed them out (AttachEvent.cuda):
  // device_uuid, memory_handles (cudaIpcMemHandle_t bytes, 64 each), buffer_bytes and
  // event_handles (cudaIpcEventHandle_t bytes, 64 each); null for a host-only session. TensorRefs
  // with Memory::kCuda name these buffers and events.
  const ::mapl::v1::CudaBuffers* cuda() const;

  // Hands `tensor` (n, d), kF32 or kBF16, to the daemon to encode and ship; `token_ids` (n, 1)
  // kI32 goes with forward sends (required for METHOD_MAPL). Returns once the daemon has taken
  // (copied and checked) the tensor, so the buffer regions may be reused; the frame is encoded
  // in the background, in Send order. wait_encoded: return only once the frame is queued on the
  // peer link, with result->wire_bytes set and any encoder error.
  // An encode failure of an earlier Send that did not wait is returned once by the next Send (its
  // tensor then not taken) and the next Step, with its code.
  // A kCuda tensor is checked here against cuda() (a session without device buffers, a buffer or
  // event index out of range, a region past the end of its buffer: INVALID_ARGUMENT, nothing
  // sent); token ids in kCuda memory are INVALID_ARGUMENT. Host refs are checked by the daemon.
  Status Send(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
              const TensorRef& tensor, const std::optional<TensorRef>& token_ids,
              SendResult* result, bool wait_encoded = false);
  // The same with a shape and evaluation (SendOptions).
  Status Send(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
              const TensorRef& tensor, const std::optional<TensorRef>& token_ids,
              const SendOptions& options, SendResult* result);

  // Blocks until the tensor for (boundary, direction, step, microbatch) is decoded into `into`
  // (its rows are the capacity; kF32 or kBF16). timeout_ms 0: the daemon's recv_timeout_ms.
  // No tensor in time: DEADLINE_EXCEEDED. `into` may be kCuda, checked as in Send; the token ids'
  // buffer is kHost.
  // Errors (docs/ARCHITECTURE.md, "Errors"): FAILED_PRECONDITION at once for a closed step or a
  // tensor already received; INVALID_ARGUMENT for `into` or the ids' buffer too small or another
  // shape than options.expect_shape (the tensor stays); UNAVAILABLE or ABORTED for a transient
  // failure (retry the microbatch); DATA_LOSS for a corrupt frame.
  Status Recv(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
              const TensorRef& into, uint32_t timeout_ms, RecvResult* result);
  Status Recv(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
              const TensorRef& into, uint32_t timeout_ms, const RecvOptions& options,
              RecvResult* result);

  // Tells the daemon the optimizer finished `step`, so the compressors run their own update;
  // `result` (may be null) gets every boundary's record after it.
  Status Step(uint64_t step, uint32_t timeout_ms, StepResult* result);

  // The stage and every boundary's record, as of now.
  Status Stats(StatsResult* result);

  // Writes every boundary's learned state to the daemon's state_dir now (call it when the trainer
  // saves its own checkpoint); `result` (may be null) lists the files. FAILED_PRECONDITION when
  // the daemon has no state_dir.
  Status Checkpoint(CheckpointResult* result);

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
};

}  // namespace client
}  // namespace mapl

#endif  // MAPL_CLIENT_MAPL_CLIENT_H_
