// Frame layout, encodings and checks (peer.proto Frame).
#include "server/frame_codec.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/check.h"
#include "common/status_macros.h"

// Frames carry little-endian numbers (peer.proto); they are copied as they lie in memory.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mapl's wire format assumes a little-endian host"
#endif

namespace mapl {
namespace {

// Appends count floats as bf16 to out.
void AppendBf16(const float* src, int64_t count, std::string* out) {
  const size_t at = out->size();
  out->resize(at + count * sizeof(bf16_t));
  std::vector<bf16_t> tmp(count);
  FloatToBf16(src, tmp.data(), count);
  std::memcpy(out->data() + at, tmp.data(), count * sizeof(bf16_t));
}

// A checked CODEC_INT8 or CODEC_INT4 frame's scales as floats (bf16 on the wire).
std::vector<float> FrameScales(const v1::Frame& frame) {
  const int64_t rows = frame.tokens();
  std::vector<bf16_t> raw(rows);
  std::memcpy(raw.data(), frame.scales().data(), rows * sizeof(bf16_t));
  std::vector<float> scales(rows);
  Bf16ToFloat(raw.data(), scales.data(), rows);
  return scales;
}

}  // namespace

uint64_t FrameChecksum(const v1::Frame& frame) {
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(),
                                                                 &XXH3_freeState);
  MAPL_CHECK(state != nullptr && XXH3_64bits_reset(state.get()) == XXH_OK,
             "cannot allocate a 600-byte hash state");
  for (const std::string* s : {&frame.payload(), &frame.scales(), &frame.token_ids()}) {
    XXH3_64bits_update(state.get(), s->data(), s->size());
  }
  return XXH3_64bits_digest(state.get());
}

std::string ShapeString(const std::vector<uint32_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status CheckTensorShape(const std::vector<uint32_t>& shape, int64_t rows, int64_t d,
                              const std::string& what) {
  const std::string tensor = absl::StrCat("a tensor of (", rows, ", ", d, ")");
  if (shape.empty() || shape.size() > static_cast<size_t>(kMaxShapeDims)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", ShapeString(shape), " has ",
                                                   shape.size(), " dimensions; it takes 1 to ",
                                                   kMaxShapeDims, ", the last d (", tensor, ")"));
  }
  if (shape.back() != d) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " ", ShapeString(shape), " must end in the hidden size d = ", d, " (", tensor, ")"));
  }
  // Each dimension fits 32 bits: stopping past 2^31 keeps the product from overflowing 64.
  constexpr int64_t kCap = int64_t{1} << 31;
  int64_t product = 1;
  for (size_t i = 0; i + 1 < shape.size() && product <= kCap; ++i) product *= shape[i];
  if (product != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " ", ShapeString(shape), ": its dimensions before the last multiply to ",
                     product > kCap ? absl::StrCat("more than ", kCap) : absl::StrCat(product),
                     ", but the tensor has ", rows, " rows (", tensor, ")"));
  }
  return absl::OkStatus();
}

std::vector<uint32_t> FrameShape(const v1::Frame& frame, int64_t d) {
  if (frame.shape_size() == 0) return {frame.tokens(), static_cast<uint32_t>(d)};
  return std::vector<uint32_t>(frame.shape().begin(), frame.shape().end());
}

std::vector<int32_t> FrameTokenIds(const v1::Frame& frame) {
  const int64_t n = frame.tokens();
  const int bytes = static_cast<int>(frame.token_id_bytes());
  std::vector<int32_t> ids(frame.token_ids().empty() ? 0 : n);
  for (size_t i = 0; i < ids.size(); ++i) {
    uint32_t t = 0;
    std::memcpy(&t, frame.token_ids().data() + i * bytes, bytes);
    ids[i] = static_cast<int32_t>(t);
  }
  return ids;
}

uint64_t FrameWireBytes(const v1::Frame& f) {
  return f.payload().size() + f.scales().size() + f.token_ids().size();
}

