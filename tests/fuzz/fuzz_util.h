// Shared parts of the fuzz targets (tests/fuzz/README.md): the small boundary configs they run,
// a reader of the fuzzer's bytes, deterministic tensors, the checksum repairs that let mutated
// messages past their checksums into the decoding behind them, and the engine driver that feeds
// peer messages to an engine the way the boundary worker's decoder thread does.
//
// Everything here is deterministic in the input: libFuzzer must be able to replay a crash.
#ifndef MAPL_TESTS_FUZZ_FUZZ_UTIL_H_
#define MAPL_TESTS_FUZZ_FUZZ_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#include "proto/mapl/v1/config.pb.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/dictionary.h"
#include "server/downstream_engine.h"
#include "server/engine.h"
#include "server/upstream_engine.h"

namespace mapl {
namespace fuzz {

// A MAPL_CHECK-like stop for a property a fuzzer checks (its own oracle): prints and aborts, so
// libFuzzer records the input.
[[noreturn]] void Fail(const std::string& what);
#define FUZZ_EXPECT(cond, what)            \
  do {                                     \
    if (!(cond)) ::mapl::fuzz::Fail(what); \
  } while (0)

// The fuzzed boundary: d = 32, k = 8, vocab = 50, max_tokens = 64, rvq_levels = 2 (small
// dictionary messages, and frames that may carry fewer levels than the codebooks have).
inline constexpr int kD = 32, kK = 8, kVocab = 50, kMaxTokens = 64, kRvqLevels = 2;

// The variants of that boundary a fuzz input picks with one byte (modulo kNumVariants).
enum Variant : int {
  kDense = 0,       // METHOD_DENSE: dense bf16 both ways
  kMaplRvq,         // METHOD_MAPL, forward CODEC_RVQ (bf16 before the fit, int8 over a budget)
  kMaplInt8,        // METHOD_MAPL, forward CODEC_INT8, backward CODEC_INT4
  kMaplInt4,        // METHOD_MAPL, forward CODEC_INT4, backward CODEC_BF16
  kMaplBf16,        // METHOD_MAPL, forward CODEC_BF16, a bf16 dictionary
  kFixedRvqBudget,  // METHOD_FIXED, forward CODEC_RVQ with forward_error_budget
  kNumVariants,
};
const char* VariantName(int variant);

// The variant's config for `role`, defaults filled in (BoundaryConfigWithDefaults).
v1::BoundaryConfig BoundaryFor(int variant, v1::Role role);

// The CPU backend, made once.
const Backend& CpuBackend();

// Reads a fuzz input front to back; past the end every read yields zeros / empty.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return pos_ >= size_; }
  uint8_t Byte();
  uint16_t U16();
  // The next `n` bytes (fewer at the end).
  absl::string_view Take(size_t n);
  // A length-prefixed chunk: a 16-bit little-endian length, then that many bytes.
  absl::string_view Chunk() { return Take(U16()); }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Appends a Chunk() encoding of `bytes` (at most 65535 of them) to `out`.
void AppendChunk(absl::string_view bytes, std::string* out);

// A deterministic pseudo-random tensor (rows, kD) f32 in about [-1, 1], from (seed, step,
// microbatch), and its token ids below kVocab: what the "local" side of a fuzzed engine sends.
std::vector<float> TensorOf(uint64_t seed, uint64_t step, uint32_t microbatch, int64_t rows);
std::vector<int32_t> TokensOf(uint64_t step, uint32_t microbatch, int64_t rows);
// The rows of the local forward of microbatch `mb`: 64, 48, 64, 17, ... (full and partial).
int64_t RowsOf(uint32_t microbatch);

// ---- checksum repair ----
// A mutated message nearly always fails its checksum, which is checked after the sizes and
// before the decoding: the fuzzers repair it when the input asks, so that the decoding of
// mutated values (codes, scales, token ids, dictionary rows) is searched too.

// Sets a frame's checksum to what its data hashes to.
void RepairFrame(v1::Frame* frame);
// Sets a snapshot's checksum to that of the state it carries, if that state is well formed
// (otherwise leaves it: the receiver rejects it before the checksum anyway).
void RepairSnapshot(v1::DictionarySnapshot* snapshot);
// Sets a delta's checksum to that of `base` with the delta applied, if it applies.
void RepairDelta(const PublishedDictionary& base, v1::DictionaryDelta* delta);

// ---- the engine driver ----

// One side of the fuzzed boundary fed as the boundary worker feeds it: peer frames decoded into
// an output of the frame's rows (after the worker's own direction and max_tokens checks), every
// other sequenced message handed to Handle, step markers ignored (advisory); plus what the
// side's own trainer does (Encode of a local tensor, Step), and the stats a scrape reads.
// It keeps a shadow replica of the downstream's dictionary, fed the same messages, to repair
// delta checksums against.
class EngineDriver {
 public:
  // `upstream`: drive the upstream engine (it receives backward frames, learning signals and
  // snapshot requests), else the downstream one. `trained`: start the downstream from the
  // dictionary of a boundary trained for a few steps (RVQ codebooks fitted) and the upstream
  // with forwards of step 1 pending; else start both fresh.
  EngineDriver(int variant, bool upstream, bool trained, bool repair_checksums);

