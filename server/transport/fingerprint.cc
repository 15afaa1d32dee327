#include "server/transport/fingerprint.h"

#include "absl/strings/str_cat.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/text_format.h"

namespace mapl {

std::optional<FingerprintDifference> FirstDifference(const v1::BoundaryFingerprint& a,
                                                     const v1::BoundaryFingerprint& b) {
  // Through the descriptor, so that a field added to the fingerprint is compared without a change
  // here.
  const google::protobuf::Descriptor* d = v1::BoundaryFingerprint::descriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* f = d->field(i);
    FingerprintDifference diff{f->name(), "", ""};
    google::protobuf::TextFormat::PrintFieldValueToString(a, f, -1, &diff.a);
    google::protobuf::TextFormat::PrintFieldValueToString(b, f, -1, &diff.b);
    if (diff.a != diff.b) return diff;
  }
  return std::nullopt;
}

std::string FingerprintFields() {
  const google::protobuf::Descriptor* d = v1::BoundaryFingerprint::descriptor();
  std::string out;
  for (int i = 0; i < d->field_count(); ++i) {
    absl::StrAppend(&out, i == 0 ? "" : ", ", d->field(i)->name());
  }
  return out;
}

}  // namespace mapl