std::string FrameName(const v1::Frame& f) {
  return absl::StrCat(v1::Direction_Name(f.direction()), " frame (step ", f.step(), ", microbatch ",
                      f.microbatch(), ")");
}

absl::Status DecodeDenseValues(const std::string& bytes, v1::Precision precision, int64_t count,
                               int64_t cols, const std::string& what, float* dst) {
  MAPL_CHECK(static_cast<int64_t>(bytes.size()) >= count * PrecisionBytes(precision),
             "DecodeDenseValues: the caller checked the size");
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

FrameCodec::FrameCodec(const v1::BoundaryConfig& config, const Backend* backend)
    : config_(config),
      backend_(backend),
      d_(config.d()),
      k_(config.k()),
      projected_(config.method() != v1::METHOD_DENSE),
      mapl_(config.method() == v1::METHOD_MAPL) {}

v1::Frame FrameCodec::NewFrame(v1::Direction direction, uint64_t step, uint32_t microbatch,
                               int64_t rows) const {
  v1::Frame f;
  f.set_boundary(config_.id());
  f.set_direction(direction);
  f.set_step(step);
  f.set_microbatch(microbatch);
  f.set_tokens(static_cast<uint32_t>(rows));
  return f;
}

void FrameCodec::Seal(v1::Frame* frame) { frame->set_checksum(FrameChecksum(*frame)); }

void FrameCodec::EncodeDense(const ConstTensor& t, v1::Frame* frame) const {
  frame->set_codec(v1::CODEC_DENSE);
  frame->set_dim(static_cast<uint32_t>(d_));
  frame->set_dense_precision(v1::PRECISION_BF16);
  F32View v(t);
  AppendBf16(v.data(), t.rows * d_, frame->mutable_payload());
}

absl::Status FrameCodec::DecodeDense(const v1::Frame& frame, const Tensor& out) const {
  const int64_t n = frame.tokens();
  std::vector<float> h(n * d_);
  MAPL_RETURN_IF_ERROR(DecodeDenseValues(frame.payload(), frame.dense_precision(), n * d_, d_,
                                         FrameName(frame) + " payload", h.data()));
  FromF32(h, out);
  return absl::OkStatus();
}

absl::Status FrameCodec::EncodeProjected(v1::Codec codec, const float* x, int64_t rows,
                                         const RvqCodebooks* codebooks, v1::Frame* frame) const {
  frame->set_codec(codec);
  frame->set_dim(static_cast<uint32_t>(k_));
  const ConstTensor xt = ConstTensor::F32(x, rows, k_);
  std::string* payload = frame->mutable_payload();
  switch (codec) {
    case v1::CODEC_BF16:
      AppendBf16(x, rows * k_, payload);
      return absl::OkStatus();
    case v1::CODEC_INT8:
    case v1::CODEC_INT4: {
      // Both round each scale up to a bf16 value before dividing by it, so the bf16 scale on
      // the wire is exactly the one the codes were made with.
      const bool int8 = codec == v1::CODEC_INT8;
      payload->resize(rows * (int8 ? k_ : (k_ + 1) / 2));
      std::vector<float> scales(rows);
      MAPL_RETURN_IF_ERROR(
          int8
              ? backend_->Int8Encode(
                    xt, absl::MakeSpan(reinterpret_cast<int8_t*>(payload->data()), payload->size()),
                    absl::MakeSpan(scales))
              : backend_->Int4Encode(
                    xt,
                    absl::MakeSpan(reinterpret_cast<uint8_t*>(payload->data()), payload->size()),
                    absl::MakeSpan(scales)));
      AppendBf16(scales.data(), rows, frame->mutable_scales());
      return absl::OkStatus();
    }
    case v1::CODEC_RVQ: {
      MAPL_CHECK(codebooks != nullptr, "RVQ frames are encoded only once codebooks exist");
      payload->resize(rows * codebooks->levels);
      frame->set_levels(static_cast<uint32_t>(codebooks->levels));
      return backend_->RvqEncode(
          *codebooks, xt, /*beam=*/1,
          absl::MakeSpan(reinterpret_cast<uint8_t*>(payload->data()), payload->size()), {});
    }
    default:
      MAPL_CHECK(false, absl::StrCat("EncodeProjected: codec ", codec,
                                     " is not a projected codec; config validation admits only "
                                     "BF16, INT8, INT4 and RVQ"));
  }
  return absl::OkStatus();
}

absl::Status FrameCodec::RvqCodesWithErrors(const float* x, int64_t rows,
                                            const RvqCodebooks& codebooks,
                                            std::vector<uint8_t>* codes,
                                            std::vector<double>* errors) const {
  const int levels = codebooks.levels;
  codes->resize(rows * levels);
  MAPL_RETURN_IF_ERROR(backend_->RvqEncode(codebooks, ConstTensor::F32(x, rows, k_), /*beam=*/1,
                                           absl::MakeSpan(*codes), {}));
  // The residual after each level, row by row: rows x L x k multiply-adds, small next to the
  // encode's rows x L x K x k.
  std::vector<double> err2(levels, 0.0);
  double norm2 = 0.0;
  std::vector<float> residual(k_);
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * k_;
    std::copy(xi, xi + k_, residual.begin());
    for (int64_t c = 0; c < k_; ++c) norm2 += double{xi[c]} * xi[c];
    for (int l = 0; l < levels; ++l) {
      const float* centroid = codebooks.level(l).data() + int64_t{(*codes)[i * levels + l]} * k_;
      double e = 0.0;
      for (int64_t c = 0; c < k_; ++c) {
        residual[c] -= centroid[c];
        e += double{residual[c]} * residual[c];
      }
      err2[l] += e;
    }
  }
  errors->resize(levels);
  for (int l = 0; l < levels; ++l) (*errors)[l] = norm2 > 0.0 ? std::sqrt(err2[l] / norm2) : 0.0;
  return absl::OkStatus();
}

