// Tests for the role engines (server/upstream_engine.h, server/downstream_engine.h), one call
// at a time: the checks on untrusted frames, shapes and NaN input, the dense baseline, PCA init,
// dictionary recovery, config defaults, int4 backward codes and the seeded U.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "tests/server/engine_pair.h"

namespace mapl {
namespace {

using testing_internal::Config;
using testing_internal::Curve;
using testing_internal::Pair;
using testing_internal::RunScenario;
using testing_internal::Stream;

// ---- units ----

class EngineTest : public ::testing::Test {
 protected:
  static constexpr int kN = 64;

  void SetUp() override { stream_.Next(kN, &h_, &tokens_); }

  // Encodes (step 1, mb 0) upstream and returns its frame.
  v1::Frame Forward(Pair& pair) {
    auto out =
        pair.up().EncodeForward(1, 0, ConstTensor::F32(h_.data(), kN, Stream::kD), tokens_.data());
    EXPECT_TRUE(out.ok()) << out.status();
    std::vector<v1::Frame> frames;
    EXPECT_TRUE(pair.ToDownstream(*out, &frames).ok());
    EXPECT_EQ(frames.size(), 1u);
    return frames.empty() ? v1::Frame() : frames[0];
  }

  absl::Status Decode(Pair& pair, const v1::Frame& frame) {
    h_hat_.assign(size_t(kN) * Stream::kD, 0.f);
    return pair.down().DecodeForward(frame, Tensor::F32(h_hat_.data(), kN, Stream::kD));
  }

  Stream stream_{7};
  std::vector<float> h_, h_hat_;
  std::vector<int32_t> tokens_;
};

TEST_F(EngineTest, CorruptFrameIsDataLoss) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_INT8));
  v1::Frame frame = Forward(pair);
  v1::Frame bad = frame;
  (*bad.mutable_payload())[5] ^= 0x10;
  EXPECT_EQ(Decode(pair, bad).code(), absl::StatusCode::kDataLoss);
  bad = frame;
  (*bad.mutable_scales())[1] ^= 0x01;
  EXPECT_EQ(Decode(pair, bad).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(pair.down().stats().frames_rejected(), 2u);
  // Nothing was kept of the bad frames: the good one decodes.
  ASSERT_TRUE(Decode(pair, frame).ok());
}

// Transient, not the caller's fault: a snapshot that brings the version is asked for.
TEST_F(EngineTest, UnknownDictionaryVersionIsRejectedAsUnavailable) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  v1::Frame frame = Forward(pair);
  frame.set_dict_version(99);  // not covered by the checksum
  absl::Status s = Decode(pair, frame);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "unknown dictionary version 99")) << s;
}

