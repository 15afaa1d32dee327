// Writes the fuzz targets' seed corpora (tests/fuzz/corpus/<target>/) from real messages: the
// engines of each fuzzed boundary variant run on deterministic tensors (fuzz_util.h) and their
// frames, deltas, snapshots and learning signals are recorded in each target's input format.
// The output is deterministic; regenerate after a wire or engine change:
//   build-asan/tests/fuzz/fuzz_corpus_gen tests/fuzz/corpus
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "proto/mapl/v1/local.pb.h"
#include "server/state_store.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using namespace mapl;

std::string root;
int files = 0;

void Write(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = root + "/" + target;
  ::mkdir(dir.c_str(), 0755);
  std::ofstream out(dir + "/" + name, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) fuzz::Fail("cannot write " + dir + "/" + name);
  ++files;
}

std::string Head(int variant, bool upstream, bool repair) {
  return std::string(1, static_cast<char>(variant | (upstream ? 8 : 0) | (repair ? 16 : 0)));
}

void FrameCorpus(int v) {
  const std::string name = fuzz::VariantName(v);
  // Downstream: the trained boundary's next forward frames.
  const std::vector<v1::PeerMessage>& fwd = fuzz::TrainedBoundary(v).next_frames;
  for (size_t i = 0; i < fwd.size(); ++i) {
    Write("frame_fuzzer", absl::StrCat(name, "-forward-", i),
          Head(v, false, i % 2 == 1) + fwd[i].SerializeAsString());
  }
  // Upstream: the backward frames of the forwards UpstreamWithPending leaves pending.
  std::vector<v1::PeerMessage> frames;
  fuzz::UpstreamWithPending(v, &frames);
  fuzz::EngineDriver down(v, /*upstream=*/false, /*trained=*/false, /*repair=*/false);
  for (const v1::PeerMessage& m : frames) down.Deliver(m);
  for (int i = 0; i < 4; ++i) down.EncodeLocal(0);
  for (size_t i = 0; i < down.sent().size(); ++i) {
    Write("frame_fuzzer", absl::StrCat(name, "-backward-", i),
          Head(v, true, i % 2 == 1) + down.sent()[i].SerializeAsString());
  }
}

// One recorded run of both sides (7 steps of 4 microbatches: the RVQ codebooks are fitted and
// published at step 6) as each side's peer_sequence_fuzzer input.
void SequenceCorpus(int v) {
  fuzz::EngineDriver up(v, true, false, false), down(v, false, false, false);
  std::string up_ops = Head(v, true, false), down_ops = Head(v, false, false);
  size_t up_seen = 0, down_seen = 0;
  // Delivers what `from` sent since last time to `to`, recording it in `ops`.
  auto pass = [](fuzz::EngineDriver& from, size_t* seen, fuzz::EngineDriver& to, std::string* ops) {
    for (; *seen < from.sent().size(); ++*seen) {
      const v1::PeerMessage& m = from.sent()[*seen];
      ops->push_back(0);
      fuzz::AppendChunk(m.SerializeAsString(), ops);
      to.Deliver(m);
    }
  };
  for (int step = 1; step <= 7; ++step) {
    for (uint32_t mb = 0; mb < 4; ++mb) {
      up_ops.push_back(static_cast<char>(1 + 4 * mb));
      up.EncodeLocal(mb);
      pass(up, &up_seen, down, &down_ops);
      down_ops.push_back(1);
      down.EncodeLocal(0);
      pass(down, &down_seen, up, &up_ops);
    }
    down_ops.push_back(2);
    down.StepNext(0);
    pass(down, &down_seen, up, &up_ops);
    up_ops.push_back(2);
    up.StepNext(0);
    pass(up, &up_seen, down, &down_ops);
    up_ops.push_back(3);
    down_ops.push_back(3);
    if (step == 2) {  // a short seed too
      Write("peer_sequence_fuzzer", absl::StrCat(fuzz::VariantName(v), "-upstream-2steps"), up_ops);
      Write("peer_sequence_fuzzer", absl::StrCat(fuzz::VariantName(v), "-downstream-2steps"),
            down_ops);
    }
  }
  if (v == fuzz::kDense) return;  // 7 steps of dense frames: the short seed covers it
  Write("peer_sequence_fuzzer", absl::StrCat(fuzz::VariantName(v), "-upstream-7steps"), up_ops);
  // With repaired checksums, so that mutations of the codebooks' delta reach the frames.
  down_ops[0] = static_cast<char>(down_ops[0] | 16);
  Write("peer_sequence_fuzzer", absl::StrCat(fuzz::VariantName(v), "-downstream-7steps"), down_ops);
}

