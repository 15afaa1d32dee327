// shm_open + ftruncate + mmap, with every failure turned into a Status that says what to do.
#include "server/shm.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace mapl {

absl::StatusOr<std::unique_ptr<SharedMemory>> SharedMemory::Create(const std::string& name,
                                                                   size_t bytes) {
  if (name.size() < 2 || name[0] != '/' || name.find('/', 1) != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("shared memory name '", name, "' must be '/' followed by a plain name"));
  }
  if (bytes == 0) return absl::InvalidArgumentError("shared memory of 0 bytes");
  const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    const int err = errno;
    if (err == EEXIST) {
      return absl::AlreadyExistsError(absl::StrCat("shared memory ", name, " already exists"));
    }
    return absl::InternalError(absl::StrCat("shm_open(", name, "): ", std::strerror(err)));
  }
  // posix_fallocate reserves the pages now, so a full /dev/shm fails here with a clear message
  // instead of a SIGBUS in whichever process first touches a missing page.
  int rc = ::ftruncate(fd, static_cast<off_t>(bytes));
  if (rc == 0)
    rc = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  else
    rc = errno;
  if (rc != 0) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot reserve ", bytes, " bytes of shared memory for ", name, ": ", std::strerror(rc),
        "; /dev/shm is too small (Kubernetes: mount an emptyDir with medium Memory "
        "at /dev/shm) or lower client_buffer_bytes"));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    ::shm_unlink(name.c_str());
    return absl::ResourceExhaustedError(
        absl::StrCat("mmap of ", bytes, " bytes for ", name, ": ", std::strerror(map_err)));
  }
  return std::unique_ptr<SharedMemory>(new SharedMemory(name, p, bytes));
}

SharedMemory::~SharedMemory() {
  ::munmap(data_, size_);
  ::shm_unlink(name_.c_str());
}

}  // namespace mapl