TEST_F(EngineTest, TokenIdOutOfVocabIsRejected) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  v1::Frame frame = Forward(pair);
  ASSERT_EQ(frame.token_id_bytes(), 1u);  // vocab 256
  ASSERT_EQ(frame.token_ids().size(), size_t(kN));
  // One byte cannot hold an id >= 256: the ids are resent as 2 bytes (which Check() takes), with
  // one out of the vocabulary.
  std::string wide(2 * kN, '\0');
  for (int i = 0; i < kN; ++i) wide[2 * i] = frame.token_ids()[i];
  const uint16_t bad_id = Stream::kVocab;  // == vocab
  std::memcpy(wide.data() + 2 * 3, &bad_id, 2);
  frame.set_token_ids(wide);
  frame.set_token_id_bytes(2);
  frame.set_checksum(FrameChecksum(frame));
  absl::Status s = Decode(pair, frame);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "token_ids[3] = 256")) << s;

  // The encoder refuses them too.
  tokens_[0] = -1;
  auto out =
      pair.up().EncodeForward(1, 1, ConstTensor::F32(h_.data(), kN, Stream::kD), tokens_.data());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, BackwardWithoutForwardIsFailedPrecondition) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  std::vector<float> g(size_t(kN) * Stream::kD, 0.f);
  auto out = pair.down().EncodeBackward(1, 0, ConstTensor::F32(g.data(), kN, Stream::kD));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition) << out.status();

  // And upstream: a backward frame for a forward it never encoded.
  v1::Frame frame;
  frame.set_boundary(7);
  frame.set_direction(v1::DIRECTION_BACKWARD);
  frame.set_step(3);
  EXPECT_EQ(pair.up().DecodeBackward(frame, Tensor::F32(g.data(), kN, Stream::kD)).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(EngineTest, WrongShapesAreRejected) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_RVQ));
  // h with the wrong width, too many rows.
  auto out = pair.up().EncodeForward(1, 0, ConstTensor::F32(h_.data(), kN, Stream::kD - 1),
                                     tokens_.data());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> big(size_t(5000) * Stream::kD);
  std::vector<int32_t> big_tokens(5000, 0);
  out = pair.up().EncodeForward(1, 0, ConstTensor::F32(big.data(), 5000, Stream::kD),
                                big_tokens.data());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);

  v1::Frame frame = Forward(pair);
  // Output of the wrong shape.
  std::vector<float> out_buf(size_t(kN + 1) * Stream::kD);
  EXPECT_EQ(
      pair.down().DecodeForward(frame, Tensor::F32(out_buf.data(), kN + 1, Stream::kD)).code(),
      absl::StatusCode::kInvalidArgument);
  // Header fields that disagree with the payload.
  for (int which = 0; which < 5; ++which) {
    v1::Frame bad = frame;
    if (which == 0) bad.set_tokens(kN + 1);
    if (which == 1) bad.set_dim(31);
    if (which == 2) bad.set_codec(v1::CODEC_INT8);
    if (which == 3) bad.mutable_payload()->pop_back();
    if (which == 4) bad.set_boundary(8);
    std::vector<float> buf(size_t(bad.tokens()) * Stream::kD);
    absl::Status s =
        pair.down().DecodeForward(bad, Tensor::F32(buf.data(), bad.tokens(), Stream::kD));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << which << ": " << s;
  }
  ASSERT_TRUE(Decode(pair, frame).ok());
  // A gradient of the wrong shape.
  std::vector<float> g(size_t(kN) * Stream::kD);
  auto back = pair.down().EncodeBackward(1, 0, ConstTensor::F32(g.data(), kN - 1, Stream::kD));
  EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
  // A learning signal of the wrong shape.
  v1::LearningSignal signal;
  signal.set_boundary(7);
  signal.set_step(1);
  signal.set_rows(Stream::kD);
  signal.set_cols(31);
  EXPECT_EQ(pair.up().HandleLearningSignal(signal).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, NanInputLeavesStateUntouched) {
  // Two identical pairs; one sees NaN input (and a NaN learning signal) first. Their learning
  // signals and dictionaries must come out identical.
  Pair clean(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  Pair dirty(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));

  std::vector<float> nan_h = h_;
  nan_h[100] = std::nanf("");
  auto out = dirty.up().EncodeForward(1, 0, ConstTensor::F32(nan_h.data(), kN, Stream::kD),
                                      tokens_.data());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dirty.up().stats().frames_sent(), 0u);
  EXPECT_EQ(dirty.up().stats().nonfinite_inputs(), 1u);

  v1::LearningSignal nan_signal;
  nan_signal.set_boundary(7);
  nan_signal.set_step(1);
  nan_signal.set_rows(Stream::kD);
  nan_signal.set_cols(32);
  std::vector<float> g_down(Stream::kD * 32, 0.f);
  g_down[5] = INFINITY;
  nan_signal.set_g_down(reinterpret_cast<const char*>(g_down.data()), g_down.size() * 4);
  EXPECT_EQ(dirty.up().HandleLearningSignal(nan_signal).code(), absl::StatusCode::kInvalidArgument);

  std::vector<std::string> signals;
  for (Pair* pair : {&clean, &dirty}) {
    const v1::Frame frame = Forward(*pair);  // same (step, mb) as the refused one
    ASSERT_TRUE(Decode(*pair, frame).ok());
    std::vector<float> g(size_t(kN) * Stream::kD);
    for (size_t i = 0; i < g.size(); ++i) g[i] = h_hat_[i] - h_[i];
    if (pair == &dirty) {
      std::vector<float> nan_g = g;
      nan_g[7] = -INFINITY;
      auto back = pair->down().EncodeBackward(1, 0, ConstTensor::F32(nan_g.data(), kN, Stream::kD));
      EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
    }
    auto back = pair->down().EncodeBackward(1, 0, ConstTensor::F32(g.data(), kN, Stream::kD));
    ASSERT_TRUE(back.ok()) << back.status();
    std::vector<float> dh(g.size());
    ASSERT_TRUE(
        pair->up().DecodeBackward(back->frame(), Tensor::F32(dh.data(), kN, Stream::kD)).ok());
    // The upstream cannot step before the (valid) signal arrives.
    EXPECT_EQ(pair->up().Step(1).status().code(), absl::StatusCode::kFailedPrecondition);
    auto signal = pair->down().Step(1);
    ASSERT_TRUE(signal.ok());
    ASSERT_EQ(signal->size(), 1u);
    signals.push_back(signal->at(0).learning_signal().g_down());
    ASSERT_TRUE(pair->up().HandleLearningSignal(signal->at(0).learning_signal()).ok());
    auto delta = pair->up().Step(1);
    ASSERT_TRUE(delta.ok()) << delta.status();
    std::vector<v1::Frame> none;
    ASSERT_TRUE(pair->ToDownstream(*delta, &none).ok());
  }
  EXPECT_EQ(signals[0], signals[1]);
  EXPECT_EQ(clean.up().stats().dictionary_checksum(), dirty.up().stats().dictionary_checksum());
  EXPECT_EQ(clean.down().stats().dictionary_checksum(), dirty.down().stats().dictionary_checksum());
}

