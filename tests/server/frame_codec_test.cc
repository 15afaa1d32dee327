// Tests for server/frame_codec.h: the checksum against XXH3 of the concatenated fields, each
// encoding's round trip against its definition, token id packing, and every check of an incoming
// frame.
#include "server/frame_codec.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"
#include "server/config.h"
#include "server/upstream_engine.h"

namespace mapl {
namespace {

constexpr int64_t kD = 64, kK = 16, kN = 5;

v1::BoundaryConfig MakeConfig(v1::Method method, v1::Codec forward, uint32_t vocab = 1000) {
  v1::BoundaryConfig c;
  c.set_id(3);
  c.set_role(v1::ROLE_DOWNSTREAM);
  c.set_d(kD);
  c.set_k(kK);
  c.set_method(method);
  if (method != v1::METHOD_DENSE) c.set_forward_codec(forward);
  c.set_vocab(vocab);
  c.set_max_tokens(8);
  absl::StatusOr<v1::BoundaryConfig> full = BoundaryConfigWithDefaults(c);
  EXPECT_TRUE(full.ok()) << full.status();
  return *full;
}

std::vector<float> Random(int64_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

class FrameCodecTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> backend_ = *MakeBackend("cpu");
};

TEST_F(FrameCodecTest, ChecksumIsXxh3OfPayloadScalesAndTokenIds) {
  v1::Frame f;
  f.set_payload("payload-bytes");
  f.set_scales("sc");
  f.set_token_ids("ids!");
  const std::string all =
      "payload-bytes"
      "sc"
      "ids!";
  EXPECT_EQ(FrameChecksum(f), XXH3_64bits(all.data(), all.size()));
  EXPECT_EQ(FrameWireBytes(f), all.size());
  FrameCodec::Seal(&f);
  EXPECT_EQ(f.checksum(), XXH3_64bits(all.data(), all.size()));
}

TEST_F(FrameCodecTest, Bf16AndInt8RoundTripWithinTheirRounding) {
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_FIXED, v1::CODEC_INT8);
  FrameCodec codec(c, backend_.get());
  const std::vector<float> x = Random(kN * kK, 1);
  std::vector<float> out(kN * kK);
  for (v1::Codec kind : {v1::CODEC_BF16, v1::CODEC_INT8}) {
    v1::Frame f = codec.NewFrame(v1::DIRECTION_BACKWARD, 1, 0, kN);
    ASSERT_TRUE(codec.EncodeProjected(kind, x.data(), kN, nullptr, &f).ok());
    ASSERT_TRUE(codec.DecodeProjected(f, nullptr, out.data()).ok());
    for (int64_t i = 0; i < kN; ++i) {
      float max_abs = 0.f;
      for (int64_t j = 0; j < kK; ++j) max_abs = std::max(max_abs, std::fabs(x[i * kK + j]));
      for (int64_t j = 0; j < kK; ++j) {
        const float v = x[i * kK + j];
        // bf16 keeps 8 significant bits (relative error <= 2^-8 after rounding to nearest);
        // int8 codes are within half a step of max|x| / 127, the step rounded up to bf16.
        const float bound = kind == v1::CODEC_BF16 ? std::fabs(v) * 0x1p-8f
                                                   : 0.5f * max_abs / 127.f * (1.f + 0x1p-7f);
        EXPECT_LE(std::fabs(out[i * kK + j] - v), bound) << v1::Codec_Name(kind);
      }
    }
    EXPECT_EQ(f.payload().size(), size_t(kind == v1::CODEC_BF16 ? kN * kK * 2 : kN * kK));
    EXPECT_EQ(f.scales().size(), size_t(kind == v1::CODEC_BF16 ? 0 : kN * 2));
  }
}

// int4 frames of even and odd k, both directions: ceil(k / 2) bytes and a bf16 scale a token, each
// value within half a step of max|x| / 7 (the step rounded up to bf16). A payload or scales of
// another size is refused by Check(), and a corrupt scale by the decoder.
TEST_F(FrameCodecTest, Int4FramesRoundTripAndCheckTheirSizes) {
  for (uint32_t k : {16u, 15u}) {
    v1::BoundaryConfig c = MakeConfig(v1::METHOD_MAPL, v1::CODEC_INT4, 200);
    c.set_k(k);
    c.set_backward_codec(v1::CODEC_INT4);
    FrameCodec codec(c, backend_.get());
    const std::vector<float> x = Random(kN * k, 8);
    const std::vector<int32_t> ids = {1, 2, 3, 199, 0};
    std::vector<float> zq(kN * k), out(kN * kD);
    const Tensor t = Tensor::F32(out.data(), kN, kD);
    const size_t row_bytes = (k + 1) / 2;
    for (v1::Direction direction : {v1::DIRECTION_FORWARD, v1::DIRECTION_BACKWARD}) {
      SCOPED_TRACE(testing::Message() << "k " << k << ", " << v1::Direction_Name(direction));
      v1::Frame f = codec.NewFrame(direction, 1, 0, kN);
      ASSERT_TRUE(codec.EncodeProjected(v1::CODEC_INT4, x.data(), kN, nullptr, &f).ok());
      if (direction == v1::DIRECTION_FORWARD) codec.PackTokenIds(ids.data(), kN, &f);
      FrameCodec::Seal(&f);
      EXPECT_EQ(f.codec(), v1::CODEC_INT4);
      EXPECT_EQ(f.payload().size(), kN * row_bytes);
      EXPECT_EQ(f.scales().size(), size_t(kN * 2));
      ASSERT_TRUE(codec.Check(f, direction, kN, t).ok()) << codec.Check(f, direction, kN, t);
      ASSERT_TRUE(codec.DecodeProjected(f, nullptr, zq.data()).ok());
      for (int64_t i = 0; i < kN; ++i) {
        float max_abs = 0.f;
        for (uint32_t j = 0; j < k; ++j) max_abs = std::max(max_abs, std::fabs(x[i * k + j]));
        for (uint32_t j = 0; j < k; ++j) {
          EXPECT_LE(std::fabs(zq[i * k + j] - x[i * k + j]), 0.5f * max_abs / 7.f * (1.f + 0x1p-7f))
              << i << ", " << j;
        }
      }

      for (size_t size : {kN * row_bytes - 1, kN * row_bytes + 1, size_t(kN * k)}) {
        v1::Frame bad = f;
        bad.mutable_payload()->resize(size);
        FrameCodec::Seal(&bad);
        const absl::Status s = codec.Check(bad, direction, kN, t);
        EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << size;
        EXPECT_TRUE(absl::StrContains(s.message(), "payload has")) << s;
      }
      v1::Frame bad = f;
      bad.mutable_scales()->pop_back();
      FrameCodec::Seal(&bad);
      EXPECT_TRUE(absl::StrContains(codec.Check(bad, direction, kN, t).message(), "scales has"));
      // A NaN scale (bf16 0x7fc0) has the right size: the decoder refuses it, naming the row.
      bad = f;
      bad.mutable_scales()->replace(2 * 2, 2, std::string("\xc0\x7f", 2));
      FrameCodec::Seal(&bad);
      ASSERT_TRUE(codec.Check(bad, direction, kN, t).ok());
      const absl::Status s = codec.DecodeProjected(bad, nullptr, zq.data());
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_TRUE(absl::StrContains(s.message(), "row 2")) << s;
    }
  }
  // A boundary of int8 codes refuses int4 frames, and the other way round.
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_FIXED, v1::CODEC_INT8);
  FrameCodec codec(c, backend_.get());
  const std::vector<float> x = Random(kN * kK, 9);
  std::vector<float> out(kN * kD);
  v1::Frame f = codec.NewFrame(v1::DIRECTION_BACKWARD, 1, 0, kN);
  ASSERT_TRUE(codec.EncodeProjected(v1::CODEC_INT4, x.data(), kN, nullptr, &f).ok());
  FrameCodec::Seal(&f);
  EXPECT_TRUE(absl::StrContains(
      codec.Check(f, v1::DIRECTION_BACKWARD, kN, Tensor::F32(out.data(), kN, kD)).message(),
      "codec CODEC_INT8 expected"));
}

