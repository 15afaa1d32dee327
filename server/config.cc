// Config parsing (protobuf TextFormat and reflection for overrides), defaults and validation.
#include "server/config.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "common/status_macros.h"
#include "server/boundary.h"

namespace mapl {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;

class CollectErrors : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (first_.empty())
      first_ = absl::StrCat("line ", line + 1, ", column ", column + 1, ": ", message);
  }
  const std::string& first() const { return first_; }

 private:
  std::string first_;
};

// Validates a host:port address (host may be a name, an IPv4 address or [IPv6]).
absl::Status CheckAddress(const std::string& field, const std::string& address) {
  const size_t colon = address.rfind(':');
  uint32_t port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": '", address, "' is not host:port (for example 127.0.0.1:7000)"));
  }
  return absl::OkStatus();
}

// Sets a singular scalar field from its command-line spelling (strings unquoted, enums by name
// or number); false if `value` does not parse as the field's type.
bool SetScalar(const FieldDescriptor* field, const std::string& value, Message* msg) {
  const Reflection* r = msg->GetReflection();
  switch (field->cpp_type()) {
    case FieldDescriptor::CPPTYPE_STRING:
      r->SetString(msg, field, value);
      return true;
    case FieldDescriptor::CPPTYPE_INT32: {
      int32_t v;
      if (!absl::SimpleAtoi(value, &v)) return false;
      r->SetInt32(msg, field, v);
      return true;
    }
    case FieldDescriptor::CPPTYPE_INT64: {
      int64_t v;
      if (!absl::SimpleAtoi(value, &v)) return false;
      r->SetInt64(msg, field, v);
      return true;
    }
    case FieldDescriptor::CPPTYPE_UINT32: {
      uint32_t v;
      if (!absl::SimpleAtoi(value, &v)) return false;
      r->SetUInt32(msg, field, v);
      return true;
    }
    case FieldDescriptor::CPPTYPE_UINT64: {
      uint64_t v;
      if (!absl::SimpleAtoi(value, &v)) return false;
      r->SetUInt64(msg, field, v);
      return true;
    }
    case FieldDescriptor::CPPTYPE_FLOAT: {
      float v;
      if (!absl::SimpleAtof(value, &v)) return false;
      r->SetFloat(msg, field, v);
      return true;
    }
    case FieldDescriptor::CPPTYPE_DOUBLE: {
      double v;
      if (!absl::SimpleAtod(value, &v)) return false;
      r->SetDouble(msg, field, v);
      return true;
    }
    case FieldDescriptor::CPPTYPE_BOOL: {
      bool v;
      if (!absl::SimpleAtob(value, &v)) return false;
      r->SetBool(msg, field, v);
      return true;
    }
    case FieldDescriptor::CPPTYPE_ENUM: {
      const google::protobuf::EnumValueDescriptor* e = field->enum_type()->FindValueByName(value);
      int number;
      if (e == nullptr && absl::SimpleAtoi(value, &number)) {
        e = field->enum_type()->FindValueByNumber(number);
      }
      if (e == nullptr) return false;
      r->SetEnum(msg, field, e);
      return true;
    }
    default:
      return false;
  }
}

}  // namespace

std::string DefaultSocketPath(uint32_t stage) {
  const char* runtime = std::getenv("XDG_RUNTIME_DIR");
  if (runtime != nullptr && *runtime != '\0') {
    return absl::StrCat(runtime, "/mapld-", stage, ".sock");
  }
  return absl::StrCat("/tmp/mapld-", ::getuid(), "-", stage, ".sock");
}

absl::StatusOr<v1::DaemonConfig> ParseConfig(const std::string& text) {
  v1::DaemonConfig config;
  google::protobuf::TextFormat::Parser parser;
  CollectErrors errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &config)) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", errors.first()));
  }
  return config;
}

