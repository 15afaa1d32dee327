// memfd_create + ftruncate + posix_fallocate + seals + mmap, with every failure turned into a
// Status that says what to do.
#include "server/shm.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace mapl {
namespace {

// What to lower when the fds or the memory run out.
constexpr char kLowerHint[] = "lower client_buffer_bytes, client_buffers or max_sessions";

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemory>> SharedMemory::Create(const std::string& name,
                                                                   size_t bytes) {
  // memfd names are at most 249 bytes; a '/' would read as a path in logs.
  if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory name '", name, "' must be 1 to 200 bytes without '/'"));
  }
  if (bytes == 0) return absl::InvalidArgumentError("shared memory of 0 bytes");
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) {
    const int err = errno;
    if (err == EMFILE || err == ENFILE) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cannot create shared memory ", name, ": ", std::strerror(err),
          "; mapld holds one fd a buffer until its trainer takes it: raise its open-file limit "
          "(ulimit -n) or ",
          kLowerHint));
    }
    return absl::InternalError(absl::StrCat("memfd_create(", name, "): ", std::strerror(err)));
  }
  // posix_fallocate reserves the pages now, so a host short of memory fails here with a clear
  // message instead of a SIGBUS in whichever process first touches a missing page.
  int rc = ::ftruncate(fd.get(), static_cast<off_t>(bytes));
  if (rc == 0)
    rc = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(bytes));
  else
    rc = errno;
  if (rc != 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot reserve ", bytes, " bytes of shared memory for ", name, ": ", std::strerror(rc),
        "; the host (or the container's memory limit) has too little memory free: ", kLowerHint));
  }
  // Sealed before anyone else sees the fd: from here on no fd of this file, the trainer's
  // included, can change its size, and no one can lift or add a seal.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return absl::InternalError(
        absl::StrCat("sealing shared memory ", name, ": ", std::strerror(errno)));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return absl::ResourceExhaustedError(absl::StrCat("mmap of ", bytes, " bytes for ", name, ": ",
                                                     std::strerror(err), "; ", kLowerHint));
  }
  return std::unique_ptr<SharedMemory>(new SharedMemory(name, std::move(fd), p, bytes));
}

SharedMemory::~SharedMemory() { ::munmap(data_, size_); }

}  // namespace mapl
