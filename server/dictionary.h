// The dictionary of one boundary direction (docs/METHOD.md section 3): the float tables a decoder
// needs besides the codes (U, RVQ codebooks), and their synchronization from the owner to the
// decoder through versioned, checksummed deltas under a byte budget.
//
//   // Both sides start from the same version 0 (e.g. from a shared seed).
//   std::vector<mapl::DictionaryTableSpec> specs = {{"U", d, k}, {"rvq", L * 256, k}};
//   mapl::DictionaryId id{/*boundary=*/0, mapl::v1::DIRECTION_FORWARD};
//   MAPL_ASSIGN_OR_RETURN(mapl::DictionaryOwner owner,
//                         mapl::DictionaryOwner::Create(id, specs, init,
//                         mapl::v1::PRECISION_BF16));
//   MAPL_ASSIGN_OR_RETURN(mapl::PublishedDictionary v0, mapl::PublishedDictionary::Create(
//                             specs, init, mapl::v1::PRECISION_BF16, /*version=*/0));
//   MAPL_ASSIGN_OR_RETURN(mapl::DictionaryReplica replica,
//                         mapl::DictionaryReplica::Create(id, std::move(v0)));
//
//   // Owner, each optimizer step: learn into the learner copy, then publish what the budget
//   allows. float* u = owner.mutable_learner(0);  // d x k, row-major
//   MAPL_ASSIGN_OR_RETURN(mapl::v1::DictionaryDelta delta, owner.MakeDelta(/*byte_budget=*/4096));
//   // ... send delta in-band; encode with owner.published() ...
//
//   // Decoder: apply, then decode each frame with the version it names.
//   MAPL_RETURN_IF_ERROR(replica.Apply(delta));  // on error: ask for a snapshot, then Restore()
//   std::shared_ptr<const mapl::PublishedDictionary> dict = replica.Find(frame.dict_version());
//
// Published states are immutable and shared: an encoder or decoder holding a
// shared_ptr<const PublishedDictionary> keeps using it safely while newer versions are published.
// The owner and replica classes themselves are not thread-safe; their user serializes calls.
#ifndef MAPL_SERVER_DICTIONARY_H_
#define MAPL_SERVER_DICTIONARY_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/tensor.h"
#include "proto/mapl/v1/peer.pb.h"

namespace mapl {

// Shape of one named table: rows x cols float32, row-major. Rows are the unit of publishing.
struct DictionaryTableSpec {
  std::string name;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Which dictionary: one per boundary and direction. Deltas and snapshots for another are rejected.
struct DictionaryId {
  uint32_t boundary = 0;
  v1::Direction direction = v1::DIRECTION_FORWARD;
};

// Bytes one element takes on the wire in `precision` (4 or 2); 0 for an invalid precision.
int64_t PrecisionBytes(v1::Precision precision);

// The published state of a dictionary at one version: immutable once built, bit-identical on the
// owner and on every replica at the same version.
class PublishedDictionary {
 public:
  // Tables shaped by `specs` holding `values` (one vector of rows * cols per table; an empty
  // `values` means all zeros) rounded to `precision`. INVALID_ARGUMENT on bad specs (no tables,
  // empty or duplicate names, non-positive or oversized shapes), wrong value sizes, or values that
  // are not finite after rounding.
  static absl::StatusOr<PublishedDictionary> Create(std::vector<DictionaryTableSpec> specs,
                                                    const std::vector<std::vector<float>>& values,
                                                    v1::Precision precision, uint64_t version);

  // Decodes and checks an untrusted snapshot: INVALID_ARGUMENT for bad shapes, sizes, precisions
  // or non-finite values; DATA_LOSS when the checksum does not match.
  static absl::StatusOr<PublishedDictionary> FromSnapshot(const v1::DictionarySnapshot& snapshot);

  uint64_t version() const { return version_; }
  // XXH3-64 of the state as defined in peer.proto (version, table names and shapes, values).
  uint64_t Checksum() const { return checksum_; }

