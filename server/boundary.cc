// One side of one boundary (DESIGN.md sections 2 and 3): the forward and backward codecs, the
// forward dictionary (owner upstream, replica downstream), the projector's SPEL learner, the RVQ
// codebooks' streaming learner and the downstream's anchors. See boundary.h for the contract.
#include "server/boundary.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

// Frames carry little-endian numbers (peer.proto); they are copied as they lie in memory.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mapl's wire format assumes a little-endian host"
#endif

namespace mapl {
namespace {

// Config limits: beyond them a frame or a table could not travel in one protobuf message (2 GiB)
// or the anchors would not fit in memory.
constexpr uint32_t kMaxHidden = 1u << 16;
constexpr uint32_t kMaxTokens = 1u << 20;
constexpr int64_t kMaxFrameElements = int64_t{1} << 28;
constexpr uint32_t kMaxVocab = 1u << 24;
constexpr uint32_t kMaxAnchorRank = 1024;
constexpr int64_t kMaxAnchorElements = int64_t{1} << 28;

// Defaults of config.proto. The projector's and the anchors' were tuned on the acceptance
// scenario of tests/server/boundary_test.cc (see the report there).
constexpr uint32_t kDefaultRvqLevels = 4;
constexpr uint32_t kDefaultAnchorRank = 16;
constexpr float kDefaultProjectorLr = 0.03f;
constexpr float kDefaultProjectorBeta = 0.9f;
constexpr uint32_t kDefaultWarmupSteps = 10;
constexpr float kDefaultAnchorLr = 0.01f;
constexpr float kDefaultBudgetFraction = 0.25f;
constexpr uint32_t kDefaultMaxTokens = 4096;
constexpr float kDefaultRvqDecay = 0.99f;

// Q starts small, P at zero: the anchor a = P[t] Q starts at exactly zero.
constexpr float kAnchorQInitStd = 0.02f;

// Salts that keep the seeded streams of one boundary independent of each other.
constexpr uint64_t kSaltProjector = 0x55f1e6a3c0d2b817ull;
constexpr uint64_t kSaltAnchors = 0x0a7c4e9d31b25f60ull;
constexpr uint64_t kSaltRvq = 0x3d9b72e8a64c105full;

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string FrameName(const v1::Frame& f) {
  return absl::StrCat(v1::Direction_Name(f.direction()), " frame (step ", f.step(), ", microbatch ",
                      f.microbatch(), ")");
}

std::string KeyName(uint64_t step, uint32_t microbatch) {
  return absl::StrCat("(step ", step, ", microbatch ", microbatch, ")");
}

v1::PeerMessage Wrap(v1::Frame frame) {
  v1::PeerMessage m;
  *m.mutable_frame() = std::move(frame);
  return m;
}

// Appends count floats as bf16 to out.
void AppendBf16(const float* src, int64_t count, std::string* out) {
  const size_t at = out->size();
  out->resize(at + count * sizeof(bf16_t));
  std::vector<bf16_t> tmp(count);
  FloatToBf16(src, tmp.data(), count);
  std::memcpy(out->data() + at, tmp.data(), count * sizeof(bf16_t));
}

// Decodes count dense values of `precision` from bytes into dst; INVALID_ARGUMENT naming the
// first non-finite one (values come from the peer).
absl::Status DecodeDense(const std::string& bytes, v1::Precision precision, int64_t count,
                         int64_t cols, const std::string& what, float* dst) {
  if (precision == v1::PRECISION_BF16) {
    std::vector<bf16_t> tmp(count);
    std::memcpy(tmp.data(), bytes.data(), count * sizeof(bf16_t));
    Bf16ToFloat(tmp.data(), dst, count);
  } else {
    std::memcpy(dst, bytes.data(), count * sizeof(float));
  }
  for (int64_t i = 0; i < count; ++i) {
    if (!std::isfinite(dst[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": non-finite value at (", i / cols, ", ", i % cols, ")"));
    }
  }
  return absl::OkStatus();
}

void AddTo(const std::vector<float>& src, std::vector<float>* dst) {
  for (size_t i = 0; i < src.size(); ++i) (*dst)[i] += src[i];
}

}  // namespace

uint64_t FrameChecksum(const v1::Frame& frame) {
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(),
                                                                 &XXH3_freeState);
  // Allocation failure of a few hundred bytes: nothing sensible is left to do.
  if (state == nullptr || XXH3_64bits_reset(state.get()) != XXH_OK) std::abort();
  for (const std::string* s : {&frame.payload(), &frame.scales(), &frame.token_ids()}) {
    XXH3_64bits_update(state.get(), s->data(), s->size());
  }
  return XXH3_64bits_digest(state.get());
}

std::vector<float> SeededOrthonormal(int64_t d, int64_t k, uint64_t seed) {
  // Columns stored contiguously. Entries: a sum of four uniforms (near-Gaussian), exact in double.
  uint64_t state = seed ^ kSaltProjector;
  std::vector<double> a(static_cast<size_t>(d * k));
  for (double& v : a) {
    double s = 0.0;
    for (int i = 0; i < 4; ++i) s += static_cast<double>(SplitMix64(&state) >> 11) * 0x1p-53;
    v = s - 2.0;
  }
  // Modified Gram-Schmidt, twice per column for full orthogonality. Every multiply-add is an
  // explicit std::fma (correctly rounded, in hardware or in libm), so the compiler's contraction
  // choices cannot change a bit between builds.
  for (int64_t j = 0; j < k; ++j) {
    double* col = a.data() + j * d;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t p = 0; p < j; ++p) {
        const double* q = a.data() + p * d;
        double dot = 0.0;
        for (int64_t i = 0; i < d; ++i) dot = std::fma(q[i], col[i], dot);
        for (int64_t i = 0; i < d; ++i) col[i] = std::fma(-dot, q[i], col[i]);
      }
    }
    double norm2 = 0.0;
    for (int64_t i = 0; i < d; ++i) norm2 = std::fma(col[i], col[i], norm2);
    const double norm = std::sqrt(norm2);
    for (int64_t i = 0; i < d; ++i) col[i] /= norm;
  }
  std::vector<float> u(static_cast<size_t>(d * k));
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < k; ++j) u[i * k + j] = static_cast<float>(a[j * d + i]);
  }
  return u;
}

// ---------------------------------------------------------------------------------------------
// Config

