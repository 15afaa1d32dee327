// RVQ on the CPU: k-means fitting, greedy and beam-search encoding, decoding, and the owner's
// streaming update. The nearest-centroid search is in rvq_distance.cc.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/rvq_distance.h"
#include "kernels/validation.h"

namespace mapl {
namespace {

using cpu::PreparedLevel;

// Rows encoded together: the residual block (rows x dim floats) stays in L2.
constexpr int64_t kChunkRows = 240;

std::vector<PreparedLevel> PrepareAll(const RvqCodebooks& cb) {
  std::vector<PreparedLevel> levels;
  levels.reserve(cb.levels);
  for (int l = 0; l < cb.levels; ++l) {
    levels.push_back(cpu::PrepareLevel(cb.level(l).data(), cb.codebook_size, cb.dim));
  }
  return levels;
}

// Copies rows [r0, r0 + rows) of x into dst as fp32; in gain-shape mode normalises each row and
// writes its norm (0 for a zero row, which then encodes as direction 0).
void LoadRows(const ConstTensor& x, int64_t r0, int64_t rows, bool gain_shape, float* dst,
              float* norms) {
  const int64_t dim = x.cols;
  if (x.dtype == DType::kF32) {
    std::copy(x.f32() + r0 * dim, x.f32() + (r0 + rows) * dim, dst);
  } else {
    Bf16ToFloat(x.bf16() + r0 * dim, dst, rows * dim);
  }
  if (!gain_shape) return;
  for (int64_t i = 0; i < rows; ++i) {
    float* v = dst + i * dim;
    double s = 0;
    for (int64_t j = 0; j < dim; ++j) s += double(v[j]) * v[j];
    const float norm = static_cast<float>(std::sqrt(s));
    norms[i] = norm;
    const float inv = norm > 0 ? 1.f / norm : 0.f;
    for (int64_t j = 0; j < dim; ++j) v[j] *= inv;
  }
}

void SubtractCentroids(const PreparedLevel& lv, const int32_t* best, int64_t rows, float* r) {
  const int dim = lv.dim;
  for (int64_t i = 0; i < rows; ++i) {
    const float* c = lv.centroids.data() + int64_t{best[i]} * dim;
    float* v = r + i * dim;
    for (int j = 0; j < dim; ++j) v[j] -= c[j];
  }
}

double SquaredNorm(const float* v, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(v[i]) * v[i];
  return s;
}

// Greedy encode of fp32 rows (already normalised in gain-shape mode). residual (rows, dim) is
// consumed: it holds the final residual afterwards. codes: (rows, L).
void GreedyRows(const std::vector<PreparedLevel>& levels, float* residual, int64_t rows,
                uint8_t* codes, std::vector<int32_t>& best) {
  const int nl = static_cast<int>(levels.size());
  best.resize(rows);
  for (int l = 0; l < nl; ++l) {
    cpu::NearestCentroids(residual, rows, levels[l], best.data(), nullptr);
    SubtractCentroids(levels[l], best.data(), rows, residual);
    for (int64_t i = 0; i < rows; ++i) codes[i * nl + l] = static_cast<uint8_t>(best[i]);
  }
}

// Beam search over one row block x (rows, dim). All rows' candidates are scored with one GEMM
// per level; each row then keeps its `beam` best extensions. On return codes hold, per row, the
// better of the beam's best path and the greedy path, so beam search is never worse than greedy.
void BeamRows(const std::vector<PreparedLevel>& levels, const float* x, int64_t rows, int beam,
              uint8_t* codes) {
  const int nl = static_cast<int>(levels.size());
  const int dim = levels[0].dim;
  const int k = levels[0].k;
  std::vector<float> greedy_res(x, x + rows * dim);
  std::vector<int32_t> best;
  GreedyRows(levels, greedy_res.data(), rows, codes, best);

  // Candidate j of row i lives at slot i * beam + j; width is how many slots are live per row.
  const int64_t slots = rows * beam;
  std::vector<float> res(slots * dim), next_res(slots * dim), scores(slots * k);
  std::vector<double> err(slots), next_err(slots);
  std::vector<uint8_t> path(slots * nl), next_path(slots * nl);
  std::vector<int32_t> order;
  std::vector<float> top_d;
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(x + i * dim, x + (i + 1) * dim, res.begin() + i * beam * dim);
    err[i * beam] = SquaredNorm(x + i * dim, dim);
  }
  int width = 1;
  for (int l = 0; l < nl; ++l) {
    const PreparedLevel& lv = levels[l];
    // Score every live slot; dead slots (j >= width) are scored too but never read.
    cpu::AllScores(res.data(), slots, lv, scores.data());
    const int keep = std::min(beam, width * k);
    for (int64_t i = 0; i < rows; ++i) {
      // ||r - c||^2 = ||r||^2 + 2 (||c||^2 / 2 - r.c) for each (slot, centroid) of this row.
      const float* sc = scores.data() + i * beam * k;
      const double* e = err.data() + i * beam;
      // Top-`keep` by insertion into a small sorted list: most candidates fail the first test.
      top_d.assign(keep, std::numeric_limits<float>::infinity());
      order.assign(keep, 0);
      for (int b = 0; b < width; ++b) {
        for (int c = 0; c < k; ++c) {
          const float dv = static_cast<float>(e[b]) + 2.f * sc[b * k + c];
          if (!(dv < top_d[keep - 1])) continue;
          int pos = keep - 1;
          while (pos > 0 && dv < top_d[pos - 1]) {
            top_d[pos] = top_d[pos - 1];
            order[pos] = order[pos - 1];
            --pos;
          }
          top_d[pos] = dv;
          order[pos] = b * k + c;
        }
      }
      for (int j = 0; j < keep; ++j) {
        const int b = order[j] / k, c = order[j] % k;
        const int64_t src = i * beam + b, dst = i * beam + j;
        const float* cen = lv.centroids.data() + int64_t{c} * dim;
        for (int t = 0; t < dim; ++t) next_res[dst * dim + t] = res[src * dim + t] - cen[t];
        // Exact error from the residual: the incremental form drifts in fp32.
        next_err[dst] = SquaredNorm(next_res.data() + dst * dim, dim);
        std::copy(path.begin() + src * nl, path.begin() + src * nl + l,
                  next_path.begin() + dst * nl);
        next_path[dst * nl + l] = static_cast<uint8_t>(c);
      }
    }
    res.swap(next_res);
    err.swap(next_err);
    path.swap(next_path);
    width = keep;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const double* e = err.data() + i * beam;
    const int winner = static_cast<int>(std::min_element(e, e + width) - e);
    if (e[winner] < SquaredNorm(greedy_res.data() + i * dim, dim)) {
      std::copy(path.begin() + (i * beam + winner) * nl,
                path.begin() + (i * beam + winner + 1) * nl, codes + i * nl);
    }
  }
}

absl::Status CheckCodebooksAndInput(const RvqCodebooks& cb, const ConstTensor& x) {
  MAPL_RETURN_IF_ERROR(CheckRvqInput(cb, x));
  return CheckFinite(x, "x");
}

// Plain k-means (Lloyd) of `n` rows of `data` into `k` centroids, initialised from a random
// sample; an empty cluster is re-seeded by splitting the most populated one.
void KMeans(const float* data, int64_t n, int dim, int k, int iterations, std::mt19937_64& rng,
            float* centroids) {
  std::vector<int64_t> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int c = 0; c < k; ++c) {
    std::copy(data + perm[c % n] * dim, data + perm[c % n] * dim + dim, centroids + c * dim);
  }
  std::vector<int32_t> assign(n);
  std::vector<double> sums(size_t(k) * dim);
  std::vector<int64_t> counts(k);
  for (int it = 0; it < iterations; ++it) {
    PreparedLevel lv = cpu::PrepareLevel(centroids, k, dim);
    cpu::NearestCentroids(data, n, lv, assign.data(), nullptr);
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int c = assign[i];
      ++counts[c];
      for (int j = 0; j < dim; ++j) sums[size_t(c) * dim + j] += data[i * dim + j];
    }
    for (int c = 0; c < k; ++c) {
      if (counts[c] == 0) continue;
      for (int j = 0; j < dim; ++j)
        centroids[c * dim + j] = float(sums[size_t(c) * dim + j] / counts[c]);
    }
    // Empty clusters: split the largest cluster with a small symmetric perturbation.
    for (int c = 0; c < k; ++c) {
      if (counts[c] != 0) continue;
      const int big = int(std::max_element(counts.begin(), counts.end()) - counts.begin());
      std::normal_distribution<float> noise(0.f, 1.f);
      for (int j = 0; j < dim; ++j) {
        const float base = centroids[big * dim + j];
        const float eps = 1e-3f * (std::fabs(base) + 1e-6f) * noise(rng);
        centroids[c * dim + j] = base + eps;
        centroids[big * dim + j] = base - eps;
      }
      counts[c] = counts[big] / 2;
      counts[big] -= counts[c];
    }
  }
}

}  // namespace