  int num_tables() const { return static_cast<int>(specs_->size()); }
  const std::vector<DictionaryTableSpec>& specs() const { return *specs_; }
  const DictionaryTableSpec& spec(int table) const { return (*specs_)[table]; }
  // Index of the table named `name`, or -1.
  int FindTable(absl::string_view name) const;
  // Table `table`: spec(table).rows x spec(table).cols float32, row-major.
  const float* table(int table) const { return data_[table].data(); }
  ConstTensor tensor(int table) const {
    return ConstTensor::F32(data_[table].data(), spec(table).rows, spec(table).cols);
  }

  // The whole state as a snapshot. Each table travels in bf16 when that is lossless for all of its
  // values, else in f32.
  v1::DictionarySnapshot ToSnapshot(const DictionaryId& id) const;

 private:
  friend class DictionaryOwner;
  friend class DictionaryReplica;

  PublishedDictionary() = default;
  void UpdateChecksum();

  // Shared between versions: shapes never change.
  std::shared_ptr<const std::vector<DictionaryTableSpec>> specs_;
  std::vector<std::vector<float>> data_;
  uint64_t version_ = 0;
  uint64_t checksum_ = 0;
};

// The last few published versions, newest last, for frames still in flight.
class DictionaryHistory {
 public:
  explicit DictionaryHistory(int capacity) : capacity_(capacity) {}

  // Makes `dict` the newest version, dropping the oldest beyond capacity.
  void Push(std::shared_ptr<const PublishedDictionary> dict);
  // Drops everything, then holds only `dict`.
  void Reset(std::shared_ptr<const PublishedDictionary> dict);
  const std::shared_ptr<const PublishedDictionary>& newest() const { return versions_.back(); }
  // The kept version `version`, or nullptr.
  std::shared_ptr<const PublishedDictionary> Find(uint64_t version) const;
  int capacity() const { return capacity_; }

 private:
  int capacity_;
  std::deque<std::shared_ptr<const PublishedDictionary>> versions_;
};

// Default number of versions a history keeps, the current one included.
inline constexpr int kDefaultDictionaryHistory = 4;

// The owner's side: a learner copy that training writes into, and the published copy that encoders
// use and that MakeDelta() moves towards the learner under a byte budget.
class DictionaryOwner {
 public:
  // The learner starts at `initial` (one vector of rows * cols per table; empty: zeros) and
  // version 0 is `initial` rounded to `precision`, the element type of every published row.
  // `history` (>= 1) versions are kept for decoding frames encoded with older ones.
  static absl::StatusOr<DictionaryOwner> Create(const DictionaryId& id,
                                                std::vector<DictionaryTableSpec> specs,
                                                std::vector<std::vector<float>> initial,
                                                v1::Precision precision,
                                                int history = kDefaultDictionaryHistory);

  // An owner as a checkpoint kept it: `published` (checked like a snapshot from a peer, and
  // against `specs`) is the current published version, `learner` the learner copy of each table.
  // INVALID_ARGUMENT or DATA_LOSS (checksum) for a state that does not fit.
  static absl::StatusOr<DictionaryOwner> Restore(const DictionaryId& id,
                                                 const std::vector<DictionaryTableSpec>& specs,
                                                 const v1::DictionarySnapshot& published,
                                                 std::vector<std::vector<float>> learner,
                                                 v1::Precision precision,
                                                 int history = kDefaultDictionaryHistory);

  const DictionaryId& id() const { return id_; }
  v1::Precision precision() const { return precision_; }
  int num_tables() const { return published()->num_tables(); }
  const DictionaryTableSpec& spec(int table) const { return published()->spec(table); }

  // The learner copy of `table`: rows x cols float32, row-major. Write freely; NaN or Inf rows are
  // never published.
  float* mutable_learner(int table) { return learner_[table].data(); }
  const float* learner(int table) const { return learner_[table].data(); }