absl::StatusOr<v1::BoundaryConfig> BoundaryEngine::WithDefaults(const v1::BoundaryConfig& in,
                                                                absl::string_view path) {
  v1::BoundaryConfig c = in;
  const std::string prefix = path.empty() ? std::string() : absl::StrCat(path, ".");
  auto bad = [&](absl::string_view field, const auto&... msg) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, field, ": ", msg...));
  };

  if (c.role() != v1::ROLE_UPSTREAM && c.role() != v1::ROLE_DOWNSTREAM) {
    return bad("role", "required: ROLE_UPSTREAM or ROLE_DOWNSTREAM, got ", c.role());
  }
  if (c.d() == 0) return bad("d", "required (the hidden size)");
  if (c.d() > kMaxHidden) return bad("d", "must be <= ", kMaxHidden, ", got ", c.d());
  if (c.k() == 0) c.set_k(std::max(1u, c.d() / 16));
  if (c.k() > c.d()) return bad("k", "must be in [1, d=", c.d(), "], got ", c.k());

  if (c.method() == v1::METHOD_UNSPECIFIED) c.set_method(v1::METHOD_MAPL);
  if (!v1::Method_IsValid(c.method())) return bad("method", "unknown value ", c.method());
  if (c.method() == v1::METHOD_DENSE) {
    for (auto [name, codec] :
         {std::pair<const char*, v1::Codec>{"forward_codec", c.forward_codec()},
          {"backward_codec", c.backward_codec()}}) {
      if (codec != v1::CODEC_UNSPECIFIED && codec != v1::CODEC_DENSE) {
        return bad(name, "METHOD_DENSE sends dense bf16; got ", v1::Codec_Name(codec));
      }
    }
    c.set_forward_codec(v1::CODEC_DENSE);
    c.set_backward_codec(v1::CODEC_DENSE);
  } else {
    if (c.forward_codec() == v1::CODEC_UNSPECIFIED) c.set_forward_codec(v1::CODEC_RVQ);
    if (c.forward_codec() != v1::CODEC_BF16 && c.forward_codec() != v1::CODEC_INT8 &&
        c.forward_codec() != v1::CODEC_RVQ) {
      return bad("forward_codec", "must be CODEC_BF16, CODEC_INT8 or CODEC_RVQ (dense: method ",
                 "METHOD_DENSE), got ", c.forward_codec());
    }
    if (c.backward_codec() == v1::CODEC_UNSPECIFIED) c.set_backward_codec(v1::CODEC_INT8);
    if (c.backward_codec() != v1::CODEC_INT8 && c.backward_codec() != v1::CODEC_BF16) {
      return bad("backward_codec", "must be CODEC_INT8 or CODEC_BF16, got ", c.backward_codec());
    }
  }
  if (c.rvq_levels() == 0) c.set_rvq_levels(kDefaultRvqLevels);
  if (c.rvq_levels() > static_cast<uint32_t>(kMaxRvqLevels)) {
    return bad("rvq_levels", "must be in [1, ", kMaxRvqLevels, "], got ", c.rvq_levels());
  }
  if (c.anchor_rank() == 0) c.set_anchor_rank(kDefaultAnchorRank);
  if (c.anchor_rank() > kMaxAnchorRank) {
    return bad("anchor_rank", "must be in [1, ", kMaxAnchorRank, "], got ", c.anchor_rank());
  }
  if (c.method() == v1::METHOD_MAPL) {
    if (c.vocab() == 0) return bad("vocab", "required for METHOD_MAPL (the anchors' table size)");
    if (c.vocab() > kMaxVocab) return bad("vocab", "must be <= ", kMaxVocab, ", got ", c.vocab());
    if (int64_t{c.vocab()} * c.anchor_rank() > kMaxAnchorElements ||
        int64_t{c.anchor_rank()} * c.d() > kMaxAnchorElements) {
      return bad("anchor_rank", "anchor tables too large: vocab ", c.vocab(), " x rank ",
                 c.anchor_rank(), " and rank x d ", c.d());
    }
  }
  // proto3 floats: 0 means unset; negative, NaN and Inf are errors.
  auto positive = [&](absl::string_view field, float v, float max) -> absl::Status {
    if (!(v > 0.f && v <= max)) return bad(field, "must be in (0, ", max, "], got ", v);
    return absl::OkStatus();
  };
  if (c.projector_lr() == 0.f) c.set_projector_lr(kDefaultProjectorLr);
  MAPL_RETURN_IF_ERROR(positive("projector_lr", c.projector_lr(), 1.f));
  if (c.projector_beta() == 0.f) c.set_projector_beta(kDefaultProjectorBeta);
  if (!(c.projector_beta() > 0.f && c.projector_beta() < 1.f)) {
    return bad("projector_beta", "must be in [0, 1), got ", c.projector_beta());
  }
  if (c.projector_warmup_steps() == 0) c.set_projector_warmup_steps(kDefaultWarmupSteps);
  if (c.anchor_lr() == 0.f) c.set_anchor_lr(kDefaultAnchorLr);
  MAPL_RETURN_IF_ERROR(positive("anchor_lr", c.anchor_lr(), 1.f));
  if (c.dictionary_budget_fraction() == 0.f) {
    c.set_dictionary_budget_fraction(kDefaultBudgetFraction);
  }
  MAPL_RETURN_IF_ERROR(
      positive("dictionary_budget_fraction", c.dictionary_budget_fraction(), 1e6f));
  if (c.dictionary_precision() == v1::PRECISION_UNSPECIFIED) {
    c.set_dictionary_precision(v1::PRECISION_F32);
  }
  if (c.dictionary_precision() != v1::PRECISION_F32 &&
      c.dictionary_precision() != v1::PRECISION_BF16) {
    return bad("dictionary_precision", "must be PRECISION_F32 or PRECISION_BF16, got ",
               c.dictionary_precision());
  }
  if (c.max_tokens() == 0) c.set_max_tokens(kDefaultMaxTokens);
  if (c.max_tokens() > kMaxTokens || int64_t{c.max_tokens()} * c.d() > kMaxFrameElements) {
    return bad("max_tokens", "must be in [1, ", kMaxTokens,
               "] with max_tokens x d <= ", kMaxFrameElements, ", got ", c.max_tokens(),
               " (d = ", c.d(), ")");
  }
  if (c.projector_init() == v1::PROJECTOR_INIT_UNSPECIFIED) {
    c.set_projector_init(v1::PROJECTOR_INIT_RANDOM);
  }
  if (!v1::ProjectorInit_IsValid(c.projector_init())) {
    return bad("projector_init", "unknown value ", c.projector_init());
  }
  if (c.projector_init() == v1::PROJECTOR_INIT_PCA && c.method() != v1::METHOD_MAPL) {
    return bad("projector_init", "PROJECTOR_INIT_PCA needs METHOD_MAPL (METHOD_FIXED uses the ",
               "seeded U; METHOD_DENSE has none), got ", v1::Method_Name(c.method()));
  }
  if (c.rvq_decay() == 0.f) c.set_rvq_decay(kDefaultRvqDecay);
  if (!(c.rvq_decay() > 0.f && c.rvq_decay() < 1.f)) {
    return bad("rvq_decay", "must be in (0, 1), got ", c.rvq_decay());
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Construction

BoundaryEngine::BoundaryEngine(v1::BoundaryConfig config, Backend* backend)
    : config_(std::move(config)),
      backend_(backend),
      d_(config_.d()),
      k_(config_.k()),
      projected_(config_.method() != v1::METHOD_DENSE),
      mapl_(config_.method() == v1::METHOD_MAPL),
      rvq_(config_.forward_codec() == v1::CODEC_RVQ) {}

BoundaryEngine::~BoundaryEngine() = default;

absl::StatusOr<std::unique_ptr<BoundaryEngine>> BoundaryEngine::Create(
    const v1::BoundaryConfig& config, Backend* backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("backend: null");
  MAPL_ASSIGN_OR_RETURN(v1::BoundaryConfig full, WithDefaults(config));
  std::unique_ptr<BoundaryEngine> engine(new BoundaryEngine(std::move(full), backend));
  MAPL_RETURN_IF_ERROR(engine->Init());
  return engine;
}

std::vector<DictionaryTableSpec> BoundaryEngine::TableSpecs() const {
  std::vector<DictionaryTableSpec> specs = {{"U", d_, k_}};
  if (rvq_) {
    specs.push_back({"rvq", int64_t{config_.rvq_levels()} * kMaxCodebookSize, k_});
  }
  return specs;
}

std::vector<std::vector<float>> BoundaryEngine::SeededTables() const {
  std::vector<std::vector<float>> tables = {SeededOrthonormal(d_, k_, config_.seed())};
  // The RVQ codebooks start empty: frames travel as bf16 until they are fitted (boundary.h).
  if (rvq_) tables.emplace_back(size_t{config_.rvq_levels()} * kMaxCodebookSize * k_, 0.f);
  return tables;
}

absl::Status BoundaryEngine::Init() {
  if (!projected_) return absl::OkStatus();
  const DictionaryId id{config_.id(), v1::DIRECTION_FORWARD};
  const bool seeded = config_.projector_init() == v1::PROJECTOR_INIT_RANDOM;
  if (role() == v1::ROLE_UPSTREAM) {
    if (mapl_) {
      momentum_.assign(d_ * k_, 0.f);
      g_up_.assign(d_ * k_, 0.f);
    }
    // PCA: the owner is created from the first batch (EncodeForward).
    if (seeded) MAPL_RETURN_IF_ERROR(CreateOwner(SeededTables()));
    return absl::OkStatus();
  }
  if (seeded) {
    MAPL_ASSIGN_OR_RETURN(PublishedDictionary v0,
                          PublishedDictionary::Create(TableSpecs(), SeededTables(),
                                                      config_.dictionary_precision(), 0));
    MAPL_ASSIGN_OR_RETURN(DictionaryReplica replica, DictionaryReplica::Create(id, std::move(v0)));
    replica_.emplace(std::move(replica));
    UpdateDictionaryGauges(replica_->current());
  }
  if (mapl_) {
    const int64_t v = config_.vocab(), r = config_.anchor_rank();
    p_.assign(v * r, 0.f);
    dp_ = p_m_ = p_v_ = p_;
    q_.resize(r * d_);
    std::mt19937_64 rng(config_.seed() ^ kSaltAnchors);
    std::normal_distribution<float> normal(0.f, kAnchorQInitStd);
    for (float& x : q_) x = normal(rng);
    dq_.assign(r * d_, 0.f);
    q_m_ = q_v_ = dq_;
    g_down_.assign(d_ * k_, 0.f);
  }
  return absl::OkStatus();
}

absl::Status BoundaryEngine::CreateOwner(std::vector<std::vector<float>> tables) {
  MAPL_ASSIGN_OR_RETURN(DictionaryOwner owner,
                        DictionaryOwner::Create({config_.id(), v1::DIRECTION_FORWARD}, TableSpecs(),
                                                std::move(tables), config_.dictionary_precision()));
  owner_.emplace(std::move(owner));
  UpdateDictionaryGauges(owner_->published());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> BoundaryEngine::PcaInit(const ConstTensor& h) {
  // Subspace iteration on C = h^T h without forming it: Y = h^T (h U), U = polar(Y). The shift
  // Y += mu U with mu = 1e-3 |Y|_F leaves the eigenvectors alone and keeps Y's condition number
  // below about 1e3, so the polar factor exists even when h has rank < k.
  std::vector<float> u = SeededOrthonormal(d_, k_, config_.seed());
  std::vector<float> z(h.rows * k_), y(d_ * k_);
  for (int it = 0; it < kPcaIterations; ++it) {
    MAPL_RETURN_IF_ERROR(backend_->Project(h, ConstTensor::F32(u.data(), d_, k_),
                                           Tensor::F32(z.data(), h.rows, k_)));
    MAPL_RETURN_IF_ERROR(backend_->GradUp(h, ConstTensor::F32(z.data(), h.rows, k_),
                                          Tensor::F32(y.data(), d_, k_), /*accumulate=*/false));
    double norm2 = 0.0;
    for (float v : y) norm2 += double{v} * v;
    const float mu = static_cast<float>(1e-3 * std::sqrt(norm2));
    if (!(mu > 0.f) || !std::isfinite(mu)) break;  // h == 0 (keep the seeded U) or overflow
    for (size_t i = 0; i < y.size(); ++i) y[i] += mu * u[i];
    // Cannot fail by the bound above; if it did, the last U is still orthonormal.
    if (!backend_->Retract(Tensor::F32(y.data(), d_, k_)).ok()) break;
    u.swap(y);
  }
  return u;
}

// ---------------------------------------------------------------------------------------------
// Helpers

absl::Status BoundaryEngine::CheckRole(v1::Role want, const char* call) const {
  if (role() != want) {
    return absl::FailedPreconditionError(
        absl::StrCat(call, ": boundary ", config_.id(), " is ", v1::Role_Name(role()), " here"));
  }
  return absl::OkStatus();
}

absl::Status BoundaryEngine::NonFinite(absl::Status status) {
  ++stats_.nonfinite_inputs;
  return status;
}

void BoundaryEngine::UpdateDictionaryGauges(
    const std::shared_ptr<const PublishedDictionary>& dict) {
  stats_.has_dictionary = true;
  stats_.dict_version = dict->version();
  stats_.dict_checksum = dict->Checksum();
  const float* u = dict->table(0);
  double err = 0.0;
  for (int64_t a = 0; a < k_; ++a) {
    for (int64_t b = a; b < k_; ++b) {
      double dot = 0.0;
      for (int64_t i = 0; i < d_; ++i) dot += double{u[i * k_ + a]} * u[i * k_ + b];
      err = std::max(err, std::fabs(dot - (a == b ? 1.0 : 0.0)));
    }
  }
  stats_.orthogonality_error = err;
}

BoundaryStats BoundaryEngine::stats() const { return stats_; }

ConstTensor BoundaryEngine::UpForward::h() const {
  return dtype == DType::kF32 ? ConstTensor::F32(h_f32.data(), rows, h_f32.size() / rows)
                              : ConstTensor::BF16(h_bf16.data(), rows, h_bf16.size() / rows);
}

absl::StatusOr<const RvqCodebooks*> BoundaryEngine::Codebooks(
    const std::shared_ptr<const PublishedDictionary>& dict) {
  if (dict == codebooks_dict_) return &codebooks_;
  const int table = dict->FindTable("rvq");
  if (table < 0) return absl::InvalidArgumentError("dictionary has no 'rvq' table");
  RvqCodebooks cb;
  cb.levels = static_cast<int32_t>(config_.rvq_levels());
  cb.codebook_size = kMaxCodebookSize;
  cb.dim = static_cast<int32_t>(k_);
  cb.centroids.assign(dict->table(table), dict->table(table) + dict->spec(table).rows * k_);
  MAPL_RETURN_IF_ERROR(cb.Validate());
  codebooks_ = std::move(cb);
  codebooks_dict_ = dict;
  return &codebooks_;
}

v1::Frame BoundaryEngine::NewFrame(v1::Direction direction, uint64_t step, uint32_t microbatch,
                                   int64_t rows) const {
  v1::Frame f;
  f.set_boundary(config_.id());
  f.set_direction(direction);
  f.set_step(step);
  f.set_microbatch(microbatch);
  f.set_tokens(static_cast<uint32_t>(rows));
  return f;
}

void BoundaryEngine::SealFrame(v1::Frame* frame, bool sent) {
  frame->set_checksum(FrameChecksum(*frame));
  if (!sent) return;
  const uint64_t bytes =
      frame->payload().size() + frame->scales().size() + frame->token_ids().size();
  ++stats_.frames_encoded;
  stats_.raw_bytes_sent += uint64_t{frame->tokens()} * d_ * sizeof(bf16_t);
  stats_.payload_bytes_sent += bytes;
  payload_bytes_this_step_ += bytes;
}

template <typename Map>
void BoundaryEngine::Evict(Map* pending) {
  while (pending->size() >= kMaxPendingMicrobatches) {
    pending->erase(pending->begin());
    ++stats_.dropped_microbatches;
  }
}

template <typename Map>
void BoundaryEngine::DropClosed(Map* pending, uint64_t step) {
  while (!pending->empty() && pending->begin()->first.first <= step) {
    pending->erase(pending->begin());
    ++stats_.dropped_microbatches;
  }
}

absl::Status BoundaryEngine::EncodeProjected(v1::Codec codec, const float* x, int64_t rows,
                                             const std::shared_ptr<const PublishedDictionary>& dict,
                                             v1::Frame* frame) {
  frame->set_codec(codec);
  frame->set_dim(static_cast<uint32_t>(k_));
  const ConstTensor xt = ConstTensor::F32(x, rows, k_);
  std::string* payload = frame->mutable_payload();
  switch (codec) {
    case v1::CODEC_BF16:
      AppendBf16(x, rows * k_, payload);
      return absl::OkStatus();
    case v1::CODEC_INT8: {
      // Int8Encode rounds each scale up to a bf16 value before dividing by it, so the bf16
      // scale on the wire is exactly the one the codes were made with.
      payload->resize(rows * k_);
      std::vector<float> scales(rows);
      MAPL_RETURN_IF_ERROR(
          backend_->Int8Encode(xt, reinterpret_cast<int8_t*>(payload->data()), scales.data()));
      AppendBf16(scales.data(), rows, frame->mutable_scales());
      return absl::OkStatus();
    }
    case v1::CODEC_RVQ: {
      MAPL_ASSIGN_OR_RETURN(const RvqCodebooks* cb, Codebooks(dict));
      payload->resize(rows * cb->levels);
      frame->set_levels(static_cast<uint32_t>(cb->levels));
      return backend_->RvqEncode(*cb, xt, /*beam=*/1, reinterpret_cast<uint8_t*>(payload->data()),
                                 nullptr);
    }
    default:
      return absl::InternalError(absl::StrCat("EncodeProjected: codec ", codec));
  }
}

absl::Status BoundaryEngine::DecodeProjected(const v1::Frame& frame,
                                             const std::shared_ptr<const PublishedDictionary>& dict,
                                             float* zq) {
  const int64_t rows = frame.tokens();
  const Tensor out = Tensor::F32(zq, rows, k_);
  switch (frame.codec()) {
    case v1::CODEC_BF16:
      return DecodeDense(frame.payload(), v1::PRECISION_BF16, rows * k_, k_,
                         FrameName(frame) + " payload", zq);
    case v1::CODEC_INT8: {
      std::vector<bf16_t> raw(rows);
      std::memcpy(raw.data(), frame.scales().data(), rows * sizeof(bf16_t));
      std::vector<float> scales(rows);
      Bf16ToFloat(raw.data(), scales.data(), rows);
      absl::Status s = backend_->Int8Decode(reinterpret_cast<const int8_t*>(frame.payload().data()),
                                            scales.data(), out);
      if (!s.ok())
        return absl::InvalidArgumentError(absl::StrCat(FrameName(frame), ": ", s.message()));
      return absl::OkStatus();
    }
    case v1::CODEC_RVQ: {
      MAPL_ASSIGN_OR_RETURN(const RvqCodebooks* cb, Codebooks(dict));
      return backend_->RvqDecode(*cb, reinterpret_cast<const uint8_t*>(frame.payload().data()),
                                 nullptr, out);
    }
    default:
      return absl::InternalError(absl::StrCat("DecodeProjected: codec ", frame.codec()));
  }
}

absl::Status BoundaryEngine::CheckFrame(const v1::Frame& f, v1::Direction direction,
                                        int64_t tokens_expected, const Tensor& out) {
  const std::string name = FrameName(f);
  auto bad = [&](const auto&... msg) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", msg...));
  };
  if (f.boundary() != config_.id()) {
    return bad("boundary ", f.boundary(), ", this is boundary ", config_.id());
  }
  if (f.direction() != direction) {
    return bad("direction must be ", v1::Direction_Name(direction), ", got ", f.direction());
  }
  const int64_t n = f.tokens();
  if (n < 1 || n > config_.max_tokens()) {
    return bad("tokens must be in [1, max_tokens=", config_.max_tokens(), "], got ", n);
  }
  if (tokens_expected >= 0 && n != tokens_expected) {
    return bad("tokens ", n, ", but its forward had ", tokens_expected);
  }
  {
    absl::Status s = CheckShape(out, "output", n, d_);
    if (!s.ok()) return bad(s.message());
  }

  // The codec and the sizes it implies.
  int64_t payload = 0, scales = 0;
  if (!projected_) {
    if (f.codec() != v1::CODEC_DENSE) return bad("codec must be CODEC_DENSE, got ", f.codec());
    if (f.dim() != d_) return bad("dim must be d = ", d_, ", got ", f.dim());
    const int64_t bytes = PrecisionBytes(f.dense_precision());
    if (bytes == 0) return bad("bad dense_precision ", f.dense_precision());
    payload = n * d_ * bytes;
  } else {
    const v1::Codec want =
        direction == v1::DIRECTION_FORWARD ? config_.forward_codec() : config_.backward_codec();
    // Forward frames travel as bf16 until the RVQ codebooks are fitted.
    const bool ok =
        f.codec() == want || (direction == v1::DIRECTION_FORWARD && f.codec() == v1::CODEC_BF16);
    if (!ok) {
      return bad("codec ", v1::Codec_Name(want), " expected, got ", f.codec());
    }
    if (f.dim() != k_) return bad("dim must be k = ", k_, ", got ", f.dim());
    switch (f.codec()) {
      case v1::CODEC_BF16:
        payload = n * k_ * 2;
        break;
      case v1::CODEC_INT8:
        payload = n * k_;
        scales = n * 2;
        break;
      default:  // CODEC_RVQ
        if (f.levels() != config_.rvq_levels()) {
          return bad("levels must be ", config_.rvq_levels(), ", got ", f.levels());
        }
        payload = n * f.levels();
        break;
    }
  }
  if (static_cast<int64_t>(f.payload().size()) != payload) {
    return bad("payload has ", f.payload().size(), " bytes, expected ", payload);
  }
  if (static_cast<int64_t>(f.scales().size()) != scales) {
    return bad("scales has ", f.scales().size(), " bytes, expected ", scales);
  }
  if (direction == v1::DIRECTION_FORWARD && mapl_) {
    if (f.token_id_bytes() != 2 && f.token_id_bytes() != 4) {
      return bad("token_id_bytes must be 2 or 4, got ", f.token_id_bytes());
    }
    if (static_cast<int64_t>(f.token_ids().size()) != n * f.token_id_bytes()) {
      return bad("token_ids has ", f.token_ids().size(), " bytes, expected ",
                 n * f.token_id_bytes());
    }
  } else if (!f.token_ids().empty()) {
    return bad("unexpected token_ids (", f.token_ids().size(), " bytes)");
  }
  const uint64_t sum = FrameChecksum(f);
  if (sum != f.checksum()) {
    return absl::DataLossError(absl::StrCat(name, ": checksum mismatch (frame says ",
                                            absl::Hex(f.checksum()), ", data hashes to ",
                                            absl::Hex(sum), ")"));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Upstream

absl::StatusOr<std::vector<v1::PeerMessage>> BoundaryEngine::EncodeForward(
    uint64_t step, uint32_t microbatch, const ConstTensor& h, const int32_t* token_ids) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_UPSTREAM, "EncodeForward"));
  const int64_t n = h.rows;
  if (n < 1 || n > config_.max_tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("h: rows must be in [1, max_tokens=", config_.max_tokens(), "], got ", n));
  }
  MAPL_RETURN_IF_ERROR(CheckShape(h, "h", n, d_));
  if (absl::Status s = CheckFinite(h, "h"); !s.ok()) return NonFinite(s);
  if (last_step_.has_value() && step <= *last_step_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "EncodeForward: step ", step, " was already closed by Step(", *last_step_, ")"));
  }
  const Key key{step, microbatch};
  if (up_pending_.count(key) != 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("EncodeForward: ", KeyName(step, microbatch), " was already encoded"));
  }
  if (mapl_) {
    if (token_ids == nullptr) {
      return absl::InvalidArgumentError("token_ids: required for METHOD_MAPL (anchors)");
    }
    for (int64_t i = 0; i < n; ++i) {
      if (token_ids[i] < 0 || static_cast<uint32_t>(token_ids[i]) >= config_.vocab()) {
        return absl::InvalidArgumentError(absl::StrCat("token_ids[", i, "] = ", token_ids[i],
                                                       ": must be in [0, vocab=", config_.vocab(),
                                                       ")"));
      }
    }
  }

  std::vector<v1::PeerMessage> out;
  if (projected_ && !owner_.has_value()) {
    // PROJECTOR_INIT_PCA: version 0 comes from this first batch and travels as a snapshot.
    MAPL_ASSIGN_OR_RETURN(std::vector<float> u, PcaInit(h));
    std::vector<std::vector<float>> tables = SeededTables();
    tables[0] = std::move(u);
    MAPL_RETURN_IF_ERROR(CreateOwner(std::move(tables)));
    v1::PeerMessage m;
    *m.mutable_dictionary_snapshot() = owner_->Snapshot();
    stats_.dictionary_bytes_sent += m.dictionary_snapshot().ByteSizeLong();
    out.push_back(std::move(m));
  }

  v1::Frame frame = NewFrame(v1::DIRECTION_FORWARD, step, microbatch, n);
  UpForward saved;
  saved.rows = n;
  if (!projected_) {
    frame.set_codec(v1::CODEC_DENSE);
    frame.set_dim(static_cast<uint32_t>(d_));
    frame.set_dense_precision(v1::PRECISION_BF16);
    F32View hv(h);
    AppendBf16(hv.data(), n * d_, frame.mutable_payload());
  } else {
    saved.dict = owner_->published();
    std::vector<float> z(n * k_);
    MAPL_RETURN_IF_ERROR(backend_->Project(h, saved.dict->tensor(0), Tensor::F32(z.data(), n, k_)));
    const v1::Codec codec =
        rvq_ && !rvq_learner_.has_value() ? v1::CODEC_BF16 : config_.forward_codec();
    MAPL_RETURN_IF_ERROR(EncodeProjected(codec, z.data(), n, saved.dict, &frame));
    frame.set_dict_version(saved.dict->version());
    if (mapl_) {
      const int bytes = config_.vocab() <= 65536 ? 2 : 4;
      frame.set_token_id_bytes(bytes);
      std::string* ids = frame.mutable_token_ids();
      ids->resize(n * bytes);
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t t = static_cast<uint32_t>(token_ids[i]);
        std::memcpy(ids->data() + i * bytes, &t, bytes);  // little-endian low bytes
      }
    }
    if (rvq_) {
      const int64_t room = kMaxRvqRowsPerStep - static_cast<int64_t>(rvq_rows_.size()) / k_;
      const int64_t take = std::min(n, std::max<int64_t>(room, 0));
      rvq_rows_.insert(rvq_rows_.end(), z.begin(), z.begin() + take * k_);
    }
  }
  if (mapl_) {
    // Kept only for G_up = h^T gzq.
    saved.dtype = h.dtype;
    if (h.dtype == DType::kF32) {
      if (!spare_h_f32_.empty()) {
        saved.h_f32.swap(spare_h_f32_.back());
        spare_h_f32_.pop_back();
      }
      saved.h_f32.assign(h.f32(), h.f32() + n * d_);
    } else {
      if (!spare_h_bf16_.empty()) {
        saved.h_bf16.swap(spare_h_bf16_.back());
        spare_h_bf16_.pop_back();
      }
      saved.h_bf16.assign(h.bf16(), h.bf16() + n * d_);
    }
  }
  SealFrame(&frame, /*sent=*/true);
  Evict(&up_pending_);
  up_pending_.emplace(key, std::move(saved));
  out.push_back(Wrap(std::move(frame)));
  return out;
}

