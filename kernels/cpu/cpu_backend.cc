// Factory for the CPU backend, and its BLAS threading.
#include "kernels/cpu/cpu_backend.h"

#include <cblas.h>

#include "absl/strings/str_cat.h"
#include "common/check.h"

namespace mapl {

std::unique_ptr<Backend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

void SetCpuBlasThreads(int threads) {
  MAPL_CHECK(threads >= 1, absl::StrCat("SetCpuBlasThreads: threads must be >= 1, got ", threads));
  openblas_set_num_threads(threads);
}

int CpuBlasThreads() { return openblas_get_num_threads(); }

}  // namespace mapl
