// Internal to the CPU backend: nearest-centroid search for RVQ, the hot loop of encoding.
//
// For residual rows r (n x dim) and one level's K centroids c, finds
//   argmin_c ||r - c||^2 = argmin_c (||c||^2 / 2 - r . c)
// Three kernels compute it: a generic one (sgemm into a score block, then a scan) and fused ones
// for AVX2+FMA and AVX-512F that keep a tile of scores in registers and never write them out
// (FAISS, by contrast, materialises the score block; fusing is where the speed comes from).
// All break ties towards the smaller centroid index.
#ifndef MAPL_KERNELS_CPU_RVQ_DISTANCE_H_
#define MAPL_KERNELS_CPU_RVQ_DISTANCE_H_

#include <cstdint>
#include <vector>

namespace mapl::cpu {

// One codebook level laid out for the kernels.
struct PreparedLevel {
  int32_t k = 0;         // centroids, K
  int32_t k_padded = 0;  // K rounded up to a multiple of 64; padding never wins
  int32_t dim = 0;
  std::vector<float> centroids;   // (K, dim), as given
  std::vector<float> transposed;  // (dim, k_padded)
  std::vector<float> half_norms;  // (k_padded): ||c||^2 / 2, +inf for padding
};

PreparedLevel PrepareLevel(const float* centroids, int32_t k, int32_t dim);

// Ordered by preference; kAuto picks the last one this CPU supports.
enum class DistanceKernel { kAuto, kGeneric, kAvx2, kAvx512 };

// The kernel kAuto resolves to on this CPU. MAPL_DISABLE_AVX512=1 in the environment skips the
// AVX-512 kernel (to measure the AVX2 one on the same machine).
DistanceKernel BestDistanceKernel();
const char* DistanceKernelName(DistanceKernel kernel);
// Overrides kAuto process-wide (tests and benchmarks compare the kernels); returns the old one.
DistanceKernel SetDistanceKernelForTesting(DistanceKernel kernel);

// best[i] = argmin over centroids for residual row i of r (n, dim); score[i] (may be null) gets
// ||c_best||^2 / 2 - r_i . c_best.
void NearestCentroids(const float* r, int64_t n, const PreparedLevel& level, int32_t* best,
                      float* score);

// scores (n, K) = ||c||^2 / 2 - r . c for every centroid (generic sgemm path; beam search).
void AllScores(const float* r, int64_t n, const PreparedLevel& level, float* scores);

}  // namespace mapl::cpu

#endif  // MAPL_KERNELS_CPU_RVQ_DISTANCE_H_
