// Throughput of the CUDA backend's codec path on one device, against the device's own memory
// bandwidth measured in the same run (a cudaMemcpy device to device of the input's size):
//   encode: z = h U (bf16 h, n = 65536, d = 4096, k = 128), then 4-level RVQ of z (K = 256);
//   decode: RVQ decode, then h' = zq U^T in bf16.
// GB/s counts the bf16 activation bytes (n * d * 2) per second, the figure to set against the
// link and against the trainer's own memory traffic. All operands live in device memory, as
// they would with CUDA IPC intake. Prints one table; exits 1 on any error, 2 without a device.
//
//   build/bench/gpu_codec_bench [--n=65536] [--reps=5]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/backend.h"
#include "kernels/registry.h"

namespace mapl {
namespace {

constexpr int64_t kD = 4096, kK = 128;
constexpr int kLevels = 4, kCodebook = 256;

#define BENCH_CHECK_CUDA(call)                                               \
  do {                                                                       \
    const cudaError_t e = (call);                                            \
    if (e != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(e)); \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

void* DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  BENCH_CHECK_CUDA(cudaMalloc(&p, bytes));
  return p;
}

template <typename Fn>
double MedianSeconds(int reps, Fn fn) {
  std::vector<double> t;
  fn();  // warm-up: lanes, scratch and cuBLAS's workspaces
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    BENCH_CHECK_CUDA(cudaDeviceSynchronize());
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int Main(int argc, char** argv) {
  int64_t n = 65536;
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--n=", 4) == 0)
      n = std::atoll(argv[i] + 4);
    else if (std::strncmp(argv[i], "--reps=", 7) == 0)
      reps = std::atoi(argv[i] + 7);
    else {
      std::fprintf(stderr, "usage: %s [--n=65536] [--reps=5]\n", argv[0]);
      return 1;
    }
  }
  absl::StatusOr<std::unique_ptr<Backend>> made = MakeBackend("cuda");
  if (made.status().code() == absl::StatusCode::kUnavailable) {
    std::fprintf(stderr, "no CUDA device: %s\n", made.status().ToString().c_str());
    return 2;
  }
  Check(made.status(), "MakeBackend(cuda)");
  const std::unique_ptr<Backend> gpu = *std::move(made);
  const std::unique_ptr<Backend> cpu = MakeCpuBackend();

  // Host data: activations with a decaying spectrum, an orthonormal U, and codebooks fitted on
  // the CPU to a sample of the projected activations.
  std::mt19937_64 rng(7);
  std::normal_distribution<float> g;
  std::vector<float> decay(kD);
  for (int64_t j = 0; j < kD; ++j) decay[j] = std::exp(-float(j) / 256.f);
  std::vector<bf16_t> h(size_t(n) * kD);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < kD; ++j) h[i * kD + j] = FloatToBf16(g(rng) * decay[j]);
  std::vector<float> u(size_t(kD) * kK);
  for (float& v : u) v = g(rng);
  Check(cpu->Retract(Tensor::F32(u.data(), kD, kK)), "Retract");
  const int64_t sample = std::min<int64_t>(n, 8192);
  std::vector<float> zs(size_t(sample) * kK);
  Check(cpu->Project(ConstTensor::BF16(h.data(), sample, kD), ConstTensor::F32(u.data(), kD, kK),
                     Tensor::F32(zs.data(), sample, kK)),
        "Project (sample)");
  RvqFitOptions fit;
  fit.levels = kLevels;
  fit.codebook_size = kCodebook;
  fit.kmeans_iterations = 5;
  fit.refine_passes = 0;
  absl::StatusOr<RvqCodebooks> cb = cpu->RvqFit(ConstTensor::F32(zs.data(), sample, kK), fit);
  Check(cb.status(), "RvqFit");

  // Device operands.
  const size_t h_bytes = h.size() * sizeof(bf16_t);
  auto* h_d = static_cast<bf16_t*>(DeviceAlloc(h_bytes));
  auto* h2_d = static_cast<bf16_t*>(DeviceAlloc(h_bytes));
  auto* u_d = static_cast<float*>(DeviceAlloc(u.size() * sizeof(float)));
  auto* z_d = static_cast<float*>(DeviceAlloc(size_t(n) * kK * sizeof(float)));
  auto* codes_d = static_cast<uint8_t*>(DeviceAlloc(size_t(n) * kLevels));
  BENCH_CHECK_CUDA(cudaMemcpy(h_d, h.data(), h_bytes, cudaMemcpyHostToDevice));
  BENCH_CHECK_CUDA(cudaMemcpy(u_d, u.data(), u.size() * sizeof(float), cudaMemcpyHostToDevice));
  // The backend's streams do not wait for the legacy stream, where these copies may still be.
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());

  const double t_copy = MedianSeconds(
      reps, [&] { BENCH_CHECK_CUDA(cudaMemcpy(h2_d, h_d, h_bytes, cudaMemcpyDeviceToDevice)); });
  const double t_project = MedianSeconds(reps, [&] {
    Check(gpu->Project(ConstTensor::BF16(h_d, n, kD), ConstTensor::F32(u_d, kD, kK),
                       Tensor::F32(z_d, n, kK)),
          "Project");
  });
  const double t_rvq = MedianSeconds(reps, [&] {
    Check(gpu->RvqEncode(*cb, ConstTensor::F32(z_d, n, kK), 1,
                         absl::MakeSpan(codes_d, size_t(n) * kLevels), {}),
          "RvqEncode");
  });
  const double t_rvq_decode = MedianSeconds(reps, [&] {
    Check(gpu->RvqDecode(*cb, absl::MakeConstSpan(codes_d, size_t(n) * kLevels), {},
                         Tensor::F32(z_d, n, kK)),
          "RvqDecode");
  });
  const double t_lift = MedianSeconds(reps, [&] {
    Check(gpu->Lift(ConstTensor::F32(z_d, n, kK), ConstTensor::F32(u_d, kD, kK),
                    Tensor::BF16(h2_d, n, kD)),
          "Lift");
  });

  cudaDeviceProp prop;
  int device = 0;
  BENCH_CHECK_CUDA(cudaGetDevice(&device));
  BENCH_CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  const double gb = double(h_bytes) / 1e9;
  const double enc = t_project + t_rvq, dec = t_rvq_decode + t_lift;
  std::printf("gpu_codec_bench on %s: n=%lld d=%lld k=%lld, RVQ %d x %d, bf16 input %.2f GB\n",
              prop.name, static_cast<long long>(n), static_cast<long long>(kD),
              static_cast<long long>(kK), kLevels, kCodebook, gb);
  std::printf("%-28s %10s %10s %12s\n", "step", "ms", "GB/s", "vs memcpy");
  const double copy_gbs = gb / t_copy;
  auto row = [&](const char* name, double t) {
    std::printf("%-28s %10.3f %10.1f %11.1f%%\n", name, t * 1e3, gb / t,
                100.0 * (gb / t) / copy_gbs);
  };
  row("cudaMemcpy D2D (same size)", t_copy);
  row("project (bf16 -> f32 z)", t_project);
  row("rvq encode (4 levels)", t_rvq);
  row("encode total", enc);
  row("rvq decode", t_rvq_decode);
  row("lift (f32 -> bf16 h)", t_lift);
  row("decode total", dec);
  cudaFree(h_d);
  cudaFree(h2_d);
  cudaFree(u_d);
  cudaFree(z_d);
  cudaFree(codes_d);
  return 0;
}

}  // namespace
}  // namespace mapl

int main(int argc, char** argv) { return mapl::Main(argc, argv); }
