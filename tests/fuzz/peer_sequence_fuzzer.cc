// peer_sequence_fuzzer: a sequence of peer messages fed to one engine of the fuzzed boundary
// (fuzz_util.h) in order, as the boundary worker's decoder thread feeds them (frames,
// dictionary deltas and snapshots, snapshot requests, learning signals, step markers),
// interleaved with what the side's own trainer does (Send: Encode of a local tensor; Step) and
// with stats reads. The engine starts fresh (dictionary version 0), so the corpus carries a whole
// run: the codebooks' publication, deltas, frames of every codec.
//
// Input: byte 0 picks the variant (bits 0-2), the side (bit 3: 1 = upstream), checksum repair
// (bit 4: frames, and deltas and snapshots against a shadow replica fed the same messages);
// then operations, each an op byte: op % 4 == 0: a PeerMessage follows as a chunk (16-bit
// little-endian length, bytes); 1: local encode (argument op / 4); 2: Step (the next step plus
// op / 4 % 4); 3: read the stats.
#include <cstddef>
#include <cstdint>

#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mapl;
  fuzz::Input in(data, size);
  const uint8_t head = in.Byte();
  const int variant = (head & 7) % fuzz::kNumVariants;
  fuzz::EngineDriver driver(variant, (head & 8) != 0, /*trained=*/false, (head & 16) != 0);
  // Bounds the work of one input (each op costs at most a decode or a step).
  for (int ops = 0; !in.empty() && ops < 256; ++ops) {
    const uint8_t op = in.Byte();
    switch (op % 4) {
      case 0: {
        const absl::string_view bytes = in.Chunk();
        v1::PeerMessage message;
        if (message.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
          driver.Deliver(std::move(message));
        }
        break;
      }
      case 1:
        driver.EncodeLocal(op / 4);
        break;
      case 2:
        driver.StepNext(op / 4 % 4);
        break;
      default:
        driver.ReadStats();
    }
  }
  return 0;
}