TEST_F(FrameCodecTest, RvqCodesDecodeToTheirCentroidSums) {
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_FIXED, v1::CODEC_RVQ);
  FrameCodec codec(c, backend_.get());
  const std::vector<float> train = Random(1024 * kK, 2);
  RvqFitOptions options;
  options.levels = static_cast<int32_t>(c.rvq_levels());
  absl::StatusOr<RvqCodebooks> cb =
      backend_->RvqFit(ConstTensor::F32(train.data(), 1024, kK), options);
  ASSERT_TRUE(cb.ok()) << cb.status();
  const std::vector<float> x = Random(kN * kK, 3);
  v1::Frame f = codec.NewFrame(v1::DIRECTION_FORWARD, 1, 0, kN);
  ASSERT_TRUE(codec.EncodeProjected(v1::CODEC_RVQ, x.data(), kN, &*cb, &f).ok());
  ASSERT_EQ(f.payload().size(), size_t(kN * c.rvq_levels()));
  EXPECT_EQ(f.levels(), c.rvq_levels());
  std::vector<float> out(kN * kK);
  ASSERT_TRUE(codec.DecodeProjected(f, &*cb, out.data()).ok());
  // Decoding is the sum over levels of the coded centroids, computed here from the codes.
  for (int64_t i = 0; i < kN; ++i) {
    for (int64_t j = 0; j < kK; ++j) {
      double sum = 0.0;
      for (uint32_t l = 0; l < c.rvq_levels(); ++l) {
        const uint8_t code = static_cast<uint8_t>(f.payload()[i * c.rvq_levels() + l]);
        sum += cb->centroids[(l * cb->codebook_size + code) * kK + j];
      }
      EXPECT_NEAR(out[i * kK + j], sum, 1e-5);
    }
  }
}

