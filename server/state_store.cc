#include "server/state_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/config.h"
#include "server/transport/fingerprint.h"

namespace mapl {
namespace {

std::string Errno(int e) { return std::strerror(e); }

// write(2) all of `data`; false with errno on failure.
bool WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return true;
}

std::string RoleName(v1::Role role) {
  return role == v1::ROLE_UPSTREAM ? "upstream" : role == v1::ROLE_DOWNSTREAM ? "downstream" : "?";
}

}  // namespace

std::string StateFilePath(absl::string_view dir, uint32_t boundary) {
  return absl::StrCat(dir, "/boundary-", boundary, ".state");
}

absl::Status PrepareStateDir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::FailedPreconditionError(
        absl::StrCat("state_dir ", dir, ": cannot create it (", Errno(errno),
                     "); create it, writable by mapld, or point state_dir elsewhere"));
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("state_dir ", dir, ": not a writable directory (", Errno(errno),
                     "); make it writable by mapld or point state_dir elsewhere"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> SerializeStateFile(const v1::BoundaryState& state) {
  v1::StateFile file;
  file.set_format(kStateFormat);
  if (!state.SerializeToString(file.mutable_state())) {
    return absl::InternalError("checkpoint: the boundary state does not serialize (over 2 GiB?)");
  }
  file.set_checksum(XXH3_64bits(file.state().data(), file.state().size()));
  return file.SerializeAsString();
}

absl::StatusOr<std::string> WriteStateFile(const std::string& dir, const v1::BoundaryState& state,
                                           int64_t* bytes) {
  MAPL_ASSIGN_OR_RETURN(const std::string data, SerializeStateFile(state));
  const std::string path = StateFilePath(dir, state.boundary());
  const std::string tmp = absl::StrCat(path, ".tmp");
  auto fail = [&](absl::string_view what) {
    const int e = errno;
    ::unlink(tmp.c_str());
    return absl::UnavailableError(absl::StrCat("checkpoint: ", what, " ", tmp, ": ", Errno(e),
                                               " (the previous checkpoint is kept)"));
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return fail("cannot create");
  const bool written = WriteAll(fd, data) && ::fsync(fd) == 0;
  const int write_errno = errno;
  if (::close(fd) != 0 || !written) {
    if (!written) errno = write_errno;
    return fail("cannot write");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail("cannot rename");
  // The rename itself is durable once the directory is synced.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  if (bytes != nullptr) *bytes = static_cast<int64_t>(data.size());
  return path;
}

absl::StatusOr<std::optional<v1::BoundaryState>> ReadStateFile(const std::string& dir,
                                                               uint32_t boundary) {
  const std::string path = StateFilePath(dir, boundary);
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::nullopt;
    return absl::FailedPreconditionError(
        absl::StrCat("state file ", path, ": cannot read it (", Errno(errno), ")"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state file ", path, ": cannot open it; make it readable by mapld or move it away"));
  }
  std::ostringstream contents;
  contents << in.rdbuf();
  return ParseStateFile(contents.str(), path, boundary);
}

absl::StatusOr<v1::BoundaryState> ParseStateFile(absl::string_view bytes, absl::string_view path,
                                                 uint32_t boundary) {
  const std::string what_to_do =
      "; restore it from a backup, or move it away to start this boundary afresh (the learned "
      "dictionary and anchors are then lost)";
  v1::StateFile file;
  if (!file.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::DataLossError(
        absl::StrCat("state file ", path, ": damaged (does not parse)", what_to_do));
  }
  if (file.format() != kStateFormat) {
    return absl::FailedPreconditionError(absl::StrCat("state file ", path, ": format ",
                                                      file.format(), ", this mapld reads format ",
                                                      kStateFormat, what_to_do));
  }
  if (XXH3_64bits(file.state().data(), file.state().size()) != file.checksum()) {
    return absl::DataLossError(
        absl::StrCat("state file ", path, ": damaged (checksum does not match)", what_to_do));
  }
  v1::BoundaryState state;
  if (!state.ParseFromString(file.state())) {
    return absl::DataLossError(
        absl::StrCat("state file ", path, ": damaged (state does not parse)", what_to_do));
  }
  if (state.boundary() != boundary) {
    return absl::DataLossError(absl::StrCat("state file ", path, ": holds boundary ",
                                            state.boundary(), ", not ", boundary, what_to_do));
  }
  return state;
}

absl::Status CheckStateFitsConfig(const v1::BoundaryState& state, const v1::BoundaryConfig& config,
                                  absl::string_view path) {
  const std::string what_to_do =
      ": restore the config it was written under, or move the file away to start this boundary "
      "afresh";
  if (state.role() != config.role()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state file ", path, " was written by the ", RoleName(state.role()), " side of boundary ",
        state.boundary(), ", this config is its ", RoleName(config.role()), what_to_do));
  }
  if (std::optional<FingerprintDifference> diff =
          FirstDifference(state.fingerprint(), BoundaryFingerprintOf(config))) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state file ", path, " was written under another config of boundary ", state.boundary(),
        ": ", diff->field, " = ", diff->a, " there, ", diff->b, " in this config", what_to_do));
  }
  return absl::OkStatus();
}

absl::Status RestoreFloats(const google::protobuf::RepeatedField<float>& from, size_t expected,
                           absl::string_view name, std::vector<float>* to) {
  if (static_cast<size_t>(from.size()) != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": ", from.size(), " values, this config needs ", expected));
  }
  for (int i = 0; i < from.size(); ++i) {
    if (!std::isfinite(from.Get(i))) {
      return absl::InvalidArgumentError(absl::StrCat(name, "[", i, "] is not finite"));
    }
  }
  to->assign(from.begin(), from.end());
  return absl::OkStatus();
}

}  // namespace mapl