namespace cpu {

absl::StatusOr<int64_t> ApplyRvqBatchStats(
    RvqLearner& next, int level, int64_t n, const std::vector<int64_t>& batch_counts,
    const std::vector<double>& batch_sums,
    const std::function<absl::Status(int64_t, float*)>& residual_row, std::mt19937_64& rng,
    const RvqUpdateOptions& options) {
  RvqCodebooks& cb = next.codebooks;
  const int64_t dim = cb.dim, k = cb.codebook_size;
  const float a = options.decay, b = 1.f - options.decay;
  float* counts = next.counts.data() + level * k;
  float* sums = next.sums.data() + level * k * dim;
  float* cen = cb.level(level).data();
  double mean_count = 0;
  for (int64_t c = 0; c < k; ++c) {
    counts[c] = a * counts[c] + b * float(batch_counts[c]);
    for (int64_t j = 0; j < dim; ++j) {
      sums[c * dim + j] = a * sums[c * dim + j] + b * float(batch_sums[c * dim + j]);
    }
    mean_count += counts[c];
  }
  mean_count /= k;
  std::uniform_int_distribution<int64_t> pick(0, n - 1);
  std::vector<float> row(dim);
  int64_t reseeded = 0;
  for (int64_t c = 0; c < k; ++c) {
    if (counts[c] < options.dead_fraction * mean_count || counts[c] <= 0.f) {
      // Dead: re-seed from a residual of this batch, weighted as an average centroid.
      const int64_t i = pick(rng);
      MAPL_RETURN_IF_ERROR(residual_row(i, row.data()));
      const float w = static_cast<float>(std::max(mean_count, 1e-6));
      for (int64_t j = 0; j < dim; ++j) {
        cen[c * dim + j] = row[j];
        sums[c * dim + j] = row[j] * w;
      }
      counts[c] = w;
      ++reseeded;
    } else {
      for (int64_t j = 0; j < dim; ++j) cen[c * dim + j] = sums[c * dim + j] / counts[c];
    }
  }
  return reseeded;
}

}  // namespace cpu

