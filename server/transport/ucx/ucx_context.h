// The process's UCP contexts (UCX's library state: its transports and devices), one for each
// distinct UcxLinkOptions.tls / net_devices pair in use, made on first use and kept for the life
// of the process. Each UCX connection of a peer link has its own worker on one of them
// (ucx_stream.h).
#ifndef MAPL_SERVER_TRANSPORT_UCX_UCX_CONTEXT_H_
#define MAPL_SERVER_TRANSPORT_UCX_UCX_CONTEXT_H_

#include <ucp/api/ucp.h>

#include "absl/status/statusor.h"
#include "server/transport/network_policy.h"

namespace mapl {

// The context for `options`' tls and net_devices, with the active-message and wakeup features.
// INVALID_ARGUMENT naming the setting UCX rejected; UNAVAILABLE if UCX cannot start.
// Thread-safe.
absl::StatusOr<ucp_context_h> UcxContextFor(const UcxLinkOptions& options);

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_UCX_UCX_CONTEXT_H_
