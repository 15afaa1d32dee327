// Config parsing (protobuf TextFormat and reflection for overrides), defaults and validation.
#include "server/config.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "kernels/registry.h"
#include "kernels/rvq.h"
#include "server/transport/network_policy.h"

namespace mapl {
namespace {

// Config limits: beyond them a frame or a table could not travel in one protobuf message (2 GiB)
// or the anchors would not fit in memory.
constexpr uint32_t kMaxHidden = 1u << 16;
constexpr uint32_t kMaxTokens = 1u << 20;
constexpr int64_t kMaxFrameElements = int64_t{1} << 28;
constexpr uint32_t kMaxVocab = 1u << 24;
constexpr uint32_t kMaxAnchorRank = 1024;
constexpr int64_t kMaxAnchorElements = int64_t{1} << 28;

// The shared secret from auth_token_file, without the trailing newline an editor or
// `kubectl create secret --from-file` leaves.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("auth_token_file: cannot read '", path, "': ", std::strerror(errno),
                     "; check the path and that mapld's user may read it"));
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string token(absl::StripTrailingAsciiWhitespace(text.str()));
  if (token.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("auth_token_file: '", path, "' is empty; put the shared secret in it"));
  }
  return token;
}

// Defaults of config.proto. The projector's and the anchors' were tuned on the acceptance
// scenario of tests/server/engine_test.cc (see the report there).
constexpr uint32_t kDefaultRvqLevels = 4;
constexpr uint32_t kDefaultAnchorRank = 16;
constexpr float kDefaultProjectorLr = 0.03f;
constexpr float kDefaultProjectorBeta = 0.9f;
constexpr uint32_t kDefaultWarmupSteps = 10;
constexpr float kDefaultAnchorLr = 0.01f;
constexpr float kDefaultBudgetFraction = 0.25f;
constexpr uint32_t kDefaultMaxTokens = 4096;
constexpr float kDefaultRvqDecay = 0.99f;
constexpr uint32_t kDefaultLearnerRows = 1024;

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

// The backend must be one this build registered (kernels/registry.h).
absl::Status CheckBackendName(const std::string& name) {
  const std::vector<std::string> names = BackendNames();
  if (std::find(names.begin(), names.end(), name) != names.end()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("backend: '", name,
                   "' is not a backend of this build (it has: ", absl::StrJoin(names, ", "), ")"));
}

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

