// The local-API client: gRPC on a Unix socket, shared memory (sealed memfds, passed over the
// daemon's buffer socket, server/fd_passing.h) for the tensors. gRPC statuses become
// mapl::client::Status here and nowhere else, through the one gRPC <-> absl conversion
// (common/grpc_status.h).
#include "client/mapl_client.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "common/grpc_status.h"
#include "proto/mapl/v1/local.grpc.pb.h"
#include "proto/mapl/v1/local.pb.h"
#include "server/fd_passing.h"

namespace mapl {
namespace client {
namespace {

namespace v1 = ::mapl::v1;
using Clock = std::chrono::system_clock;

// The public header spells the codes as plain ints (it does not include Abseil); they are
// google.rpc.Code, as absl::StatusCode is.
static_assert(kInvalidArgument == static_cast<int>(absl::StatusCode::kInvalidArgument));
static_assert(kDeadlineExceeded == static_cast<int>(absl::StatusCode::kDeadlineExceeded));
static_assert(kFailedPrecondition == static_cast<int>(absl::StatusCode::kFailedPrecondition));
static_assert(kInternal == static_cast<int>(absl::StatusCode::kInternal));
static_assert(kUnavailable == static_cast<int>(absl::StatusCode::kUnavailable));

constexpr uint32_t kDefaultConnectTimeoutMs = 10000;
// Recv and Step carry their own timeout to the daemon; the client's deadline is later by this
// much, so the daemon's DEADLINE_EXCEEDED (with its message) is what the caller sees.
constexpr std::chrono::milliseconds kDeadlineGrace{5000};

Status MakeStatus(int code, std::string message) { return Status{code, std::move(message)}; }

std::string StartHint() {
  return "start mapld for this stage (mapld --config <file>), or connect to the socket it "
         "listens on (DaemonConfig.local_socket)";
}

// Why nothing answers on `path`, as far as the file system can tell.
std::string SocketProblem(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return errno == ENOENT ? "no socket file there"
                           : "cannot stat it: " + std::string(strerror(errno));
  }
  if (!S_ISSOCK(st.st_mode)) return "the path exists but is not a socket";
  return "the socket exists but nothing accepts connections on it";
}

v1::DType ToProto(DType d) { return static_cast<v1::DType>(static_cast<int>(d)); }
v1::Direction ToProto(Direction d) { return static_cast<v1::Direction>(static_cast<int>(d)); }

void ToProto(const TensorRef& in, v1::TensorRef* out) {
  out->set_buffer(in.buffer);
  out->set_offset(in.offset);
  out->set_rows(in.rows);
  out->set_cols(in.cols);
  out->set_dtype(ToProto(in.dtype));
  out->set_memory(in.memory == Memory::kCuda ? v1::MEMORY_CUDA : v1::MEMORY_HOST);
  out->set_event(in.event);
}

// Bytes of an IPC handle (cudaIpcMemHandle_t, cudaIpcEventHandle_t: CUDA_IPC_HANDLE_SIZE) and of
// a device UUID (cuDeviceGetUuid), as local.proto CudaBuffers carries them.
constexpr size_t kCudaIpcHandleBytes = 64;
constexpr size_t kCudaUuidBytes = 16;

// The client-side checks of a ref (`what`: "tensor", "into", "token_ids"): the memory it names
// and, for device memory, the buffer, the region and the event against the session's
// CudaBuffers (`cuda`, null for a host-only session). Host refs are left to the daemon, which
// holds the buffers' sizes as it mapped them.
Status CheckRef(const TensorRef& ref, const char* what, bool host_only,
                const v1::CudaBuffers* cuda) {
  const std::string name(what);
  if (ref.memory != Memory::kHost && ref.memory != Memory::kCuda) {
    return MakeStatus(kInvalidArgument, name + ": unknown memory " +
                                            std::to_string(static_cast<int>(ref.memory)) +
                                            " (Memory::kHost or Memory::kCuda)");
  }
  if (ref.memory == Memory::kHost) {
    if (ref.event != 0) {
      return MakeStatus(kInvalidArgument,
                        name + ": event " + std::to_string(ref.event) +
                            " on a host-memory ref; events order device memory only (set "
                            "memory = Memory::kCuda, or event = 0)");
    }
    return Status{};
  }
  if (host_only) {
    return MakeStatus(kInvalidArgument, name +
                                            " in CUDA memory: token ids are always in host memory "
                                            "(Memory::kHost; copy them into a shared buffer)");
  }
  if (cuda == nullptr) {
    return MakeStatus(kInvalidArgument,
                      name +
                          " in CUDA memory, but this session has no CUDA buffers: connect "
                          "with ConnectOptions::cuda_buffers > 0, or name a host buffer");
  }
  if (ref.buffer >= static_cast<uint32_t>(cuda->memory_handles_size())) {
    return MakeStatus(kInvalidArgument, name + ": CUDA buffer " + std::to_string(ref.buffer) +
                                            " is not attached (this session has " +
                                            std::to_string(cuda->memory_handles_size()) + ")");
  }
  const uint64_t size = cuda->buffer_bytes();
  // rows * cols * element size fits in 64 bits (2^32 * 2^32 * 4 does not: divide instead).
  const uint64_t elems = static_cast<uint64_t>(ref.rows) * ref.cols;
  const uint64_t elem = DTypeSize(ref.dtype);
  if (ref.offset > size || (elem != 0 && elems > (size - ref.offset) / elem)) {
    return MakeStatus(kInvalidArgument,
                      name + ": (" + std::to_string(ref.rows) + ", " + std::to_string(ref.cols) +
                          ") at offset " + std::to_string(ref.offset) +
                          " runs past the end of CUDA buffer " + std::to_string(ref.buffer) + " (" +
                          std::to_string(size) + " bytes)");
  }
  if (ref.event > static_cast<uint32_t>(cuda->event_handles_size())) {
    return MakeStatus(kInvalidArgument,
                      name + ": event " + std::to_string(ref.event) + " names no event (1 + an " +
                          "index into the session's " + std::to_string(cuda->event_handles_size()) +
                          " events, or 0 for none)");
  }
  return Status{};
}

struct Mapping {
  std::string name;
  void* data = nullptr;
  size_t bytes = 0;
};

}  // namespace

const char* StatusCodeName(int code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  if (code < 0 || code >= static_cast<int>(sizeof(kNames) / sizeof(kNames[0]))) return "UNKNOWN";
  return kNames[code];
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kBF16:
      return 2;
  }
  return 0;
}

