// The UCX data plane's settings and its network policy. UCX has no encryption and no
// authentication on any transport (docs/operations.md, "What UCX can and cannot secure"), so a
// link sends its messages over UCX only to a peer on loopback or on a network the operator
// trusts, unless the operator opts in. Built with or without UCX: the config and the options
// are checked the same either way.
#ifndef MAPL_SERVER_TRANSPORT_NETWORK_POLICY_H_
#define MAPL_SERVER_TRANSPORT_NETWORK_POLICY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace mapl {

// Whether this build has the UCX data plane (MAPL_WITH_UCX).
constexpr bool kUcxBuilt =
#ifdef MAPL_WITH_UCX
    true;
#else
    false;
#endif

// The UCX data plane of a link (config.proto UcxConfig).
struct UcxLinkOptions {
  std::string tls;          // UCX_TLS; empty: UCX chooses.
  std::string net_devices;  // UCX_NET_DEVICES; empty: every device.
  // CIDRs a peer may be on besides loopback ("10.0.0.0/8", "fd00::/8").
  std::vector<std::string> trusted_networks;
  bool allow_untrusted_networks = false;
  // Bytes in flight per direction: sent and not completed, received and not yet read.
  int64_t max_inflight_bytes = int64_t{64} << 20;
};

// OK if `cidr` is an IPv4 or IPv6 network in CIDR notation; INVALID_ARGUMENT saying what is wrong.
absl::Status ValidateCidr(absl::string_view cidr);

// Whether the gRPC peer `peer_uri` (ServerContext::peer() or the dialer's ClientContext::peer():
// "ipv4:10.0.0.5:4312", "ipv6:[::1]:4312", "unix:/path") may be a UCX peer under `options`:
// OK for loopback, a Unix socket or a trusted network; PERMISSION_DENIED naming the address
// otherwise, unless allow_untrusted_networks (then *untrusted is set, for the caller's warning).
absl::Status CheckUcxPeer(absl::string_view peer_uri, const UcxLinkOptions& options,
                          bool* untrusted);

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_NETWORK_POLICY_H_