TEST_F(FrameCodecTest, DenseCarriesBf16ValuesAndRejectsNonFinite) {
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_DENSE, v1::CODEC_UNSPECIFIED);
  FrameCodec codec(c, backend_.get());
  const std::vector<float> h = Random(kN * kD, 4);
  v1::Frame f = codec.NewFrame(v1::DIRECTION_FORWARD, 2, 1, kN);
  codec.EncodeDense(ConstTensor::F32(h.data(), kN, kD), &f);
  FrameCodec::Seal(&f);
  std::vector<float> out(kN * kD);
  const Tensor t = Tensor::F32(out.data(), kN, kD);
  ASSERT_TRUE(codec.Check(f, v1::DIRECTION_FORWARD, -1, t).ok());
  ASSERT_TRUE(codec.DecodeDense(f, t).ok());
  for (int64_t i = 0; i < kN * kD; ++i)
    EXPECT_LE(std::fabs(out[i] - h[i]), std::fabs(h[i]) * 0x1p-8f);
  // A NaN on the wire (bf16 0x7fc0) is refused, naming where it is.
  f.mutable_payload()->replace(2 * (kD + 3), 2, std::string("\xc0\x7f", 2));
  const absl::Status s = codec.DecodeDense(f, t);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "(1, 3)")) << s;
}

TEST_F(FrameCodecTest, TokenIdsTravelInOneTwoOrFourBytes) {
  for (uint32_t vocab : {256u, 257u, 65536u, 65537u}) {
    const v1::BoundaryConfig c = MakeConfig(v1::METHOD_MAPL, v1::CODEC_INT8, vocab);
    FrameCodec codec(c, backend_.get());
    const int32_t big = static_cast<int32_t>(std::min(vocab - 1, 65535u));
    const std::vector<int32_t> ids = {0, 1, big, static_cast<int32_t>(vocab - 1), 7};
    v1::Frame f;
    f.set_tokens(kN);
    codec.PackTokenIds(ids.data(), kN, &f);
    EXPECT_EQ(f.token_id_bytes(), vocab <= 256 ? 1u : vocab <= 65536 ? 2u : 4u) << vocab;
    EXPECT_EQ(f.token_id_bytes(), uint32_t(FrameCodec::TokenIdBytes(vocab)));
    EXPECT_EQ(f.token_ids().size(), kN * f.token_id_bytes());
    std::vector<int32_t> back;
    ASSERT_TRUE(codec.UnpackTokenIds(f, &back).ok());
    EXPECT_EQ(back, ids);
  }
  // An id at or above vocab from the peer is refused.
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_MAPL, v1::CODEC_INT8, 1000);
  FrameCodec codec(c, backend_.get());
  const std::vector<int32_t> ids = {0, 1, 1000, 3, 4};
  v1::Frame f;
  f.set_tokens(kN);
  codec.PackTokenIds(ids.data(), kN, &f);
  std::vector<int32_t> back;
  const absl::Status s = codec.UnpackTokenIds(f, &back);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "token_ids[2] = 1000")) << s;
}

