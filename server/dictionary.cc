// Dictionary synchronization (docs/METHOD.md section 3): published states, their checksum and wire
// encoding, the owner's budgeted deltas and the replica's checked application of them.
#include "server/dictionary.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

// The checksum and the wire hash float32 values and integers as they lie in memory, which is the
// little-endian layout peer.proto specifies.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mapl's dictionary wire format assumes a little-endian host"
#endif

namespace mapl {
namespace {

// A table larger than this could not travel in one snapshot (protobuf caps messages at 2 GiB).
constexpr int64_t kMaxTableElements = int64_t{1} << 29;
// Row indices and shapes travel as uint32.
constexpr int64_t kMaxRowsOrCols = std::numeric_limits<uint32_t>::max();

std::string Where(const DictionaryId& id) {
  return absl::StrCat("dictionary (boundary ", id.boundary, ", ", v1::Direction_Name(id.direction),
                      ")");
}

std::string TableName(const DictionaryTableSpec& spec, int64_t table) {
  return absl::StrCat("table ", table, " ('", spec.name, "')");
}

// `v` rounded to what `precision` can carry.
float Round(v1::Precision precision, float v) {
  return precision == v1::PRECISION_BF16 ? Bf16ToFloat(FloatToBf16(v)) : v;
}

std::string Hex64(uint64_t v) { return absl::StrCat(absl::Hex(v, absl::kZeroPad16)); }

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// Appends `count` values, each already representable in `precision`, in their wire encoding.
void AppendEncoded(v1::Precision precision, const float* src, int64_t count, std::string* out) {
  if (precision == v1::PRECISION_BF16) {
    for (int64_t i = 0; i < count; ++i) {
      const bf16_t b = FloatToBf16(src[i]);
      out->append(reinterpret_cast<const char*>(&b), sizeof(b));
    }
  } else {
    out->append(reinterpret_cast<const char*>(src), count * sizeof(float));
  }
}

// Decodes `count` values in `precision` from `src`; false if any is NaN or Inf.
bool DecodeFinite(v1::Precision precision, const char* src, int64_t count, float* dst) {
  bool finite = true;
  if (precision == v1::PRECISION_BF16) {
    for (int64_t i = 0; i < count; ++i) {
      bf16_t b;
      std::memcpy(&b, src + i * sizeof(b), sizeof(b));
      dst[i] = Bf16ToFloat(b);
      finite &= std::isfinite(dst[i]);
    }
  } else {
    std::memcpy(dst, src, count * sizeof(float));
    for (int64_t i = 0; i < count; ++i) finite &= std::isfinite(dst[i]);
  }
  return finite;
}

absl::Status ValidateSpecs(const std::vector<DictionaryTableSpec>& specs) {
  if (specs.empty()) return absl::InvalidArgumentError("a dictionary needs at least one table");
  if (specs.size() > kMaxRowsOrCols) {
    return absl::InvalidArgumentError(absl::StrCat("too many tables: ", specs.size()));
  }
  std::set<absl::string_view> names;
  for (size_t t = 0; t < specs.size(); ++t) {
    const DictionaryTableSpec& s = specs[t];
    if (s.name.empty()) return absl::InvalidArgumentError(absl::StrCat("table ", t, ": no name"));
    if (!names.insert(s.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(TableName(s, t), ": duplicate name"));
    }
    if (s.rows <= 0 || s.cols <= 0 || s.rows > kMaxRowsOrCols || s.cols > kMaxRowsOrCols ||
        s.rows > kMaxTableElements / s.cols) {
      return absl::InvalidArgumentError(absl::StrCat(TableName(s, t), ": invalid shape (", s.rows,
                                                     ", ", s.cols, "); at most ", kMaxTableElements,
                                                     " elements"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidatePrecision(v1::Precision precision) {
  if (PrecisionBytes(precision) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid dictionary precision ", static_cast<int>(precision)));
  }
  return absl::OkStatus();
}

absl::Status ValidateHistory(int history) {
  if (history < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("dictionary history must be >= 1, got ", history));
  }
  return absl::OkStatus();
}

absl::Status CheckId(const DictionaryId& id, uint32_t boundary, v1::Direction direction,
                     absl::string_view what) {
  if (boundary != id.boundary || direction != id.direction) {
    return absl::InvalidArgumentError(absl::StrCat(what, " for boundary ", boundary, ", direction ",
                                                   static_cast<int>(direction), " reached ",
                                                   Where(id)));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t PrecisionBytes(v1::Precision precision) {
  switch (precision) {
    case v1::PRECISION_F32:
      return 4;
    case v1::PRECISION_BF16:
      return 2;
    default:
      return 0;
  }
}

// ---- PublishedDictionary ----

absl::StatusOr<PublishedDictionary> PublishedDictionary::Create(
    std::vector<DictionaryTableSpec> specs, const std::vector<std::vector<float>>& values,
    v1::Precision precision, uint64_t version) {
  MAPL_RETURN_IF_ERROR(ValidateSpecs(specs));
  MAPL_RETURN_IF_ERROR(ValidatePrecision(precision));
  if (!values.empty() && values.size() != specs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("values for ", values.size(), " tables, but ", specs.size(), " specs"));
  }
  PublishedDictionary dict;
  dict.data_.resize(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    const DictionaryTableSpec& s = specs[t];
    const size_t n = static_cast<size_t>(s.rows * s.cols);
    std::vector<float>& data = dict.data_[t];
    if (values.empty()) {
      data.assign(n, 0.0f);
      continue;
    }
    if (values[t].size() != n) {
      return absl::InvalidArgumentError(absl::StrCat(TableName(s, t), ": ", values[t].size(),
                                                     " values, expected ", s.rows, " x ", s.cols));
    }
    data.resize(n);
    for (size_t i = 0; i < n; ++i) {
      data[i] = Round(precision, values[t][i]);
      if (!std::isfinite(data[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat(TableName(s, t), " row ", i / s.cols, ": value ", values[t][i],
                         " is not finite in ", v1::Precision_Name(precision)));
      }
    }
  }
  dict.specs_ = std::make_shared<const std::vector<DictionaryTableSpec>>(std::move(specs));
  dict.version_ = version;
  dict.UpdateChecksum();
  return dict;
}

absl::StatusOr<PublishedDictionary> PublishedDictionary::FromSnapshot(
    const v1::DictionarySnapshot& snapshot) {
  std::vector<DictionaryTableSpec> specs;
  specs.reserve(snapshot.tables_size());
  for (const v1::DictionaryTable& t : snapshot.tables()) {
    specs.push_back({t.name(), static_cast<int64_t>(t.rows()), static_cast<int64_t>(t.cols())});
  }
  MAPL_RETURN_IF_ERROR(ValidateSpecs(specs));
  PublishedDictionary dict;
  dict.data_.resize(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    const v1::DictionaryTable& table = snapshot.tables(t);
    const DictionaryTableSpec& s = specs[t];
    const int64_t elem = PrecisionBytes(table.precision());
    if (elem == 0) {
      return absl::InvalidArgumentError(absl::StrCat(TableName(s, t), ": invalid precision ",
                                                     static_cast<int>(table.precision())));
    }
    const int64_t n = s.rows * s.cols;
    if (static_cast<int64_t>(table.data().size()) != n * elem) {
      return absl::InvalidArgumentError(absl::StrCat(
          TableName(s, t), ": data holds ", table.data().size(), " bytes, expected ", n * elem));
    }
    std::vector<float>& data = dict.data_[t];
    data.resize(n);
    for (int64_t r = 0; r < s.rows; ++r) {
      if (!DecodeFinite(table.precision(), table.data().data() + r * s.cols * elem, s.cols,
                        data.data() + r * s.cols)) {
        return absl::InvalidArgumentError(
            absl::StrCat("snapshot ", TableName(s, t), " row ", r, ": non-finite value"));
      }
    }
  }
  dict.specs_ = std::make_shared<const std::vector<DictionaryTableSpec>>(std::move(specs));
  dict.version_ = snapshot.version();
  dict.UpdateChecksum();
  if (dict.checksum_ != snapshot.checksum()) {
    return absl::DataLossError(absl::StrCat("dictionary snapshot at version ", snapshot.version(),
                                            ": checksum ", Hex64(snapshot.checksum()),
                                            ", computed ", Hex64(dict.checksum_)));
  }
  return dict;
}

int PublishedDictionary::FindTable(absl::string_view name) const {
  for (int t = 0; t < num_tables(); ++t) {
    if (spec(t).name == name) return t;
  }
  return -1;
}

void PublishedDictionary::UpdateChecksum() {
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(),
                                                                 &XXH3_freeState);
  // Allocation failure here is out of memory in a 600-byte allocation: crash loudly.
  if (state == nullptr || XXH3_64bits_reset(state.get()) != XXH_OK) std::abort();
  auto add_u64 = [&](uint64_t v) { XXH3_64bits_update(state.get(), &v, sizeof(v)); };
  add_u64(version_);
  add_u64(specs_->size());
  for (size_t t = 0; t < specs_->size(); ++t) {
    const DictionaryTableSpec& s = (*specs_)[t];
    add_u64(s.name.size());
    XXH3_64bits_update(state.get(), s.name.data(), s.name.size());
    add_u64(static_cast<uint64_t>(s.rows));
    add_u64(static_cast<uint64_t>(s.cols));
    XXH3_64bits_update(state.get(), data_[t].data(), data_[t].size() * sizeof(float));
  }
  checksum_ = XXH3_64bits_digest(state.get());
}

v1::DictionarySnapshot PublishedDictionary::ToSnapshot(const DictionaryId& id) const {
  v1::DictionarySnapshot snapshot;
  snapshot.set_boundary(id.boundary);
  snapshot.set_direction(id.direction);
  snapshot.set_version(version_);
  for (int t = 0; t < num_tables(); ++t) {
    const DictionaryTableSpec& s = spec(t);
    const std::vector<float>& data = data_[t];
    const bool bf16_exact = std::all_of(data.begin(), data.end(), [](float v) {
      return SameBits(v, Round(v1::PRECISION_BF16, v));
    });
    const v1::Precision precision = bf16_exact ? v1::PRECISION_BF16 : v1::PRECISION_F32;
    v1::DictionaryTable* table = snapshot.add_tables();
    table->set_name(s.name);
    table->set_rows(static_cast<uint32_t>(s.rows));
    table->set_cols(static_cast<uint32_t>(s.cols));
    table->set_precision(precision);
    std::string* out = table->mutable_data();
    out->reserve(data.size() * PrecisionBytes(precision));
    AppendEncoded(precision, data.data(), static_cast<int64_t>(data.size()), out);
  }
  snapshot.set_checksum(checksum_);
  return snapshot;
}

// ---- DictionaryHistory ----

void DictionaryHistory::Push(std::shared_ptr<const PublishedDictionary> dict) {
  versions_.push_back(std::move(dict));
  while (static_cast<int>(versions_.size()) > capacity_) versions_.pop_front();
}

void DictionaryHistory::Reset(std::shared_ptr<const PublishedDictionary> dict) {
  versions_.clear();
  versions_.push_back(std::move(dict));
}

std::shared_ptr<const PublishedDictionary> DictionaryHistory::Find(uint64_t version) const {
  for (const auto& dict : versions_) {
    if (dict->version() == version) return dict;
  }
  return nullptr;
}

// ---- DictionaryOwner ----

absl::StatusOr<DictionaryOwner> DictionaryOwner::Create(const DictionaryId& id,
                                                        std::vector<DictionaryTableSpec> specs,
                                                        std::vector<std::vector<float>> initial,
                                                        v1::Precision precision, int history) {
  MAPL_RETURN_IF_ERROR(ValidateHistory(history));
  MAPL_ASSIGN_OR_RETURN(PublishedDictionary v0,
                        PublishedDictionary::Create(specs, initial, precision, /*version=*/0));
  DictionaryOwner owner(id, precision, history);
  if (initial.empty()) {
    for (const DictionaryTableSpec& s : specs) initial.emplace_back(s.rows * s.cols, 0.0f);
  }
  owner.learner_ = std::move(initial);
  owner.history_.Reset(std::make_shared<const PublishedDictionary>(std::move(v0)));
  return owner;
}

absl::StatusOr<DictionaryOwner> DictionaryOwner::Restore(
    const DictionaryId& id, const std::vector<DictionaryTableSpec>& specs,
    const v1::DictionarySnapshot& published, std::vector<std::vector<float>> learner,
    v1::Precision precision, int history) {
  MAPL_RETURN_IF_ERROR(ValidateHistory(history));
  MAPL_RETURN_IF_ERROR(
      CheckId(id, published.boundary(), published.direction(), "checkpointed dictionary"));
  MAPL_ASSIGN_OR_RETURN(PublishedDictionary dict, PublishedDictionary::FromSnapshot(published));
  if (dict.num_tables() != static_cast<int>(specs.size()) || learner.size() != specs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(id), ": the checkpoint holds ", dict.num_tables(), " published and ",
                     learner.size(), " learner tables, this config has ", specs.size()));
  }
  for (size_t t = 0; t < specs.size(); ++t) {
    const DictionaryTableSpec& want = specs[t];
    const DictionaryTableSpec& got = dict.spec(static_cast<int>(t));
    if (got.name != want.name || got.rows != want.rows || got.cols != want.cols ||
        learner[t].size() != static_cast<size_t>(want.rows * want.cols)) {
      return absl::InvalidArgumentError(absl::StrCat(
          Where(id), ": the checkpoint's ", TableName(got, static_cast<int64_t>(t)), " is ",
          got.rows, " x ", got.cols, " (learner: ", learner[t].size(),
          " values), this config's is '", want.name, "' ", want.rows, " x ", want.cols));
    }
  }
  DictionaryOwner owner(id, precision, history);
  owner.learner_ = std::move(learner);
  owner.history_.Reset(std::make_shared<const PublishedDictionary>(std::move(dict)));
  return owner;
}

int64_t DictionaryOwner::RowBytes(int table) const {
  return 4 + spec(table).cols * PrecisionBytes(precision_);
}

absl::StatusOr<v1::DictionaryDelta> DictionaryOwner::MakeDelta(int64_t byte_budget) {
  if (byte_budget < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(id_), ": negative byte budget ", byte_budget));
  }
  const PublishedDictionary& current = *published();

  // Rank every row whose rounded learner value differs from the published one.
  struct Candidate {
    double distance2;  // Squared L2 norm of learner - published.
    int table;
    int64_t row;
  };
  std::vector<Candidate> candidates;
  for (int t = 0; t < current.num_tables(); ++t) {
    const int64_t cols = current.spec(t).cols;
    for (int64_t r = 0; r < current.spec(t).rows; ++r) {
      const float* learned = learner(t) + r * cols;
      const float* published_row = current.table(t) + r * cols;
      bool finite = true;
      bool differs = false;
      double distance2 = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        const float rounded = Round(precision_, learned[c]);
        if (!std::isfinite(rounded)) {  // Also catches a finite value that overflows bf16.
          finite = false;
          break;
        }
        differs |= !SameBits(rounded, published_row[c]);
        const double diff = static_cast<double>(learned[c]) - published_row[c];
        distance2 += diff * diff;
      }
      if (!finite) {
        ++nonfinite_rows_skipped_;
      } else if (differs) {
        candidates.push_back({distance2, t, r});
      }
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.distance2 != b.distance2) return a.distance2 > b.distance2;
    if (a.table != b.table) return a.table < b.table;
    return a.row < b.row;
  });

