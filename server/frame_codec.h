// The wire form of a frame (peer.proto Frame) for one side of one boundary: the header, the
// checksum, the five encodings of a tensor (dense bf16 for METHOD_DENSE; bf16, int8, int4 and RVQ
// codes of a projected tensor), the token ids, and every check an incoming frame must pass. It
// holds no learned state: the RVQ codebooks come in with each call (CodebookCache keeps them per
// dictionary version).
//
//   FrameCodec codec(config, backend);              // config with defaults filled in
//   v1::Frame f = codec.NewFrame(v1::DIRECTION_FORWARD, step, mb, n);
//   MAPL_RETURN_IF_ERROR(codec.EncodeProjected(v1::CODEC_INT8, z, n, nullptr, &f));
//   FrameCodec::Seal(&f);
//   ...
//   MAPL_RETURN_IF_ERROR(codec.Check(f, v1::DIRECTION_FORWARD, -1, out));   // on the receiver
//   MAPL_RETURN_IF_ERROR(codec.DecodeProjected(f, nullptr, zq));
#ifndef MAPL_SERVER_FRAME_CODEC_H_
#define MAPL_SERVER_FRAME_CODEC_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/rvq.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/dictionary.h"

namespace mapl {

// XXH3-64 (seed 0) of frame.payload || frame.scales || frame.token_ids, as peer.proto defines
// Frame.checksum.
uint64_t FrameChecksum(const v1::Frame& frame);

// The bytes a frame carries: payload + scales + token ids.
uint64_t FrameWireBytes(const v1::Frame& frame);

// "DIRECTION_FORWARD frame (step 3, microbatch 1)", for messages.
std::string FrameName(const v1::Frame& frame);

// The most dimensions a tensor's shape may have (local.proto SendRequest.shape, Frame.shape).
inline constexpr int kMaxShapeDims = 8;

// Whether `shape` describes a tensor of `rows` rows of width `d`: 1 to kMaxShapeDims dimensions,
// the last d and the product of the others `rows`. INVALID_ARGUMENT naming `what`, the shape
// and (rows, d) otherwise. An empty shape is the caller's to default.
absl::Status CheckTensorShape(const std::vector<uint32_t>& shape, int64_t rows, int64_t d,
                              const std::string& what);
// "[4, 128, 512]".
std::string ShapeString(const std::vector<uint32_t>& shape);
// The frame's shape, [tokens, d] when it carries none (a sender of protocol version 1).
std::vector<uint32_t> FrameShape(const v1::Frame& frame, int64_t d);

// The token ids of a checked frame (Check: width and size; ids below vocab when it is set).
std::vector<int32_t> FrameTokenIds(const v1::Frame& frame);

// Decodes `count` dense values of `precision` from `bytes` into dst. INVALID_ARGUMENT names
// `what` and the first non-finite value (values come from the peer). `bytes` must hold them.
absl::Status DecodeDenseValues(const std::string& bytes, v1::Precision precision, int64_t count,
                               int64_t cols, const std::string& what, float* dst);

class FrameCodec {
 public:
  // `config` has its defaults filled in; `backend` is borrowed.
  FrameCodec(const v1::BoundaryConfig& config, const Backend* backend);

  // A frame header: boundary, direction, step, microbatch, tokens.
  v1::Frame NewFrame(v1::Direction direction, uint64_t step, uint32_t microbatch,
                     int64_t rows) const;
  // Sets the checksum; call last.
  static void Seal(v1::Frame* frame);

  // METHOD_DENSE: t (n, d) as bf16.
  void EncodeDense(const ConstTensor& t, v1::Frame* frame) const;
  absl::Status DecodeDense(const v1::Frame& frame, const Tensor& out) const;

  // x (rows, k) f32 with `codec` (BF16, INT8, INT4 or RVQ; RVQ needs `codebooks`) into the
  // frame's payload and scales.
  absl::Status EncodeProjected(v1::Codec codec, const float* x, int64_t rows,
                               const RvqCodebooks* codebooks, v1::Frame* frame) const;
  // CODEC_RVQ at the codebooks' full depth L: the codes of x (rows, k) f32, row-major (rows, L),
  // and the relative error ||x - xq||_F / ||x||_F after each number of levels (errors[l]: the
  // first l + 1 levels). Residual codes are prefix codes: the first l levels of a row are its
  // code at depth l.
  absl::Status RvqCodesWithErrors(const float* x, int64_t rows, const RvqCodebooks& codebooks,
                                  std::vector<uint8_t>* codes, std::vector<double>* errors) const;
  // The frame's CODEC_RVQ payload: the first `levels` of each row's codes (rows, full_levels).
  void SetRvqPayload(const std::vector<uint8_t>& codes, int64_t rows, int full_levels, int levels,
                     v1::Frame* frame) const;
  // A checked frame's payload into zq (rows, k) f32. RVQ frames need `codebooks` (a frame may
  // carry fewer levels than they have; it is decoded with its first levels).
  absl::Status DecodeProjected(const v1::Frame& frame, const RvqCodebooks* codebooks,
                               float* zq) const;

  // The narrowest width of a token id below `vocab`: 1 byte up to a vocabulary of 256, 2 up to
  // 65536, else 4.
  static int TokenIdBytes(uint32_t vocab);
  // Token ids (each >= 0, below vocab when the boundary has one) travel as TokenIdBytes(vocab)
  // little-endian bytes each; without a vocab, as the narrowest width that holds the largest.
  void PackTokenIds(const int32_t* ids, int64_t n, v1::Frame* frame) const;
  // INVALID_ARGUMENT for an id not below vocab.
  absl::Status UnpackTokenIds(const v1::Frame& frame, std::vector<int32_t>* ids) const;

  // Every check of an incoming frame: boundary, direction, token count (and `tokens_expected`
  // when >= 0), the output's shape, codec, dim, levels, payload / scales / token id sizes, a
  // token id width of 1, 2 or 4 bytes and at least TokenIdBytes(vocab), ids below vocab
  // (INVALID_ARGUMENT); then the checksum, and a shape or dtype that contradicts the frame
  // (DATA_LOSS). Token ids: required on forward frames of METHOD_MAPL, optional on the other
  // methods' forward frames, never on backward frames. Forward frames of a CODEC_RVQ boundary
  // may also be CODEC_BF16 (before the codebooks exist) or CODEC_INT8 (codes that would exceed
  // forward_error_budget), and may carry 1 to rvq_levels levels.
  absl::Status Check(const v1::Frame& frame, v1::Direction direction, int64_t tokens_expected,
                     const Tensor& out) const;

 private:
  const v1::BoundaryConfig& config_;
  const Backend* const backend_;
  const int64_t d_;
  const int64_t k_;
  const bool projected_;
  const bool mapl_;
};

// The RVQ codebooks of a published dictionary's "rvq" table, rebuilt only when the version
// changes.
class CodebookCache {
 public:
  CodebookCache(int64_t k, uint32_t levels) : k_(k), levels_(levels) {}
  absl::StatusOr<const RvqCodebooks*> Get(const std::shared_ptr<const PublishedDictionary>& dict);

 private:
  const int64_t k_;
  const uint32_t levels_;
  std::shared_ptr<const PublishedDictionary> dict_;
  RvqCodebooks codebooks_;
};

}  // namespace mapl

#endif  // MAPL_SERVER_FRAME_CODEC_H_
