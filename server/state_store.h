// Checkpoints of a boundary's learned state (state.proto) on disk, and the helpers the learners
// use to put their tables into a BoundaryState and take them back out.
//
//   MAPL_ASSIGN_OR_RETURN(std::string path, WriteStateFile(dir, state));  // atomic replace
//   MAPL_ASSIGN_OR_RETURN(std::optional<v1::BoundaryState> s, ReadStateFile(dir, boundary_id));
//   if (s.has_value()) MAPL_RETURN_IF_ERROR(CheckStateFitsConfig(*s, config, path));
//
// A state file is untrusted input as far as its shape goes (it may come from another build or
// another config): every table's size is checked against the config before use, and values must
// be finite. Its bytes are covered by a checksum, so a damaged file is refused, never half-used.
#ifndef MAPL_SERVER_STATE_STORE_H_
#define MAPL_SERVER_STATE_STORE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/repeated_field.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/state.pb.h"

namespace mapl {

// The format this build writes and reads (StateFile.format).
inline constexpr uint32_t kStateFormat = 1;

// <dir>/boundary-<id>.state
std::string StateFilePath(absl::string_view dir, uint32_t boundary);

// Creates `dir` (mode 0700) if it does not exist. FAILED_PRECONDITION naming the directory and the
// system's reason when it cannot be created or written.
absl::Status PrepareStateDir(const std::string& dir);

// Writes `state` to StateFilePath(dir, state.boundary()) atomically: a temporary file beside it
// (mode 0600), fsync, rename over the old file, fsync of the directory. Returns the path and sets
// *bytes (may be null) to the file's size. On error the old file is untouched.
absl::StatusOr<std::string> WriteStateFile(const std::string& dir, const v1::BoundaryState& state,
                                           int64_t* bytes = nullptr);

// The state of `boundary` in `dir`; nullopt when there is no file. DATA_LOSS for a file that is
// damaged (checksum, truncation, parse) and FAILED_PRECONDITION for one of an unknown format, each
// naming the file and what to do.
absl::StatusOr<std::optional<v1::BoundaryState>> ReadStateFile(const std::string& dir,
                                                               uint32_t boundary);

// The bytes of a state file holding `state` (StateFile: format, state, checksum), and the state a
// file's bytes hold, with the checks ReadStateFile makes (`path` only names the file in errors).
// SerializeStateFile fails only for a state over protobuf's 2 GiB.
absl::StatusOr<std::string> SerializeStateFile(const v1::BoundaryState& state);
absl::StatusOr<v1::BoundaryState> ParseStateFile(absl::string_view bytes, absl::string_view path,
                                                 uint32_t boundary);

// FAILED_PRECONDITION unless `state` was taken by this boundary (id, role) under a config with the
// same fingerprint; the message names `path` and the first field that differs.
absl::Status CheckStateFitsConfig(const v1::BoundaryState& state, const v1::BoundaryConfig& config,
                                  absl::string_view path);

// Table helpers for the learners' Save/Restore.
inline void SaveFloats(const std::vector<float>& from, google::protobuf::RepeatedField<float>* to) {
  to->Assign(from.begin(), from.end());
}
// INVALID_ARGUMENT ("<name>: N values, this config needs M" or "<name>[i] is not finite")
// unless `from` holds exactly `expected` finite values; `to` is only written on success.
absl::Status RestoreFloats(const google::protobuf::RepeatedField<float>& from, size_t expected,
                           absl::string_view name, std::vector<float>* to);

}  // namespace mapl

#endif  // MAPL_SERVER_STATE_STORE_H_
