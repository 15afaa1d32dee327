// Kernel throughput of the CPU backend (Google Benchmark), plus the projection-vs-sgemm ratio the
// project sets as a target (projection of n=4096, d=2048, k=64 in fp32 at >= 70% of a
// bare OpenBLAS sgemm of the same shape, measured in the same run).
//
//   OPENBLAS_NUM_THREADS=1 build/bench/kernels_bench
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "kernels/backend.h"
#include "kernels/cpu/rvq_distance.h"

namespace mapl {
namespace {

std::vector<float> Gaussian(int64_t n, int64_t dim, uint64_t seed, bool decaying) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  std::vector<float> x(n * dim);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < dim; ++j)
      x[i * dim + j] = g(rng) * (decaying ? std::exp(-float(j) / 16.f) : 1.f);
  return x;
}

std::vector<float> Orthonormal(int64_t d, int64_t k, uint64_t seed) {
  std::vector<float> u = Gaussian(d, k, seed, false);
  auto be = MakeCpuBackend();
  if (!be->Retract(Tensor::F32(u.data(), d, k)).ok()) std::abort();
  return u;
}

constexpr int64_t kN = 4096, kD = 2048, kK = 64;

void BM_SgemmBare(benchmark::State& state) {
  std::vector<float> h = Gaussian(kN, kD, 1, false), u = Gaussian(kD, kK, 2, false), z(kN * kK);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, kN, kK, kD, 1.f, h.data(), kD, u.data(),
                kK, 0.f, z.data(), kK);
    benchmark::DoNotOptimize(z.data());
  }
  state.SetItemsProcessed(state.iterations() * kN);
}
BENCHMARK(BM_SgemmBare)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_ProjectF32(benchmark::State& state) {
  auto be = MakeCpuBackend();
  std::vector<float> h = Gaussian(kN, kD, 1, false), u = Orthonormal(kD, kK, 2), z(kN * kK);
  for (auto _ : state) {
    if (!be->Project(ConstTensor::F32(h.data(), kN, kD), ConstTensor::F32(u.data(), kD, kK),
                     Tensor::F32(z.data(), kN, kK))
             .ok())
      state.SkipWithError("project failed");
    benchmark::DoNotOptimize(z.data());
  }
  state.SetItemsProcessed(state.iterations() * kN);
}
BENCHMARK(BM_ProjectF32)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_ProjectBf16(benchmark::State& state) {
  auto be = MakeCpuBackend();
  std::vector<float> hf = Gaussian(kN, kD, 1, false), u = Orthonormal(kD, kK, 2);
  std::vector<bf16_t> h(kN * kD), z(kN * kK);
  FloatToBf16(hf.data(), h.data(), h.size());
  for (auto _ : state) {
    if (!be->Project(ConstTensor::BF16(h.data(), kN, kD), ConstTensor::F32(u.data(), kD, kK),
                     Tensor::BF16(z.data(), kN, kK))
             .ok())
      state.SkipWithError("project failed");
    benchmark::DoNotOptimize(z.data());
  }
  state.SetItemsProcessed(state.iterations() * kN);
}
BENCHMARK(BM_ProjectBf16)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_LiftF32(benchmark::State& state) {
  auto be = MakeCpuBackend();
  std::vector<float> z = Gaussian(kN, kK, 1, false), u = Orthonormal(kD, kK, 2), h(kN * kD);
  for (auto _ : state) {
    if (!be->Lift(ConstTensor::F32(z.data(), kN, kK), ConstTensor::F32(u.data(), kD, kK),
                  Tensor::F32(h.data(), kN, kD))
             .ok())
      state.SkipWithError("lift failed");
    benchmark::DoNotOptimize(h.data());
  }
  state.SetItemsProcessed(state.iterations() * kN);
}
BENCHMARK(BM_LiftF32)->Unit(benchmark::kMillisecond)->UseRealTime();

// RVQ on the data of bench/rvq_vs_faiss.py: 65,536 vectors of dimension 64, decaying spectrum, 4 x
// 256.
struct RvqFixture {
  RvqFixture() : x(Gaussian(65536, 64, 3, true)) {
    RvqFitOptions opt;
    opt.levels = 4;
    opt.kmeans_iterations = 10;
    cb = *MakeCpuBackend()->RvqFit(ConstTensor::F32(x.data(), 65536, 64), opt);
  }
  std::vector<float> x;
  RvqCodebooks cb;
};
RvqFixture& Rvq() {
  static RvqFixture f;
  return f;
}