  // Take rows in rank order while they fit; a row too large for what is left is passed over so
  // that smaller rows of other tables can still use the budget.
  std::vector<std::vector<int64_t>> selected(current.num_tables());
  int64_t cheapest = RowBytes(0);
  for (int t = 1; t < current.num_tables(); ++t) cheapest = std::min(cheapest, RowBytes(t));
  int64_t left = byte_budget;
  bool any = false;
  for (const Candidate& c : candidates) {
    if (left < cheapest) break;
    const int64_t cost = RowBytes(c.table);
    if (cost > left) continue;
    left -= cost;
    selected[c.table].push_back(c.row);
    any = true;
  }

  v1::DictionaryDelta delta;
  delta.set_boundary(id_.boundary);
  delta.set_direction(id_.direction);
  delta.set_base_version(current.version());
  if (!any) {
    delta.set_new_version(current.version());
    delta.set_checksum(current.Checksum());
    return delta;
  }

  auto next = std::make_shared<PublishedDictionary>(current);
  next->version_ = current.version() + 1;
  for (int t = 0; t < current.num_tables(); ++t) {
    if (selected[t].empty()) continue;
    const int64_t cols = current.spec(t).cols;
    v1::DictionaryTableRows* rows = delta.add_tables();
    rows->set_table(static_cast<uint32_t>(t));
    rows->set_precision(precision_);
    rows->mutable_rows()->Reserve(static_cast<int>(selected[t].size()));
    std::string* data = rows->mutable_data();
    data->reserve(selected[t].size() * cols * PrecisionBytes(precision_));
    for (int64_t r : selected[t]) {
      rows->add_rows(static_cast<uint32_t>(r));
      float* dst = next->data_[t].data() + r * cols;
      const float* learned = learner(t) + r * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] = Round(precision_, learned[c]);
      AppendEncoded(precision_, dst, cols, data);
    }
  }
  next->UpdateChecksum();
  delta.set_new_version(next->version());
  delta.set_checksum(next->Checksum());
  history_.Push(std::move(next));
  return delta;
}

