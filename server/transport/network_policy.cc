#include "server/transport/network_policy.h"

#include <arpa/inet.h>

#include <array>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace mapl {
namespace {

// An address as 16 bytes (IPv4 mapped into ::ffff:0:0/96) and how many of its leading bits a
// network prefix may cover.
struct Address {
  std::array<unsigned char, 16> bytes{};
  bool v4 = false;
};

bool ParseAddress(absl::string_view text, Address* out) {
  const std::string s(text);
  unsigned char buf[16];
  if (inet_pton(AF_INET, s.c_str(), buf) == 1) {
    out->bytes.fill(0);
    out->bytes[10] = 0xff;
    out->bytes[11] = 0xff;
    std::memcpy(&out->bytes[12], buf, 4);
    out->v4 = true;
    return true;
  }
  if (inet_pton(AF_INET6, s.c_str(), buf) == 1) {
    std::memcpy(out->bytes.data(), buf, 16);
    out->v4 = false;
    return true;
  }
  return false;
}

// `bits` counts from the start of the 16 bytes.
bool SamePrefix(const Address& a, const Address& b, int bits) {
  for (int i = 0; i < 16 && bits > 0; ++i, bits -= 8) {
    const unsigned mask = bits >= 8 ? 0xffu : (0xffu << (8 - bits)) & 0xffu;
    if ((a.bytes[i] & mask) != (b.bytes[i] & mask)) return false;
  }
  return true;
}

absl::Status ParseCidr(absl::string_view cidr, Address* net, int* bits) {
  const size_t slash = cidr.find('/');
  if (slash == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", cidr, "' is not a network in CIDR notation (e.g. 10.0.0.0/8)"));
  }
  if (!ParseAddress(cidr.substr(0, slash), net)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", cidr, "': '", cidr.substr(0, slash), "' is not an IP address"));
  }
  int prefix = -1;
  const int max = net->v4 ? 32 : 128;
  if (!absl::SimpleAtoi(cidr.substr(slash + 1), &prefix) || prefix < 0 || prefix > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", cidr, "': the prefix length must be 0 to ", max));
  }
  *bits = net->v4 ? prefix + 96 : prefix;
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateCidr(absl::string_view cidr) {
  Address net;
  int bits = 0;
  return ParseCidr(cidr, &net, &bits);
}

absl::Status CheckUcxPeer(absl::string_view peer_uri, const UcxLinkOptions& options,
                          bool* untrusted) {
  *untrusted = false;
  absl::string_view rest = peer_uri;
  if (absl::ConsumePrefix(&rest, "unix:") || absl::ConsumePrefix(&rest, "unix-abstract:")) {
    return absl::OkStatus();  // Same host.
  }
  std::string host;
  if (absl::ConsumePrefix(&rest, "ipv4:")) {
    host = std::string(rest.substr(0, rest.rfind(':')));
  } else if (absl::ConsumePrefix(&rest, "ipv6:")) {
    // "[addr]:port", the address possibly with a zone ("%eth0").
    const size_t close = rest.find(']');
    if (absl::ConsumePrefix(&rest, "[") && close != absl::string_view::npos) {
      host = std::string(rest.substr(0, close - 1));
      host = host.substr(0, host.find('%'));
    }
  }
  Address addr;
  if (host.empty() || !ParseAddress(host, &addr)) {
    return absl::PermissionDeniedError(
        absl::StrCat("the UCX data plane needs the peer's IP address to check it against "
                     "ucx.trusted_networks, and gRPC gives '",
                     peer_uri, "'"));
  }
  Address loopback4;
  Address loopback6;
  ParseAddress("127.0.0.0", &loopback4);
  ParseAddress("::1", &loopback6);
  if (SamePrefix(addr, loopback4, 96 + 8) || SamePrefix(addr, loopback6, 128)) {
    return absl::OkStatus();
  }
  for (const std::string& cidr : options.trusted_networks) {
    Address net;
    int bits = 0;
    if (ParseCidr(cidr, &net, &bits).ok() && net.v4 == addr.v4 && SamePrefix(addr, net, bits)) {
      return absl::OkStatus();
    }
  }
  if (options.allow_untrusted_networks) {
    *untrusted = true;
    return absl::OkStatus();
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "the peer is at ", host,
      ", outside loopback and ucx.trusted_networks; UCX messages are plaintext and "
      "unauthenticated, so a UCX data plane is refused there. Add its network to "
      "ucx.trusted_networks, set ucx.allow_untrusted_networks (accepting that), or use "
      "transport: TRANSPORT_GRPC with tls"));
}

}  // namespace mapl