absl::Status BoundaryEngine::DecodeBackward(const v1::Frame& frame, const Tensor& dh) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_UPSTREAM, "DecodeBackward"));
  absl::Status s = DecodeBackwardImpl(frame, dh);
  if (!s.ok()) ++stats_.frames_rejected;
  return s;
}

absl::Status BoundaryEngine::DecodeBackwardImpl(const v1::Frame& frame, const Tensor& dh) {
  const auto it = up_pending_.find({frame.step(), frame.microbatch()});
  if (it == up_pending_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat(FrameName(frame), ": no forward of it is pending here"));
  }
  const UpForward& saved = it->second;
  MAPL_RETURN_IF_ERROR(CheckFrame(frame, v1::DIRECTION_BACKWARD, saved.rows, dh));
  const int64_t n = saved.rows;
  if (!projected_) {
    std::vector<float> g(n * d_);
    MAPL_RETURN_IF_ERROR(DecodeDense(frame.payload(), frame.dense_precision(), n * d_, d_,
                                     FrameName(frame) + " payload", g.data()));
    FromF32(g.data(), dh);
  } else {
    if (frame.dict_version() != saved.dict->version()) {
      return absl::InvalidArgumentError(
          absl::StrCat(FrameName(frame), ": dict_version ", frame.dict_version(),
                       ", but its forward was encoded with version ", saved.dict->version()));
    }
    std::vector<float> gzq(n * k_);
    MAPL_RETURN_IF_ERROR(DecodeProjected(frame, saved.dict, gzq.data()));
    const ConstTensor gz = ConstTensor::F32(gzq.data(), n, k_);
    MAPL_RETURN_IF_ERROR(backend_->Lift(gz, saved.dict->tensor(0), dh));
    if (mapl_) {
      std::vector<float> g_up(d_ * k_);
      MAPL_RETURN_IF_ERROR(
          backend_->GradUp(saved.h(), gz, Tensor::F32(g_up.data(), d_, k_), false));
      AddTo(g_up, &g_up_);
    }
  }
  ++stats_.frames_decoded;
  stats_.raw_bytes_received += uint64_t(n) * d_ * sizeof(bf16_t);
  stats_.payload_bytes_received += frame.payload().size() + frame.scales().size();
  // Keep a few buffers for the next microbatches (a pipeline has that many in flight).
  constexpr size_t kSpares = 8;
  UpForward& done = it->second;
  if (!done.h_f32.empty() && spare_h_f32_.size() < kSpares) {
    spare_h_f32_.push_back(std::move(done.h_f32));
  }
  if (!done.h_bf16.empty() && spare_h_bf16_.size() < kSpares) {
    spare_h_bf16_.push_back(std::move(done.h_bf16));
  }
  up_pending_.erase(it);
  return absl::OkStatus();
}