TEST_F(EngineTest, DenseRoundTripIsExactToBf16) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_DENSE, v1::CODEC_UNSPECIFIED));
  const v1::Frame frame = Forward(pair);
  EXPECT_EQ(frame.codec(), v1::CODEC_DENSE);
  ASSERT_TRUE(Decode(pair, frame).ok());
  for (size_t i = 0; i < h_.size(); ++i) {
    ASSERT_EQ(h_hat_[i], Bf16ToFloat(FloatToBf16(h_[i]))) << i;
  }
  // Backward, into a bf16 output.
  std::vector<float> g(h_.size());
  for (size_t i = 0; i < g.size(); ++i) g[i] = 0.001f * h_[i];
  auto back = pair.down().EncodeBackward(1, 0, ConstTensor::F32(g.data(), kN, Stream::kD));
  ASSERT_TRUE(back.ok()) << back.status();
  std::vector<bf16_t> dh(g.size());
  ASSERT_TRUE(
      pair.up().DecodeBackward(back->frame(), Tensor::BF16(dh.data(), kN, Stream::kD)).ok());
  for (size_t i = 0; i < g.size(); ++i) ASSERT_EQ(dh[i], FloatToBf16(g[i])) << i;
  // Dense steps exchange nothing.
  auto down = pair.down().Step(1);
  auto up = pair.up().Step(1);
  ASSERT_TRUE(down.ok() && up.ok());
  EXPECT_TRUE(down->empty());
  EXPECT_TRUE(up->empty());
}

TEST_F(EngineTest, PcaInitSendsSnapshotFirst) {
  v1::BoundaryConfig config = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16);
  config.set_projector_init(v1::PROJECTOR_INIT_PCA);
  Pair pair(config);
  EXPECT_FALSE(pair.down().stats().has_dictionary());
  auto out =
      pair.up().EncodeForward(1, 0, ConstTensor::F32(h_.data(), kN, Stream::kD), tokens_.data());
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 2u);
  ASSERT_TRUE(out->at(0).has_dictionary_snapshot());
  ASSERT_TRUE(out->at(1).has_frame());
  // Before the snapshot the frame cannot be decoded ...
  EXPECT_EQ(Decode(pair, out->at(1).frame()).code(), absl::StatusCode::kUnavailable);
  // ... after it, it can; U is the principal subspace, so only the offsets are missing.
  ASSERT_TRUE(pair.down().HandleSnapshot(out->at(0).dictionary_snapshot()).ok());
  ASSERT_TRUE(Decode(pair, out->at(1).frame()).ok());
  double err2 = 0, norm2 = 0;
  for (size_t i = 0; i < h_.size(); ++i) {
    err2 += double(h_hat_[i] - h_[i]) * (h_hat_[i] - h_[i]);
    norm2 += double(h_[i]) * h_[i];
  }
  EXPECT_LT(std::sqrt(err2 / norm2), 0.3);
  EXPECT_LT(pair.up().stats().orthogonality_error(), 1e-5);
  EXPECT_EQ(pair.up().stats().dictionary_checksum(), pair.down().stats().dictionary_checksum());
}