void FrameCodec::SetRvqPayload(const std::vector<uint8_t>& codes, int64_t rows, int full_levels,
                               int levels, v1::Frame* frame) const {
  MAPL_CHECK(levels >= 1 && levels <= full_levels &&
                 static_cast<int64_t>(codes.size()) == rows * full_levels,
             "SetRvqPayload: levels within the codes' depth");
  frame->set_codec(v1::CODEC_RVQ);
  frame->set_dim(static_cast<uint32_t>(k_));
  frame->set_levels(static_cast<uint32_t>(levels));
  std::string* payload = frame->mutable_payload();
  payload->resize(rows * levels);
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(payload->data() + i * levels, codes.data() + i * full_levels, levels);
  }
}

absl::Status FrameCodec::DecodeProjected(const v1::Frame& frame, const RvqCodebooks* codebooks,
                                         float* zq) const {
  const int64_t rows = frame.tokens();
  const Tensor out = Tensor::F32(zq, rows, k_);
  switch (frame.codec()) {
    case v1::CODEC_BF16:
      return DecodeDenseValues(frame.payload(), v1::PRECISION_BF16, rows * k_, k_,
                               FrameName(frame) + " payload", zq);
    case v1::CODEC_INT8:
    case v1::CODEC_INT4: {
      // A scale that is negative, NaN or Inf is the peer's fault: INVALID_ARGUMENT, named.
      const std::vector<float> scales = FrameScales(frame);
      absl::Status s =
          frame.codec() == v1::CODEC_INT8
              ? backend_->Int8Decode(
                    absl::MakeConstSpan(reinterpret_cast<const int8_t*>(frame.payload().data()),
                                        frame.payload().size()),
                    scales, out)
              : backend_->Int4Decode(
                    absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(frame.payload().data()),
                                        frame.payload().size()),
                    scales, out);
      if (!s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(FrameName(frame), ": ", s.message()));
      }
      return absl::OkStatus();
    }
    case v1::CODEC_RVQ: {
      MAPL_CHECK(codebooks != nullptr, "the caller fetched the frame's codebooks");
      const absl::Span<const uint8_t> codes = absl::MakeConstSpan(
          reinterpret_cast<const uint8_t*>(frame.payload().data()), frame.payload().size());
      if (static_cast<int32_t>(frame.levels()) == codebooks->levels) {
        return backend_->RvqDecode(*codebooks, codes, {}, out);
      }
      // Fewer levels (Check() bounds them): decode with the first ones.
      RvqCodebooks prefix;
      prefix.levels = static_cast<int32_t>(frame.levels());
      prefix.codebook_size = codebooks->codebook_size;
      prefix.dim = codebooks->dim;
      prefix.gain_shape = codebooks->gain_shape;
      prefix.centroids.assign(codebooks->centroids.begin(),
                              codebooks->centroids.begin() +
                                  int64_t{prefix.levels} * prefix.codebook_size * prefix.dim);
      return backend_->RvqDecode(prefix, codes, {}, out);
    }
    default:
      MAPL_CHECK(false, absl::StrCat("DecodeProjected: codec ", frame.codec(),
                                     " passed Check(), which admits only projected codecs"));
  }
  return absl::OkStatus();
}