struct Client::Impl {
  std::string socket_path;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Local::Stub> stub;

  // The Attach stream; its context lives as long as the stream.
  grpc::ClientContext attach_ctx;
  std::unique_ptr<grpc::ClientReader<v1::AttachEvent>> attach;
  std::thread reader;  // Owned here; joined by Close().

  // From the first AttachEvent; constant after Connect.
  uint64_t session = 0;
  uint32_t stage = 0;
  std::vector<BoundaryInfo> boundaries;
  std::vector<Mapping> buffers;
  std::optional<v1::CudaBuffers> cuda;  // A CUDA session's device buffers and events.

  std::mutex mu;
  std::condition_variable cv;
  bool have_first = false;   // Guarded by mu.
  v1::AttachEvent first;     // Guarded by mu.
  bool stream_done = false;  // Guarded by mu.
  Status stream_status;      // Guarded by mu.
  bool closed = false;       // Guarded by mu.
  // The calls in flight (Send, Recv, Step): Close() cancels them, so that a Recv blocked on a
  // thread of the trainer's ends at once instead of at its deadline. Guarded by mu.
  std::set<grpc::ClientContext*> calls;
  std::once_flag join_once;

  ~Impl() {
    Close();
    for (Mapping& m : buffers) {
      if (m.data != nullptr) munmap(m.data, m.bytes);
    }
  }

