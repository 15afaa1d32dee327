// Shared memory owned by the daemon and handed to a trainer: an anonymous memfd, sized and
// reserved up front, sealed so that it can neither shrink nor grow, and mapped read-write.
//
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::SharedMemory> shm,
//                         mapl::SharedMemory::Create("mapld-1234-1-7-0", 64 << 20));
//   UniqueFd fd = shm->TakeFd();        // sent to the trainer, which maps it too
//   std::memcpy(dst, shm->data(), n);   // never a SIGBUS: the trainer cannot shrink it
//
// Why a sealed memfd and not a POSIX shm_open name: a trainer that could ftruncate the object
// smaller would turn the daemon's next read of the lost pages into a SIGBUS (F_SEAL_SHRINK makes
// that ftruncate fail with EPERM, for every fd of the file, however obtained); a name lives in
// /dev/shm until someone unlinks it, so a daemon killed with SIGKILL leaked it, while a memfd is
// freed with its last fd and mapping; and a name is there for any process of the user to open,
// while a memfd reaches only whoever is handed its fd.
#ifndef MAPL_SERVER_SHM_H_
#define MAPL_SERVER_SHM_H_

#include <cstddef>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "server/fd_passing.h"

namespace mapl {

class SharedMemory {
 public:
  // `name` labels the memfd (/proc/<pid>/maps shows /memfd:<name>); it need not be unique.
  // RESOURCE_EXHAUSTED, saying what to lower, when the memory or the process's fds run out.
  static absl::StatusOr<std::unique_ptr<SharedMemory>> Create(const std::string& name,
                                                              size_t bytes);
  // Unmaps it, and closes the fd if it was not taken.
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  const std::string& name() const { return name_; }
  void* data() const { return data_; }
  size_t size() const { return size_; }

  // The memfd, for handing to the trainer; from then on this object holds only its mapping, so
  // a session costs no fds once its client has its buffers. An invalid fd if already taken.
  // Not thread-safe: SessionRegistry calls it under its lock.
  UniqueFd TakeFd() { return std::move(fd_); }

 private:
  SharedMemory(std::string name, UniqueFd fd, void* data, size_t size)
      : name_(std::move(name)), fd_(std::move(fd)), data_(data), size_(size) {}
  std::string name_;
  UniqueFd fd_;
  void* data_;
  size_t size_;
};

}  // namespace mapl

#endif  // MAPL_SERVER_SHM_H_