void RvqEncode(benchmark::State& state, int beam, cpu::DistanceKernel kernel) {
  auto be = MakeCpuBackend();
  RvqFixture& f = Rvq();
  const int64_t n = beam == 1 ? 65536 : 4096;
  std::vector<uint8_t> codes(n * 4);
  auto old = cpu::SetDistanceKernelForTesting(kernel);
  state.SetLabel(cpu::DistanceKernelName(kernel));
  for (auto _ : state) {
    if (!be->RvqEncode(f.cb, ConstTensor::F32(f.x.data(), n, 64), beam, absl::MakeSpan(codes), {})
             .ok())
      state.SkipWithError("encode failed");
  }
  cpu::SetDistanceKernelForTesting(old);
  state.SetItemsProcessed(state.iterations() * n);
}
void BM_RvqEncodeGreedy(benchmark::State& s) { RvqEncode(s, 1, cpu::DistanceKernel::kAuto); }
void BM_RvqEncodeGreedyGeneric(benchmark::State& s) {
  RvqEncode(s, 1, cpu::DistanceKernel::kGeneric);
}
void BM_RvqEncodeGreedyAvx2(benchmark::State& s) { RvqEncode(s, 1, cpu::DistanceKernel::kAvx2); }
void BM_RvqEncodeBeam4(benchmark::State& s) { RvqEncode(s, 4, cpu::DistanceKernel::kAuto); }
BENCHMARK(BM_RvqEncodeGreedy)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_RvqEncodeGreedyAvx2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_RvqEncodeGreedyGeneric)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_RvqEncodeBeam4)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_RvqDecode(benchmark::State& state) {
  auto be = MakeCpuBackend();
  RvqFixture& f = Rvq();
  std::vector<uint8_t> codes(65536 * 4);
  std::vector<float> y(65536 * 64);
  if (!be->RvqEncode(f.cb, ConstTensor::F32(f.x.data(), 65536, 64), 1, absl::MakeSpan(codes), {})
           .ok())
    state.SkipWithError("encode failed");
  for (auto _ : state) {
    if (!be->RvqDecode(f.cb, codes, {}, Tensor::F32(y.data(), 65536, 64)).ok())
      state.SkipWithError("decode failed");
  }
  state.SetItemsProcessed(state.iterations() * 65536);
}
BENCHMARK(BM_RvqDecode)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Int8Encode(benchmark::State& state) {
  auto be = MakeCpuBackend();
  std::vector<float> z = Gaussian(kN, kK, 4, false), scales(kN);
  std::vector<int8_t> q(kN * kK);
  for (auto _ : state) {
    if (!be->Int8Encode(ConstTensor::F32(z.data(), kN, kK), absl::MakeSpan(q),
                        absl::MakeSpan(scales))
             .ok())
      state.SkipWithError("int8 failed");
  }
  state.SetItemsProcessed(state.iterations() * kN);
}
BENCHMARK(BM_Int8Encode)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_SpelStep(benchmark::State& state) {
  auto be = MakeCpuBackend();
  std::vector<float> u = Orthonormal(kD, kK, 5), g = Gaussian(kD, kK, 6, false), m(kD * kK);
  SpelOptions opt;
  for (auto _ : state) {
    if (!be->SpelStep(Tensor::F32(u.data(), kD, kK), ConstTensor::F32(g.data(), kD, kK),
                      Tensor::F32(m.data(), kD, kK), opt)
             .ok())
      state.SkipWithError("spel failed");
  }
}
BENCHMARK(BM_SpelStep)->Unit(benchmark::kMillisecond)->UseRealTime();

// Console output as usual, and the real time per iteration of every run, for the ratio.
class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      seconds_[r.benchmark_name()] =
          r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit);
    }
    ConsoleReporter::ReportRuns(runs);
  }
  double Get(const std::string& prefix) const {
    for (const auto& [name, t] : seconds_)
      if (name.rfind(prefix, 0) == 0) return t;
    return 0;
  }

 private:
  std::map<std::string, double> seconds_;
};

}  // namespace
}  // namespace mapl

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  mapl::RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const double sgemm = reporter.Get("BM_SgemmBare"), proj = reporter.Get("BM_ProjectF32");
  if (sgemm > 0 && proj > 0) {
    const double ratio = sgemm / proj;
    std::printf(
        "\nprojection f32 (n=4096, d=2048, k=64) throughput vs bare sgemm: %.1f%% "
        "(target >= 70%%): %s\n",
        100 * ratio, ratio >= 0.7 ? "PASS" : "FAIL");
  }
  const double greedy = reporter.Get("BM_RvqEncodeGreedy/"),
               generic = reporter.Get("BM_RvqEncodeGreedyGeneric");
  if (greedy > 0) {
    std::printf("rvq greedy encode (65536 x 64, 4 x 256): %.0f vectors/s with the %s kernel",
                65536 / greedy, mapl::cpu::DistanceKernelName(mapl::cpu::DistanceKernel::kAuto));
    if (generic > 0) std::printf(", %.0f vectors/s generic", 65536 / generic);
    std::printf("\n");
  }
  benchmark::Shutdown();
  return 0;
}