// int4 backward codes: the upstream hands its trainer gzq U^T, where gzq is g U in codes of
// [-7, 7] times a bf16 scale of max|gU| / 7 a token. Its error is within half a step per value,
// and near the step / sqrt(12) of rounding that is uniform within a step; the downstream's
// backward_code_relative_error reports the same figure.
TEST_F(EngineTest, Int4BackwardCarriesTheGradientWithinItsRounding) {
  v1::BoundaryConfig config = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16);
  config.set_backward_codec(v1::CODEC_INT4);
  Pair pair(config);
  const v1::Frame frame = Forward(pair);
  ASSERT_TRUE(Decode(pair, frame).ok());
  std::vector<float> g(h_.size());
  for (size_t i = 0; i < g.size(); ++i) g[i] = 1e-3f * h_[i];
  auto back = pair.down().EncodeBackward(1, 0, ConstTensor::F32(g.data(), kN, Stream::kD));
  ASSERT_TRUE(back.ok()) << back.status();
  const v1::Frame& bf = back->frame();
  const int64_t k = pair.up().config().k();
  ASSERT_EQ(k, 32);
  EXPECT_EQ(bf.codec(), v1::CODEC_INT4);
  EXPECT_EQ(bf.payload().size(), size_t(kN * k / 2));
  ASSERT_EQ(bf.scales().size(), size_t(kN * 2));
  std::vector<float> dh(g.size());
  ASSERT_TRUE(pair.up().DecodeBackward(bf, Tensor::F32(dh.data(), kN, Stream::kD)).ok());

  // The exact projected gradient (g U) U^T with the seeded U of version 0, in double.
  const std::vector<float> u = SeededDictionary(pair.up().config())[0];  // (d, k)
  double err2 = 0, norm2 = 0, bound2 = 0, uniform2 = 0;
  for (int i = 0; i < kN; ++i) {
    std::vector<double> gz(k, 0.0);
    for (int c = 0; c < Stream::kD; ++c) {
      for (int64_t j = 0; j < k; ++j) gz[j] += double{g[i * Stream::kD + c]} * u[c * k + j];
    }
    for (int c = 0; c < Stream::kD; ++c) {
      double ref = 0;
      for (int64_t j = 0; j < k; ++j) ref += gz[j] * u[c * k + j];
      err2 += std::pow(dh[i * Stream::kD + c] - ref, 2);
    }
    for (double v : gz) norm2 += v * v;
    bf16_t raw;
    std::memcpy(&raw, bf.scales().data() + 2 * i, 2);
    const double scale = Bf16ToFloat(raw);
    double max_abs = 0;
    for (double v : gz) max_abs = std::max(max_abs, std::fabs(v));
    EXPECT_GE(scale, max_abs / 7 * (1 - 1e-5)) << i;
    EXPECT_LE(scale, max_abs / 7 * (1 + 0x1p-7) * (1 + 1e-5)) << i;
    bound2 += k * scale * scale / 4;
    uniform2 += k * scale * scale / 12;
  }
  const double rel = std::sqrt(err2 / norm2);
  EXPECT_LE(err2, bound2 * (1 + 1e-4));
  EXPECT_GT(rel, 0.85 * std::sqrt(uniform2 / norm2));
  EXPECT_LT(rel, 1.15 * std::sqrt(uniform2 / norm2));
  // Coarser than int8 by about 127 / 7, yet it carries the gradient.
  EXPECT_GT(rel, 0.04);
  EXPECT_LT(rel, 0.2);
  std::printf("int4 backward: relative error %.4f (uniform rounding would give %.4f)\n", rel,
              std::sqrt(uniform2 / norm2));

  auto signal = pair.down().Step(1);
  ASSERT_TRUE(signal.ok()) << signal.status();
  EXPECT_NEAR(pair.down().stats().backward_code_relative_error(), rel, 1e-4 * rel);
}

TEST_F(EngineTest, Int8ForwardRoundTrip) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_FIXED, v1::CODEC_INT8));
  const v1::Frame frame = Forward(pair);
  EXPECT_EQ(frame.codec(), v1::CODEC_INT8);
  EXPECT_EQ(frame.payload().size(), size_t(kN) * 32);
  EXPECT_EQ(frame.scales().size(), size_t(kN) * 2);
  // FIXED has no anchors, but the ids the trainer gave travel (for the downstream's trainer).
  EXPECT_EQ(frame.token_ids().size(), size_t(kN) * frame.token_id_bytes());
  ASSERT_TRUE(Decode(pair, frame).ok());
  // FIXED: h_hat = zq U^T is the (quantized) projection of h, so |h_hat|^2 <= |h|^2 and
  // h_hat . (h - h_hat) ~ 0.
  double dot = 0, hh = 0;
  for (size_t i = 0; i < h_.size(); ++i) {
    dot += double(h_hat_[i]) * (h_[i] - h_hat_[i]);
    hh += double(h_hat_[i]) * h_hat_[i];
  }
  EXPECT_GT(hh, 0);
  EXPECT_LT(std::fabs(dot) / hh, 0.02);
}