absl::Status BoundaryEngine::HandleLearningSignal(const v1::LearningSignal& signal) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_UPSTREAM, "HandleLearningSignal"));
  const std::string name = absl::StrCat("learning signal (step ", signal.step(), ")");
  auto bad = [&](const auto&... msg) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", msg...));
  };
  if (!mapl_) return bad(v1::Method_Name(config_.method()), " learns no projector");
  if (signal.boundary() != config_.id()) {
    return bad("boundary ", signal.boundary(), ", this is boundary ", config_.id());
  }
  if (signal.rows() != d_ || signal.cols() != k_) {
    return bad("shape (", signal.rows(), ", ", signal.cols(), "), expected (", d_, ", ", k_, ")");
  }
  if (static_cast<int64_t>(signal.g_down().size()) != d_ * k_ * 4) {
    return bad("g_down has ", signal.g_down().size(), " bytes, expected ", d_ * k_ * 4);
  }
  if (last_step_.has_value() && signal.step() <= *last_step_) {
    return bad("step already closed (last closed: ", *last_step_, ")");
  }
  if (signals_.count(signal.step()) != 0) {
    return absl::AlreadyExistsError(absl::StrCat(name, ": already received"));
  }
  if (signals_.size() >= kMaxPendingSignals) {
    return absl::ResourceExhaustedError(
        absl::StrCat(name, ": ", signals_.size(), " signals already wait for their Step()"));
  }
  std::vector<float> g(d_ * k_);
  MAPL_RETURN_IF_ERROR(
      DecodeDense(signal.g_down(), v1::PRECISION_F32, d_ * k_, k_, name + " g_down", g.data()));
  signals_.emplace(signal.step(), std::move(g));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::PeerMessage>> BoundaryEngine::HandleSnapshotRequest(
    const v1::SnapshotRequest& request) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_UPSTREAM, "HandleSnapshotRequest"));
  if (request.boundary() != config_.id() || request.direction() != v1::DIRECTION_FORWARD) {
    return absl::InvalidArgumentError(
        absl::StrCat("snapshot request for boundary ", request.boundary(), " ",
                     v1::Direction_Name(request.direction()), "; this side owns boundary ",
                     config_.id(), " DIRECTION_FORWARD"));
  }
  if (!projected_) {
    return absl::InvalidArgumentError("snapshot request: METHOD_DENSE has no dictionary");
  }
  std::vector<v1::PeerMessage> out;
  if (!owner_.has_value()) return out;  // it will precede the first frame
  v1::PeerMessage m;
  *m.mutable_dictionary_snapshot() = owner_->Snapshot();
  stats_.dictionary_bytes_sent += m.dictionary_snapshot().ByteSizeLong();
  out.push_back(std::move(m));
  return out;
}