  // Keeps reading the Attach stream until it ends: the daemon holds the session as long as the
  // stream is open. Events after the first carry nothing this client acts on yet.
  void ReadAttach() {
    v1::AttachEvent event;
    while (attach->Read(&event)) {
      std::lock_guard<std::mutex> lock(mu);
      if (!have_first) {
        first = event;
        have_first = true;
        cv.notify_all();
      }
    }
    const grpc::Status s = attach->Finish();
    std::lock_guard<std::mutex> lock(mu);
    stream_done = true;
    if (closed) {
      stream_status = MakeStatus(1, "the client closed its session");
    } else if (s.ok()) {
      stream_status =
          MakeStatus(kUnavailable, "mapld at unix:" + socket_path + " ended this session");
    } else {
      stream_status = FromGrpc(s);
    }
    cv.notify_all();
  }

  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
      for (grpc::ClientContext* call : calls) call->TryCancel();
    }
    attach_ctx.TryCancel();
    std::call_once(join_once, [this] {
      if (reader.joinable()) reader.join();
    });
  }

  // A gRPC status as the caller sees it: the daemon's code and message; when the daemon itself is
  // gone (the call never got its answer), the socket and `what` the call was, since no message
  // of the daemon's names it.
  Status FromGrpc(const grpc::Status& s, const std::string& what = "") const {
    const absl::Status status = ::mapl::FromGrpcStatus(s);
    const int code = static_cast<int>(status.code());
    std::string message(status.message());
    // gRPC's own words when the connection died under a call (the channel may still read READY
    // for a moment after).
    const bool connection_lost = message == "Socket closed" ||
                                 message.rfind("failed to connect", 0) == 0 ||
                                 channel->GetState(false) != GRPC_CHANNEL_READY;
    if (status.code() == absl::StatusCode::kUnavailable && connection_lost) {
      message = (what.empty() ? std::string() : what + ": ") + "lost mapld at unix:" + socket_path +
                " (" + message + "); is it still running?";
    }
    return MakeStatus(code, std::move(message));
  }

  // FAILED_PRECONDITION after Close(), the stream's end status after the daemon ended it.
  Status CheckOpen() {
    std::lock_guard<std::mutex> lock(mu);
    return CheckOpenLocked();
  }

  // The status of a call that failed: as FromGrpc, but a call that Close() cancelled says so.
  Status CallFailed(const grpc::Status& s, const std::string& what) {
    if (s.error_code() == grpc::StatusCode::CANCELLED) {
      std::lock_guard<std::mutex> lock(mu);
      if (closed) {
        return MakeStatus(kFailedPrecondition,
                          what + ": the mapl client was closed while this call waited");
      }
    }
    return FromGrpc(s, what);
  }

  Status CheckOpenLocked() {
    if (closed) return MakeStatus(kFailedPrecondition, "the mapl client is closed");
    if (stream_done) return stream_status;
    return Status{};
  }

  // A call in flight, registered in `calls` for its lifetime (see Close). `status` is not OK
  // when the client was closed (or its stream ended) first: the call must not start.
  class Call {
   public:
    explicit Call(Impl* impl) : impl_(impl) {
      std::lock_guard<std::mutex> lock(impl_->mu);
      status = impl_->CheckOpenLocked();
      if (status.ok()) impl_->calls.insert(&ctx);
    }
    ~Call() {
      std::lock_guard<std::mutex> lock(impl_->mu);
      impl_->calls.erase(&ctx);
    }
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;

    grpc::ClientContext ctx;
    Status status;

   private:
    Impl* impl_;
  };

  // Collects the buffers' memfds from the daemon's buffer socket (presenting the session's
  // secret), checks each is sealed against shrinking, maps it and closes the fd. Waits until
  // `deadline` at most.
  Status FetchBuffers(const std::string& secret, Clock::time_point deadline) {
    if (buffers.empty()) return Status{};
    const std::string path = FdSocketPath(socket_path);
    const std::string where = "mapld's buffer socket " + path;
    if (secret.size() != kFdSecretBytes) {
      return MakeStatus(kInternal, "mapld sent a buffer secret of " +
                                       std::to_string(secret.size()) + " bytes, not " +
                                       std::to_string(kFdSecretBytes) +
                                       " (a mapld of another version?)");
    }
    sockaddr_un addr{};
    if (path.size() >= sizeof(addr.sun_path)) {
      return MakeStatus(kInvalidArgument, where + ": path too long for a Unix socket");
    }
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    UniqueFd sock(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (!sock.valid()) return MakeStatus(kInternal, "socket(): " + std::string(strerror(errno)));
    // Both ways bounded by what is left of Connect's wait (at least a second).
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    const int64_t ms = std::max<int64_t>(left.count(), 1000);
    const timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>(ms % 1000 * 1000)};
    setsockopt(sock.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(sock.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(sock.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
      const int err = errno;
      if (err == EACCES || err == EPERM) {
        return MakeStatus(kFailedPrecondition,
                          "cannot connect to " + where + ": " + strerror(err) +
                              "; the trainer must run on the daemon's host as its user");
      }
      return MakeStatus(kUnavailable, "cannot connect to " + where + " (" + strerror(err) +
                                          "); is mapld at unix:" + socket_path +
                                          " still running, and of this client's version?");
    }
    FdSecret key;
    std::memcpy(key.data(), secret.data(), key.size());
    const auto request = EncodeFdRequest(session, key);
    if (int err = SendFdMessage(sock.get(), request.data(), request.size(), {}); err != 0) {
      return MakeStatus(kUnavailable,
                        "sending the buffer request to " + where + ": " + strerror(err));
    }
    uint8_t message[kFdReplyBytes + 1];
    size_t size = 0;
    std::vector<UniqueFd> stray;  // the reply carries none; any that came are closed
    int err = ReceiveFdMessage(sock.get(), message, sizeof(message), &size, &stray);
    uint32_t status = 0, count = 0;
    if (err != 0 || !DecodeFdPair(message, size, &status, &count)) {
      return MakeStatus(
          kUnavailable,
          where + " gave no valid reply (" +
              (err != 0 ? std::string(strerror(err)) : std::to_string(size) + " bytes") + ")");
    }
    if (status != kFdOk) {
      return MakeStatus(kFailedPrecondition,
                        where + " refused the buffers of session " + std::to_string(session) +
                            " (it hands them once, to the client that attached, as the daemon's "
                            "user; its log says why)");
    }
    if (count != buffers.size()) {
      return MakeStatus(kInternal, where + " offered " + std::to_string(count) +
                                       " buffers, the Attach event announced " +
                                       std::to_string(buffers.size()));
    }
    std::vector<UniqueFd> fds;
    while (fds.size() < count) {
      std::vector<UniqueFd> batch;
      uint32_t first = 0, n = 0;
      err = ReceiveFdMessage(sock.get(), message, sizeof(message), &size, &batch);
      if (err != 0 || !DecodeFdPair(message, size, &first, &n) || first != fds.size() ||
          n != batch.size() || n == 0 || n > count - fds.size()) {
        return MakeStatus(kUnavailable, where + " broke off handing out the buffers after " +
                                            std::to_string(fds.size()) + " of " +
                                            std::to_string(count) +
                                            (err != 0 ? ": " + std::string(strerror(err)) : ""));
      }
      for (UniqueFd& fd : batch) fds.push_back(std::move(fd));
    }
    for (size_t i = 0; i < buffers.size(); ++i) {
      Status s = Map(i, fds[i].get());
      if (!s.ok()) return s;
      fds[i].reset();  // the mapping keeps the memory; the fd is not needed any more
    }
    return Status{};
  }

  // Maps buffer i from its memfd. A buffer that could shrink under its mapping would turn a
  // later access into a SIGBUS in this process, so only a shrink-sealed one is taken.
  Status Map(size_t i, int fd) {
    Mapping& m = buffers[i];
    const std::string what = "buffer " + std::to_string(i) + " (\"" + m.name + "\")";
    const int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
      return MakeStatus(kFailedPrecondition,
                        what + " is not sealed against shrinking (" +
                            (seals < 0 ? std::string(strerror(errno)) : "no F_SEAL_SHRINK") +
                            "); refusing to map it: a mapld of another version, or not mapld");
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < m.bytes) {
      return MakeStatus(kInternal, what + " is smaller than the " + std::to_string(m.bytes) +
                                       " bytes mapld announced");
    }
    if (m.bytes == 0) return Status{};
    void* p = mmap(nullptr, m.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      return MakeStatus(kInternal, "mmap of " + what + " failed: " + strerror(errno));
    }
    m.data = p;
    return Status{};
  }

  grpc::ClientContext* WithTimeout(grpc::ClientContext* ctx, uint32_t timeout_ms) {
    if (timeout_ms > 0) {
      ctx->set_deadline(Clock::now() + std::chrono::milliseconds(timeout_ms) + kDeadlineGrace);
    }
    return ctx;
  }
};

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