// Check() takes ids of 1, 2 or 4 bytes, but none too narrow for the vocabulary: a vocabulary of
// 256 takes all three widths (a peer may send wider ids than it needs), one of 257 refuses 1.
TEST_F(FrameCodecTest, CheckTakesAnyTokenIdWidthThatHoldsTheVocabulary) {
  for (uint32_t vocab : {256u, 257u}) {
    const v1::BoundaryConfig c = MakeConfig(v1::METHOD_MAPL, v1::CODEC_INT8, vocab);
    FrameCodec codec(c, backend_.get());
    const std::vector<float> z = Random(kN * kK, 10);
    v1::Frame frame = codec.NewFrame(v1::DIRECTION_FORWARD, 1, 0, kN);
    ASSERT_TRUE(codec.EncodeProjected(v1::CODEC_INT8, z.data(), kN, nullptr, &frame).ok());
    std::vector<float> out(kN * kD);
    const Tensor t = Tensor::F32(out.data(), kN, kD);
    const std::vector<uint32_t> ids = {0, 255, 3, 200, 1};
    for (uint32_t width : {1u, 2u, 4u}) {
      SCOPED_TRACE(testing::Message() << "vocab " << vocab << ", width " << width);
      v1::Frame f = frame;
      f.set_token_id_bytes(width);
      for (uint32_t id : ids)
        f.mutable_token_ids()->append(reinterpret_cast<const char*>(&id), width);
      FrameCodec::Seal(&f);
      const absl::Status s = codec.Check(f, v1::DIRECTION_FORWARD, -1, t);
      if (width == 1 && vocab > 256) {
        EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
        EXPECT_TRUE(absl::StrContains(s.message(), "token_id_bytes 1 cannot hold")) << s;
        continue;
      }
      ASSERT_TRUE(s.ok()) << s;
      std::vector<int32_t> back;
      ASSERT_TRUE(codec.UnpackTokenIds(f, &back).ok());
      EXPECT_EQ(back, std::vector<int32_t>(ids.begin(), ids.end()));
    }
  }
}

