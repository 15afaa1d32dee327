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
#include "server/transport/tls.h"

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

// Whether this side of boundary `config` dials its peer daemon (BoundaryConfig.dial; unset: the
// upstream dials and the downstream listens).
bool DialsPeer(const v1::BoundaryConfig& config);

// The TLS files of `tls` (DaemonConfig.tls) as the transport takes them.
TlsFiles TlsFilesOf(const v1::TlsConfig& tls);

// The largest peer message boundary `config` (defaults filled) can produce: a dense frame of
// max_tokens rows in float32 with its token ids, or a dictionary snapshot, whichever is larger,
// with room for the envelope. Both sides of the link accept nothing larger, so an unauthenticated
// peer cannot make the receiver buffer more.
int MaxPeerMessageBytes(const v1::BoundaryConfig& config);

// What both ends of boundary `config` (defaults filled) must agree on, as the handshake sends
// and compares it.
v1::BoundaryFingerprint BoundaryFingerprintOf(const v1::BoundaryConfig& config);

// `config` with its secrets (auth_token) replaced by "<redacted>", for printing and logs.
v1::DaemonConfig RedactedConfig(const v1::DaemonConfig& config);

}  // namespace mapl

#endif  // MAPL_SERVER_CONFIG_H_