namespace {

// Connect's checks of ConnectOptions, before anything is dialed.
Status CheckConnectOptions(const ConnectOptions& o) {
  if (!o.cuda_device_uuid.empty() && o.cuda_device_uuid.size() != kCudaUuidBytes) {
    return MakeStatus(kInvalidArgument,
                      "Connect: cuda_device_uuid is " + std::to_string(o.cuda_device_uuid.size()) +
                          " bytes; a device UUID is 16 (cuDeviceGetUuid), or leave it empty for "
                          "the daemon's device");
  }
  if (o.cuda_buffers == 0 &&
      (o.cuda_buffer_bytes != 0 || o.cuda_events != 0 || !o.cuda_device_uuid.empty())) {
    return MakeStatus(kInvalidArgument,
                      "Connect: cuda_buffer_bytes, cuda_events or cuda_device_uuid without "
                      "cuda_buffers; set cuda_buffers > 0 for device buffers, or none of them");
  }
  return Status{};
}

// Whether the CudaBuffers mapld sent are what `o` asked for.
Status CheckCudaBuffers(const v1::AttachEvent& ev, const ConnectOptions& o,
                        const std::string& socket_path) {
  const std::string who = "mapld at unix:" + socket_path;
  if (!ev.has_cuda()) {
    return MakeStatus(kFailedPrecondition,
                      who + " attached without the " + std::to_string(o.cuda_buffers) +
                          " CUDA buffers asked for (a mapld that predates CUDA buffers?): "
                          "upgrade it, or connect without cuda_buffers");
  }
  const v1::CudaBuffers& c = ev.cuda();
  std::string wrong;
  if (c.memory_handles_size() != static_cast<int>(o.cuda_buffers)) {
    wrong = std::to_string(c.memory_handles_size()) + " memory handles for " +
            std::to_string(o.cuda_buffers) + " buffers";
  } else if (c.event_handles_size() != static_cast<int>(o.cuda_events)) {
    wrong = std::to_string(c.event_handles_size()) + " event handles for " +
            std::to_string(o.cuda_events) + " events";
  } else if (c.buffer_bytes() < o.cuda_buffer_bytes) {
    wrong = "buffers of " + std::to_string(c.buffer_bytes()) + " bytes for " +
            std::to_string(o.cuda_buffer_bytes);
  } else if (c.device_uuid().size() != kCudaUuidBytes ||
             (!o.cuda_device_uuid.empty() && c.device_uuid() != o.cuda_device_uuid)) {
    wrong = "the buffers on another device than the one asked for";
  }
  for (const std::string& h : c.memory_handles()) {
    if (wrong.empty() && h.size() != kCudaIpcHandleBytes) {
      wrong = "a memory handle of " + std::to_string(h.size()) + " bytes";
    }
  }
  for (const std::string& h : c.event_handles()) {
    if (wrong.empty() && h.size() != kCudaIpcHandleBytes) {
      wrong = "an event handle of " + std::to_string(h.size()) + " bytes";
    }
  }
  if (!wrong.empty()) {
    return MakeStatus(kInternal, who + " sent " + wrong + " (a mapld of another version?)");
  }
  return Status{};
}

}  // namespace