int FrameCodec::TokenIdBytes(uint32_t vocab) {
  if (vocab <= 256) return 1;
  return vocab <= 65536 ? 2 : 4;
}

void FrameCodec::PackTokenIds(const int32_t* ids, int64_t n, v1::Frame* frame) const {
  uint32_t vocab = config_.vocab();
  if (vocab == 0) {  // no vocab configured: wide enough for the largest id
    int32_t largest = 0;
    for (int64_t i = 0; i < n; ++i) largest = std::max(largest, ids[i]);
    vocab = static_cast<uint32_t>(largest) + 1;
  }
  const int bytes = TokenIdBytes(vocab);
  frame->set_token_id_bytes(bytes);
  std::string* out = frame->mutable_token_ids();
  out->resize(n * bytes);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t t = static_cast<uint32_t>(ids[i]);
    std::memcpy(out->data() + i * bytes, &t, bytes);  // little-endian low bytes
  }
}

absl::Status FrameCodec::UnpackTokenIds(const v1::Frame& frame, std::vector<int32_t>* ids) const {
  const int64_t n = frame.tokens();
  const int bytes = static_cast<int>(frame.token_id_bytes());
  ids->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t t = 0;
    std::memcpy(&t, frame.token_ids().data() + i * bytes, bytes);
    if (config_.vocab() != 0 && t >= config_.vocab()) {
      return absl::InvalidArgumentError(absl::StrCat(FrameName(frame), ": token_ids[", i, "] = ", t,
                                                     " is not below vocab = ", config_.vocab()));
    }
    (*ids)[i] = static_cast<int32_t>(t);
  }
  return absl::OkStatus();
}

