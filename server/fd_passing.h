// The buffer socket's wire format and the fd passing under it, shared by the daemon
// (server/fd_server.cc) and the client (client/mapl_client.cc). Header-only and free of Abseil
// and gRPC: the client includes it without linking anything of the server.
//
// gRPC cannot carry file descriptors, so the memfds of a session's buffers travel on a Unix
// socket of their own, <local_socket>.fds, of type SOCK_SEQPACKET (each message arrives whole
// or not at all, so the framing below needs no length prefixes). One connection, one exchange:
//
//   client -> daemon   request, exactly kFdRequestBytes:
//                        "MFD1" | session id (uint64) | secret (kFdSecretBytes)
//   daemon -> client   reply, exactly kFdReplyBytes:
//                        "MFD1" | status (uint32, kFdOk or kFdRefused) | count (uint32)
//   daemon -> client   if kFdOk: the buffers' fds in order, at most kFdsPerMessage a message,
//                      each message "MFD1" | first index (uint32) | n (uint32) with n fds
//                      attached (SCM_RIGHTS)
//
// Integers are in the host's byte order: both ends run on one host.
//
//   UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
//   std::array<uint8_t, kFdRequestBytes> req = EncodeFdRequest(session, secret);
//   SendFdMessage(fd.get(), req.data(), req.size(), {});
#ifndef MAPL_SERVER_FD_PASSING_H_
#define MAPL_SERVER_FD_PASSING_H_

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace mapl {

// An owned file descriptor, closed when it goes away.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// The suffix that names the buffer socket after the local API's socket.
inline constexpr char kFdSocketSuffix[] = ".fds";
inline std::string FdSocketPath(const std::string& local_socket) {
  return local_socket + kFdSocketSuffix;
}

inline constexpr char kFdMagic[4] = {'M', 'F', 'D', '1'};
inline constexpr size_t kFdSecretBytes = 32;  // 256 bits from getrandom(2)
inline constexpr size_t kFdRequestBytes = 4 + 8 + kFdSecretBytes;
inline constexpr size_t kFdReplyBytes = 4 + 4 + 4;
inline constexpr size_t kFdBatchBytes = 4 + 4 + 4;
// Below the kernel's SCM_MAX_FD (253) with room to spare; client_buffers may be up to 256.
inline constexpr size_t kFdsPerMessage = 64;
inline constexpr uint32_t kFdOk = 0;
inline constexpr uint32_t kFdRefused = 1;

using FdSecret = std::array<uint8_t, kFdSecretBytes>;

struct FdRequest {
  uint64_t session = 0;
  FdSecret secret{};
};

inline std::array<uint8_t, kFdRequestBytes> EncodeFdRequest(uint64_t session,
                                                            const FdSecret& secret) {
  std::array<uint8_t, kFdRequestBytes> out{};
  std::memcpy(out.data(), kFdMagic, 4);
  std::memcpy(out.data() + 4, &session, 8);
  std::memcpy(out.data() + 12, secret.data(), kFdSecretBytes);
  return out;
}

// False for anything but exactly kFdRequestBytes starting with the magic.
inline bool DecodeFdRequest(const uint8_t* data, size_t size, FdRequest* out) {
  if (size != kFdRequestBytes || std::memcmp(data, kFdMagic, 4) != 0) return false;
  std::memcpy(&out->session, data + 4, 8);
  std::memcpy(out->secret.data(), data + 12, kFdSecretBytes);
  return true;
}

// The reply header and the fd batches have one shape: magic and two uint32 (status and count,
// or first index and n).
inline std::array<uint8_t, 12> EncodeFdPair(uint32_t a, uint32_t b) {
  std::array<uint8_t, 12> out{};
  std::memcpy(out.data(), kFdMagic, 4);
  std::memcpy(out.data() + 4, &a, 4);
  std::memcpy(out.data() + 8, &b, 4);
  return out;
}

inline bool DecodeFdPair(const uint8_t* data, size_t size, uint32_t* a, uint32_t* b) {
  if (size != 12 || std::memcmp(data, kFdMagic, 4) != 0) return false;
  std::memcpy(a, data + 4, 4);
  std::memcpy(b, data + 8, 4);
  return true;
}

// One message with `fds` attached (none: a plain message). MSG_NOSIGNAL: a peer that already
// left is an EPIPE here, not a SIGPIPE that kills the process. Returns 0 or an errno value.
inline int SendFdMessage(int socket, const void* data, size_t size, const std::vector<int>& fds) {
  if (fds.size() > kFdsPerMessage) return EINVAL;
  iovec iov{const_cast<void*>(data), size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(kFdsPerMessage * sizeof(int))];
  if (!fds.empty()) {
    const size_t fd_bytes = fds.size() * sizeof(int);
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(fd_bytes);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fd_bytes);
    std::memcpy(CMSG_DATA(c), fds.data(), fd_bytes);
  }
  for (;;) {
    const ssize_t n = ::sendmsg(socket, &msg, MSG_NOSIGNAL);
    if (n >= 0) return static_cast<size_t>(n) == size ? 0 : EMSGSIZE;
    if (errno != EINTR) return errno;
  }
}

// One message into `data` (capacity `capacity`); its size goes to `*size`, the fds that came
// with it to `fds` (owned, close-on-exec). Up to kFdsPerMessage fds are taken; a message that
// did not fit, or carried more fds, is EMSGSIZE (the kernel closes fds it could not deliver).
// 0 with *size == 0: the peer closed the connection. Returns 0 or an errno value; EAGAIN when
// SO_RCVTIMEO ran out.
inline int ReceiveFdMessage(int socket, void* data, size_t capacity, size_t* size,
                            std::vector<UniqueFd>* fds) {
  iovec iov{data, capacity};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(kFdsPerMessage * sizeof(int))];
  if (fds != nullptr) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
  }
  ssize_t n;
  do {
    n = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return errno;
  if (fds != nullptr) {
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        fds->emplace_back(fd);
      }
    }
  }
  *size = static_cast<size_t>(n);
  if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) return EMSGSIZE;
  return 0;
}

}  // namespace mapl

#endif  // MAPL_SERVER_FD_PASSING_H_
