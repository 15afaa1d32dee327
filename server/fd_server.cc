// The buffer socket's server: one thread, poll() on the listener and a wake-up eventfd, each
// connection handled to its end (bounded by kRequestTimeout) before the next is accepted.
#include "server/fd_server.h"

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"

namespace mapl {
namespace {

bool MakeAddress(const std::string& path, sockaddr_un* addr) {
  if (path.size() >= sizeof(addr->sun_path)) return false;
  *addr = sockaddr_un{};
  addr->sun_family = AF_UNIX;
  std::memcpy(addr->sun_path, path.c_str(), path.size() + 1);
  return true;
}

// Removes a stale socket file; refuses if a live process serves it. As the daemon does for the
// local socket, with this socket's type: a SOCK_STREAM probe would not reach a SEQPACKET
// listener and would take a live one for stale.
absl::Status PrepareSocketPath(const std::string& path, const sockaddr_un& addr) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return absl::OkStatus();
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("local_socket: the buffer socket ", path,
                     " exists and is not a socket; remove it or pick another local_socket"));
  }
  UniqueFd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (probe.valid() &&
      ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0) {
    return absl::AlreadyExistsError(absl::StrCat("local_socket: another mapld is serving ", path,
                                                 "; stop it or give this stage another socket"));
  }
  ::unlink(path.c_str());
  return absl::OkStatus();
}

std::string Errno(int err) { return std::strerror(err); }

}  // namespace

absl::StatusOr<std::unique_ptr<FdServer>> FdServer::Start(const std::string& path,
                                                          SessionRegistry* sessions) {
  sockaddr_un addr;
  if (!MakeAddress(path, &addr)) {
    return absl::InvalidArgumentError(absl::StrCat("local_socket: the buffer socket path '", path,
                                                   "' is too long for a Unix socket"));
  }
  if (absl::Status s = PrepareSocketPath(path, addr); !s.ok()) return s;
  UniqueFd listener(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listener.valid()) {
    return absl::InternalError(absl::StrCat("buffer socket: socket(): ", Errno(errno)));
  }
  // bind creates the file: a 0077 umask makes it 0600 from the first moment, as for the local
  // socket (the chmod after only repeats it).
  const mode_t old_umask = ::umask(0077);
  const int bound = ::bind(listener.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  const int bind_errno = errno;
  ::umask(old_umask);
  if (bound != 0) {
    return absl::UnavailableError(absl::StrCat("local_socket: cannot listen on ", path, ": ",
                                               Errno(bind_errno), " (is the directory writable?)"));
  }
  ::chmod(path.c_str(), 0600);
  if (::listen(listener.get(), 64) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("buffer socket: listen(", path, "): ", Errno(err)));
  }
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake.valid()) {
    const int err = errno;
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("buffer socket: eventfd: ", Errno(err)));
  }
  std::unique_ptr<FdServer> server(
      new FdServer(path, sessions, std::move(listener), std::move(wake)));
  server->thread_ = std::thread([s = server.get()] { s->Serve(); });
  return server;
}

FdServer::FdServer(std::string path, SessionRegistry* sessions, UniqueFd listener, UniqueFd wake)
    : path_(std::move(path)),
      sessions_(sessions),
      listener_(std::move(listener)),
      wake_(std::move(wake)) {}

FdServer::~FdServer() { Stop(); }

