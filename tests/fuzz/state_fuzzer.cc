// state_fuzzer: a checkpoint file (server/state_store.h) read back and restored into a fresh
// engine of the fuzzed boundary, as mapld does at start, then used: the upstream encodes a
// forward and closes a step, the downstream decodes the trained boundary's next frame.
//
// Beyond crashes and sanitizer reports it checks what engine.h promises: a state the engine
// refuses leaves it unchanged, and a state it takes saves back to one that a second fresh engine
// takes and saves identically (a restore loses nothing a checkpoint holds).
//
// Input: byte 0: variant (modulo fuzz::kNumVariants), then bit 0 of byte0 / kNumVariants: the
// upstream's side (else the downstream's), bit 1: the rest is a serialized BoundaryState that
// the harness wraps in a valid StateFile (format, checksum), so that mutated tables get past the
// checksum; without it the rest is the file's bytes as they are.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "server/state_store.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using namespace mapl;

// An engine's state without what differs between two saves (the time it was taken).
std::string Learned(const Engine& engine) {
  v1::BoundaryState state = engine.SaveState();
  state.clear_unix_micros();
  return state.SerializeAsString();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Mutated table names are invalid UTF-8, which protobuf logs at every parse: noise here.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in(data, size);
  const uint8_t head = in.Byte();
  const int variant = head % fuzz::kNumVariants;
  const int flags = head / fuzz::kNumVariants;
  const bool upstream = (flags & 1) != 0;
  const bool wrap = (flags & 2) != 0;
  const absl::string_view rest = in.Take(size);

  std::string file(rest);
  if (wrap) {
    v1::BoundaryState state;
    if (!state.ParseFromArray(rest.data(), static_cast<int>(rest.size()))) return 0;
    absl::StatusOr<std::string> bytes = SerializeStateFile(state);
    if (!bytes.ok()) return 0;
    file = *std::move(bytes);
  }
  const v1::BoundaryConfig config =
      fuzz::BoundaryFor(variant, upstream ? v1::ROLE_UPSTREAM : v1::ROLE_DOWNSTREAM);
  absl::StatusOr<v1::BoundaryState> state = ParseStateFile(file, "fuzz", config.id());
  if (!state.ok()) return 0;
  if (!CheckStateFitsConfig(*state, config, "fuzz").ok()) return 0;

  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(config, &fuzz::CpuBackend());
  FUZZ_EXPECT(engine.ok(), "the fuzzed boundary's engine is created");
  const std::string before = Learned(**engine);
  if (!(*engine)->RestoreState(*state).ok()) {
    FUZZ_EXPECT(Learned(**engine) == before, "a refused state leaves the engine unchanged");
    return 0;
  }
  absl::StatusOr<std::unique_ptr<Engine>> again = Engine::Create(config, &fuzz::CpuBackend());
  FUZZ_EXPECT(again.ok(), "the fuzzed boundary's engine is created");
  FUZZ_EXPECT((*again)->RestoreState((*engine)->SaveState()).ok(),
              "an engine takes the state a restored engine saves");
  FUZZ_EXPECT(Learned(**again) == Learned(**engine), "a restore keeps all of a saved state");

  // Use it: what a restored daemon does first.
  Engine& e = **engine;
  std::vector<v1::PeerMessage> replies;
  if (upstream) {
    const int64_t rows = fuzz::RowsOf(0);
    const std::vector<float> h = fuzz::TensorOf(1, 1, 0, rows);
    const std::vector<int32_t> tokens = fuzz::TokensOf(1, 0, rows);
    (void)e.Encode(1, 0, ConstTensor::F32(h.data(), rows, fuzz::kD), tokens.data(),
                   Engine::FiniteCheck::kCheck);
  } else {
    // The upstream's dictionary arrives whole, then a frame decodes with the restored anchors.
    const fuzz::Trained& trained = fuzz::TrainedBoundary(variant);
    if (trained.snapshot.tables_size() > 0) {
      v1::PeerMessage m;
      *m.mutable_dictionary_snapshot() = trained.snapshot;
      (void)e.Handle(m, &replies);
    }
    for (const v1::PeerMessage& m : trained.next_frames) {
      if (!m.has_frame()) continue;
      const int64_t rows = m.frame().tokens();
      if (rows <= 0 || rows > fuzz::kMaxTokens) break;
      std::vector<float> out(static_cast<size_t>(rows) * fuzz::kD);
      (void)e.Decode(m.frame(), Tensor::F32(out.data(), rows, fuzz::kD), &replies);
      break;
    }
  }
  (void)e.Step(1);
  (void)e.stats();
  return 0;
}