absl::StatusOr<std::vector<v1::PeerMessage>> BoundaryEngine::StepUpstream(uint64_t step) {
  std::vector<v1::PeerMessage> out;
  std::map<uint64_t, std::vector<float>>::iterator signal = signals_.end();
  if (mapl_) {
    signal = signals_.find(step);
    if (signal == signals_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("Step(", step, "): the downstream's learning signal has not arrived"));
    }
  }
  if (projected_ && owner_.has_value()) {
    int64_t extra_budget = 0;
    if (mapl_) {
      // G = G_up + G_down: one SPEL step of the learner U (the published copy follows by delta).
      std::vector<float> grad = g_up_;
      AddTo(signal->second, &grad);
      const double w = std::max<uint32_t>(config_.projector_warmup_steps(), 1);
      const double t = static_cast<double>(spel_steps_ + 1);
      SpelOptions options;
      options.lr = static_cast<float>(config_.projector_lr() * std::min(t / w, std::sqrt(w / t)));
      options.beta = config_.projector_beta();
      // Atomic: on error (a gradient so large that the momentum overflows) nothing moved, and
      // failing the step would only make the daemon retry it forever.
      const absl::Status s = backend_->SpelStep(Tensor::F32(owner_->mutable_learner(0), d_, k_),
                                                ConstTensor::F32(grad.data(), d_, k_),
                                                Tensor::F32(momentum_.data(), d_, k_), options);
      if (s.ok()) {
        ++spel_steps_;
        stats_.projector_lr = options.lr;
      } else {
        ++stats_.learner_updates_skipped;
      }
    }
    if (rvq_) {
      const int64_t rows = static_cast<int64_t>(rvq_rows_.size()) / k_;
      const ConstTensor x = ConstTensor::F32(rvq_rows_.data(), rows, k_);
      if (!rvq_learner_.has_value() && rows >= kMinRvqFitRows) {
        RvqFitOptions options;
        options.levels = static_cast<int32_t>(config_.rvq_levels());
        options.seed = config_.seed() ^ kSaltRvq;
        absl::StatusOr<RvqCodebooks> cb = backend_->RvqFit(x, options);
        if (cb.ok()) {
          rvq_learner_ = RvqLearner::FromCodebooks(*cb, config_.seed() ^ kSaltRvq);
          // The first codebooks are published whole, outside the budget: RVQ frames need them.
          extra_budget = int64_t{config_.rvq_levels()} * kMaxCodebookSize * owner_->RowBytes(1);
        } else {
          ++stats_.learner_updates_skipped;
        }
        rvq_rows_.clear();
      } else if (rvq_learner_.has_value() && rows > 0) {
        RvqUpdateOptions options;
        options.decay = config_.rvq_decay();
        // Atomic too: the learner is unchanged on error.
        absl::StatusOr<RvqUpdateStats> update = backend_->RvqUpdate(&*rvq_learner_, x, options);
        if (update.ok()) {
          stats_.rvq_relative_mse = update->relative_mse;
        } else {
          ++stats_.learner_updates_skipped;
        }
        rvq_rows_.clear();
      }
      if (rvq_learner_.has_value()) {
        const std::vector<float>& c = rvq_learner_->codebooks.centroids;
        std::copy(c.begin(), c.end(), owner_->mutable_learner(1));
      }
    }
    if (mapl_ || rvq_) {
      int64_t row_bytes = owner_->RowBytes(0);
      if (rvq_) row_bytes = std::max(row_bytes, owner_->RowBytes(1));
      const int64_t budget =
          std::max(static_cast<int64_t>(config_.dictionary_budget_fraction() *
                                        static_cast<double>(payload_bytes_this_step_)),
                   row_bytes) +
          extra_budget;
      MAPL_ASSIGN_OR_RETURN(v1::DictionaryDelta delta, owner_->MakeDelta(budget));
      stats_.dictionary_bytes_sent += delta.ByteSizeLong();
      UpdateDictionaryGauges(owner_->published());
      v1::PeerMessage m;
      *m.mutable_dictionary_delta() = std::move(delta);
      out.push_back(std::move(m));
    }
  }
  std::fill(g_up_.begin(), g_up_.end(), 0.f);
  payload_bytes_this_step_ = 0;
  signals_.erase(signals_.begin(), signals_.upper_bound(step));
  DropClosed(&up_pending_, step);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Downstream