void FdServer::Stop() {
  absl::MutexLock l(&stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  const uint64_t one = 1;
  while (::write(wake_.get(), &one, sizeof(one)) < 0 && errno == EINTR) {
  }
  if (thread_.joinable()) thread_.join();
  ::unlink(path_.c_str());
}

void FdServer::Serve() {
  for (;;) {
    pollfd p[2] = {{listener_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      Log(LogLevel::kError, "buffer socket stopped", {{"error", Errno(errno)}});
      return;
    }
    if (p[1].revents != 0) return;
    if (p[0].revents == 0) continue;
    UniqueFd connection(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!connection.valid()) {
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ECONNABORTED) continue;
      Log(LogLevel::kWarning, "buffer socket: accept failed", {{"error", Errno(err)}});
      // Out of fds: the connection stays queued, so the listener stays readable; wait a little
      // rather than spin (or until Stop()).
      pollfd w{wake_.get(), POLLIN, 0};
      ::poll(&w, 1, 100);
      continue;
    }
    Handle(connection.get());
  }
}

void FdServer::Handle(int connection) {
  ucred peer{};
  socklen_t peer_size = sizeof(peer);
  if (::getsockopt(connection, SOL_SOCKET, SO_PEERCRED, &peer, &peer_size) != 0) {
    Log(LogLevel::kWarning, "buffer request refused",
        {{"reason", absl::StrCat("SO_PEERCRED: ", Errno(errno))}});
    return;
  }
  // The one log line an attempt gets, and a refusal the client can tell from a lost daemon.
  auto refuse = [&](const std::string& reason) {
    Log(LogLevel::kWarning, "buffer request refused",
        {{"reason", reason},
         {"peer_pid", absl::StrCat(peer.pid)},
         {"peer_uid", absl::StrCat(peer.uid)}});
    const auto reply = EncodeFdPair(kFdRefused, 0);
    SendFdMessage(connection, reply.data(), reply.size(), {});
  };
  // A send that cannot proceed (a peer that stopped reading) fails instead of holding the thread.
  const timeval send_timeout = absl::ToTimeval(kRequestTimeout);
  ::setsockopt(connection, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof(send_timeout));

  const absl::Time deadline = absl::Now() + kRequestTimeout;
  for (;;) {
    pollfd p[2] = {{connection, POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    const int ready = ::poll(p, 2, static_cast<int>(std::max<int64_t>(left_ms, 0)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return refuse(absl::StrCat("poll: ", Errno(errno)));
    if (ready == 0)
      return refuse(absl::StrCat("no request within ", absl::FormatDuration(kRequestTimeout)));
    if (p[1].revents != 0) return;  // stopping
    break;
  }
  // One byte of room past a request: a longer message shows as truncated, not as a request.
  uint8_t message[kFdRequestBytes + 1];
  size_t size = 0;
  // No room for fds: any a peer attaches are closed by the kernel (MSG_CTRUNC).
  const int err = ReceiveFdMessage(connection, message, sizeof(message), &size, nullptr);
  if (err == EMSGSIZE) {
    return refuse(
        absl::StrCat("malformed request: longer than ", kFdRequestBytes, " bytes or carrying fds"));
  }
  if (err != 0) return refuse(absl::StrCat("reading the request: ", Errno(err)));
  // Checked once the request is read, though it goes unused: a socket closed with a message
  // unread resets the connection, and the peer would see ECONNRESET instead of the refusal.
  if (peer.uid != ::geteuid()) {
    return refuse(absl::StrCat("peer uid ", peer.uid, " is not the daemon's uid ", ::geteuid()));
  }
  FdRequest request;
  if (!DecodeFdRequest(message, size, &request)) {
    return refuse(absl::StrCat("malformed request: ", size, " bytes, want ", kFdRequestBytes,
                               " starting with the magic"));
  }
  absl::StatusOr<std::vector<UniqueFd>> fds =
      sessions_->TakeBufferFds(request.session, request.secret);
  if (!fds.ok()) return refuse(std::string(fds.status().message()));

  const auto header = EncodeFdPair(kFdOk, static_cast<uint32_t>(fds->size()));
  int send_err = SendFdMessage(connection, header.data(), header.size(), {});
  for (size_t first = 0; send_err == 0 && first < fds->size(); first += kFdsPerMessage) {
    const size_t n = std::min(kFdsPerMessage, fds->size() - first);
    std::vector<int> batch;
    for (size_t i = first; i < first + n; ++i) batch.push_back((*fds)[i].get());
    const auto head = EncodeFdPair(static_cast<uint32_t>(first), static_cast<uint32_t>(n));
    send_err = SendFdMessage(connection, head.data(), head.size(), batch);
  }
  // Either way the daemon's copies close here: the session keeps only its mappings.
  if (send_err != 0) {
    Log(LogLevel::kWarning, "buffer hand-off failed",
        {{"session", absl::StrCat(request.session)},
         {"peer_pid", absl::StrCat(peer.pid)},
         {"error", Errno(send_err)}});
    return;
  }
  Log(LogLevel::kInfo, "buffers handed out",
      {{"session", absl::StrCat(request.session)},
       {"buffers", absl::StrCat(fds->size())},
       {"peer_pid", absl::StrCat(peer.pid)}});
}

}  // namespace mapl