Status Client::Connect(const std::string& socket_path, const std::string& client_name,
                       uint32_t timeout_ms, std::unique_ptr<Client>* out) {
  return Connect(socket_path, client_name, timeout_ms, ConnectOptions{}, out);
}

Status Client::Connect(const std::string& socket_path, const std::string& client_name,
                       uint32_t timeout_ms, const ConnectOptions& options,
                       std::unique_ptr<Client>* out) {
  if (out == nullptr) return MakeStatus(kInvalidArgument, "Connect: out is null");
  if (socket_path.empty()) return MakeStatus(kInvalidArgument, "Connect: empty socket path");
  if (Status s = CheckConnectOptions(options); !s.ok()) return s;
  if (timeout_ms == 0) timeout_ms = kDefaultConnectTimeoutMs;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);

  std::unique_ptr<Client> c(new Client(std::make_unique<Impl>()));
  Impl& im = *c->impl_;
  im.socket_path = socket_path;
  // Short reconnect backoff: a trainer that starts with its daemon should attach as soon as the
  // socket appears, not a second later.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 50);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 50);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  // Its own connection: gRPC shares subchannels between the channels of a process by default,
  // and a client made after its daemon restarted on the same socket path would otherwise be
  // handed the connection to the daemon that is gone ("Broken pipe" at Attach).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  im.channel =
      grpc::CreateCustomChannel("unix:" + socket_path, grpc::InsecureChannelCredentials(), args);
  im.stub = v1::Local::NewStub(im.channel);

  if (!im.channel->WaitForConnected(deadline)) {
    return MakeStatus(kUnavailable, "mapld is not running at unix:" + socket_path + " (" +
                                        SocketProblem(socket_path) + ", waited " +
                                        std::to_string(timeout_ms) + " ms): " + StartHint());
  }

  v1::AttachRequest req;
  req.set_client_name(client_name);
  req.set_pid(static_cast<uint32_t>(getpid()));
  req.set_cuda_buffers(options.cuda_buffers);
  req.set_cuda_buffer_bytes(options.cuda_buffer_bytes);
  req.set_cuda_events(options.cuda_events);
  req.set_cuda_device_uuid(options.cuda_device_uuid);
  im.attach = im.stub->Attach(&im.attach_ctx, req);
  im.reader = std::thread([&im] { im.ReadAttach(); });

  std::string secret;
  {
    std::unique_lock<std::mutex> lock(im.mu);
    if (!im.cv.wait_until(lock, deadline, [&im] { return im.have_first || im.stream_done; })) {
      lock.unlock();
      return MakeStatus(kDeadlineExceeded, "mapld at unix:" + socket_path +
                                               " accepted the connection but sent no Attach "
                                               "event within " +
                                               std::to_string(timeout_ms) + " ms");
    }
    if (!im.have_first) return im.stream_status;
    const v1::AttachEvent& ev = im.first;
    secret = ev.buffer_secret();
    im.session = ev.session();
    im.stage = ev.stage();
    for (const v1::SharedBuffer& b : ev.buffers()) {
      im.buffers.push_back(Mapping{b.name(), nullptr, static_cast<size_t>(b.bytes())});
    }
    for (const v1::BoundaryInfo& b : ev.boundaries()) {
      im.boundaries.push_back(
          BoundaryInfo{b.id(), b.role(), b.d(), b.k(), b.method(), b.vocab(), b.max_tokens()});
    }
    if (options.cuda_buffers > 0) {
      Status s = CheckCudaBuffers(ev, options, socket_path);
      if (!s.ok()) return s;  // ~Client ends the session, and with it the device buffers.
      im.cuda = ev.cuda();
    }
  }
  Status s = im.FetchBuffers(secret, deadline);
  if (!s.ok()) return s;  // ~Client ends the session and unmaps what was mapped.
  *out = std::move(c);
  return Status{};
}

