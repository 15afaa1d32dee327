// Comparing two boundary-config fingerprints (peer.proto BoundaryFingerprint) field by field, so
// that a refusal can name what differs: the link's handshake compares its peer's, a restore the
// one its state file was written under.
#ifndef MAPL_SERVER_TRANSPORT_FINGERPRINT_H_
#define MAPL_SERVER_TRANSPORT_FINGERPRINT_H_

#include <optional>
#include <string>

#include "proto/mapl/v1/peer.pb.h"

namespace mapl {

struct FingerprintDifference {
  std::string field;  // "k"
  std::string a;      // a's value, as text ("32")
  std::string b;
};

// The first field (in field-number order) whose values differ; nullopt when equal.
std::optional<FingerprintDifference> FirstDifference(const v1::BoundaryFingerprint& a,
                                                     const v1::BoundaryFingerprint& b);

// The fields a fingerprint covers, for messages: "d, k, method, ..., dictionary_precision".
std::string FingerprintFields();

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_FINGERPRINT_H_
