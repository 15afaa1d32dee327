// dictionary_fuzzer: a DictionaryReplica (server/dictionary.h) that starts from a real owner's
// snapshot and is fed, in the order the input gives, deltas and snapshots parsed from the input,
// the owner's own deltas (after the input moves the owner's learner rows, NaN, Inf and bf16
// overflow included) and the owner's snapshots.
//
// Beyond crashes and sanitizer reports it checks what dictionary.h promises: a replica that is
// in step with its owner applies the owner's delta (through the wire) and ends bit-identical
// (same version and checksum); it always takes the owner's snapshot; and after any error it is
// unchanged.
//
// Input: byte 0: bit 0 a bf16 dictionary (else f32), bit 1 repair the checksums of the input's
// deltas and snapshots (so that their rows get past the checksum into the state). Then
// operations, an op byte each: op % 4 == 0: a DictionaryDelta chunk (16-bit little-endian
// length, bytes); 1: a DictionarySnapshot chunk; 2: the owner moves up to 8 learner rows (table
// op / 4 % 2; per row an index byte and a value byte) and sends a delta within a byte budget
// (16 bits, x 4); 3: the owner's snapshot.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_util.h"

namespace {

using namespace mapl;

constexpr DictionaryId kId{3, v1::DIRECTION_FORWARD};

// A value byte as a learner value: mostly moderate, some NaN, Inf, bf16 overflow and denormals.
float ValueOf(uint8_t b) {
  switch (b) {
    case 0xff:
      return std::numeric_limits<float>::quiet_NaN();
    case 0xfe:
      return std::numeric_limits<float>::infinity();
    case 0xfd:
      return 3.4e38f;  // finite in f32, Inf in bf16
    case 0xfc:
      return std::numeric_limits<float>::denorm_min();
    default:
      return static_cast<float>(static_cast<int8_t>(b)) / 16.f;
  }
}

bool InStep(const DictionaryReplica& replica, const DictionaryOwner& owner) {
  return replica.version() == owner.version() &&
         replica.current()->Checksum() == owner.published()->Checksum();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::Input in(data, size);
  const uint8_t head = in.Byte();
  const v1::Precision precision = (head & 1) ? v1::PRECISION_BF16 : v1::PRECISION_F32;
  const bool repair = (head & 2) != 0;

  DictionaryOwner owner = fuzz::FuzzDictionaryOwner(precision);
  absl::StatusOr<DictionaryReplica> replica_or =
      DictionaryReplica::FromSnapshot(kId, owner.Snapshot());
  FUZZ_EXPECT(replica_or.ok(), "a replica starts from its owner's snapshot");
  DictionaryReplica& replica = *replica_or;

  for (int ops = 0; !in.empty() && ops < 128; ++ops) {
    const uint8_t op = in.Byte();
    const std::shared_ptr<const PublishedDictionary> before = replica.current();
    absl::Status s;
    switch (op % 4) {
      case 0: {
        const absl::string_view bytes = in.Chunk();
        v1::DictionaryDelta delta;
        if (!delta.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) continue;
        if (repair) fuzz::RepairDelta(*replica.current(), &delta);
        s = replica.Apply(delta);
        break;
      }
      case 1: {
        const absl::string_view bytes = in.Chunk();
        v1::DictionarySnapshot snapshot;
        if (!snapshot.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) continue;
        if (repair) fuzz::RepairSnapshot(&snapshot);
        s = replica.Restore(snapshot);
        break;
      }
      case 2: {
        const int table = op / 4 % 2;
        const int64_t rows = owner.spec(table).rows, cols = owner.spec(table).cols;
        const int moved = in.Byte() % 9;
        for (int i = 0; i < moved; ++i) {
          const int64_t row = (int64_t{in.Byte()} * 7) % rows;
          const float v = ValueOf(in.Byte());
          float* dst = owner.mutable_learner(table) + row * cols;
          for (int64_t c = 0; c < cols; ++c) dst[c] += v * static_cast<float>(c + 1) / 8.f;
        }
        const int64_t budget = int64_t{in.U16()} * 4;
        const bool in_step = InStep(replica, owner);
        absl::StatusOr<v1::DictionaryDelta> delta = owner.MakeDelta(budget);
        FUZZ_EXPECT(delta.ok(), "MakeDelta with a budget >= 0");
        v1::DictionaryDelta wire;
        FUZZ_EXPECT(wire.ParseFromString(delta->SerializeAsString()), "a delta parses back");
        s = replica.Apply(wire);
        if (in_step) {
          FUZZ_EXPECT(s.ok(), "a replica in step applies its owner's delta: " + s.ToString());
          FUZZ_EXPECT(InStep(replica, owner), "owner and replica identical after a delta");
        }
        break;
      }
      default: {
        s = replica.Restore(owner.Snapshot());
        FUZZ_EXPECT(s.ok(), "a replica takes its owner's snapshot: " + s.ToString());
        FUZZ_EXPECT(InStep(replica, owner), "owner and replica identical after a snapshot");
      }
    }
    if (!s.ok()) {
      FUZZ_EXPECT(replica.current() == before, "a rejected message leaves the replica unchanged");
    }
    // What a frame in flight asks of the history.
    (void)replica.Find(replica.version());
  }
  return 0;
}