TEST_F(EngineTest, BadDeltaThenSnapshotRecovers) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  const v1::Frame frame = Forward(pair);
  ASSERT_TRUE(Decode(pair, frame).ok());
  std::vector<float> g(h_.size());
  for (size_t i = 0; i < g.size(); ++i) g[i] = h_hat_[i] - h_[i];
  auto back = pair.down().EncodeBackward(1, 0, ConstTensor::F32(g.data(), kN, Stream::kD));
  ASSERT_TRUE(back.ok());
  std::vector<float> dh(g.size());
  ASSERT_TRUE(pair.up().DecodeBackward(back->frame(), Tensor::F32(dh.data(), kN, Stream::kD)).ok());
  auto signal = pair.down().Step(1);
  ASSERT_TRUE(signal.ok());
  ASSERT_TRUE(pair.up().HandleLearningSignal(signal->at(0).learning_signal()).ok());
  auto delta = pair.up().Step(1);
  ASSERT_TRUE(delta.ok());
  ASSERT_EQ(delta->size(), 1u);
  v1::DictionaryDelta bad = delta->at(0).dictionary_delta();
  ASSERT_GT(bad.tables_size(), 0);
  bad.set_checksum(bad.checksum() ^ 1);
  EXPECT_EQ(pair.down().HandleDelta(bad).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(pair.down().stats().dictionary_version(), 0u);  // unchanged

  v1::SnapshotRequest request;
  request.set_boundary(7);
  request.set_direction(v1::DIRECTION_FORWARD);
  request.set_reason(v1::SNAPSHOT_REASON_CHECKSUM_MISMATCH);
  auto snapshot = pair.up().HandleSnapshotRequest(request);
  ASSERT_TRUE(snapshot.ok()) << snapshot.status();
  ASSERT_EQ(snapshot->size(), 1u);
  // A snapshot of other shapes is refused.
  v1::DictionarySnapshot wrong = snapshot->at(0).dictionary_snapshot();
  wrong.mutable_tables(0)->set_cols(31);
  EXPECT_EQ(pair.down().HandleSnapshot(wrong).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(pair.down().HandleSnapshot(snapshot->at(0).dictionary_snapshot()).ok());
  EXPECT_EQ(pair.down().stats().dictionary_version(), 1u);
  EXPECT_EQ(pair.down().stats().dictionary_checksum(), pair.up().stats().dictionary_checksum());
}

// Frames refused for a version the downstream lacks ask for one snapshot per version held, not
// one per frame.
TEST_F(EngineTest, DownstreamAsksOnceForTheVersionItHolds) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  v1::Frame frame = Forward(pair);
  frame.set_dict_version(99);  // not covered by the checksum
  std::vector<v1::PeerMessage> replies;
  for (int i = 0; i < 3; ++i) {
    h_hat_.assign(size_t(kN) * Stream::kD, 0.f);
    EXPECT_FALSE(
        pair.down().Decode(frame, Tensor::F32(h_hat_.data(), kN, Stream::kD), &replies).ok());
  }
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_TRUE(replies[0].has_snapshot_request());
  EXPECT_EQ(pair.down().stats().snapshot_requests_sent(), 1u);
}

