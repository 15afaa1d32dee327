// Tests for checkpoints of a boundary's learned state (server/state_store.h, Engine::SaveState and
// RestoreState): a pair restored from files continues exactly as the pair that wrote them, and a
// file that is damaged, of another format, or written under another config is refused with a
// message that names the file and what differs.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "server/state_store.h"
#include "tests/server/engine_pair.h"

namespace mapl {
namespace {

using testing_internal::Config;
using testing_internal::Pair;
using testing_internal::Stream;

constexpr int kN = 64;

class StateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/mapl-state-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }

  // Trains `pair` for steps [first, last], `mbs` microbatches each, on `stream`.
  static void Train(Pair& pair, Stream& stream, uint64_t first, uint64_t last, int mbs) {
    std::vector<float> h;
    std::vector<int32_t> tokens;
    double err2 = 0, norm2 = 0;
    for (uint64_t step = first; step <= last; ++step) {
      for (int mb = 0; mb < mbs; ++mb) {
        stream.Next(kN, &h, &tokens);
        ASSERT_TRUE(pair.Microbatch(step, mb, h, tokens, &err2, &norm2).ok());
      }
      ASSERT_TRUE(pair.CloseStep(step).ok());
    }
  }

  // Writes both sides' states of `pair` to dir_ and reads them back through the files.
  void SaveAndLoad(Pair& pair, v1::BoundaryState* up, v1::BoundaryState* down) {
    // One directory a side, as two daemons have.
    for (const char* side : {"/up", "/down"}) ASSERT_TRUE(PrepareStateDir(dir_ + side).ok());
    ASSERT_TRUE(WriteStateFile(dir_ + "/up", pair.up().SaveState()).ok());
    ASSERT_TRUE(WriteStateFile(dir_ + "/down", pair.down().SaveState()).ok());
    auto read_up = ReadStateFile(dir_ + "/up", 7);
    auto read_down = ReadStateFile(dir_ + "/down", 7);
    ASSERT_TRUE(read_up.ok()) << read_up.status();
    ASSERT_TRUE(read_down.ok()) << read_down.status();
    ASSERT_TRUE(read_up->has_value() && read_down->has_value());
    ASSERT_TRUE(CheckStateFitsConfig(**read_up, pair.up().config(), "up").ok());
    ASSERT_TRUE(CheckStateFitsConfig(**read_down, pair.down().config(), "down").ok());
    *up = **read_up;
    *down = **read_down;
  }

  // An engine's state without what differs by design (when it was taken, the last step).
  static std::string Learned(const Engine& engine) {
    v1::BoundaryState state = engine.SaveState();
    state.clear_unix_micros();
    state.clear_last_step();
    return state.SerializeAsString();
  }

  std::string dir_;
};