  Engine& engine() { return *engine_; }

  // A message from the peer (any body; the link's own Hello/Ack/Heartbeat never reach here in
  // the daemon, and are dropped the same way).
  void Deliver(v1::PeerMessage message);
  // The local trainer sends a tensor: upstream a forward of the open step's microbatch `arg`,
  // downstream the gradient of the `arg`-th decoded forward still pending.
  void EncodeLocal(uint32_t arg);
  // Closes the step after the last one closed, plus `skip` (FAILED_PRECONDITION is fine).
  void StepNext(uint32_t skip);
  // Reads the stats as a scrape does.
  void ReadStats();

  // Every message the engine returned (what the worker would ship), for the corpus generator.
  const std::vector<v1::PeerMessage>& sent() const { return sent_; }

 private:
  void Ship(std::vector<v1::PeerMessage> messages);

  const int variant_;
  const bool upstream_;
  const bool repair_;
  v1::BoundaryConfig config_;
  std::unique_ptr<Engine> engine_;
  std::optional<DictionaryReplica> shadow_;
  // Decoded forwards not yet answered (downstream): key -> rows.
  std::map<std::pair<uint64_t, uint32_t>, int64_t> decoded_;
  uint64_t next_step_ = 1;
  std::vector<v1::PeerMessage> sent_;
};

// ---- the trained boundary ----

// What a boundary of `variant` trained for 7 steps on TensorOf tensors leaves: the upstream's
// last published dictionary (RVQ codebooks fitted), as a snapshot (empty for METHOD_DENSE), and
// the forward frames of step 8 (microbatches 0..3) it encodes with it.
struct Trained {
  v1::DictionarySnapshot snapshot;
  std::vector<v1::PeerMessage> next_frames;
};
const Trained& TrainedBoundary(int variant);

// A downstream engine of `variant` holding the trained dictionary.
std::unique_ptr<DownstreamEngine> TrainedDownstream(int variant);
// An upstream engine of `variant` (fresh dictionary) with the forwards of step 1, microbatches
// 0..3 (RowsOf rows, TensorOf values) encoded and pending; their frames in *frames if given.
std::unique_ptr<UpstreamEngine> UpstreamWithPending(int variant,
                                                    std::vector<v1::PeerMessage>* frames);

// The dictionary_fuzzer's owner: boundary 3 forward, tables "U" (kD x kK) and "rvq" (512 x kK),
// deterministic values, in `precision`.
DictionaryOwner FuzzDictionaryOwner(v1::Precision precision);

}  // namespace fuzz
}  // namespace mapl

#endif  // MAPL_TESTS_FUZZ_FUZZ_UTIL_H_
