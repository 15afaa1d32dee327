// Nearest-centroid kernels for RVQ encoding: generic (sgemm + scan) and fused AVX2 / AVX-512.
#include "kernels/cpu/rvq_distance.h"

#include <cblas.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace mapl::cpu {
namespace {

constexpr int kPad = 64;      // centroid block of the fused kernel: 4 zmm registers
constexpr int kTileRows = 6;  // residual rows per register tile: 6 x 4 accumulators
constexpr int64_t kGenericBlock = 128;

std::atomic<DistanceKernel> g_override{DistanceKernel::kAuto};

DistanceKernel Resolve() {
  DistanceKernel k = g_override.load(std::memory_order_relaxed);
  return k == DistanceKernel::kAuto ? BestDistanceKernel() : k;
}

void NearestGeneric(const float* r, int64_t n, const PreparedLevel& lv, int32_t* best,
                    float* score) {
  std::vector<float> block(kGenericBlock * lv.k);
  for (int64_t i0 = 0; i0 < n; i0 += kGenericBlock) {
    const int64_t rows = std::min(kGenericBlock, n - i0);
    AllScores(r + i0 * lv.dim, rows, lv, block.data());
    for (int64_t i = 0; i < rows; ++i) {
      const float* s = block.data() + i * lv.k;
      int32_t arg = 0;
      float v = s[0];
      for (int32_t c = 1; c < lv.k; ++c) {
        if (s[c] < v) v = s[c], arg = c;
      }
      best[i0 + i] = arg;
      if (score) score[i0 + i] = v;
    }
  }
}

#if defined(__x86_64__)
// One tile of MR residual rows against all centroids. Accumulators stay in registers for a
// 64-centroid block; a per-row, per-lane running minimum (value and index) is kept in registers
// too and reduced across lanes once at the end.
template <int MR>
__attribute__((target("avx512f"))) void TileAvx512(const float* r, int dim, const PreparedLevel& lv,
                                                   int32_t* best, float* score) {
  __m512 best_v[MR];
  __m512i best_i[MR];
  for (int i = 0; i < MR; ++i) {
    best_v[i] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    best_i[i] = _mm512_setzero_si512();
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int kp = lv.k_padded;
  const float* ct = lv.transposed.data();
  for (int c0 = 0; c0 < kp; c0 += kPad) {
    __m512 acc[MR][4];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
    }
    const float* col = ct + c0;
    for (int j = 0; j < dim; ++j, col += kp) {
      const __m512 b0 = _mm512_loadu_ps(col);
      const __m512 b1 = _mm512_loadu_ps(col + 16);
      const __m512 b2 = _mm512_loadu_ps(col + 32);
      const __m512 b3 = _mm512_loadu_ps(col + 48);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 a = _mm512_set1_ps(r[i * dim + j]);
        acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
        acc[i][2] = _mm512_fmadd_ps(a, b2, acc[i][2]);
        acc[i][3] = _mm512_fmadd_ps(a, b3, acc[i][3]);
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __m512 hn = _mm512_loadu_ps(lv.half_norms.data() + c0 + 16 * q);
      const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(c0 + 16 * q));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 s = _mm512_sub_ps(hn, acc[i][q]);
        // Strictly less: within a lane, earlier (smaller) indices win ties.
        const __mmask16 m = _mm512_cmp_ps_mask(s, best_v[i], _CMP_LT_OQ);
        best_v[i] = _mm512_mask_mov_ps(best_v[i], m, s);
        best_i[i] = _mm512_mask_mov_epi32(best_i[i], m, idx);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(64) float v[16];
    alignas(64) int32_t ix[16];
    _mm512_store_ps(v, best_v[i]);
    _mm512_store_si512(reinterpret_cast<__m512i*>(ix), best_i[i]);
    float bv = v[0];
    int32_t bi = ix[0];
    for (int l = 1; l < 16; ++l) {
      if (v[l] < bv || (v[l] == bv && ix[l] < bi)) bv = v[l], bi = ix[l];
    }
    best[i] = bi;
    if (score) score[i] = bv;
  }
}

// The AVX2 + FMA variant: 16 ymm registers allow a tile of 6 rows x 16 centroids (12
// accumulators); the per-row running minimum lives in a small stack array instead.
template <int MR>
__attribute__((target("avx2,fma"))) void TileAvx2(const float* r, int dim, const PreparedLevel& lv,
                                                  int32_t* best, float* score) {
  alignas(32) float best_v[MR][16];
  alignas(32) int32_t best_i[MR][16];
  for (int i = 0; i < MR; ++i) {
    for (int l = 0; l < 16; ++l) {
      best_v[i][l] = std::numeric_limits<float>::infinity();
      best_i[i][l] = 0;
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int kp = lv.k_padded;
  const float* ct = lv.transposed.data();
  for (int c0 = 0; c0 < kp; c0 += 16) {
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const float* col = ct + c0;
    for (int j = 0; j < dim; ++j, col += kp) {
      const __m256 b0 = _mm256_loadu_ps(col);
      const __m256 b1 = _mm256_loadu_ps(col + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_broadcast_ss(r + i * dim + j);
        acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q) {
      const __m256 hn = _mm256_loadu_ps(lv.half_norms.data() + c0 + 8 * q);
      const __m256i idx = _mm256_add_epi32(lane, _mm256_set1_epi32(c0 + 8 * q));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 s = _mm256_sub_ps(hn, acc[i][q]);
        // Each of the 16 lane slots sees its centroid indices in increasing order, so strict
        // less-than keeps the smallest index on ties.
        float* bv = best_v[i] + 8 * q;
        int32_t* bi = best_i[i] + 8 * q;
        const __m256 old_v = _mm256_load_ps(bv);
        const __m256 m = _mm256_cmp_ps(s, old_v, _CMP_LT_OQ);
        _mm256_store_ps(bv, _mm256_blendv_ps(old_v, s, m));
        const __m256i old_i = _mm256_load_si256(reinterpret_cast<const __m256i*>(bi));
        _mm256_store_si256(reinterpret_cast<__m256i*>(bi),
                           _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(old_i),
                                                                _mm256_castsi256_ps(idx), m)));
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    float bv = best_v[i][0];
    int32_t bi = best_i[i][0];
    for (int l = 1; l < 16; ++l) {
      if (best_v[i][l] < bv || (best_v[i][l] == bv && best_i[i][l] < bi)) {
        bv = best_v[i][l], bi = best_i[i][l];
      }
    }
    best[i] = bi;
    if (score) score[i] = bv;
  }
}

// Runs Tile<MR> over all rows: full tiles of kTileRows, then one remainder tile.
template <template <int> class Tile>
void ForEachTile(const float* r, int64_t n, const PreparedLevel& lv, int32_t* best, float* score) {
  const int dim = lv.dim;
  float scratch[kTileRows];
  auto sc = [&](int64_t i) { return score ? score + i : scratch; };
  int64_t i = 0;
  for (; i + kTileRows <= n; i += kTileRows)
    Tile<kTileRows>::Run(r + i * dim, dim, lv, best + i, sc(i));
  switch (n - i) {
    case 5:
      Tile<5>::Run(r + i * dim, dim, lv, best + i, sc(i));
      break;
    case 4:
      Tile<4>::Run(r + i * dim, dim, lv, best + i, sc(i));
      break;
    case 3:
      Tile<3>::Run(r + i * dim, dim, lv, best + i, sc(i));
      break;
    case 2:
      Tile<2>::Run(r + i * dim, dim, lv, best + i, sc(i));
      break;
    case 1:
      Tile<1>::Run(r + i * dim, dim, lv, best + i, sc(i));
      break;
    default:
      break;
  }
}

template <int MR>
struct Avx512Tile {
  static void Run(const float* r, int dim, const PreparedLevel& lv, int32_t* best, float* score) {
    TileAvx512<MR>(r, dim, lv, best, score);
  }
};
template <int MR>
struct Avx2Tile {
  static void Run(const float* r, int dim, const PreparedLevel& lv, int32_t* best, float* score) {
    TileAvx2<MR>(r, dim, lv, best, score);
  }
};
#endif

}  // namespace

PreparedLevel PrepareLevel(const float* centroids, int32_t k, int32_t dim) {
  PreparedLevel lv;
  lv.k = k;
  lv.dim = dim;
  lv.k_padded = (k + kPad - 1) / kPad * kPad;
  lv.centroids.assign(centroids, centroids + int64_t{k} * dim);
  lv.transposed.assign(int64_t{dim} * lv.k_padded, 0.f);
  lv.half_norms.assign(lv.k_padded, std::numeric_limits<float>::infinity());
  for (int32_t c = 0; c < k; ++c) {
    double norm = 0;
    for (int32_t j = 0; j < dim; ++j) {
      const float v = centroids[int64_t{c} * dim + j];
      lv.transposed[int64_t{j} * lv.k_padded + c] = v;
      norm += double(v) * v;
    }
    lv.half_norms[c] = static_cast<float>(0.5 * norm);
  }
  return lv;
}

DistanceKernel BestDistanceKernel() {
#if defined(__x86_64__)
  static const bool avx512 = [] {
    const char* off = std::getenv("MAPL_DISABLE_AVX512");
    return __builtin_cpu_supports("avx512f") && !(off && *off && std::strcmp(off, "0") != 0);
  }();
  if (avx512) return DistanceKernel::kAvx512;
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return DistanceKernel::kAvx2;
#endif
  return DistanceKernel::kGeneric;
}

const char* DistanceKernelName(DistanceKernel kernel) {
  switch (kernel) {
    case DistanceKernel::kAuto:
      return DistanceKernelName(BestDistanceKernel());
    case DistanceKernel::kGeneric:
      return "generic";
    case DistanceKernel::kAvx512:
      return "avx512";
    case DistanceKernel::kAvx2:
      return "avx2";
  }
  return "?";
}

DistanceKernel SetDistanceKernelForTesting(DistanceKernel kernel) {
  // A kernel this CPU lacks falls back to the best one it has (kAvx512 > kAvx2 > kGeneric).
  if (kernel != DistanceKernel::kAuto && kernel > BestDistanceKernel())
    kernel = BestDistanceKernel();
  return g_override.exchange(kernel);
}

void AllScores(const float* r, int64_t n, const PreparedLevel& lv, float* scores) {
  if (n == 0) return;
  // scores = -r C^T, then add the half norms.
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, lv.k, lv.dim, -1.f, r, lv.dim,
              lv.centroids.data(), lv.dim, 0.f, scores, lv.k);
  for (int64_t i = 0; i < n; ++i) {
    float* s = scores + i * lv.k;
    for (int32_t c = 0; c < lv.k; ++c) s[c] += lv.half_norms[c];
  }
}

void NearestCentroids(const float* r, int64_t n, const PreparedLevel& level, int32_t* best,
                      float* score) {
#if defined(__x86_64__)
  switch (Resolve()) {
    case DistanceKernel::kAvx512:
      ForEachTile<Avx512Tile>(r, n, level, best, score);
      return;
    case DistanceKernel::kAvx2:
      ForEachTile<Avx2Tile>(r, n, level, best, score);
      return;
    default:
      break;
  }
#endif
  NearestGeneric(r, n, level, best, score);
}

}  // namespace mapl::cpu
