#include "server/engine.h"

#include <algorithm>
#include <cmath>

#include "common/status_macros.h"
#include "server/config.h"
#include "server/dictionary.h"
#include "server/downstream_engine.h"
#include "server/upstream_engine.h"

namespace mapl {

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const v1::BoundaryConfig& config,
                                                       const Backend* backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("backend: null");
  MAPL_ASSIGN_OR_RETURN(v1::BoundaryConfig full, BoundaryConfigWithDefaults(config));
  if (full.role() == v1::ROLE_UPSTREAM) {
    MAPL_ASSIGN_OR_RETURN(std::unique_ptr<UpstreamEngine> e,
                          UpstreamEngine::Create(full, backend));
    return std::unique_ptr<Engine>(std::move(e));
  }
  MAPL_ASSIGN_OR_RETURN(std::unique_ptr<DownstreamEngine> e,
                        DownstreamEngine::Create(full, backend));
  return std::unique_ptr<Engine>(std::move(e));
}

double OrthogonalityError(const float* u, int64_t d, int64_t k) {
  double err = 0.0;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = a; b < k; ++b) {
      double dot = 0.0;
      for (int64_t i = 0; i < d; ++i) dot += double{u[i * k + a]} * u[i * k + b];
      err = std::max(err, std::fabs(dot - (a == b ? 1.0 : 0.0)));
    }
  }
  return err;
}

void DictionaryGauges::Fill(const PublishedDictionary& dict, int64_t d, int64_t k,
                            v1::BoundaryStats* out) const {
  if (dict.version() != version_ || dict.Checksum() != checksum_) {
    version_ = dict.version();
    checksum_ = dict.Checksum();
    orthogonality_error_ = OrthogonalityError(dict.table(0), d, k);
  }
  out->set_has_dictionary(true);
  out->set_dictionary_version(version_);
  out->set_dictionary_checksum(checksum_);
  out->set_orthogonality_error(orthogonality_error_);
}

}  // namespace mapl