void Client::Close() { impl_->Close(); }

bool Client::attached() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return !impl_->stream_done && !impl_->closed;
}

Status Client::AttachStatus() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stream_done ? impl_->stream_status : Status{};
}

const std::string& Client::socket_path() const { return impl_->socket_path; }
uint64_t Client::session() const { return impl_->session; }
uint32_t Client::stage() const { return impl_->stage; }
const std::vector<BoundaryInfo>& Client::boundaries() const { return impl_->boundaries; }
size_t Client::buffer_count() const { return impl_->buffers.size(); }
void* Client::data(size_t i) const { return impl_->buffers.at(i).data; }
size_t Client::bytes(size_t i) const { return impl_->buffers.at(i).bytes; }
const std::string& Client::buffer_name(size_t i) const { return impl_->buffers.at(i).name; }
const v1::CudaBuffers* Client::cuda() const {
  return impl_->cuda.has_value() ? &*impl_->cuda : nullptr;
}

namespace {

// The fields SendRequest and RecvRequest share: which tensor of which session.
template <typename Request>
void SetTensorKey(uint64_t session, uint32_t boundary, Direction direction, uint64_t step,
                  uint32_t microbatch, Request* req) {
  req->set_session(session);
  req->set_boundary(boundary);
  req->set_direction(ToProto(direction));
  req->set_step(step);
  req->set_microbatch(microbatch);
}

}  // namespace