// Every field Check() looks at, broken one at a time.
// Residual codes are prefix codes: a frame may carry the first levels only, and decodes to the
// sum of those levels' centroids; the errors reported per depth are those of the decoded prefixes.
// Forward frames of an RVQ boundary may also travel as int8; levels outside [1, L] are refused.
TEST_F(FrameCodecTest, RvqFramesCarryAPrefixOfLevelsOrInt8) {
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_FIXED, v1::CODEC_RVQ);
  FrameCodec codec(c, backend_.get());
  const int levels = static_cast<int>(c.rvq_levels());
  const std::vector<float> train = Random(1024 * kK, 2);
  RvqFitOptions options;
  options.levels = levels;
  absl::StatusOr<RvqCodebooks> cb =
      backend_->RvqFit(ConstTensor::F32(train.data(), 1024, kK), options);
  ASSERT_TRUE(cb.ok()) << cb.status();
  const std::vector<float> x = Random(kN * kK, 3);
  std::vector<uint8_t> codes;
  std::vector<double> errors;
  ASSERT_TRUE(codec.RvqCodesWithErrors(x.data(), kN, *cb, &codes, &errors).ok());
  ASSERT_EQ(errors.size(), size_t(levels));
  EXPECT_LT(errors.back(), errors.front());
  std::vector<float> out(kN * kD);
  const Tensor t = Tensor::F32(out.data(), kN, kD);
  double norm2 = 0.0;
  for (float v : x) norm2 += double{v} * v;
  for (int depth = 1; depth <= levels; ++depth) {
    v1::Frame f = codec.NewFrame(v1::DIRECTION_FORWARD, 1, 0, kN);
    codec.SetRvqPayload(codes, kN, levels, depth, &f);
    FrameCodec::Seal(&f);
    ASSERT_TRUE(codec.Check(f, v1::DIRECTION_FORWARD, -1, t).ok()) << depth;
    std::vector<float> zq(kN * kK);
    ASSERT_TRUE(codec.DecodeProjected(f, &*cb, zq.data()).ok());
    double err2 = 0.0;
    for (size_t i = 0; i < zq.size(); ++i) err2 += std::pow(double{zq[i]} - x[i], 2);
    EXPECT_NEAR(std::sqrt(err2 / norm2), errors[depth - 1], 1e-5) << depth;
  }
  for (uint32_t bad : {0u, c.rvq_levels() + 1}) {
    v1::Frame f = codec.NewFrame(v1::DIRECTION_FORWARD, 1, 0, kN);
    f.set_dim(kK);
    f.set_codec(v1::CODEC_RVQ);
    f.set_levels(bad);
    f.mutable_payload()->resize(kN * bad);
    FrameCodec::Seal(&f);
    EXPECT_TRUE(absl::StrContains(codec.Check(f, v1::DIRECTION_FORWARD, -1, t).message(),
                                  "levels must be in [1, "))
        << bad;
  }
  v1::Frame int8 = codec.NewFrame(v1::DIRECTION_FORWARD, 1, 0, kN);
  ASSERT_TRUE(codec.EncodeProjected(v1::CODEC_INT8, x.data(), kN, nullptr, &int8).ok());
  FrameCodec::Seal(&int8);
  EXPECT_TRUE(codec.Check(int8, v1::DIRECTION_FORWARD, -1, t).ok());
}

// The depth policy of forward_error_budget.
TEST(RvqDepthTest, FewestLevelsWithinBudgetWhileTheLinkIsBusy) {
  const std::vector<double> errors = {0.5, 0.3, 0.2, 0.1};
  EXPECT_EQ(UpstreamEngine::ChooseRvqDepth(errors, 0.0, true), 4);   // no budget
  EXPECT_EQ(UpstreamEngine::ChooseRvqDepth(errors, 0.25, true), 3);  // busy: fewest within
  EXPECT_EQ(UpstreamEngine::ChooseRvqDepth(errors, 0.3, true), 2);
  EXPECT_EQ(UpstreamEngine::ChooseRvqDepth(errors, 0.25, false), 4);  // room: every level
  EXPECT_EQ(UpstreamEngine::ChooseRvqDepth(errors, 0.05, true), 0);   // int8
  EXPECT_EQ(UpstreamEngine::ChooseRvqDepth(errors, 0.05, false), 0);
}