absl::StatusOr<RvqCodebooks> CpuBackend::RvqFit(const ConstTensor& x,
                                                const RvqFitOptions& options) const {
  RvqCodebooks cb;
  cb.levels = options.levels;
  cb.codebook_size = options.codebook_size;
  cb.dim = static_cast<int32_t>(x.cols);
  cb.gain_shape = options.gain_shape;
  MAPL_RETURN_IF_ERROR(CheckShape(x, "x", -1, -1));
  MAPL_RETURN_IF_ERROR(cb.ValidateShape());
  cb.centroids.assign(size_t(cb.levels) * cb.codebook_size * cb.dim, 0.f);
  MAPL_RETURN_IF_ERROR(CheckCodebooksAndInput(cb, x));
  if (x.rows < cb.codebook_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rvq fit: need at least codebook_size = ", cb.codebook_size, " rows, got ", x.rows));
  }
  if (options.kmeans_iterations < 1 || options.refine_passes < 0) {
    return absl::InvalidArgumentError(
        "rvq fit: kmeans_iterations must be >= 1, refine_passes >= 0");
  }
  const int64_t n = x.rows;
  const int dim = cb.dim, k = cb.codebook_size, nl = cb.levels;
  std::vector<float> norms(n);
  std::vector<float> data(n * dim);
  LoadRows(x, 0, n, cb.gain_shape, data.data(), norms.data());
  std::mt19937_64 rng(options.seed);

  // Level by level: k-means on the residual left by the levels before.
  std::vector<float> residual = data;
  std::vector<int32_t> best(n);
  for (int l = 0; l < nl; ++l) {
    KMeans(residual.data(), n, dim, k, options.kmeans_iterations, rng, cb.level(l).data());
    PreparedLevel lv = cpu::PrepareLevel(cb.level(l).data(), k, dim);
    cpu::NearestCentroids(residual.data(), n, lv, best.data(), nullptr);
    SubtractCentroids(lv, best.data(), n, residual.data());
  }

  // Refinement: with codes fixed, each level's centroids become the mean of what the other
  // levels leave; then re-encode.
  std::vector<uint8_t> codes(n * nl);
  std::vector<double> sums(size_t(k) * dim);
  std::vector<int64_t> counts(k);
  for (int pass = 0; pass < options.refine_passes; ++pass) {
    std::vector<PreparedLevel> levels = PrepareAll(cb);
    residual = data;
    GreedyRows(levels, residual.data(), n, codes.data(), best);
    // residual = x - sum of all levels; target for level l = residual + c_l[code].
    for (int l = 0; l < nl; ++l) {
      float* cen = cb.level(l).data();
      std::fill(sums.begin(), sums.end(), 0.0);
      std::fill(counts.begin(), counts.end(), 0);
      for (int64_t i = 0; i < n; ++i) {
        const int c = codes[i * nl + l];
        ++counts[c];
        for (int j = 0; j < dim; ++j) {
          sums[size_t(c) * dim + j] += residual[i * dim + j] + cen[c * dim + j];
        }
      }
      std::vector<float> old(cen, cen + size_t(k) * dim);
      for (int c = 0; c < k; ++c) {
        if (counts[c] == 0) continue;
        for (int j = 0; j < dim; ++j)
          cen[c * dim + j] = float(sums[size_t(c) * dim + j] / counts[c]);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int c = codes[i * nl + l];
        for (int j = 0; j < dim; ++j) residual[i * dim + j] += old[c * dim + j] - cen[c * dim + j];
      }
    }
  }
  return cb;
}