namespace {
// "Recv of boundary 0, forward tensor of step 5 microbatch 3": what a call was, for a failure the
// daemon could not describe (it is gone).
std::string CallName(const char* call, uint32_t boundary, Direction direction, uint64_t step,
                     uint32_t microbatch) {
  return std::string(call) + " of boundary " + std::to_string(boundary) + ", " +
         (direction == Direction::kForward ? "forward" : "backward") + " tensor of step " +
         std::to_string(step) + " microbatch " + std::to_string(microbatch);
}
}  // namespace

Status Client::Send(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
                    const TensorRef& tensor, const std::optional<TensorRef>& token_ids,
                    SendResult* result, bool wait_encoded) {
  SendOptions options;
  options.wait_encoded = wait_encoded;
  return Send(boundary, direction, step, microbatch, tensor, token_ids, options, result);
}

Status Client::Send(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
                    const TensorRef& tensor, const std::optional<TensorRef>& token_ids,
                    const SendOptions& options, SendResult* result) {
  const v1::CudaBuffers* cuda = this->cuda();
  if (Status s = CheckRef(tensor, "tensor", false, cuda); !s.ok()) return s;
  if (token_ids.has_value()) {
    if (Status s = CheckRef(*token_ids, "token_ids", true, cuda); !s.ok()) return s;
  }
  Impl::Call call(impl_.get());
  if (!call.status.ok()) return call.status;
  v1::SendRequest req;
  SetTensorKey(impl_->session, boundary, direction, step, microbatch, &req);
  ToProto(tensor, req.mutable_tensor());
  if (token_ids.has_value()) ToProto(*token_ids, req.mutable_token_ids());
  req.set_wait_encoded(options.wait_encoded);
  req.mutable_shape()->Assign(options.shape.begin(), options.shape.end());
  req.set_evaluation(options.evaluation);
  v1::SendReply reply;
  const grpc::Status s = impl_->stub->Send(&call.ctx, req, &reply);
  if (!s.ok()) {
    return impl_->CallFailed(s, CallName("Send", boundary, direction, step, microbatch));
  }
  if (result != nullptr) *result = SendResult{reply.wire_bytes(), reply.raw_bytes()};
  return Status{};
}

