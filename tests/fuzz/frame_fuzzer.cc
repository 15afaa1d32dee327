// frame_fuzzer: one peer message (mapl.v1.PeerMessage, binary) into the receiving engine of the
// fuzzed boundary (fuzz_util.h), the way the boundary worker's decoder hands it over: a forward
// frame to a downstream engine holding a trained dictionary (RVQ codebooks fitted), or a
// backward frame to an upstream engine with the forwards of step 1 pending. A frame that decodes
// then has its gradient encoded (downstream) and its step closed, so that decoded peer values
// reach the learners as they would.
//
// Input: byte 0 picks the config variant (bits 0-2, modulo kNumVariants), the side (bit 3: 1 =
// upstream) and whether the frame's checksum is repaired (bit 4), so that mutated codes, scales
// and token ids get past it; the rest is the PeerMessage. Any status is fine; a crash, a
// sanitizer report, a MAPL_CHECK or an allocation past -malloc_limit_mb is a finding.
#include <cstddef>
#include <cstdint>

#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mapl;
  fuzz::Input in(data, size);
  const uint8_t head = in.Byte();
  const int variant = (head & 7) % fuzz::kNumVariants;
  const bool upstream = (head & 8) != 0;
  const bool repair = (head & 16) != 0;
  const absl::string_view rest = in.Take(size);
  v1::PeerMessage message;
  if (!message.ParseFromArray(rest.data(), static_cast<int>(rest.size()))) return 0;
  fuzz::EngineDriver driver(variant, upstream, /*trained=*/true, repair);
  driver.Deliver(std::move(message));
  if (!upstream) driver.EncodeLocal(0);
  driver.StepNext(0);
  driver.ReadStats();
  return 0;
}
