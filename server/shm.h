// POSIX shared memory owned by the daemon and handed to a trainer: created with mode 0600,
// mapped read-write, unmapped and unlinked when the owner goes away.
//
//   MAPL_ASSIGN_OR_RETURN(std::unique_ptr<mapl::SharedMemory> shm,
//                         mapl::SharedMemory::Create("/mapld-1234-1-0", 64 << 20));
//   std::memcpy(shm->data(), src, n);   // the client mapped the same name
#ifndef MAPL_SERVER_SHM_H_
#define MAPL_SERVER_SHM_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace mapl {

class SharedMemory {
 public:
  // `name` must start with '/' and hold no other '/'. Fails with ALREADY_EXISTS if the name is
  // taken and RESOURCE_EXHAUSTED if /dev/shm is too small.
  static absl::StatusOr<std::unique_ptr<SharedMemory>> Create(const std::string& name,
                                                              size_t bytes);
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  const std::string& name() const { return name_; }
  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  SharedMemory(std::string name, void* data, size_t size)
      : name_(std::move(name)), data_(data), size_(size) {}
  std::string name_;
  void* data_;
  size_t size_;
};

}  // namespace mapl

#endif  // MAPL_SERVER_SHM_H_
