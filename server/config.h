// The daemon's configuration: a text-format mapl.v1.DaemonConfig (proto/mapl/v1/config.proto)
// plus command-line overrides, turned into a complete, validated config. A missing field takes
// its default; a present but invalid one is an error naming the field.
//
//   MAPL_ASSIGN_OR_RETURN(mapl::v1::DaemonConfig config,
//                         mapl::LoadConfig("stage0.textproto", {"boundaries[0].k=64"}));
#ifndef MAPL_SERVER_CONFIG_H_
#define MAPL_SERVER_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/mapl/v1/config.pb.h"

namespace mapl {

// Parses `text` (text format). Errors name the line and column.
absl::StatusOr<v1::DaemonConfig> ParseConfig(const std::string& text);

// Applies one override "path=value", where path names a field with dots and repeated message
// fields take an index: "stage", "boundaries[0].k", "boundaries[1].peer_address". Index == size
// appends an element. Enum values take their names (METHOD_FIXED) or numbers.
absl::Status ApplyOverride(const std::string& assignment, v1::DaemonConfig* config);

// Fills defaults and validates everything; errors name the field ("boundaries[0].k: ...").
absl::StatusOr<v1::DaemonConfig> FinalizeConfig(const v1::DaemonConfig& config);

// One boundary's config with the documented defaults (config.proto) filled in for unset fields,
// validated. INVALID_ARGUMENT names the field, prefixed with `path` (e.g. "boundaries[0]" gives
// "boundaries[0].k: must be in [1, d=512], got 600").
absl::StatusOr<v1::BoundaryConfig> BoundaryConfigWithDefaults(const v1::BoundaryConfig& config,
                                                              absl::string_view path = "");

// Reads `path` (may be empty: start from an empty config), applies `overrides` in order,
// finalizes.
absl::StatusOr<v1::DaemonConfig> LoadConfig(const std::string& path,
                                            const std::vector<std::string>& overrides);

// The local socket path used when the config names none:
// $XDG_RUNTIME_DIR/mapld-<stage>.sock, else /tmp/mapld-<uid>-<stage>.sock.
std::string DefaultSocketPath(uint32_t stage);

}  // namespace mapl

#endif  // MAPL_SERVER_CONFIG_H_