absl::Status FrameCodec::Check(const v1::Frame& f, v1::Direction direction, int64_t tokens_expected,
                               const Tensor& out) const {
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
  if (absl::Status s = CheckShape(out, "output", n, d_); !s.ok()) return bad(s.message());

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
    // Forward frames travel as bf16 until the RVQ codebooks are fitted, and as int8 when RVQ
    // codes would exceed the error budget.
    const bool forward_rvq = direction == v1::DIRECTION_FORWARD && want == v1::CODEC_RVQ;
    const bool ok = f.codec() == want ||
                    (direction == v1::DIRECTION_FORWARD && f.codec() == v1::CODEC_BF16) ||
                    (forward_rvq && f.codec() == v1::CODEC_INT8);
    if (!ok) return bad("codec ", v1::Codec_Name(want), " expected, got ", f.codec());
    if (f.dim() != k_) return bad("dim must be k = ", k_, ", got ", f.dim());
    switch (f.codec()) {
      case v1::CODEC_BF16:
        payload = n * k_ * 2;
        break;
      case v1::CODEC_INT8:
        payload = n * k_;
        scales = n * 2;
        break;
      case v1::CODEC_INT4:
        payload = n * ((k_ + 1) / 2);
        scales = n * 2;
        break;
      default:  // CODEC_RVQ
        if (f.levels() < 1 || f.levels() > config_.rvq_levels()) {
          return bad("levels must be in [1, ", config_.rvq_levels(), "], got ", f.levels());
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
  // Forward frames carry token ids with METHOD_MAPL always, with the other methods when the
  // upstream trainer gave them; backward frames never.
  const bool ids = direction == v1::DIRECTION_FORWARD && (mapl_ || !f.token_ids().empty());
  if (ids) {
    // Ids wider than the narrowest are valid (a peer built before 1-byte ids sends 2 bytes for
    // a vocabulary of 256); narrower ones cannot hold every id of the vocabulary.
    const uint32_t width = f.token_id_bytes();
    if (width != 1 && width != 2 && width != 4) {
      return bad("token_id_bytes must be 1, 2 or 4, got ", width);
    }
    if (config_.vocab() != 0 && width < static_cast<uint32_t>(TokenIdBytes(config_.vocab()))) {
      return bad("token_id_bytes ", width, " cannot hold the ids of vocab ", config_.vocab(),
                 " (at least ", TokenIdBytes(config_.vocab()), ")");
    }
    if (static_cast<int64_t>(f.token_ids().size()) != n * f.token_id_bytes()) {
      return bad("token_ids has ", f.token_ids().size(), " bytes, expected ",
                 n * f.token_id_bytes());
    }
  } else if (!f.token_ids().empty() || f.token_id_bytes() != 0) {
    return bad("unexpected token_ids (", f.token_ids().size(), " bytes, token_id_bytes ",
               f.token_id_bytes(), ")");
  }
  const uint64_t sum = FrameChecksum(f);
  if (sum != f.checksum()) {
    return absl::DataLossError(absl::StrCat(name, ": checksum mismatch (frame says ",
                                            absl::Hex(f.checksum()), ", data hashes to ",
                                            absl::Hex(sum), ")"));
  }
  // What the header says of the trainer's tensor must agree with the frame: a frame that
  // contradicts itself is corrupt, whatever its checksum (which covers only the data).
  if (f.shape_size() != 0) {
    const std::vector<uint32_t> shape(f.shape().begin(), f.shape().end());
    if (absl::Status s = CheckTensorShape(shape, n, d_, "shape"); !s.ok()) {
      return absl::DataLossError(
          absl::StrCat(name, ": corrupt: ", s.message(), " contradicts its ", n, " tokens"));
    }
  }
  if (f.dtype() != v1::DTYPE_UNSPECIFIED && f.dtype() != v1::DTYPE_F32 &&
      f.dtype() != v1::DTYPE_BF16) {
    return absl::DataLossError(absl::StrCat(name, ": corrupt: dtype ", f.dtype(),
                                            " (a tensor is handed in as F32 or BF16)"));
  }
  // Ids past the vocabulary would index past the anchors' table (and mean nothing to the
  // downstream trainer).
  if (ids && config_.vocab() != 0) {
    const std::vector<int32_t> tokens = FrameTokenIds(f);
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (static_cast<uint32_t>(tokens[i]) >= config_.vocab()) {
        return bad("token_ids[", i, "] = ", static_cast<uint32_t>(tokens[i]),
                   " is not below vocab = ", config_.vocab());
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<const RvqCodebooks*> CodebookCache::Get(
    const std::shared_ptr<const PublishedDictionary>& dict) {
  if (dict == dict_) return &codebooks_;
  const int table = dict->FindTable("rvq");
  if (table < 0) return absl::InvalidArgumentError("dictionary has no 'rvq' table");
  RvqCodebooks cb;
  cb.levels = static_cast<int32_t>(levels_);
  cb.codebook_size = kMaxCodebookSize;
  cb.dim = static_cast<int32_t>(k_);
  cb.centroids.assign(dict->table(table), dict->table(table) + dict->spec(table).rows * k_);
  MAPL_RETURN_IF_ERROR(cb.Validate());
  codebooks_ = std::move(cb);
  dict_ = dict;
  return &codebooks_;
}

}  // namespace mapl