void DictionaryCorpus() {
  for (int head = 0; head < 4; ++head) {
    const v1::Precision precision = (head & 1) ? v1::PRECISION_BF16 : v1::PRECISION_F32;
    // The fuzzer's owner, moved and published here: its delta applies to the fuzzer's replica.
    DictionaryOwner owner = fuzz::FuzzDictionaryOwner(precision);
    for (int r = 0; r < 6; ++r) {
      float* row = owner.mutable_learner(r % 2) + (r * 5) * fuzz::kK;
      for (int c = 0; c < fuzz::kK; ++c) row[c] += 0.25f * (c + 1) * (r % 2 ? -1.f : 1.f);
    }
    absl::StatusOr<v1::DictionaryDelta> delta = owner.MakeDelta(4 * (4 + fuzz::kK * 4));
    if (!delta.ok()) fuzz::Fail("MakeDelta");
    std::string ops(1, static_cast<char>(head));
    ops.push_back(0);
    fuzz::AppendChunk(delta->SerializeAsString(), &ops);
    ops.push_back(1);
    fuzz::AppendChunk(owner.Snapshot().SerializeAsString(), &ops);
    ops += std::string("\x02\x03\x01\x10\x02\x20\x05\x30\x00\x01", 10);  // U: 3 rows moved
    ops += std::string("\x06\x02\x40\x7f\x41\xff\x00\x10", 8);           // rvq: 2 rows, one NaN
    ops.push_back(3);
    ops += std::string("\x02\x01\x09\xfd\xff\xff", 6);  // a bf16 overflow, the whole budget
    Write("dictionary_fuzzer", absl::StrCat("run-", head), ops);
  }
}

void ConfigCorpus() {
  for (const char* stage : {"stage0", "stage1"}) {
    std::ifstream in(std::string(MAPL_SOURCE_DIR) + "/deploy/examples/" + stage + ".textproto");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (text.empty()) fuzz::Fail(std::string("cannot read the example config ") + stage);
    Write("config_fuzzer", stage, text);
    static const char kOverrides[] =
        "\0boundaries[0].k=16\0boundaries[0].forward_codec=CODEC_INT4\0send_rate_mbit=20"
        "\0boundaries[1].d=64\0tls.server_only=true";
    Write("config_fuzzer", absl::StrCat(stage, "-overrides"),
          text + std::string(kOverrides, sizeof(kOverrides) - 1));
  }
  Write("config_fuzzer", "tls",
        "stage: 1 auth_token: \"t\" peer_listen: \"[::1]:7000\"\n"
        "tls { cert_file: \"a\" key_file: \"b\" ca_file: \"c\" }\n"
        "boundaries { id: 0 role: ROLE_DOWNSTREAM d: 64 method: METHOD_DENSE max_tokens: 8 }\n");
  Write("config_fuzzer", "minimal-upstream",
        "auth_token: \"x\" boundaries { role: ROLE_UPSTREAM peer_address: \"h:1\" d: 32 "
        "vocab: 50 forward_error_budget: 0.1 projector_init: PROJECTOR_INIT_PCA }");
}

void TensorRefCorpus() {
  auto ref = [](v1::TensorRef* r, uint32_t buffer, uint64_t offset, uint32_t rows, uint32_t cols,
                v1::DType dtype) {
    r->set_buffer(buffer);
    r->set_offset(offset);
    r->set_rows(rows);
    r->set_cols(cols);
    r->set_dtype(dtype);
  };
  const std::string d32_max64(1, static_cast<char>(1 + 3 * 1));
  v1::SendRequest r;
  ref(r.mutable_tensor(), 0, 0, 64, 32, v1::DTYPE_F32);
  ref(r.mutable_token_ids(), 1, 0, 64, 1, v1::DTYPE_I32);
  Write("tensor_ref_fuzzer", "f32-and-ids", d32_max64 + r.SerializeAsString());
  // A bf16 tensor ending exactly at the buffer's end (3 x 4096 + 100 bytes), ids right behind it.
  ref(r.mutable_tensor(), 2, 3 * 4096 + 100 - 64 * 32 * 2, 64, 32, v1::DTYPE_BF16);
  ref(r.mutable_token_ids(), 2, 4096, 64, 1, v1::DTYPE_I32);
  Write("tensor_ref_fuzzer", "bf16-at-end", d32_max64 + r.SerializeAsString());
  ref(r.mutable_tensor(), 1, 6, 1, 4096, v1::DTYPE_F32);  // misaligned, d = 4096
  ref(r.mutable_token_ids(), 3, 0, 1, 1, v1::DTYPE_I32);  // no such buffer
  Write("tensor_ref_fuzzer", "bad", std::string(1, 2 + 3 * 2) + r.SerializeAsString());
}

}  // namespace

// Checkpoints of both sides of each variant: as files, and as states for the harness to wrap.
void StateCorpus(int v) {
  const std::string name = fuzz::VariantName(v);
  for (const bool upstream : {true, false}) {
    const v1::BoundaryState state = upstream ? fuzz::UpstreamWithPending(v, nullptr)->SaveState()
                                             : fuzz::TrainedDownstream(v)->SaveState();
    absl::StatusOr<std::string> file = SerializeStateFile(state);
    if (!file.ok()) fuzz::Fail("cannot serialize a state: " + std::string(file.status().message()));
    const std::string side = upstream ? "-up" : "-down";
    const int head = v + fuzz::kNumVariants * (upstream ? 1 : 0);
    Write("state_fuzzer", name + side + "-file", std::string(1, static_cast<char>(head)) + *file);
    Write("state_fuzzer", name + side + "-state",
          std::string(1, static_cast<char>(head + 2 * fuzz::kNumVariants)) +
              state.SerializeAsString());
  }
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR (tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  root = argv[1];
  ::mkdir(root.c_str(), 0755);
  for (int v = 0; v < fuzz::kNumVariants; ++v) {
    FrameCorpus(v);
    SequenceCorpus(v);
    StateCorpus(v);
  }
  DictionaryCorpus();
  ConfigCorpus();
  TensorRefCorpus();
  std::printf("wrote %d files under %s\n", files, root.c_str());
  return 0;
}