Status Client::Recv(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
                    const TensorRef& into, uint32_t timeout_ms, RecvResult* result) {
  return Recv(boundary, direction, step, microbatch, into, timeout_ms, RecvOptions{}, result);
}

Status Client::Recv(uint32_t boundary, Direction direction, uint64_t step, uint32_t microbatch,
                    const TensorRef& into, uint32_t timeout_ms, const RecvOptions& options,
                    RecvResult* result) {
  const v1::CudaBuffers* cuda = this->cuda();
  if (Status s = CheckRef(into, "into", false, cuda); !s.ok()) return s;
  if (options.token_ids.has_value()) {
    if (Status s = CheckRef(*options.token_ids, "token_ids", true, cuda); !s.ok()) return s;
  }
  Impl::Call call(impl_.get());
  if (!call.status.ok()) return call.status;
  v1::RecvRequest req;
  SetTensorKey(impl_->session, boundary, direction, step, microbatch, &req);
  ToProto(into, req.mutable_into());
  req.set_timeout_ms(timeout_ms);
  if (options.token_ids.has_value()) ToProto(*options.token_ids, req.mutable_token_ids_into());
  req.mutable_expect_shape()->Assign(options.expect_shape.begin(), options.expect_shape.end());
  v1::RecvReply reply;
  const grpc::Status s = impl_->stub->Recv(impl_->WithTimeout(&call.ctx, timeout_ms), req, &reply);
  if (!s.ok()) {
    return impl_->CallFailed(s, CallName("Recv", boundary, direction, step, microbatch));
  }
  if (result != nullptr) {
    RecvResult r;
    r.rows = reply.rows();
    r.cols = reply.cols();
    r.shape.assign(reply.shape().begin(), reply.shape().end());
    if (reply.dtype() == v1::DTYPE_F32) r.dtype = DType::kF32;
    if (reply.dtype() == v1::DTYPE_BF16) r.dtype = DType::kBF16;
    r.has_token_ids = reply.has_token_ids();
    *result = std::move(r);
  }
  return Status{};
}

Status Client::Step(uint64_t step, uint32_t timeout_ms, StepResult* result) {
  Impl::Call call(impl_.get());
  if (!call.status.ok()) return call.status;
  v1::StepRequest req;
  req.set_session(impl_->session);
  req.set_step(step);
  req.set_timeout_ms(timeout_ms);
  v1::StepReply reply;
  const grpc::Status s = impl_->stub->Step(impl_->WithTimeout(&call.ctx, timeout_ms), req, &reply);
  if (!s.ok()) return impl_->CallFailed(s, "Step(" + std::to_string(step) + ")");
  if (result != nullptr) *result = std::move(reply);
  return Status{};
}

Status Client::Stats(StatsResult* result) {
  Status open = impl_->CheckOpen();
  if (!open.ok()) return open;
  v1::StatsRequest req;
  req.set_session(impl_->session);
  v1::StatsReply reply;
  grpc::ClientContext ctx;
  const grpc::Status s = impl_->stub->Stats(&ctx, req, &reply);
  if (!s.ok()) return impl_->FromGrpc(s);
  if (result != nullptr) *result = std::move(reply);
  return Status{};
}

Status Client::Checkpoint(CheckpointResult* result) {
  Status open = impl_->CheckOpen();
  if (!open.ok()) return open;
  v1::CheckpointRequest req;
  req.set_session(impl_->session);
  v1::CheckpointReply reply;
  grpc::ClientContext ctx;
  const grpc::Status s = impl_->stub->Checkpoint(&ctx, req, &reply);
  if (!s.ok()) return impl_->FromGrpc(s, "Checkpoint()");
  if (result != nullptr) *result = std::move(reply);
  return Status{};
}

}  // namespace client
}  // namespace mapl