TEST_F(FrameCodecTest, CheckRejectsEachInconsistencyByName) {
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_MAPL, v1::CODEC_INT8);
  FrameCodec codec(c, backend_.get());
  const std::vector<float> z = Random(kN * kK, 5);
  const std::vector<int32_t> ids = {1, 2, 3, 4, 5};
  v1::Frame good = codec.NewFrame(v1::DIRECTION_FORWARD, 1, 0, kN);
  ASSERT_TRUE(codec.EncodeProjected(v1::CODEC_INT8, z.data(), kN, nullptr, &good).ok());
  codec.PackTokenIds(ids.data(), kN, &good);
  FrameCodec::Seal(&good);
  std::vector<float> out(kN * kD);
  const Tensor t = Tensor::F32(out.data(), kN, kD);
  ASSERT_TRUE(codec.Check(good, v1::DIRECTION_FORWARD, -1, t).ok());
  ASSERT_TRUE(codec.Check(good, v1::DIRECTION_FORWARD, kN, t).ok());

  struct Case {
    const char* field;
    std::function<void(v1::Frame*)> breaks;
  };
  const std::vector<Case> cases = {
      {"boundary", [](v1::Frame* f) { f->set_boundary(4); }},
      {"direction", [](v1::Frame* f) { f->set_direction(v1::DIRECTION_BACKWARD); }},
      {"tokens must be", [](v1::Frame* f) { f->set_tokens(0); }},
      {"tokens must be", [](v1::Frame* f) { f->set_tokens(9); }},
      {"codec", [](v1::Frame* f) { f->set_codec(v1::CODEC_RVQ); }},
      {"dim", [](v1::Frame* f) { f->set_dim(kK + 1); }},
      {"payload has", [](v1::Frame* f) { f->mutable_payload()->pop_back(); }},
      {"scales has", [](v1::Frame* f) { f->mutable_scales()->append("xx"); }},
      {"token_id_bytes", [](v1::Frame* f) { f->set_token_id_bytes(3); }},
      {"token_ids has", [](v1::Frame* f) { f->mutable_token_ids()->pop_back(); }},
  };
  for (const Case& k : cases) {
    v1::Frame f = good;
    k.breaks(&f);
    FrameCodec::Seal(&f);  // a consistent checksum: the field check must catch it
    const absl::Status s = codec.Check(f, v1::DIRECTION_FORWARD, -1, t);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << k.field;
    EXPECT_TRUE(absl::StrContains(s.message(), k.field)) << k.field << ": " << s;
  }
  // The backward's token count must match its forward's; the output must be (n, d).
  EXPECT_TRUE(absl::StrContains(codec.Check(good, v1::DIRECTION_FORWARD, kN + 1, t).message(),
                                "its forward had"));
  EXPECT_EQ(
      codec.Check(good, v1::DIRECTION_FORWARD, -1, Tensor::F32(out.data(), kN, kD - 1)).code(),
      absl::StatusCode::kInvalidArgument);
  // A flipped payload bit with the old checksum is DATA_LOSS.
  v1::Frame corrupt = good;
  (*corrupt.mutable_payload())[0] ^= 1;
  const absl::Status s = codec.Check(corrupt, v1::DIRECTION_FORWARD, -1, t);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "checksum mismatch")) << s;
}

TEST_F(FrameCodecTest, CodebookCacheFollowsTheDictionaryVersion) {
  const v1::BoundaryConfig c = MakeConfig(v1::METHOD_FIXED, v1::CODEC_RVQ);
  std::vector<DictionaryTableSpec> specs = {{"U", kD, kK},
                                            {"rvq", int64_t{c.rvq_levels()} * 256, kK}};
  std::vector<std::vector<float>> tables = {Random(kD * kK, 6),
                                            Random(c.rvq_levels() * 256 * kK, 7)};
  auto v0 = PublishedDictionary::Create(specs, tables, v1::PRECISION_F32, 0);
  ASSERT_TRUE(v0.ok());
  auto d0 = std::make_shared<const PublishedDictionary>(*std::move(v0));
  tables[1][0] += 1.f;
  auto v1d = PublishedDictionary::Create(specs, tables, v1::PRECISION_F32, 1);
  ASSERT_TRUE(v1d.ok());
  auto d1 = std::make_shared<const PublishedDictionary>(*std::move(v1d));
  CodebookCache cache(kK, c.rvq_levels());
  absl::StatusOr<const RvqCodebooks*> a = cache.Get(d0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->centroids[0], d0->table(1)[0]);
  absl::StatusOr<const RvqCodebooks*> b = cache.Get(d1);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->centroids[0], d1->table(1)[0]);
  EXPECT_NE((*b)->centroids[0], d0->table(1)[0]);
  // A dictionary without an "rvq" table cannot give codebooks.
  auto plain = PublishedDictionary::Create({{"U", kD, kK}}, {tables[0]}, v1::PRECISION_F32, 0);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(
      cache.Get(std::make_shared<const PublishedDictionary>(*std::move(plain))).status().code(),
      absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mapl