absl::StatusOr<v1::BoundaryConfig> BoundaryConfigWithDefaults(const v1::BoundaryConfig& in,
                                                              absl::string_view path) {
  v1::BoundaryConfig c = in;
  const std::string prefix = path.empty() ? std::string() : absl::StrCat(path, ".");
  auto bad = [&](absl::string_view field, const auto&... msg) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, field, ": ", msg...));
  };

  if (c.role() != v1::ROLE_UPSTREAM && c.role() != v1::ROLE_DOWNSTREAM) {
    return bad("role", "required: ROLE_UPSTREAM or ROLE_DOWNSTREAM, got ", c.role());
  }
  if (c.transport() == v1::TRANSPORT_UNSPECIFIED) c.set_transport(v1::TRANSPORT_GRPC);
  if (!v1::Transport_IsValid(c.transport())) {
    return bad("transport", "unknown value ", c.transport());
  }
  if (c.transport() == v1::TRANSPORT_UCX && !kUcxBuilt) {
    return bad("transport",
               "TRANSPORT_UCX, but this mapld was built without UCX (MAPL_WITH_UCX=OFF; it needs "
               "libucx-dev at build time); use TRANSPORT_GRPC or a mapld built with UCX");
  }
  if (c.d() == 0) return bad("d", "required (the hidden size)");
  if (c.d() > kMaxHidden) return bad("d", "must be <= ", kMaxHidden, ", got ", c.d());
  if (c.k() == 0) c.set_k(std::max(1u, c.d() / 16));
  if (c.k() > c.d()) return bad("k", "must be in [1, d=", c.d(), "], got ", c.k());

  if (c.method() == v1::METHOD_UNSPECIFIED) c.set_method(v1::METHOD_MAPL);
  if (!v1::Method_IsValid(c.method())) return bad("method", "unknown value ", c.method());
  if (c.method() == v1::METHOD_DENSE) {
    for (auto [name, codec] :
         {std::pair<const char*, v1::Codec>{"forward_codec", c.forward_codec()},
          {"backward_codec", c.backward_codec()}}) {
      if (codec != v1::CODEC_UNSPECIFIED && codec != v1::CODEC_DENSE) {
        return bad(name, "METHOD_DENSE sends dense bf16; got ", v1::Codec_Name(codec));
      }
    }
    c.set_forward_codec(v1::CODEC_DENSE);
    c.set_backward_codec(v1::CODEC_DENSE);
  } else {
    if (c.forward_codec() == v1::CODEC_UNSPECIFIED) c.set_forward_codec(v1::CODEC_RVQ);
    if (c.forward_codec() != v1::CODEC_BF16 && c.forward_codec() != v1::CODEC_INT8 &&
        c.forward_codec() != v1::CODEC_INT4 && c.forward_codec() != v1::CODEC_RVQ) {
      return bad("forward_codec",
                 "must be CODEC_BF16, CODEC_INT8, CODEC_INT4 or CODEC_RVQ (dense: method ",
                 "METHOD_DENSE), got ", c.forward_codec());
    }
    if (c.backward_codec() == v1::CODEC_UNSPECIFIED) c.set_backward_codec(v1::CODEC_INT8);
    if (c.backward_codec() != v1::CODEC_INT8 && c.backward_codec() != v1::CODEC_INT4 &&
        c.backward_codec() != v1::CODEC_BF16) {
      return bad("backward_codec", "must be CODEC_INT8, CODEC_INT4 or CODEC_BF16, got ",
                 c.backward_codec());
    }
  }
  if (c.rvq_levels() == 0) c.set_rvq_levels(kDefaultRvqLevels);
  if (c.rvq_levels() > static_cast<uint32_t>(kMaxRvqLevels)) {
    return bad("rvq_levels", "must be in [1, ", kMaxRvqLevels, "], got ", c.rvq_levels());
  }
  if (c.anchor_rank() == 0) c.set_anchor_rank(kDefaultAnchorRank);
  if (c.anchor_rank() > kMaxAnchorRank) {
    return bad("anchor_rank", "must be in [1, ", kMaxAnchorRank, "], got ", c.anchor_rank());
  }
  if (c.method() == v1::METHOD_MAPL) {
    if (c.vocab() == 0) return bad("vocab", "required for METHOD_MAPL (the anchors' table size)");
    if (c.vocab() > kMaxVocab) return bad("vocab", "must be <= ", kMaxVocab, ", got ", c.vocab());
    if (int64_t{c.vocab()} * c.anchor_rank() > kMaxAnchorElements ||
        int64_t{c.anchor_rank()} * c.d() > kMaxAnchorElements) {
      return bad("anchor_rank", "anchor tables too large: vocab ", c.vocab(), " x rank ",
                 c.anchor_rank(), " and rank x d ", c.d());
    }
  }
  // proto3 floats: 0 means unset; negative, NaN and Inf are errors.
  auto positive = [&](absl::string_view field, float v, float max) -> absl::Status {
    if (!(v > 0.f && v <= max)) return bad(field, "must be in (0, ", max, "], got ", v);
    return absl::OkStatus();
  };
  if (c.projector_lr() == 0.f) c.set_projector_lr(kDefaultProjectorLr);
  MAPL_RETURN_IF_ERROR(positive("projector_lr", c.projector_lr(), 1.f));
  if (c.projector_beta() == 0.f) c.set_projector_beta(kDefaultProjectorBeta);
  if (!(c.projector_beta() > 0.f && c.projector_beta() < 1.f)) {
    return bad("projector_beta", "must be in [0, 1), got ", c.projector_beta());
  }
  if (c.projector_warmup_steps() == 0) c.set_projector_warmup_steps(kDefaultWarmupSteps);
  if (c.anchor_lr() == 0.f) c.set_anchor_lr(kDefaultAnchorLr);
  MAPL_RETURN_IF_ERROR(positive("anchor_lr", c.anchor_lr(), 1.f));
  if (c.dictionary_budget_fraction() == 0.f) {
    c.set_dictionary_budget_fraction(kDefaultBudgetFraction);
  }
  MAPL_RETURN_IF_ERROR(
      positive("dictionary_budget_fraction", c.dictionary_budget_fraction(), 1e6f));
  if (c.dictionary_precision() == v1::PRECISION_UNSPECIFIED) {
    c.set_dictionary_precision(v1::PRECISION_F32);
  }
  if (c.dictionary_precision() != v1::PRECISION_F32 &&
      c.dictionary_precision() != v1::PRECISION_BF16) {
    return bad("dictionary_precision", "must be PRECISION_F32 or PRECISION_BF16, got ",
               c.dictionary_precision());
  }
  if (c.max_tokens() == 0) c.set_max_tokens(kDefaultMaxTokens);
  if (c.max_tokens() > kMaxTokens || int64_t{c.max_tokens()} * c.d() > kMaxFrameElements) {
    return bad("max_tokens", "must be in [1, ", kMaxTokens,
               "] with max_tokens x d <= ", kMaxFrameElements, ", got ", c.max_tokens(),
               " (d = ", c.d(), ")");
  }
  if (c.projector_init() == v1::PROJECTOR_INIT_UNSPECIFIED) {
    c.set_projector_init(v1::PROJECTOR_INIT_RANDOM);
  }
  if (!v1::ProjectorInit_IsValid(c.projector_init())) {
    return bad("projector_init", "unknown value ", c.projector_init());
  }
  if (c.projector_init() == v1::PROJECTOR_INIT_PCA && c.method() != v1::METHOD_MAPL) {
    return bad("projector_init", "PROJECTOR_INIT_PCA needs METHOD_MAPL (METHOD_FIXED uses the ",
               "seeded U; METHOD_DENSE has none), got ", v1::Method_Name(c.method()));
  }
  if (c.rvq_decay() == 0.f) c.set_rvq_decay(kDefaultRvqDecay);
  if (!(c.rvq_decay() > 0.f && c.rvq_decay() < 1.f)) {
    return bad("rvq_decay", "must be in (0, 1), got ", c.rvq_decay());
  }
  if (c.learner_rows() == 0) c.set_learner_rows(kDefaultLearnerRows);
  if (!(c.forward_error_budget() >= 0.f && c.forward_error_budget() < 1e6f)) {
    return bad("forward_error_budget", "must be >= 0 (0: no budget), got ",
               c.forward_error_budget());
  }
  if (c.forward_error_budget() > 0.f && c.forward_codec() != v1::CODEC_RVQ) {
    return bad("forward_error_budget", "applies to CODEC_RVQ forward codes only, got ",
               v1::Codec_Name(c.forward_codec()));
  }
  return c;
}