absl::Status BoundaryEngine::DecodeForward(const v1::Frame& frame, const Tensor& h_hat) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_DOWNSTREAM, "DecodeForward"));
  absl::Status s = DecodeForwardImpl(frame, h_hat);
  if (!s.ok()) ++stats_.frames_rejected;
  return s;
}

absl::Status BoundaryEngine::DecodeForwardImpl(const v1::Frame& frame, const Tensor& h_hat) {
  MAPL_RETURN_IF_ERROR(CheckFrame(frame, v1::DIRECTION_FORWARD, -1, h_hat));
  const Key key{frame.step(), frame.microbatch()};
  if (last_step_.has_value() && frame.step() <= *last_step_) {
    return absl::FailedPreconditionError(
        absl::StrCat(FrameName(frame), ": step already closed by Step(", *last_step_, ")"));
  }
  if (down_pending_.count(key) != 0) {
    return absl::AlreadyExistsError(absl::StrCat(FrameName(frame), ": already decoded"));
  }
  const int64_t n = frame.tokens();
  DownForward saved;
  saved.rows = n;
  if (!projected_) {
    std::vector<float> h(n * d_);
    MAPL_RETURN_IF_ERROR(DecodeDense(frame.payload(), frame.dense_precision(), n * d_, d_,
                                     FrameName(frame) + " payload", h.data()));
    FromF32(h.data(), h_hat);
  } else {
    if (!replica_.has_value()) {
      return absl::FailedPreconditionError(absl::StrCat(
          FrameName(frame), ": no dictionary yet (waiting for the upstream's snapshot)"));
    }
    saved.dict = replica_->Find(frame.dict_version());
    if (saved.dict == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(FrameName(frame), ": unknown dictionary version ", frame.dict_version(),
                       " (current: ", replica_->version(), ")"));
    }
    if (mapl_) {
      const int bytes = static_cast<int>(frame.token_id_bytes());
      saved.tokens.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        uint32_t t = 0;
        std::memcpy(&t, frame.token_ids().data() + i * bytes, bytes);
        if (t >= config_.vocab()) {
          return absl::InvalidArgumentError(
              absl::StrCat(FrameName(frame), ": token_ids[", i, "] = ", t,
                           " is not below vocab = ", config_.vocab()));
        }
        saved.tokens[i] = static_cast<int32_t>(t);
      }
    }
    saved.zq.resize(n * k_);
    MAPL_RETURN_IF_ERROR(DecodeProjected(frame, saved.dict, saved.zq.data()));
    const ConstTensor zq = ConstTensor::F32(saved.zq.data(), n, k_);
    if (mapl_) {
      std::vector<float> a(n * d_);
      MAPL_RETURN_IF_ERROR(backend_->AnchorLookup(
          ConstTensor::F32(p_.data(), config_.vocab(), config_.anchor_rank()),
          ConstTensor::F32(q_.data(), config_.anchor_rank(), d_), saved.tokens.data(),
          Tensor::F32(a.data(), n, d_)));
      MAPL_RETURN_IF_ERROR(backend_->LiftWithAnchor(zq, saved.dict->tensor(0),
                                                    ConstTensor::F32(a.data(), n, d_), h_hat));
    } else {
      MAPL_RETURN_IF_ERROR(backend_->Lift(zq, saved.dict->tensor(0), h_hat));
    }
  }
  ++stats_.frames_decoded;
  stats_.raw_bytes_received += uint64_t(n) * d_ * sizeof(bf16_t);
  stats_.payload_bytes_received +=
      frame.payload().size() + frame.scales().size() + frame.token_ids().size();
  Evict(&down_pending_);
  down_pending_.emplace(key, std::move(saved));
  return absl::OkStatus();
}

