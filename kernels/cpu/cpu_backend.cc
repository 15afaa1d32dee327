// Factory for the CPU backend.
#include "kernels/cpu/cpu_backend.h"

namespace mapl {

std::unique_ptr<Backend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace mapl