absl::Status ApplyOverride(const std::string& assignment, v1::DaemonConfig* config) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--set '", assignment, "': expected path=value, for example boundaries[0].k=64"));
  }
  const std::string path = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  Message* msg = config;
  std::vector<std::string> parts = absl::StrSplit(path, '.');
  for (size_t i = 0; i < parts.size(); ++i) {
    std::string name = parts[i];
    int64_t index = -1;
    const size_t bracket = name.find('[');
    if (bracket != std::string::npos) {
      if (name.back() != ']' ||
          !absl::SimpleAtoi(name.substr(bracket + 1, name.size() - bracket - 2), &index) ||
          index < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("--set ", path, ": bad index in '", name, "'"));
      }
      name = name.substr(0, bracket);
    }
    const FieldDescriptor* field = msg->GetDescriptor()->FindFieldByName(name);
    if (field == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--set ", path, ": ", msg->GetDescriptor()->name(), " has no field '", name, "'"));
    }
    const Reflection* refl = msg->GetReflection();
    const bool last = i + 1 == parts.size();
    if (field->is_repeated()) {
      if (index < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--set ", path, ": '", name, "' is repeated; give an index, e.g. ", name, "[0]"));
      }
      const int size = refl->FieldSize(*msg, field);
      if (index > size) {
        return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": index ", index,
                                                       " past the end (", name, " has ", size,
                                                       " elements; ", size, " appends)"));
      }
      if (field->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE || last) {
        return absl::InvalidArgumentError(
            absl::StrCat("--set ", path, ": only repeated messages can be overridden by index"));
      }
      msg = index == size ? refl->AddMessage(msg, field)
                          : refl->MutableRepeatedMessage(msg, field, static_cast<int>(index));
      continue;
    }
    if (index >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--set ", path, ": '", name, "' is not repeated"));
    }
    if (!last) {
      if (field->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE) {
        return absl::InvalidArgumentError(
            absl::StrCat("--set ", path, ": '", name, "' is not a message"));
      }
      msg = refl->MutableMessage(msg, field);
      continue;
    }
    if (!SetScalar(field, value, msg)) {
      return absl::InvalidArgumentError(absl::StrCat("--set ", path, ": '", value,
                                                     "' is not a valid ", field->type_name(),
                                                     " value for ", field->full_name()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::DaemonConfig> FinalizeConfig(const v1::DaemonConfig& in) {
  v1::DaemonConfig c = in;
  if (c.local_socket().empty()) c.set_local_socket(DefaultSocketPath(c.stage()));
  if (c.local_socket().size() > 100) {  // sun_path is 108 bytes
    return absl::InvalidArgumentError(absl::StrCat("local_socket: path '", c.local_socket(),
                                                   "' is too long for a Unix socket (max 100)"));
  }
  if (c.metrics_address().empty()) c.set_metrics_address("127.0.0.1:0");
  if (c.metrics_address() != "off") {
    MAPL_RETURN_IF_ERROR(CheckAddress("metrics_address", c.metrics_address()));
  }
  if (c.peer_listen().empty()) c.set_peer_listen("127.0.0.1:0");
  MAPL_RETURN_IF_ERROR(CheckAddress("peer_listen", c.peer_listen()));
  if (c.client_buffers() == 0) c.set_client_buffers(8);
  if (c.client_buffers() > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("client_buffers: at most 256, got ", c.client_buffers()));
  }
  if (c.client_buffer_bytes() == 0) c.set_client_buffer_bytes(uint64_t{64} << 20);
  if (c.client_buffer_bytes() > (uint64_t{1} << 36)) {
    return absl::InvalidArgumentError(
        absl::StrCat("client_buffer_bytes: at most 64 GiB, got ", c.client_buffer_bytes()));
  }
  if (c.recv_timeout_ms() == 0) c.set_recv_timeout_ms(60000);
  if (c.peer_connect_timeout_ms() == 0) c.set_peer_connect_timeout_ms(30000);
  if (!(c.send_rate_mbit() >= 0) || c.send_rate_mbit() > 1e6) {
    return absl::InvalidArgumentError(absl::StrCat(
        "send_rate_mbit: must be in [0, 1e6] Mbit/s (0: no cap), got ", c.send_rate_mbit()));
  }
  if (c.auth_token().empty()) {
    return absl::InvalidArgumentError(
        "auth_token: required; the daemons on both sides of a boundary present it to each other "
        "(any shared secret, e.g. from a Kubernetes Secret)");
  }
  if (c.boundaries_size() == 0) {
    return absl::InvalidArgumentError(
        "boundaries: a stage needs at least one boundary (see deploy/examples/*.textproto)");
  }
  std::set<uint32_t> ids;
  for (int i = 0; i < c.boundaries_size(); ++i) {
    const std::string field = absl::StrCat("boundaries[", i, "]");
    v1::BoundaryConfig* b = c.mutable_boundaries(i);
    if (!ids.insert(b->id()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".id: boundary ", b->id(), " appears twice"));
    }
    if (b->role() == v1::ROLE_UPSTREAM && b->id() != c.stage()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".role: stage ", c.stage(),
                                                     " can be upstream only of boundary ",
                                                     c.stage(), ", not ", b->id()));
    }
    if (b->role() == v1::ROLE_DOWNSTREAM && b->id() + 1 != c.stage()) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".role: stage ", c.stage(), " can be downstream only of boundary ",
          c.stage() == 0 ? std::string("(none: stage 0 is first)") : absl::StrCat(c.stage() - 1),
          ", not ", b->id()));
    }
    if (b->role() == v1::ROLE_UPSTREAM) {
      if (b->peer_address().empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(field,
                         ".peer_address: required on the upstream side (the downstream daemon's "
                         "peer_listen address)"));
      }
      MAPL_RETURN_IF_ERROR(CheckAddress(field + ".peer_address", b->peer_address()));
    }
    MAPL_ASSIGN_OR_RETURN(*b, BoundaryEngine::WithDefaults(*b, field));
    // A trainer stages one whole microbatch (float32) and its token ids in one buffer.
    const uint64_t need = uint64_t{b->max_tokens()} * b->d() * 4 + uint64_t{b->max_tokens()} * 4;
    if (need > c.client_buffer_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "client_buffer_bytes: ", c.client_buffer_bytes(), " cannot hold one microbatch of ",
          field, " (max_tokens ", b->max_tokens(), " x d ", b->d(), " float32 + ids = ", need,
          " bytes); raise client_buffer_bytes or lower ", field, ".max_tokens"));
    }
  }
  return c;
}

absl::StatusOr<v1::DaemonConfig> LoadConfig(const std::string& path,
                                            const std::vector<std::string>& overrides) {
  v1::DaemonConfig config;
  if (!path.empty()) {
    std::ifstream in(path);
    if (!in) {
      return absl::NotFoundError(absl::StrCat("--config ", path, ": cannot open the file"));
    }
    std::stringstream text;
    text << in.rdbuf();
    absl::StatusOr<v1::DaemonConfig> parsed = ParseConfig(text.str());
    if (!parsed.ok()) {
      return absl::Status(parsed.status().code(),
                          absl::StrCat(path, ": ", parsed.status().message()));
    }
    config = *std::move(parsed);
  }
  for (const std::string& o : overrides) MAPL_RETURN_IF_ERROR(ApplyOverride(o, &config));
  return FinalizeConfig(config);
}

}  // namespace mapl