absl::Status CpuBackend::RvqEncode(const RvqCodebooks& cb, const ConstTensor& x, int beam,
                                   absl::Span<uint8_t> codes, absl::Span<float> norms) const {
  MAPL_RETURN_IF_ERROR(CheckCodebooksAndInput(cb, x));
  if (beam < 1 || beam > kMaxRvqBeam) {
    return absl::InvalidArgumentError(
        absl::StrCat("rvq encode: beam must be in [1, ", kMaxRvqBeam, "], got ", beam));
  }
  MAPL_RETURN_IF_ERROR(CheckRvqCodesAndNorms(cb, x.rows, codes, norms, "x"));
  const std::vector<PreparedLevel> levels = PrepareAll(cb);
  const int64_t dim = cb.dim;
  std::vector<float> residual(kChunkRows * dim);
  std::vector<float> chunk_norms(kChunkRows);
  std::vector<int32_t> best;
  for (int64_t r0 = 0; r0 < x.rows; r0 += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, x.rows - r0);
    LoadRows(x, r0, rows, cb.gain_shape, residual.data(), chunk_norms.data());
    if (cb.gain_shape) {
      std::copy(chunk_norms.begin(), chunk_norms.begin() + rows, norms.begin() + r0);
    }
    uint8_t* out = codes.data() + r0 * cb.levels;
    if (beam == 1) {
      GreedyRows(levels, residual.data(), rows, out, best);
    } else {
      BeamRows(levels, residual.data(), rows, beam, out);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::RvqDecode(const RvqCodebooks& cb, absl::Span<const uint8_t> codes,
                                   absl::Span<const float> norms, const Tensor& out) const {
  MAPL_RETURN_IF_ERROR(CheckRvqDecodeArgs(cb, codes, norms, out));
  const int64_t n = out.rows, dim = cb.dim, nl = cb.levels;
  MAPL_RETURN_IF_ERROR(CheckRvqCodeValues(cb, codes));
  if (cb.gain_shape) MAPL_RETURN_IF_ERROR(CheckRvqNormValues(norms));
  std::vector<const float*> level_data(nl);
  for (int l = 0; l < nl; ++l) level_data[l] = cb.level(l).data();
  F32Output dst(out);
  float* h = dst.data();
  for (int64_t i = 0; i < n; ++i) {
    float* row = h + i * dim;
    std::fill(row, row + dim, 0.f);
    for (int l = 0; l < nl; ++l) {
      const float* c = level_data[l] + int64_t{codes[i * nl + l]} * dim;
      for (int64_t j = 0; j < dim; ++j) row[j] += c[j];
    }
    if (cb.gain_shape) {
      for (int64_t j = 0; j < dim; ++j) row[j] *= norms[i];
    }
  }
  dst.Commit();
  return absl::OkStatus();
}

absl::StatusOr<RvqUpdateStats> CpuBackend::RvqUpdate(RvqLearner* learner, const ConstTensor& x,
                                                     const RvqUpdateOptions& options) const {
  if (learner == nullptr) return absl::InvalidArgumentError("rvq update: learner is null");
  MAPL_RETURN_IF_ERROR(CheckCodebooksAndInput(learner->codebooks, x));
  // Work on a copy and commit only a finite result: huge but finite input can overflow the EMA
  // sums, and learner state must never be poisoned (docs/ARCHITECTURE.md).
  RvqLearner next = *learner;
  RvqCodebooks& cb = next.codebooks;
  const int64_t n = x.rows, dim = cb.dim, k = cb.codebook_size, nl = cb.levels;
  MAPL_RETURN_IF_ERROR(CheckRvqLearnerAndOptions(next, options));
  RvqUpdateStats stats;
  if (n == 0) return stats;
  std::vector<float> norms(n);
  std::vector<float> residual(n * dim);
  LoadRows(x, 0, n, cb.gain_shape, residual.data(), norms.data());
  const double total = SquaredNorm(residual.data(), n * dim);

  const std::vector<PreparedLevel> levels = PrepareAll(cb);
  std::vector<int32_t> best(n);
  std::vector<double> batch_sums(size_t(k) * dim);
  std::vector<int64_t> batch_counts(k);
  std::mt19937_64 rng(next.rng_state);
  for (int l = 0; l < nl; ++l) {
    // Assign with the level as it was, accumulate this level's residuals, then subtract.
    cpu::NearestCentroids(residual.data(), n, levels[l], best.data(), nullptr);
    std::fill(batch_sums.begin(), batch_sums.end(), 0.0);
    std::fill(batch_counts.begin(), batch_counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      ++batch_counts[best[i]];
      for (int64_t j = 0; j < dim; ++j) batch_sums[best[i] * dim + j] += residual[i * dim + j];
    }
    const float* level_residual = residual.data();
    MAPL_ASSIGN_OR_RETURN(const int64_t reseeded, cpu::ApplyRvqBatchStats(
                                                      next, l, n, batch_counts, batch_sums,
                                                      [&](int64_t i, float* dst) {
                                                        std::copy(level_residual + i * dim,
                                                                  level_residual + (i + 1) * dim,
                                                                  dst);
                                                        return absl::OkStatus();
                                                      },
                                                      rng, options));
    stats.reseeded += reseeded;
    SubtractCentroids(levels[l], best.data(), n, residual.data());
  }
  next.rng_state = rng();
  MAPL_RETURN_IF_ERROR(CheckRvqUpdateFinite(next));
  *learner = std::move(next);
  stats.relative_mse = total > 0 ? SquaredNorm(residual.data(), n * dim) / total : 0.0;
  return stats;
}

}  // namespace mapl