// The upstream answers a snapshot request with a full snapshot only when the one it already sent
// to this downstream does not cover it: requests naming an older version (asked before that
// snapshot was in) or no state, and requests while the dictionary has not moved since, get
// nothing and are counted. A restarted downstream starts afresh.
TEST_F(EngineTest, UpstreamCoalescesSnapshotRequestsTheLastSnapshotCovers) {
  Pair pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  double err2 = 0, norm2 = 0;
  ASSERT_TRUE(pair.Microbatch(1, 0, h_, tokens_, &err2, &norm2).ok());
  ASSERT_TRUE(pair.CloseStep(1).ok());
  ASSERT_EQ(pair.up().stats().dictionary_version(), 1u);
  auto request = [](uint64_t have, v1::SnapshotReason reason) {
    v1::SnapshotRequest r;
    r.set_boundary(7);
    r.set_direction(v1::DIRECTION_FORWARD);
    r.set_have_version(have);
    r.set_reason(reason);
    return r;
  };
  auto answer = [&](uint64_t have, v1::SnapshotReason reason) -> std::vector<v1::PeerMessage> {
    auto out = pair.up().HandleSnapshotRequest(request(have, reason));
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : std::vector<v1::PeerMessage>{};
  };
  // The first request is answered with version 1.
  std::vector<v1::PeerMessage> out = answer(0, v1::SNAPSHOT_REASON_UNKNOWN_VERSION);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].dictionary_snapshot().version(), 1u);
  // Asked again before that snapshot was in (version 0 held, or none), or with version 1 held
  // while the dictionary is still at version 1: covered.
  EXPECT_TRUE(answer(0, v1::SNAPSHOT_REASON_BASE_VERSION_MISMATCH).empty());
  EXPECT_TRUE(answer(0, v1::SNAPSHOT_REASON_NO_STATE).empty());
  EXPECT_TRUE(answer(1, v1::SNAPSHOT_REASON_CHECKSUM_MISMATCH).empty());
  EXPECT_EQ(pair.up().stats().snapshot_requests_coalesced(), 3u);

  // Version 2 exists: a replica at version 1 that lost its delta gets it whole.
  ASSERT_TRUE(pair.Microbatch(2, 0, h_, tokens_, &err2, &norm2).ok());
  ASSERT_TRUE(pair.CloseStep(2).ok());
  ASSERT_EQ(pair.up().stats().dictionary_version(), 2u);
  out = answer(1, v1::SNAPSHOT_REASON_BASE_VERSION_MISMATCH);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].dictionary_snapshot().version(), 2u);
  EXPECT_TRUE(answer(1, v1::SNAPSHOT_REASON_UNKNOWN_VERSION).empty());
  EXPECT_EQ(pair.up().stats().snapshot_requests_coalesced(), 4u);

  // A restarted downstream is sent the dictionary at once, whatever the old one was sent; its
  // requests from before that snapshot was in are covered by it.
  ASSERT_EQ(pair.up().OnPeerRestart().size(), 1u);
  EXPECT_TRUE(answer(0, v1::SNAPSHOT_REASON_NO_STATE).empty());
  EXPECT_EQ(pair.up().stats().snapshot_requests_coalesced(), 5u);
}

// A restarted upstream numbers its dictionary versions from 0 again, with other tables: its
// version 1 is not the old version 1. After OnPeerRestart the downstream holds only version 0, so
// a new-lineage frame naming version 1 is refused (a snapshot is asked for) instead of being
// decoded with the old tables.
TEST_F(EngineTest, AfterAnUpstreamRestartOldVersionsAreNeverUsed) {
  Pair old_pair(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  double err2 = 0, norm2 = 0;
  ASSERT_TRUE(old_pair.Microbatch(1, 0, h_, tokens_, &err2, &norm2).ok());
  ASSERT_TRUE(old_pair.CloseStep(1).ok());
  ASSERT_EQ(old_pair.down().stats().dictionary_version(), 1u);

  // The restarted upstream, trained on other data: its own version 1.
  Pair restarted(Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16));
  Stream other(99);
  std::vector<float> h2;
  std::vector<int32_t> tokens2;
  other.Next(kN, &h2, &tokens2);
  ASSERT_TRUE(restarted.Microbatch(1, 0, h2, tokens2, &err2, &norm2).ok());
  ASSERT_TRUE(restarted.CloseStep(1).ok());
  ASSERT_EQ(restarted.up().stats().dictionary_version(), 1u);
  ASSERT_NE(restarted.up().stats().dictionary_checksum(),
            old_pair.down().stats().dictionary_checksum())
      << "the two lineages' version 1 must differ for this test to mean anything";
  auto out = restarted.up().EncodeForward(2, 0, ConstTensor::F32(h2.data(), kN, Stream::kD),
                                          tokens2.data());
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 1u);
  ASSERT_EQ(out->at(0).frame().dict_version(), 1u);

  old_pair.down().OnPeerRestart();
  EXPECT_EQ(old_pair.down().stats().dictionary_version(), 0u);
  h_hat_.assign(size_t(kN) * Stream::kD, 0.f);
  const absl::Status decoded =
      old_pair.down().DecodeForward(out->at(0).frame(), Tensor::F32(h_hat_.data(), kN, Stream::kD));
  EXPECT_FALSE(decoded.ok()) << "decoded a new-lineage frame with the old lineage's tables";

  // Seen from the other end, the upstream learns that its downstream restarted and sends its
  // current dictionary at once; with it the frame decodes.
  const std::vector<v1::PeerMessage> resync = restarted.up().OnPeerRestart();
  ASSERT_EQ(resync.size(), 1u);
  ASSERT_TRUE(resync[0].has_dictionary_snapshot());
  ASSERT_TRUE(old_pair.down().HandleSnapshot(resync[0].dictionary_snapshot()).ok());
  EXPECT_EQ(old_pair.down().stats().dictionary_checksum(),
            restarted.up().stats().dictionary_checksum());
  EXPECT_TRUE(old_pair.down()
                  .DecodeForward(out->at(0).frame(), Tensor::F32(h_hat_.data(), kN, Stream::kD))
                  .ok());
}

