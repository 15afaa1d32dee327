// MakeCudaBackend for the registry (kernels/registry.cc) and CreateCudaIpcBuffersFromModule for
// OpenCudaIpcBuffers (kernels/cuda_ipc.cc): loads the CUDA backend's module, libmapl_cuda.so,
// with dlopen and asks it for a backend or for shared device buffers. Part of mapl_kernels, which
// therefore links nothing of CUDA (kernels/CMakeLists.txt says why).
//
// The module is looked for, in this order: at $MAPL_CUDA_MODULE if that is set (and nowhere
// else); next to the binary or library that holds this code (a device bundle), or where the
// package puts it relative to that (lib/mapl under the same root); in this build's tree; in
// the package's /usr/lib/mapl. It stays loaded for the
// life of the process, since backends made by it run its code.
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/backend.h"
#include "kernels/cuda/module.h"

namespace mapl {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend();
absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> CreateCudaIpcBuffersFromModule(
    const CudaIpcRequest& request);

namespace {

struct Entries {
  MaplCudaCreateBackendFn create = nullptr;
  MaplCudaCreateIpcBuffersFn create_ipc = nullptr;
};

struct Loaded {
  Entries entries;
  absl::Status error;  // why there is no module, when entries.create is null
};

// One attempt at one path: the entry points, or an error naming the path.
absl::StatusOr<Entries> TryLoad(const std::string& path) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    return absl::NotFoundError(err != nullptr ? err : path);
  }
  auto abi = reinterpret_cast<MaplCudaModuleAbiFn>(dlsym(lib, MAPL_CUDA_MODULE_ABI_SYMBOL));
  if (abi == nullptr) {
    dlclose(lib);
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a mapl CUDA module (no ", MAPL_CUDA_MODULE_ABI_SYMBOL, ")"));
  }
  // The ABI first: a stale module may lack an entry point that this mapl added.
  if (std::strcmp(abi(), MAPL_CUDA_MODULE_ABI) != 0) {
    const std::string theirs = abi();
    dlclose(lib);
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": built as ", theirs, ", but this mapl needs ", MAPL_CUDA_MODULE_ABI));
  }
  Entries e;
  e.create = reinterpret_cast<MaplCudaCreateBackendFn>(dlsym(lib, MAPL_CUDA_CREATE_BACKEND_SYMBOL));
  e.create_ipc =
      reinterpret_cast<MaplCudaCreateIpcBuffersFn>(dlsym(lib, MAPL_CUDA_CREATE_IPC_BUFFERS_SYMBOL));
  if (e.create == nullptr || e.create_ipc == nullptr) {
    dlclose(lib);
    return absl::FailedPreconditionError(absl::StrCat(path, ": a mapl CUDA module without ",
                                                      e.create == nullptr
                                                          ? MAPL_CUDA_CREATE_BACKEND_SYMBOL
                                                          : MAPL_CUDA_CREATE_IPC_BUFFERS_SYMBOL));
  }
  return e;
}

std::vector<std::string> Candidates() {
  std::vector<std::string> paths;
  if (const char* env = std::getenv("MAPL_CUDA_MODULE"); env != nullptr && *env != '\0') {
    paths.push_back(env);
    return paths;
  }
  // The folder of the object that holds this code: the executable (dladdr then gives argv[0],
  // possibly relative, so /proc/self/exe is asked too) or a library such as the Python module.
  std::vector<std::string> dirs;
  auto add_dir = [&dirs](const std::string& file) {
    const size_t slash = file.rfind('/');
    if (slash != std::string::npos) dirs.push_back(file.substr(0, slash + 1));
  };
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&MakeCudaBackend), &info) != 0 && info.dli_fname != nullptr) {
    add_dir(info.dli_fname);
  }
  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (len > 0) add_dir(std::string(exe, static_cast<size_t>(len)));
  for (const std::string& dir : dirs) {
    paths.push_back(dir + "libmapl_cuda.so");  // a device bundle: everything in one folder
    // The package's layout, wherever its root is: <root>/usr/bin/mapld and the Python module in
    // <root>/usr/lib/python3/dist-packages/mapl, the module in <root>/usr/lib/mapl.
    paths.push_back(dir + "../lib/mapl/libmapl_cuda.so");
    paths.push_back(dir + "../../../mapl/libmapl_cuda.so");
  }
  paths.push_back(MAPL_CUDA_MODULE_BUILD_PATH);
  paths.push_back(MAPL_CUDA_MODULE_INSTALL_PATH);
  return paths;
}

const Loaded& Load() {
  static const Loaded* loaded = [] {
    auto* l = new Loaded();
    std::vector<std::string> tried;
    for (const std::string& path : Candidates()) {
      absl::StatusOr<Entries> entries = TryLoad(path);
      if (entries.ok()) {
        l->entries = *entries;
        return l;
      }
      tried.push_back(std::string(entries.status().message()));
    }
    l->error = absl::UnavailableError(absl::StrCat(
        "the CUDA backend's module (libmapl_cuda.so) cannot be loaded: ",
        absl::StrJoin(tried, "; "), "; set MAPL_CUDA_MODULE to its path, or install it"));
    return l;
  }();
  return *loaded;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend() {
  const Loaded& l = Load();
  if (l.entries.create == nullptr) return l.error;
  absl::StatusOr<std::unique_ptr<Backend>> backend = absl::InternalError("not set");
  l.entries.create(&backend);
  return backend;
}

absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> CreateCudaIpcBuffersFromModule(
    const CudaIpcRequest& request) {
  const Loaded& l = Load();
  if (l.entries.create_ipc == nullptr) return l.error;
  absl::StatusOr<std::unique_ptr<CudaIpcBuffers>> buffers = absl::InternalError("not set");
  l.entries.create_ipc(&request, &buffers);
  return buffers;
}

}  // namespace mapl