bool DialsPeer(const v1::BoundaryConfig& config) {
  return config.has_dial() ? config.dial() : config.role() == v1::ROLE_UPSTREAM;
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
  // An upstream that listens (dial: false) needs an address its downstream can reach; the
  // loopback default serves only a downstream on the same host, so it is not assumed there.
  const bool peer_listen_given = !c.peer_listen().empty();
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
  if (c.backend().empty()) c.set_backend("cpu");
  MAPL_RETURN_IF_ERROR(CheckBackendName(c.backend()));
  if (c.max_sessions() == 0) c.set_max_sessions(16);
  if (c.max_sessions() > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_sessions: at most 1024, got ", c.max_sessions()));
  }
  if (c.compute_threads() == 0) c.set_compute_threads(1);
  if (c.compute_threads() > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("compute_threads: at most 256, got ", c.compute_threads()));
  }
  if (c.peer_hello_timeout_ms() == 0) c.set_peer_hello_timeout_ms(10000);
  if (c.peer_max_pending_streams() == 0) c.set_peer_max_pending_streams(32);
  if (c.peer_max_pending_streams() > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer_max_pending_streams: at most 4096, got ", c.peer_max_pending_streams()));
  }
  if (c.peer_keepalive_ms() == 0) c.set_peer_keepalive_ms(10000);
  if (c.peer_keepalive_ms() < 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer_keepalive_ms: at least 1000 (gRPC refuses faster pings), got ",
                     c.peer_keepalive_ms()));
  }
  if (c.send_timeout_ms() == 0) c.set_send_timeout_ms(c.recv_timeout_ms());
  if (c.checkpoint_every_steps() != 0 && c.state_dir().empty()) {
    return absl::InvalidArgumentError(
        "checkpoint_every_steps: needs state_dir, the directory the checkpoints go to");
  }
  if (c.max_transport_queue_ms() == 0) c.set_max_transport_queue_ms(4000);
  {
    v1::UcxConfig* ucx = c.mutable_ucx();
    if (ucx->max_inflight_mib() == 0) ucx->set_max_inflight_mib(64);
    if (ucx->max_inflight_mib() > 4096) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ucx.max_inflight_mib: at most 4096 (MiB in flight per link and direction), got ",
          ucx->max_inflight_mib()));
    }
    for (int i = 0; i < ucx->trusted_networks_size(); ++i) {
      const absl::Status valid = ValidateCidr(ucx->trusted_networks(i));
      if (!valid.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("ucx.trusted_networks[", i, "]: ", valid.message()));
      }
    }
  }
  if (c.has_tls()) {
    v1::TlsConfig* tls = c.mutable_tls();
    if (tls->reload_seconds() == 0) tls->set_reload_seconds(60);
    MAPL_RETURN_IF_ERROR(ValidateTlsFiles(TlsFilesOf(*tls)));
  }
  if (!c.auth_token_file().empty()) {
    if (!c.auth_token().empty()) {
      return absl::InvalidArgumentError(
          "auth_token and auth_token_file: give one of them, not both");
    }
    MAPL_ASSIGN_OR_RETURN(std::string token, ReadTokenFile(c.auth_token_file()));
    c.set_auth_token(std::move(token));
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
    if (b->role() == v1::ROLE_UPSTREAM && DialsPeer(*b)) {
      if (b->peer_address().empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(field,
                         ".peer_address: required on the upstream side (the downstream daemon's "
                         "peer_listen address), unless the downstream dials: then set dial: false "
                         "here and dial: true there"));
      }
      MAPL_RETURN_IF_ERROR(CheckAddress(field + ".peer_address", b->peer_address()));
    }
    if (b->role() == v1::ROLE_DOWNSTREAM && DialsPeer(*b)) {
      if (b->peer_address().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            field,
            ".peer_address: required with dial: true (this downstream dials its upstream): set it "
            "to the upstream daemon's peer_listen address"));
      }
      MAPL_RETURN_IF_ERROR(CheckAddress(field + ".peer_address", b->peer_address()));
    }
    if (b->role() == v1::ROLE_UPSTREAM && !DialsPeer(*b) && !peer_listen_given) {
      return absl::InvalidArgumentError(absl::StrCat(
          "peer_listen: required because ", field,
          " has dial: false (this upstream listens for its downstream, which dials it): set it to "
          "an address the downstream daemon can reach, and the downstream's peer_address to it"));
    }
    MAPL_ASSIGN_OR_RETURN(*b, BoundaryConfigWithDefaults(*b, field));
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