absl::StatusOr<v1::PeerMessage> BoundaryEngine::EncodeBackward(uint64_t step, uint32_t microbatch,
                                                               const ConstTensor& g) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_DOWNSTREAM, "EncodeBackward"));
  const auto it = down_pending_.find({step, microbatch});
  if (it == down_pending_.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "EncodeBackward: no forward of ", KeyName(step, microbatch), " was decoded here"));
  }
  const DownForward& saved = it->second;
  const int64_t n = saved.rows;
  MAPL_RETURN_IF_ERROR(CheckShape(g, "g", n, d_));
  if (absl::Status s = CheckFinite(g, "g"); !s.ok()) return NonFinite(s);

  v1::Frame frame = NewFrame(v1::DIRECTION_BACKWARD, step, microbatch, n);
  if (!projected_) {
    frame.set_codec(v1::CODEC_DENSE);
    frame.set_dim(static_cast<uint32_t>(d_));
    frame.set_dense_precision(v1::PRECISION_BF16);
    F32View gv(g);
    AppendBf16(gv.data(), n * d_, frame.mutable_payload());
  } else {
    const ConstTensor u = saved.dict->tensor(0);
    std::vector<float> gz(n * k_);
    MAPL_RETURN_IF_ERROR(backend_->Project(g, u, Tensor::F32(gz.data(), n, k_)));
    MAPL_RETURN_IF_ERROR(
        EncodeProjected(config_.backward_codec(), gz.data(), n, saved.dict, &frame));
    frame.set_dict_version(saved.dict->version());
    if (mapl_) {
      // The anchor is recomputed rather than kept from the forward (n x d floats a microbatch);
      // P and Q change only in Step(), so it is the one the forward used.
      const ConstTensor p = ConstTensor::F32(p_.data(), config_.vocab(), config_.anchor_rank());
      const ConstTensor q = ConstTensor::F32(q_.data(), config_.anchor_rank(), d_);
      std::vector<float> a(n * d_), g_perp(n * d_), g_down(d_ * k_);
      const ConstTensor at = ConstTensor::F32(a.data(), n, d_);
      MAPL_RETURN_IF_ERROR(
          backend_->AnchorLookup(p, q, saved.tokens.data(), Tensor::F32(a.data(), n, d_)));
      MAPL_RETURN_IF_ERROR(backend_->GradDown(g, ConstTensor::F32(saved.zq.data(), n, k_), at, u,
                                              Tensor::F32(g_down.data(), d_, k_), false));
      MAPL_RETURN_IF_ERROR(backend_->OrthogonalComplement(g, u, Tensor::F32(g_perp.data(), n, d_)));
      // Validates before it accumulates, and its inputs were all checked above.
      MAPL_RETURN_IF_ERROR(
          backend_->AnchorGrad(p, q, saved.tokens.data(), ConstTensor::F32(g_perp.data(), n, d_),
                               Tensor::F32(dp_.data(), config_.vocab(), config_.anchor_rank()),
                               Tensor::F32(dq_.data(), config_.anchor_rank(), d_)));
      AddTo(g_down, &g_down_);
      ++down_microbatches_;
    }
  }
  SealFrame(&frame, /*sent=*/true);
  down_pending_.erase(it);
  return Wrap(std::move(frame));
}