// The pair that wrote the checkpoint and a new pair restored from it see the same data after it:
// every forward frame, every dictionary checksum and every decoded tensor is the same bit for bit
// (the projector, its momentum and step count, the fitted RVQ codebooks with their streaming
// statistics, and the anchors all came back). A fresh pair differs at once.
TEST_F(StateTest, RestoredPairContinuesExactlyAsTheOriginal) {
  const v1::BoundaryConfig config = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_RVQ);
  Pair original(config);
  Stream stream(11);
  // 4 x 64 rows a step: the codebooks are fitted after step 4 (1024 rows).
  Train(original, stream, 1, 6, 4);
  ASSERT_GT(original.up().stats().dictionary_version(), 1u);

  v1::BoundaryState up, down;
  SaveAndLoad(original, &up, &down);
  EXPECT_TRUE(up.has_published() && up.has_projector() && up.has_codebooks());
  EXPECT_EQ(up.last_step(), 6u);
  EXPECT_TRUE(down.has_anchors());
  EXPECT_GT(down.anchors().adam_steps(), 0);

  Pair restored(config);
  ASSERT_TRUE(restored.up().RestoreState(up).ok());
  ASSERT_TRUE(restored.down().RestoreState(down).ok());
  EXPECT_EQ(restored.up().stats().dictionary_checksum(),
            original.up().stats().dictionary_checksum());
  Pair fresh(config);

  Stream twin_a(12), twin_b(12), twin_c(12);
  std::vector<float> h, h_hat_a(kN * Stream::kD), h_hat_b(kN * Stream::kD);
  std::vector<int32_t> tokens;
  for (uint64_t step = 7; step <= 9; ++step) {
    for (int mb = 0; mb < 2; ++mb) {
      twin_a.Next(kN, &h, &tokens);
      twin_b.Next(kN, &h, &tokens);
      twin_c.Next(kN, &h, &tokens);
      const ConstTensor ht = ConstTensor::F32(h.data(), kN, Stream::kD);
      auto a = original.up().EncodeForward(step, mb, ht, tokens.data());
      auto b = restored.up().EncodeForward(step, mb, ht, tokens.data());
      auto c = fresh.up().EncodeForward(step, mb, ht, tokens.data());
      ASSERT_TRUE(a.ok() && b.ok() && c.ok());
      // The restored upstream sends its whole dictionary ahead of its first frame.
      ASSERT_EQ(b->size(), step == 7 && mb == 0 ? 2u : 1u);
      if (b->size() == 2) {
        ASSERT_TRUE(b->at(0).has_dictionary_snapshot());
      }
      const v1::Frame& fa = a->back().frame();
      const v1::Frame& fb = b->back().frame();
      EXPECT_EQ(fa.SerializeAsString(), fb.SerializeAsString()) << "step " << step << " mb " << mb;
      EXPECT_NE(fa.SerializeAsString(), c->back().frame().SerializeAsString());
      EXPECT_EQ(fb.codec(), v1::CODEC_RVQ);

      std::vector<v1::Frame> frames_a, frames_b, frames_c;
      ASSERT_TRUE(original.ToDownstream(*a, &frames_a).ok());
      ASSERT_TRUE(restored.ToDownstream(*b, &frames_b).ok());
      ASSERT_TRUE(fresh.ToDownstream(*c, &frames_c).ok());
      ASSERT_TRUE(
          original.down().DecodeForward(fa, Tensor::F32(h_hat_a.data(), kN, Stream::kD)).ok());
      ASSERT_TRUE(
          restored.down().DecodeForward(fb, Tensor::F32(h_hat_b.data(), kN, Stream::kD)).ok());
      EXPECT_EQ(h_hat_a, h_hat_b);
      // The backward: the same gradient on both pairs.
      std::vector<float> g(kN * Stream::kD), dh(kN * Stream::kD);
      for (size_t i = 0; i < g.size(); ++i) g[i] = h_hat_a[i] - h[i];
      const ConstTensor gt = ConstTensor::F32(g.data(), kN, Stream::kD);
      for (Pair* p : {&original, &restored}) {
        auto back = p->down().EncodeBackward(step, mb, gt);
        ASSERT_TRUE(back.ok()) << back.status();
        ASSERT_TRUE(
            p->up().DecodeBackward(back->frame(), Tensor::F32(dh.data(), kN, Stream::kD)).ok());
      }
      std::vector<float> h_hat_c(kN * Stream::kD);
      ASSERT_TRUE(fresh.down()
                      .DecodeForward(c->back().frame(), Tensor::F32(h_hat_c.data(), kN, Stream::kD))
                      .ok());
      std::vector<float> gc(kN * Stream::kD);
      for (size_t i = 0; i < gc.size(); ++i) gc[i] = h_hat_c[i] - h[i];
      auto back_c =
          fresh.down().EncodeBackward(step, mb, ConstTensor::F32(gc.data(), kN, Stream::kD));
      ASSERT_TRUE(back_c.ok());
      ASSERT_TRUE(
          fresh.up().DecodeBackward(back_c->frame(), Tensor::F32(dh.data(), kN, Stream::kD)).ok());
    }
    ASSERT_TRUE(original.CloseStep(step).ok());
    ASSERT_TRUE(restored.CloseStep(step).ok());
    ASSERT_TRUE(fresh.CloseStep(step).ok());
    EXPECT_EQ(original.up().stats().projector_lr(), restored.up().stats().projector_lr());
    // The whole learned state, learners' tables and optimizer moments included, is the same.
    EXPECT_EQ(Learned(original.up()), Learned(restored.up())) << "step " << step;
    EXPECT_EQ(Learned(original.down()), Learned(restored.down())) << "step " << step;
    EXPECT_EQ(original.up().stats().dictionary_version(),
              restored.up().stats().dictionary_version());
    EXPECT_EQ(original.up().stats().dictionary_checksum(),
              restored.up().stats().dictionary_checksum());
    EXPECT_EQ(restored.down().stats().dictionary_checksum(),
              restored.up().stats().dictionary_checksum());
  }
}