// The learners' sample of a microbatch (BoundaryConfig.learner_rows): every row up to the limit;
// above it, that many distinct rows in order, spread over the microbatch, standing for
// n / max_rows rows each, and moving with (step, microbatch) so that no position is never seen.
TEST(LearnerSampleTest, StridedDistinctAndMoving) {
  EXPECT_TRUE(SampleLearnerRows(1024, 1024, 1, 0).all());
  EXPECT_TRUE(SampleLearnerRows(7, 1024, 1, 0).all());
  EXPECT_EQ(SampleLearnerRows(7, 1024, 1, 0).scale, 1.f);
  std::vector<int> seen(8, 0);  // how often each position mod 8 was sampled
  for (uint64_t step = 1; step <= 8; ++step) {
    for (uint32_t mb = 0; mb < 4; ++mb) {
      const LearnerSample s = SampleLearnerRows(4096, 512, step, mb);
      ASSERT_EQ(s.rows.size(), 512u);
      EXPECT_EQ(s.scale, 8.f);
      EXPECT_GE(s.rows.front(), 0);
      EXPECT_LT(s.rows.back(), 4096);
      for (size_t i = 1; i < s.rows.size(); ++i) {
        ASSERT_GT(s.rows[i], s.rows[i - 1]);
        ASSERT_LE(s.rows[i] - s.rows[i - 1], 9);  // spread: no gap wider than the stride + 1
      }
      ++seen[s.rows[0] % 8];
    }
  }
  for (int r = 0; r < 8; ++r) EXPECT_GT(seen[r], 0) << "offset " << r << " never sampled";
}

// With every row of a microbatch the same, a sample of a quarter of them, scaled, gives the
// downstream's learning signal of the whole microbatch.
TEST_F(EngineTest, LearnerSampleOfIdenticalRowsGivesTheWholeSignal) {
  std::vector<float> h(size_t(kN) * Stream::kD);
  std::vector<int32_t> tokens(kN, tokens_[0]);
  for (int i = 0; i < kN; ++i)
    std::copy(h_.begin(), h_.begin() + Stream::kD, h.begin() + i * Stream::kD);
  std::vector<std::vector<float>> signals;
  for (uint32_t rows : {uint32_t{kN}, uint32_t{kN / 4}}) {
    v1::BoundaryConfig c = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16);
    c.set_learner_rows(rows);
    Pair pair(c);
    double err2 = 0, norm2 = 0;
    ASSERT_TRUE(pair.Microbatch(1, 0, h, tokens, &err2, &norm2).ok());
    auto out = pair.down().Step(1);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(out->size(), 1u);
    const std::string& bytes = (*out)[0].learning_signal().g_down();
    signals.emplace_back(bytes.size() / 4);
    std::memcpy(signals.back().data(), bytes.data(), bytes.size());
  }
  double diff = 0, norm = 0;
  for (size_t i = 0; i < signals[0].size(); ++i) {
    diff += std::pow(double{signals[0][i]} - signals[1][i], 2);
    norm += std::pow(double{signals[0][i]}, 2);
  }
  ASSERT_GT(norm, 0.0);
  EXPECT_LT(std::sqrt(diff / norm), 1e-4);
}