absl::StatusOr<std::vector<v1::PeerMessage>> BoundaryEngine::StepDownstream(uint64_t step) {
  std::vector<v1::PeerMessage> out;
  if (mapl_) {
    v1::PeerMessage m;
    v1::LearningSignal* signal = m.mutable_learning_signal();
    signal->set_boundary(config_.id());
    signal->set_step(step);
    signal->set_rows(static_cast<uint32_t>(d_));
    signal->set_cols(static_cast<uint32_t>(k_));
    signal->set_microbatches(down_microbatches_);
    signal->mutable_g_down()->assign(reinterpret_cast<const char*>(g_down_.data()),
                                     g_down_.size() * sizeof(float));
    if (down_microbatches_ > 0) {
      AdamOptions options;
      options.lr = config_.anchor_lr();
      options.step = adam_steps_ + 1;
      const int64_t v = config_.vocab(), r = config_.anchor_rank();
      MAPL_RETURN_IF_ERROR(backend_->AdamStep(
          Tensor::F32(p_.data(), v, r), ConstTensor::F32(dp_.data(), v, r),
          Tensor::F32(p_m_.data(), v, r), Tensor::F32(p_v_.data(), v, r), options));
      MAPL_RETURN_IF_ERROR(backend_->AdamStep(
          Tensor::F32(q_.data(), r, d_), ConstTensor::F32(dq_.data(), r, d_),
          Tensor::F32(q_m_.data(), r, d_), Tensor::F32(q_v_.data(), r, d_), options));
      ++adam_steps_;
    }
    std::fill(dp_.begin(), dp_.end(), 0.f);
    std::fill(dq_.begin(), dq_.end(), 0.f);
    std::fill(g_down_.begin(), g_down_.end(), 0.f);
    down_microbatches_ = 0;
    out.push_back(std::move(m));
  }
  DropClosed(&down_pending_, step);
  return out;
}

absl::Status BoundaryEngine::HandleDelta(const v1::DictionaryDelta& delta) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_DOWNSTREAM, "HandleDelta"));
  if (!projected_) {
    return absl::InvalidArgumentError("dictionary delta: METHOD_DENSE has no dictionary");
  }
  if (!replica_.has_value()) {
    return absl::FailedPreconditionError(
        "dictionary delta before the first snapshot: a snapshot is needed");
  }
  MAPL_RETURN_IF_ERROR(replica_->Apply(delta));
  stats_.dictionary_bytes_received += delta.ByteSizeLong();
  UpdateDictionaryGauges(replica_->current());
  return absl::OkStatus();
}

absl::Status BoundaryEngine::HandleSnapshot(const v1::DictionarySnapshot& snapshot) {
  MAPL_RETURN_IF_ERROR(CheckRole(v1::ROLE_DOWNSTREAM, "HandleSnapshot"));
  if (!projected_) {
    return absl::InvalidArgumentError("dictionary snapshot: METHOD_DENSE has no dictionary");
  }
  // The tables must be the ones this config expects, whatever the peer claims.
  const std::vector<DictionaryTableSpec> specs = TableSpecs();
  if (snapshot.tables_size() != static_cast<int>(specs.size())) {
    return absl::InvalidArgumentError(absl::StrCat("dictionary snapshot: ", snapshot.tables_size(),
                                                   " tables, expected ", specs.size()));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const v1::DictionaryTable& t = snapshot.tables(static_cast<int>(i));
    if (t.name() != specs[i].name || t.rows() != specs[i].rows || t.cols() != specs[i].cols) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dictionary snapshot: table ", i, " is '", t.name(), "' (", t.rows(), " x ", t.cols(),
          "), expected '", specs[i].name, "' (", specs[i].rows, " x ", specs[i].cols, ")"));
    }
  }
  if (replica_.has_value()) {
    MAPL_RETURN_IF_ERROR(replica_->Restore(snapshot));
  } else {
    MAPL_ASSIGN_OR_RETURN(
        DictionaryReplica replica,
        DictionaryReplica::FromSnapshot({config_.id(), v1::DIRECTION_FORWARD}, snapshot));
    replica_.emplace(std::move(replica));
  }
  stats_.dictionary_bytes_received += snapshot.ByteSizeLong();
  UpdateDictionaryGauges(replica_->current());
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Both

absl::StatusOr<std::vector<v1::PeerMessage>> BoundaryEngine::Step(uint64_t step) {
  if (last_step_.has_value() && step <= *last_step_) {
    return absl::InvalidArgumentError(
        absl::StrCat("Step(", step, "): steps must increase; the last closed was ", *last_step_));
  }
  std::vector<v1::PeerMessage> out;
  if (role() == v1::ROLE_UPSTREAM) {
    MAPL_ASSIGN_OR_RETURN(out, StepUpstream(step));
  } else {
    MAPL_ASSIGN_OR_RETURN(out, StepDownstream(step));
  }
  last_step_ = step;
  ++stats_.steps;
  return out;
}

}  // namespace mapl