// ---- DictionaryReplica ----

absl::StatusOr<DictionaryReplica> DictionaryReplica::Create(const DictionaryId& id,
                                                            PublishedDictionary initial,
                                                            int history) {
  MAPL_RETURN_IF_ERROR(ValidateHistory(history));
  DictionaryReplica replica(id, history);
  replica.history_.Reset(std::make_shared<const PublishedDictionary>(std::move(initial)));
  return replica;
}

absl::StatusOr<DictionaryReplica> DictionaryReplica::FromSnapshot(
    const DictionaryId& id, const v1::DictionarySnapshot& snapshot, int history) {
  MAPL_RETURN_IF_ERROR(ValidateHistory(history));
  MAPL_RETURN_IF_ERROR(CheckId(id, snapshot.boundary(), snapshot.direction(), "snapshot"));
  MAPL_ASSIGN_OR_RETURN(PublishedDictionary dict, PublishedDictionary::FromSnapshot(snapshot));
  DictionaryReplica replica(id, history);
  replica.history_.Reset(std::make_shared<const PublishedDictionary>(std::move(dict)));
  return replica;
}

absl::Status DictionaryReplica::Apply(const v1::DictionaryDelta& delta) {
  MAPL_RETURN_IF_ERROR(CheckId(id_, delta.boundary(), delta.direction(), "dictionary delta"));
  const PublishedDictionary& current = *this->current();
  const uint64_t base = delta.base_version();
  if (base != current.version()) {
    return absl::FailedPreconditionError(absl::StrCat(Where(id_), ": delta applies to version ",
                                                      base, " but version ", current.version(),
                                                      " is held; a snapshot is needed"));
  }
  bool has_rows = false;
  for (const v1::DictionaryTableRows& t : delta.tables()) has_rows |= t.rows_size() > 0;
  const auto check_checksum = [&](const PublishedDictionary& result) -> absl::Status {
    if (result.Checksum() == delta.checksum()) return absl::OkStatus();
    return absl::DataLossError(
        absl::StrCat(Where(id_), ": delta ", base, " -> ", delta.new_version(), ": checksum ",
                     Hex64(delta.checksum()), ", computed ", Hex64(result.Checksum())));
  };
  if (delta.new_version() == base) {
    if (has_rows) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(id_), ": delta carries rows but does not change the version ", base));
    }
    return check_checksum(current);
  }
  if (base == std::numeric_limits<uint64_t>::max() || delta.new_version() != base + 1) {
    return absl::InvalidArgumentError(absl::StrCat(Where(id_), ": delta from version ", base,
                                                   " to ", delta.new_version(),
                                                   "; expected one step"));
  }

  // Decode into a copy: the current state stays untouched unless everything checks out.
  auto next = std::make_shared<PublishedDictionary>(current);
  next->version_ = delta.new_version();
  std::vector<std::vector<bool>> seen(current.num_tables());
  for (const v1::DictionaryTableRows& rows : delta.tables()) {
    if (rows.table() >= static_cast<uint32_t>(current.num_tables())) {
      return absl::InvalidArgumentError(absl::StrCat(Where(id_), ": table index ", rows.table(),
                                                     " out of range (", current.num_tables(),
                                                     " tables)"));
    }
    const int t = static_cast<int>(rows.table());
    const DictionaryTableSpec& s = current.spec(t);
    const int64_t elem = PrecisionBytes(rows.precision());
    if (elem == 0) {
      return absl::InvalidArgumentError(absl::StrCat(Where(id_), " ", TableName(s, t),
                                                     ": invalid precision ",
                                                     static_cast<int>(rows.precision())));
    }
    // Bounding the row count first keeps the size product below the table's own size.
    if (rows.rows_size() > s.rows) {
      return absl::InvalidArgumentError(absl::StrCat(Where(id_), " ", TableName(s, t), ": ",
                                                     rows.rows_size(), " rows for a table of ",
                                                     s.rows));
    }
    const int64_t row_bytes = s.cols * elem;
    if (static_cast<int64_t>(rows.data().size()) != rows.rows_size() * row_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(id_), " ", TableName(s, t), ": data holds ", rows.data().size(),
                       " bytes, expected ", rows.rows_size() * row_bytes, " for ", rows.rows_size(),
                       " rows of ", s.cols, " ", v1::Precision_Name(rows.precision())));
    }
    std::vector<bool>& table_seen = seen[t];
    if (table_seen.empty()) table_seen.assign(s.rows, false);
    for (int i = 0; i < rows.rows_size(); ++i) {
      const uint32_t r = rows.rows(i);
      if (r >= s.rows) {
        return absl::InvalidArgumentError(absl::StrCat(Where(id_), " ", TableName(s, t), " row ", r,
                                                       ": out of range (", s.rows, " rows)"));
      }
      if (table_seen[r]) {
        return absl::InvalidArgumentError(
            absl::StrCat(Where(id_), " ", TableName(s, t), " row ", r, ": sent twice"));
      }
      table_seen[r] = true;
      if (!DecodeFinite(rows.precision(), rows.data().data() + i * row_bytes, s.cols,
                        next->data_[t].data() + r * s.cols)) {
        return absl::InvalidArgumentError(
            absl::StrCat(Where(id_), " ", TableName(s, t), " row ", r, ": non-finite value"));
      }
    }
  }
  next->UpdateChecksum();
  MAPL_RETURN_IF_ERROR(check_checksum(*next));
  history_.Push(std::move(next));
  return absl::OkStatus();
}

absl::Status DictionaryReplica::Restore(const v1::DictionarySnapshot& snapshot) {
  MAPL_RETURN_IF_ERROR(CheckId(id_, snapshot.boundary(), snapshot.direction(), "snapshot"));
  MAPL_ASSIGN_OR_RETURN(PublishedDictionary dict, PublishedDictionary::FromSnapshot(snapshot));
  const std::vector<DictionaryTableSpec>& have = current()->specs();
  const std::vector<DictionaryTableSpec>& got = dict.specs();
  bool same = have.size() == got.size();
  for (size_t t = 0; same && t < have.size(); ++t) {
    same =
        have[t].name == got[t].name && have[t].rows == got[t].rows && have[t].cols == got[t].cols;
  }
  if (!same) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(id_), ": snapshot tables differ from the dictionary's"));
  }
  history_.Reset(std::make_shared<const PublishedDictionary>(std::move(dict)));
  return absl::OkStatus();
}

}  // namespace mapl