  // The current published state; encoders use this, never the learner.
  const std::shared_ptr<const PublishedDictionary>& published() const { return history_.newest(); }
  uint64_t version() const { return published()->version(); }
  // A kept published version, or nullptr (e.g. to decode backward frames projected with it).
  std::shared_ptr<const PublishedDictionary> Find(uint64_t version) const {
    return history_.Find(version);
  }

  // Bytes one row of `table` costs against the budget: a 4-byte index plus cols elements.
  int64_t RowBytes(int table) const;

  // Publishes the rows that moved most. Rows are ranked by the L2 norm of learner - published
  // (largest first, ties by table then row) and taken in that order whenever their RowBytes() still
  // fit in `byte_budget` (protobuf framing is not counted). Rows whose rounded learner value equals
  // the published one are never sent; rows with NaN or Inf (before or after rounding) are skipped
  // and counted. The owner applies the rounded rows to a new published version (version + 1); the
  // delta carries the checksum of that state. With nothing to send, the delta is a no-op
  // (new_version == base_version, no rows). INVALID_ARGUMENT for a negative budget.
  absl::StatusOr<v1::DictionaryDelta> MakeDelta(int64_t byte_budget);

  // The whole published state, for a decoder that asks for it.
  v1::DictionarySnapshot Snapshot() const { return published()->ToSnapshot(id_); }

  // Learner rows skipped for NaN or Inf, summed over all MakeDelta() calls.
  uint64_t nonfinite_rows_skipped() const { return nonfinite_rows_skipped_; }

 private:
  DictionaryOwner(const DictionaryId& id, v1::Precision precision, int history)
      : id_(id), precision_(precision), history_(history) {}

  DictionaryId id_;
  v1::Precision precision_;
  std::vector<std::vector<float>> learner_;
  DictionaryHistory history_;
  uint64_t nonfinite_rows_skipped_ = 0;
};

// The decoder's side: follows the owner's published state through deltas and snapshots, which are
// untrusted input. After any error the replica is unchanged; the caller asks for a snapshot.
class DictionaryReplica {
 public:
  // Starts at `initial` (which must equal the owner's version of the same number, e.g. both built
  // from a shared seed). INVALID_ARGUMENT if history < 1.
  static absl::StatusOr<DictionaryReplica> Create(const DictionaryId& id,
                                                  PublishedDictionary initial,
                                                  int history = kDefaultDictionaryHistory);
  // Starts from a snapshot, with the checks of Restore() except the shape comparison.
  static absl::StatusOr<DictionaryReplica> FromSnapshot(const DictionaryId& id,
                                                        const v1::DictionarySnapshot& snapshot,
                                                        int history = kDefaultDictionaryHistory);

  // Applies a delta. FAILED_PRECONDITION when its base_version is not the current version (a
  // snapshot is needed); INVALID_ARGUMENT for another dictionary's delta, bad versions, a table or
  // row index out of range, a duplicated row, a bad precision, a data size that is not rows * cols
  // elements, or non-finite values; DATA_LOSS when the result does not match the checksum.
  absl::Status Apply(const v1::DictionaryDelta& delta);

  // Replaces the state with a snapshot of the same tables (names and shapes), at any version.
  // Older versions are dropped: they may belong to a lineage the owner no longer has. Errors as
  // for Apply() (INVALID_ARGUMENT, DATA_LOSS).
  absl::Status Restore(const v1::DictionarySnapshot& snapshot);

  const DictionaryId& id() const { return id_; }
  const std::shared_ptr<const PublishedDictionary>& current() const { return history_.newest(); }
  uint64_t version() const { return current()->version(); }
  // The kept version `version` (the current one and up to history - 1 before it), or nullptr.
  std::shared_ptr<const PublishedDictionary> Find(uint64_t version) const {
    return history_.Find(version);
  }

 private:
  DictionaryReplica(const DictionaryId& id, int history) : id_(id), history_(history) {}

  DictionaryId id_;
  DictionaryHistory history_;
};

}  // namespace mapl

#endif  // MAPL_SERVER_DICTIONARY_H_