// forward_error_budget: codes over the budget travel as int8 (and a step over it refits the
// codebooks, at most every 10 steps), and a busy link gets the fewest levels within it; the
// downstream decodes both.
TEST(ForwardErrorBudgetTest, Int8OverTheBudgetFewestLevelsOnABusyLink) {
  for (float budget : {1e-6f, 10.f}) {
    v1::BoundaryConfig c = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_RVQ);
    c.set_forward_error_budget(budget);
    Pair pair(c);
    Stream stream(3);
    std::vector<float> h;
    std::vector<int32_t> tokens;
    double err2 = 0, norm2 = 0;
    const uint64_t steps = budget < 1.f ? 12 : 2;  // step 1 fits the codebooks
    for (uint64_t step = 1; step <= steps; ++step) {
      pair.up().SetLinkBusy(step > 1);
      for (uint32_t mb = 0; mb < 4; ++mb) {
        stream.Next(256, &h, &tokens);
        const absl::Status s = pair.Microbatch(step, mb, h, tokens, &err2, &norm2);
        ASSERT_TRUE(s.ok()) << budget << ": " << s;
      }
      ASSERT_TRUE(pair.CloseStep(step).ok());
    }
    const v1::BoundaryStats up = pair.up().stats();
    if (budget < 1.f) {
      EXPECT_EQ(up.forward_budget_fallbacks(), 44u);  // every frame after the fit
      EXPECT_EQ(up.forward_rvq_levels(), 0u);
      EXPECT_EQ(up.forward_rvq_levels_mean(), 0.0);  // no RVQ frame in the last step
      EXPECT_EQ(up.rvq_refits(), 1u);                // at step 11
    } else {
      EXPECT_EQ(up.forward_budget_fallbacks(), 0u);
      EXPECT_EQ(up.forward_rvq_levels(), 1u);
      EXPECT_EQ(up.forward_rvq_levels_mean(), 1.0);
      EXPECT_EQ(up.rvq_refits(), 0u);
    }
    EXPECT_EQ(pair.down().stats().frames_rejected(), 0u);
    EXPECT_EQ(up.dictionary_checksum(), pair.down().stats().dictionary_checksum());
  }
  v1::BoundaryConfig c = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_INT8);
  c.set_forward_error_budget(0.1f);
  EXPECT_TRUE(
      absl::StrContains(BoundaryConfigWithDefaults(c).status().message(), "forward_error_budget"));
}

TEST(BoundaryConfigTest, DefaultsAndValidation) {
  v1::BoundaryConfig c;
  c.set_role(v1::ROLE_DOWNSTREAM);
  c.set_d(512);
  c.set_vocab(1000);
  auto full = BoundaryConfigWithDefaults(c, "boundaries[0]");
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->k(), 32u);
  EXPECT_EQ(full->method(), v1::METHOD_MAPL);
  EXPECT_EQ(full->forward_codec(), v1::CODEC_RVQ);
  EXPECT_EQ(full->backward_codec(), v1::CODEC_INT8);
  EXPECT_EQ(full->rvq_levels(), 4u);
  EXPECT_EQ(full->learner_rows(), 1024u);
  EXPECT_EQ(full->anchor_rank(), 16u);
  EXPECT_EQ(full->dictionary_precision(), v1::PRECISION_F32);
  EXPECT_EQ(full->max_tokens(), 4096u);
  EXPECT_EQ(full->projector_init(), v1::PROJECTOR_INIT_RANDOM);
  EXPECT_GT(full->projector_lr(), 0.f);

  c.set_k(600);
  EXPECT_EQ(BoundaryConfigWithDefaults(c, "boundaries[0]").status().message(),
            "boundaries[0].k: must be in [1, d=512], got 600");
  c.set_k(0);
  c.set_vocab(0);
  EXPECT_TRUE(absl::StrContains(BoundaryConfigWithDefaults(c).status().message(), "vocab"));
  c.set_vocab(10);
  c.set_projector_lr(-1.f);
  EXPECT_TRUE(absl::StrContains(BoundaryConfigWithDefaults(c).status().message(), "projector_lr"));
  c.set_projector_lr(0.f);
  c.set_backward_codec(v1::CODEC_RVQ);
  EXPECT_TRUE(
      absl::StrContains(BoundaryConfigWithDefaults(c).status().message(), "backward_codec"));
  c.set_backward_codec(v1::CODEC_UNSPECIFIED);
  c.set_role(v1::ROLE_UNSPECIFIED);
  EXPECT_EQ(BoundaryConfigWithDefaults(c).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SeededOrthonormalTest, DeterministicAndOrthonormal) {
  const std::vector<float> a = SeededOrthonormal(300, 20, 5), b = SeededOrthonormal(300, 20, 5);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, SeededOrthonormal(300, 20, 6));
  for (int i = 0; i < 20; ++i) {
    for (int j = 0; j < 20; ++j) {
      double dot = 0;
      for (int r = 0; r < 300; ++r) dot += double(a[r * 20 + i]) * a[r * 20 + j];
      EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-6);
    }
  }
}

}  // namespace
}  // namespace mapl