TEST_F(StateTest, MissingFileIsAFreshStart) {
  ASSERT_TRUE(PrepareStateDir(dir_).ok());
  auto read = ReadStateFile(dir_, 3);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_FALSE(read->has_value());
}

TEST_F(StateTest, DamagedOrForeignFilesAreRefusedNamingTheFile) {
  const v1::BoundaryConfig config = Config(v1::ROLE_UPSTREAM, v1::METHOD_MAPL, v1::CODEC_BF16);
  Pair pair(config);
  Stream stream(5);
  Train(pair, stream, 1, 2, 1);
  int64_t bytes = 0;
  auto path = WriteStateFile(dir_, pair.up().SaveState(), &bytes);
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, StateFilePath(dir_, 7));
  EXPECT_GT(bytes, 512 * 32 * 4);  // at least the learner U
  // Only the final file remains: the temporary one was renamed over it.
  EXPECT_NE(::access(path->c_str(), R_OK), -1);
  EXPECT_EQ(::access((*path + ".tmp").c_str(), F_OK), -1);

  // Another config: each fingerprint field is named.
  v1::BoundaryConfig other = pair.up().config();
  other.set_k(16);
  auto state = ReadStateFile(dir_, 7);
  ASSERT_TRUE(state.ok() && state->has_value());
  absl::Status s = CheckStateFitsConfig(**state, other, *path);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(s.message(), "k = 32 there, 16 in this config")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), *path)) << s;
  other = pair.up().config();
  other.set_role(v1::ROLE_DOWNSTREAM);
  s = CheckStateFitsConfig(**state, other, *path);
  EXPECT_TRUE(absl::StrContains(s.message(), "written by the upstream side")) << s;

  // A restore into an engine in use, and a state whose table does not fit, change nothing.
  v1::BoundaryState bad = **state;
  bad.mutable_learner(0)->mutable_values()->RemoveLast();
  Pair target(config);
  const uint64_t checksum = target.up().stats().dictionary_checksum();
  s = target.up().RestoreState(bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(target.up().stats().dictionary_checksum(), checksum);
  bad = **state;
  bad.mutable_projector()->set_momentum(0, std::nanf(""));
  EXPECT_EQ(target.up().RestoreState(bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pair.up().RestoreState(**state).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(target.down().RestoreState(**state).code(), absl::StatusCode::kInvalidArgument);

  // One flipped byte anywhere: refused as damaged, never half-used.
  std::string contents;
  {
    std::ifstream in(*path, std::ios::binary);
    contents.assign(std::istreambuf_iterator<char>(in), {});
  }
  for (size_t at : {contents.size() / 2, contents.size() - 3}) {
    std::string flipped = contents;
    flipped[at] ^= 0x10;
    std::ofstream(*path, std::ios::binary | std::ios::trunc) << flipped;
    auto read = ReadStateFile(dir_, 7);
    EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss) << "byte " << at;
    EXPECT_TRUE(absl::StrContains(read.status().message(), "damaged")) << read.status();
  }
  std::ofstream(*path, std::ios::binary | std::ios::trunc) << contents.substr(0, 100);
  EXPECT_EQ(ReadStateFile(dir_, 7).status().code(), absl::StatusCode::kDataLoss);

  // Another format.
  v1::StateFile file;
  ASSERT_TRUE(file.ParseFromString(contents));
  file.set_format(kStateFormat + 1);
  std::ofstream(*path, std::ios::binary | std::ios::trunc) << file.SerializeAsString();
  auto read = ReadStateFile(dir_, 7);
  EXPECT_EQ(read.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(read.status().message(), "format 2")) << read.status();
}

}  // namespace
}  // namespace mapl