TlsFiles TlsFilesOf(const v1::TlsConfig& tls) {
  TlsFiles files;
  files.cert_file = tls.cert_file();
  files.key_file = tls.key_file();
  files.ca_file = tls.ca_file();
  files.mutual = !tls.server_only();
  files.reload_seconds = tls.reload_seconds();
  return files;
}

int MaxPeerMessageBytes(const v1::BoundaryConfig& c) {
  const int64_t tokens = c.max_tokens();
  const int64_t dense_frame = tokens * c.d() * 4 + tokens * 4;
  // U and the RVQ codebooks (levels x 256 centroids of width k), float32; twice over for a
  // snapshot's tables plus a delta's row indices at worst.
  const int64_t dictionary =
      2 * (int64_t{c.d()} * c.k() * 4 + int64_t{c.rvq_levels()} * 256 * c.k() * 4);
  const int64_t bytes = std::max(dense_frame, dictionary) + (1 << 20);
  return static_cast<int>(std::clamp<int64_t>(bytes, 4 << 20, int64_t{1} << 30));
}

v1::BoundaryFingerprint BoundaryFingerprintOf(const v1::BoundaryConfig& c) {
  v1::BoundaryFingerprint f;
  f.set_d(c.d());
  f.set_k(c.k());
  f.set_method(c.method());
  f.set_forward_codec(c.forward_codec());
  f.set_backward_codec(c.backward_codec());
  f.set_rvq_levels(c.rvq_levels());
  f.set_seed(c.seed());
  f.set_vocab(c.vocab());
  f.set_max_tokens(c.max_tokens());
  f.set_projector_init(c.projector_init());
  f.set_dictionary_precision(c.dictionary_precision());
  return f;
}

v1::DaemonConfig RedactedConfig(const v1::DaemonConfig& config) {
  v1::DaemonConfig out = config;
  if (!out.auth_token().empty()) out.set_auth_token("<redacted>");
  return out;
}

}  // namespace mapl
