#include "server/transport/ucx/ucx_context.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/log.h"

namespace mapl {
namespace {

absl::Mutex contexts_mu(absl::kConstInit);
// Never freed: workers of links that outlive every other static may still use them.
std::map<std::pair<std::string, std::string>, ucp_context_h>* contexts
    ABSL_GUARDED_BY(contexts_mu) = nullptr;

absl::StatusOr<ucp_context_h> NewContext(const UcxLinkOptions& options) {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) {
    return absl::UnavailableError(
        absl::StrCat("UCX: reading its configuration failed: ", ucs_status_string(status)));
  }
  const std::pair<const char*, const std::string*> settings[] = {
      {"TLS", &options.tls}, {"NET_DEVICES", &options.net_devices}};
  for (const auto& [name, value] : settings) {
    if (value->empty()) continue;
    status = ucp_config_modify(config, name, value->c_str());
    if (status != UCS_OK) {
      ucp_config_release(config);
      return absl::InvalidArgumentError(
          absl::StrCat("UCX refuses ", name, "='", *value, "': ", ucs_status_string(status)));
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.name = "mapld";
  ucp_context_h context = nullptr;
  status = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (status != UCS_OK) {
    return absl::UnavailableError(absl::StrCat("UCX failed to start (tls '", options.tls,
                                               "', net_devices '", options.net_devices,
                                               "'): ", ucs_status_string(status)));
  }
  // What UCX found (its transports and devices), once per context, for whoever debugs a lane.
  char* text = nullptr;
  size_t size = 0;
  if (FILE* f = open_memstream(&text, &size)) {
    ucp_context_print_info(context, f);
    std::fclose(f);
    Log(LogLevel::kDebug, "UCX context ready",
        {{"tls", options.tls}, {"net_devices", options.net_devices}, {"info", text}});
    std::free(text);
  }
  return context;
}

}  // namespace

absl::StatusOr<ucp_context_h> UcxContextFor(const UcxLinkOptions& options) {
  absl::MutexLock lock(&contexts_mu);
  if (contexts == nullptr) {
    contexts = new std::map<std::pair<std::string, std::string>, ucp_context_h>();
  }
  const auto key = std::make_pair(options.tls, options.net_devices);
  auto it = contexts->find(key);
  if (it != contexts->end()) return it->second;
  absl::StatusOr<ucp_context_h> context = NewContext(options);
  if (!context.ok()) return context.status();
  contexts->emplace(key, *context);
  return *context;
}

}  // namespace mapl
