// Tests for server/dictionary.h: owner and replica stay bit-identical through budgeted deltas,
// deltas respect their budget and ranking, and every kind of bad or corrupt input is rejected
// without touching the replica.
#include "server/dictionary.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace mapl {
namespace {

constexpr DictionaryId kId{/*boundary=*/3, v1::DIRECTION_FORWARD};

// Shapes like a real boundary, scaled down: U (d x k) and RVQ codebooks (L*K x k).
std::vector<DictionaryTableSpec> Specs() { return {{"U", 48, 8}, {"rvq", 2 * 32, 8}}; }

std::vector<std::vector<float>> RandomValues(const std::vector<DictionaryTableSpec>& specs,
                                             std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> values;
  for (const DictionaryTableSpec& s : specs) {
    values.emplace_back(s.rows * s.cols);
    for (float& v : values.back()) v = normal(rng);
  }
  return values;
}

float Round(v1::Precision precision, float v) {
  return precision == v1::PRECISION_BF16 ? Bf16ToFloat(FloatToBf16(v)) : v;
}

::testing::AssertionResult Identical(const PublishedDictionary& a, const PublishedDictionary& b) {
  if (a.version() != b.version()) {
    return ::testing::AssertionFailure() << "versions " << a.version() << " != " << b.version();
  }
  if (a.Checksum() != b.Checksum()) return ::testing::AssertionFailure() << "checksums differ";
  if (a.num_tables() != b.num_tables()) return ::testing::AssertionFailure() << "table counts";
  for (int t = 0; t < a.num_tables(); ++t) {
    if (a.spec(t).rows != b.spec(t).rows || a.spec(t).cols != b.spec(t).cols) {
      return ::testing::AssertionFailure() << "table " << t << " shapes differ";
    }
    if (std::memcmp(a.table(t), b.table(t), a.spec(t).rows * a.spec(t).cols * sizeof(float))) {
      return ::testing::AssertionFailure() << "table " << t << " data differs";
    }
  }
  return ::testing::AssertionSuccess();
}

// A deep copy of a published state, to check that a failed call left the replica unchanged.
struct Saved {
  explicit Saved(const PublishedDictionary& d) : version(d.version()), checksum(d.Checksum()) {
    for (int t = 0; t < d.num_tables(); ++t) {
      data.emplace_back(d.table(t), d.table(t) + d.spec(t).rows * d.spec(t).cols);
    }
  }
  ::testing::AssertionResult Matches(const PublishedDictionary& d) const {
    if (d.version() != version || d.Checksum() != checksum) {
      return ::testing::AssertionFailure() << "version or checksum changed";
    }
    for (int t = 0; t < d.num_tables(); ++t) {
      if (std::memcmp(d.table(t), data[t].data(), data[t].size() * sizeof(float))) {
        return ::testing::AssertionFailure() << "table " << t << " changed";
      }
    }
    return ::testing::AssertionSuccess();
  }
  uint64_t version;
  uint64_t checksum;
  std::vector<std::vector<float>> data;
};

// Sends a message through its wire encoding, as the peer link will.
template <typename Message>
Message OverTheWire(const Message& m) {
  std::string bytes;
  EXPECT_TRUE(m.SerializeToString(&bytes));
  Message out;
  EXPECT_TRUE(out.ParseFromString(bytes));
  return out;
}

// The squared distance between learner and published copy, over all rows of all tables: the
// error a replica decodes with. Measured on the tables themselves, not from the ranking formula.
double PublishedError(const DictionaryOwner& owner) {
  double e = 0.0;
  for (int t = 0; t < owner.num_tables(); ++t) {
    const int64_t n = owner.spec(t).rows * owner.spec(t).cols;
    const float* l = owner.learner(t);
    const float* p = owner.published()->table(t);
    for (int64_t i = 0; i < n; ++i) e += (double{l[i]} - p[i]) * (double{l[i]} - p[i]);
  }
  return e;
}

// How much sending row r now would lower PublishedError: its squared distance minus what is left
// after rounding it to the dictionary's precision (*residual). 0 for rows that cannot be sent
// (unchanged after rounding, or not finite).
double Reduction(const DictionaryOwner& owner, int t, int64_t r, double* residual) {
  const int64_t cols = owner.spec(t).cols;
  const float* l = owner.learner(t) + r * cols;
  const float* p = owner.published()->table(t) + r * cols;
  double before = 0.0, after = 0.0;
  bool differs = false;
  for (int64_t c = 0; c < cols; ++c) {
    const float q = Round(owner.precision(), l[c]);
    if (!std::isfinite(q)) return 0.0;
    differs |= std::memcmp(&q, &p[c], sizeof(float)) != 0;
    before += (double{l[c]} - p[c]) * (double{l[c]} - p[c]);
    after += (double{l[c]} - q) * (double{l[c]} - q);
  }
  *residual = after;
  return differs ? before - after : 0.0;
}

// Moves a random subset of learner rows by random amounts (scales from 1e-4 to 1).
void Perturb(DictionaryOwner& owner, std::mt19937& rng) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const double fraction = unit(rng) * 0.3;
  for (int t = 0; t < owner.num_tables(); ++t) {
    const int64_t cols = owner.spec(t).cols;
    for (int64_t r = 0; r < owner.spec(t).rows; ++r) {
      if (unit(rng) >= fraction) continue;
      const float scale = static_cast<float>(std::pow(10.0, -4.0 * unit(rng)));
      float* row = owner.mutable_learner(t) + r * cols;
      for (int64_t c = 0; c < cols; ++c) row[c] += scale * normal(rng);
    }
  }
}

std::vector<uint32_t> Rows(const v1::DictionaryTableRows& t) {
  return std::vector<uint32_t>(t.rows().begin(), t.rows().end());
}

int64_t DeltaBytes(const DictionaryOwner& owner, const v1::DictionaryDelta& delta) {
  int64_t bytes = 0;
  for (const v1::DictionaryTableRows& t : delta.tables()) {
    bytes += t.rows_size() * owner.RowBytes(static_cast<int>(t.table()));
  }
  return bytes;
}

struct Pair {
  DictionaryOwner owner;
  DictionaryReplica replica;
};

Pair MakePair(v1::Precision precision, uint32_t seed, int history = kDefaultDictionaryHistory,
              std::vector<DictionaryTableSpec> specs = Specs()) {
  std::mt19937 rng(seed);
  std::vector<std::vector<float>> init = RandomValues(specs, rng);
  absl::StatusOr<DictionaryOwner> owner =
      DictionaryOwner::Create(kId, specs, init, precision, history);
  EXPECT_TRUE(owner.ok()) << owner.status();
  absl::StatusOr<PublishedDictionary> v0 = PublishedDictionary::Create(specs, init, precision, 0);
  EXPECT_TRUE(v0.ok()) << v0.status();
  absl::StatusOr<DictionaryReplica> replica =
      DictionaryReplica::Create(kId, *std::move(v0), history);
  EXPECT_TRUE(replica.ok()) << replica.status();
  return {*std::move(owner), *std::move(replica)};
}

class DictionarySyncTest : public ::testing::TestWithParam<v1::Precision> {};

// (a) and (b): 1,000 random rounds; after each, owner and replica are bit-identical, the delta
// fits its budget, and no unsent eligible row moved more than a sent one.
TEST_P(DictionarySyncTest, StaysBitIdenticalUnderBudget) {
  const v1::Precision precision = GetParam();
  Pair p = MakePair(precision, 1);
  ASSERT_TRUE(Identical(*p.owner.published(), *p.replica.current()));
  std::mt19937 rng(42);
  std::uniform_int_distribution<int64_t> budget_rows(0, 24);
  const int64_t row_bytes = p.owner.RowBytes(0);  // Both tables have the same cols.
  ASSERT_EQ(row_bytes, 4 + 8 * PrecisionBytes(precision));
  int no_ops = 0;
  for (int round = 0; round < 1000; ++round) {
    Perturb(p.owner, rng);
    // Budgets that are not a whole number of rows too.
    const int64_t budget = budget_rows(rng) * row_bytes + (round % 3) * (row_bytes / 3);

    // The best any choice of rows within the budget can do: rows all cost the same, so it is
    // sending the rows whose update lowers the published copy's error the most.
    std::vector<double> reductions;
    std::vector<std::vector<double>> residual(p.owner.num_tables());
    int64_t eligible = 0;
    for (int t = 0; t < p.owner.num_tables(); ++t) {
      residual[t].resize(p.owner.spec(t).rows);
      for (int64_t r = 0; r < p.owner.spec(t).rows; ++r) {
        const double g = Reduction(p.owner, t, r, &residual[t][r]);
        if (g > 0.0) ++eligible;
        reductions.push_back(g);
      }
    }
    std::sort(reductions.rbegin(), reductions.rend());
    const double error_before = PublishedError(p.owner);

    absl::StatusOr<v1::DictionaryDelta> delta = p.owner.MakeDelta(budget);
    ASSERT_TRUE(delta.ok()) << delta.status();
    ASSERT_LE(DeltaBytes(p.owner, *delta), budget) << "round " << round;
    int64_t sent = 0;
    double sent_residual = 0.0;
    for (const v1::DictionaryTableRows& t : delta->tables()) {
      EXPECT_EQ(t.precision(), precision);
      sent += t.rows_size();
      for (uint32_t r : t.rows()) sent_residual += residual[t.table()][r];
    }
    double best = error_before;
    for (int64_t i = 0; i < sent && i < static_cast<int64_t>(reductions.size()); ++i) {
      best -= reductions[i];
    }
    // The published copy is as close to the learner as any choice of `sent` rows could make it,
    // up to the rounding residual of the rows sent (zero in f32): ranking by the distance before
    // rounding can miss the optimum by at most that much (sum of sums of squares). Plus the
    // rounding of these double sums.
    const double error_after = PublishedError(p.owner);
    ASSERT_LE(error_after, best + sent_residual + 1e-9 * error_before) << "round " << round;
    const int64_t eligible_left = eligible - sent;
    // Rows all cost the same, so the budget is used up unless nothing is left to send.
    if (eligible_left > 0) {
      ASSERT_EQ(sent, budget / row_bytes) << "round " << round;
    }
    if (sent == 0) {
      ++no_ops;
      EXPECT_EQ(delta->new_version(), delta->base_version());
    } else {
      EXPECT_EQ(delta->new_version(), delta->base_version() + 1);
    }

    absl::Status applied = p.replica.Apply(OverTheWire(*delta));
    ASSERT_TRUE(applied.ok()) << "round " << round << ": " << applied;
    ASSERT_TRUE(Identical(*p.owner.published(), *p.replica.current())) << "round " << round;
  }
  EXPECT_GT(no_ops, 0);
  EXPECT_GT(p.owner.version(), 900u);
  // Published values are exactly representable in the row precision.
  for (int t = 0; t < p.owner.num_tables(); ++t) {
    const PublishedDictionary& d = *p.owner.published();
    for (int64_t i = 0; i < d.spec(t).rows * d.spec(t).cols; ++i) {
      ASSERT_EQ(d.table(t)[i], Round(precision, d.table(t)[i]));
    }
  }
}

// (c): with the learner frozen, deltas refresh every row and then become no-ops.
TEST_P(DictionarySyncTest, FrozenLearnerConverges) {
  const v1::Precision precision = GetParam();
  Pair p = MakePair(precision, 2);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  int64_t total_rows = 0;
  for (int t = 0; t < p.owner.num_tables(); ++t) {
    total_rows += p.owner.spec(t).rows;
    float* l = p.owner.mutable_learner(t);
    for (int64_t i = 0; i < p.owner.spec(t).rows * p.owner.spec(t).cols; ++i) l[i] += normal(rng);
  }
  const int64_t rows_per_delta = 5;
  const int64_t budget = rows_per_delta * p.owner.RowBytes(0);
  int deltas = 0;
  while (true) {
    absl::StatusOr<v1::DictionaryDelta> delta = p.owner.MakeDelta(budget);
    ASSERT_TRUE(delta.ok()) << delta.status();
    ASSERT_TRUE(p.replica.Apply(OverTheWire(*delta)).ok());
    if (delta->new_version() == delta->base_version()) break;
    ++deltas;
    ASSERT_LE(deltas, total_rows) << "deltas do not converge";
  }
  EXPECT_EQ(deltas, (total_rows + rows_per_delta - 1) / rows_per_delta);
  for (int t = 0; t < p.owner.num_tables(); ++t) {
    for (int64_t i = 0; i < p.owner.spec(t).rows * p.owner.spec(t).cols; ++i) {
      const float want = Round(precision, p.owner.learner(t)[i]);
      ASSERT_EQ(std::memcmp(&want, &p.owner.published()->table(t)[i], sizeof(float)), 0);
    }
  }
  EXPECT_TRUE(Identical(*p.owner.published(), *p.replica.current()));
  // Nothing left to send: further deltas are no-ops even with a large budget.
  absl::StatusOr<v1::DictionaryDelta> again = p.owner.MakeDelta(int64_t{1} << 30);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->tables_size(), 0);
  EXPECT_EQ(again->new_version(), again->base_version());
  EXPECT_TRUE(p.replica.Apply(*again).ok());
}

// (f): a replica built from a snapshot in the middle of training keeps in sync afterwards.
TEST_P(DictionarySyncTest, SnapshotRoundTripAndLaterDeltas) {
  const v1::Precision precision = GetParam();
  Pair p = MakePair(precision, 3);
  std::mt19937 rng(11);
  for (int round = 0; round < 20; ++round) {
    Perturb(p.owner, rng);
    ASSERT_TRUE(p.owner.MakeDelta(10 * p.owner.RowBytes(0)).ok());  // The replica misses these.
  }
  const v1::DictionarySnapshot snapshot = OverTheWire(p.owner.Snapshot());
  EXPECT_EQ(snapshot.boundary(), kId.boundary);
  EXPECT_EQ(snapshot.direction(), kId.direction);
  EXPECT_EQ(snapshot.version(), p.owner.version());
  ASSERT_EQ(snapshot.tables_size(), 2);
  EXPECT_EQ(snapshot.tables(1).name(), "rvq");
  if (precision == v1::PRECISION_BF16) {  // bf16 rows travel in bf16.
    EXPECT_EQ(snapshot.tables(0).precision(), v1::PRECISION_BF16);
    EXPECT_EQ(snapshot.tables(0).data().size(), 48u * 8 * 2);
  } else {
    EXPECT_EQ(snapshot.tables(0).precision(), v1::PRECISION_F32);
  }

  absl::StatusOr<DictionaryReplica> fresh = DictionaryReplica::FromSnapshot(kId, snapshot);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_TRUE(Identical(*p.owner.published(), *fresh->current()));

  // The stale replica learns that it needs a snapshot, restores, and follows again.
  absl::StatusOr<v1::DictionaryDelta> delta = p.owner.MakeDelta(10 * p.owner.RowBytes(0));
  ASSERT_TRUE(delta.ok());
  EXPECT_EQ(p.replica.Apply(*delta).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(p.replica.Restore(p.owner.Snapshot()).ok());
  EXPECT_TRUE(fresh->Apply(*delta).ok());
  for (int round = 0; round < 100; ++round) {
    Perturb(p.owner, rng);
    absl::StatusOr<v1::DictionaryDelta> d = p.owner.MakeDelta(10 * p.owner.RowBytes(0));
    ASSERT_TRUE(d.ok());
    ASSERT_TRUE(fresh->Apply(OverTheWire(*d)).ok()) << "round " << round;
    ASSERT_TRUE(p.replica.Apply(*d).ok()) << "round " << round;
    ASSERT_TRUE(Identical(*p.owner.published(), *fresh->current()));
    ASSERT_TRUE(Identical(*p.owner.published(), *p.replica.current()));
  }
}

INSTANTIATE_TEST_SUITE_P(Precisions, DictionarySyncTest,
                         ::testing::Values(v1::PRECISION_F32, v1::PRECISION_BF16),
                         [](const ::testing::TestParamInfo<v1::Precision>& info) {
                           return v1::Precision_Name(info.param);
                         });

// (b): rows are taken largest movement first; a row too big for what is left is passed over and
// smaller rows of another table fill the budget.
TEST(DictionaryOwnerTest, RanksRowsByMovementAndFillsBudget) {
  std::vector<DictionaryTableSpec> specs = {{"wide", 4, 64}, {"narrow", 8, 4}};
  absl::StatusOr<DictionaryOwner> owner =
      DictionaryOwner::Create(kId, specs, {}, v1::PRECISION_F32);
  ASSERT_TRUE(owner.ok()) << owner.status();
  EXPECT_EQ(owner->RowBytes(0), 4 + 64 * 4);
  EXPECT_EQ(owner->RowBytes(1), 4 + 4 * 4);
  // Movements: wide rows 0..3 -> 100, 50, 20, 10 (L2 of a constant row: v * sqrt(64) = 8 v);
  // narrow rows 0..7 -> 1..8 (2 v).
  const float wide[] = {12.5f, 6.25f, 2.5f, 1.25f};
  for (int r = 0; r < 4; ++r) std::fill_n(owner->mutable_learner(0) + r * 64, 64, wide[r]);
  for (int r = 0; r < 8; ++r) std::fill_n(owner->mutable_learner(1) + r * 4, 4, 0.5f * (r + 1));

  // Budget: two wide rows (520) plus 100: the third wide row does not fit, five narrow rows do.
  absl::StatusOr<v1::DictionaryDelta> delta = owner->MakeDelta(2 * 260 + 100);
  ASSERT_TRUE(delta.ok()) << delta.status();
  ASSERT_EQ(delta->tables_size(), 2);
  EXPECT_EQ(delta->tables(0).table(), 0u);
  EXPECT_EQ(Rows(delta->tables(0)), (std::vector<uint32_t>{0, 1}));
  EXPECT_EQ(delta->tables(1).table(), 1u);
  EXPECT_EQ(Rows(delta->tables(1)), (std::vector<uint32_t>{7, 6, 5, 4, 3}));
  EXPECT_EQ(delta->tables(0).data().size(), 2u * 64 * 4);
  EXPECT_EQ(delta->base_version(), 0u);
  EXPECT_EQ(delta->new_version(), 1u);
  EXPECT_EQ(owner->published()->table(0)[64], 6.25f);  // Applied to the published copy.
  EXPECT_EQ(owner->published()->table(0)[128], 0.0f);  // Not sent, not applied.

  // A budget smaller than any row sends nothing.
  absl::StatusOr<v1::DictionaryDelta> tiny = owner->MakeDelta(19);
  ASSERT_TRUE(tiny.ok());
  EXPECT_EQ(tiny->tables_size(), 0);
  EXPECT_EQ(tiny->new_version(), 1u);
  EXPECT_EQ(owner->version(), 1u);

  EXPECT_EQ(owner->MakeDelta(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

// NaN or Inf in the learner never reaches the published copy; finite values that overflow bf16
// count as non-finite too.
TEST(DictionaryOwnerTest, NonFiniteLearnerRowsAreSkippedAndCounted) {
  Pair p = MakePair(v1::PRECISION_BF16, 5);
  const int64_t cols = p.owner.spec(0).cols;
  p.owner.mutable_learner(0)[2 * cols + 1] = std::numeric_limits<float>::quiet_NaN();
  p.owner.mutable_learner(0)[5 * cols] = std::numeric_limits<float>::infinity();
  p.owner.mutable_learner(1)[0] = 3.4e38f;   // Finite in f32, Inf in bf16.
  p.owner.mutable_learner(1)[cols] += 1.0f;  // A good row.
  absl::StatusOr<v1::DictionaryDelta> delta = p.owner.MakeDelta(1 << 20);
  ASSERT_TRUE(delta.ok());
  ASSERT_EQ(delta->tables_size(), 1);
  EXPECT_EQ(delta->tables(0).table(), 1u);
  EXPECT_EQ(Rows(delta->tables(0)), (std::vector<uint32_t>{1}));
  EXPECT_EQ(p.owner.nonfinite_rows_skipped(), 3u);
  ASSERT_TRUE(p.replica.Apply(*delta).ok());
  EXPECT_TRUE(Identical(*p.owner.published(), *p.replica.current()));
  ASSERT_TRUE(p.owner.MakeDelta(1 << 20).ok());
  EXPECT_EQ(p.owner.nonfinite_rows_skipped(), 6u);  // Counted again on every call.
}

// The checksum is exactly the one peer.proto documents, so other implementations can match it.
TEST(PublishedDictionaryTest, ChecksumFollowsTheWireDefinition) {
  std::vector<DictionaryTableSpec> specs = {{"U", 2, 3}, {"rvq", 1, 2}};
  std::vector<std::vector<float>> values = {{1, 2, 3, 4, 5, 6}, {-1.5f, 0.25f}};
  absl::StatusOr<PublishedDictionary> d =
      PublishedDictionary::Create(specs, values, v1::PRECISION_F32, 77);
  ASSERT_TRUE(d.ok()) << d.status();
  std::string buf;
  auto u64 = [&](uint64_t v) { buf.append(reinterpret_cast<const char*>(&v), 8); };
  u64(77);
  u64(2);
  for (int t = 0; t < 2; ++t) {
    u64(specs[t].name.size());
    buf += specs[t].name;
    u64(specs[t].rows);
    u64(specs[t].cols);
    buf.append(reinterpret_cast<const char*>(values[t].data()), values[t].size() * 4);
  }
  EXPECT_EQ(d->Checksum(), XXH3_64bits(buf.data(), buf.size()));
  EXPECT_EQ(d->FindTable("rvq"), 1);
  EXPECT_EQ(d->FindTable("V"), -1);
  EXPECT_EQ(d->tensor(0).rows, 2);
  EXPECT_EQ(d->tensor(0).f32()[5], 6.0f);
}

TEST(PublishedDictionaryTest, CreateRejectsBadSpecsAndValues) {
  const auto create = [](std::vector<DictionaryTableSpec> specs,
                         std::vector<std::vector<float>> values,
                         v1::Precision precision = v1::PRECISION_F32) {
    return PublishedDictionary::Create(std::move(specs), values, precision, 0).status().code();
  };
  constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(create({}, {}), kInvalid);
  EXPECT_EQ(create({{"", 1, 1}}, {}), kInvalid);
  EXPECT_EQ(create({{"a", 1, 1}, {"a", 1, 1}}, {}), kInvalid);
  EXPECT_EQ(create({{"a", 0, 1}}, {}), kInvalid);
  EXPECT_EQ(create({{"a", 1, -1}}, {}), kInvalid);
  EXPECT_EQ(create({{"a", int64_t{1} << 20, int64_t{1} << 20}}, {}), kInvalid);
  EXPECT_EQ(create({{"a", 1, 2}}, {{1.0f}}), kInvalid);
  EXPECT_EQ(create({{"a", 1, 2}}, {{1.0f, NAN}}), kInvalid);
  EXPECT_EQ(create({{"a", 1, 2}}, {{1.0f, 3.4e38f}}, v1::PRECISION_BF16), kInvalid);
  EXPECT_EQ(create({{"a", 1, 1}}, {}, v1::PRECISION_UNSPECIFIED), kInvalid);
  EXPECT_EQ(create({{"a", 1, 2}}, {{1.0f, 3.4e38f}}), absl::StatusCode::kOk);
  EXPECT_EQ(
      DictionaryOwner::Create(kId, Specs(), {}, v1::PRECISION_F32, /*history=*/0).status().code(),
      kInvalid);
}

// Fixture for bad deltas: a replica one good delta behind the owner, and that delta.
class BadDeltaTest : public ::testing::TestWithParam<v1::Precision> {
 protected:
  void SetUp() override {
    pair_ = std::make_unique<Pair>(MakePair(GetParam(), 9));
    std::mt19937 rng(5);
    // Change rows 1 and 3 of the "rvq" table and row 0 of "U".
    for (int r : {1, 3}) {
      for (int64_t c = 0; c < 8; ++c) pair_->owner.mutable_learner(1)[r * 8 + c] += 1.0f;
    }
    pair_->owner.mutable_learner(0)[0] += 2.0f;
    absl::StatusOr<v1::DictionaryDelta> delta = pair_->owner.MakeDelta(1 << 20);
    ASSERT_TRUE(delta.ok());
    good_ = *delta;
    ASSERT_EQ(good_.tables_size(), 2);
    ASSERT_EQ(good_.tables(1).table(), 1u);
    ASSERT_EQ(good_.tables(1).rows_size(), 2);
    saved_ = std::make_unique<Saved>(*pair_->replica.current());
  }

  // Applies `delta`, expects `code` (and `message` in the error), and the replica unchanged.
  void ExpectRejected(const v1::DictionaryDelta& delta, absl::StatusCode code,
                      const std::string& message = "") {
    absl::Status s = pair_->replica.Apply(delta);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), message)) << s;
    EXPECT_TRUE(saved_->Matches(*pair_->replica.current()));
    EXPECT_EQ(pair_->replica.Find(saved_->version + 1), nullptr);
  }

  int64_t elem() const { return PrecisionBytes(GetParam()); }

  std::unique_ptr<Pair> pair_;
  v1::DictionaryDelta good_;
  std::unique_ptr<Saved> saved_;
};

// (d): corruption is caught by the checksum.
TEST_P(BadDeltaTest, FlippedDataBitIsDataLoss) {
  v1::DictionaryDelta bad = good_;
  // The lowest bit of the first element: a finite value stays finite, only the checksum sees it.
  (*bad.mutable_tables(1)->mutable_data())[0] ^= 1;
  ExpectRejected(bad, absl::StatusCode::kDataLoss, "checksum");
  EXPECT_TRUE(pair_->replica.Apply(good_).ok());  // The good delta still applies.
  EXPECT_TRUE(Identical(*pair_->owner.published(), *pair_->replica.current()));
}

TEST_P(BadDeltaTest, WrongChecksumIsDataLoss) {
  v1::DictionaryDelta bad = good_;
  bad.set_checksum(good_.checksum() ^ 1);
  ExpectRejected(bad, absl::StatusCode::kDataLoss, "checksum");
  v1::DictionaryDelta no_op;
  no_op.set_boundary(kId.boundary);
  no_op.set_direction(kId.direction);
  no_op.set_base_version(0);
  no_op.set_new_version(0);
  no_op.set_checksum(pair_->replica.current()->Checksum() + 1);
  ExpectRejected(no_op, absl::StatusCode::kDataLoss, "checksum");
}

// (e): wrong state and bad input.
TEST_P(BadDeltaTest, WrongBaseVersionIsFailedPrecondition) {
  v1::DictionaryDelta bad = good_;
  bad.set_base_version(5);
  bad.set_new_version(6);
  ExpectRejected(bad, absl::StatusCode::kFailedPrecondition, "version 5 but version 0");
}

TEST_P(BadDeltaTest, TableIndexOutOfRange) {
  v1::DictionaryDelta bad = good_;
  bad.mutable_tables(1)->set_table(2);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "table index 2");
}

TEST_P(BadDeltaTest, RowIndexOutOfRange) {
  v1::DictionaryDelta bad = good_;
  bad.mutable_tables(1)->set_rows(1, 64);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "table 1 ('rvq') row 64");
}

TEST_P(BadDeltaTest, DuplicateRow) {
  v1::DictionaryDelta bad = good_;
  v1::DictionaryTableRows* t = bad.mutable_tables(1);
  t->set_rows(1, t->rows(0));
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument,
                 "row " + std::to_string(t->rows(0)) + ": sent twice");
  // Across two entries for the same table as well.
  v1::DictionaryDelta split = good_;
  v1::DictionaryTableRows* again = split.add_tables();
  again->set_table(1);
  again->set_precision(GetParam());
  again->add_rows(3);
  again->set_data(std::string(8 * elem(), '\0'));
  ExpectRejected(split, absl::StatusCode::kInvalidArgument, "row 3: sent twice");
}

TEST_P(BadDeltaTest, TruncatedOrOversizedData) {
  v1::DictionaryDelta bad = good_;
  bad.mutable_tables(1)->mutable_data()->pop_back();
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "table 1 ('rvq'): data holds");
  bad = good_;
  bad.mutable_tables(1)->mutable_data()->append(std::string(8 * elem(), '\0'));
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "data holds");
  bad = good_;
  bad.mutable_tables(1)->set_precision(GetParam() == v1::PRECISION_F32 ? v1::PRECISION_BF16
                                                                       : v1::PRECISION_F32);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "data holds");
  bad = good_;
  bad.mutable_tables(1)->set_precision(v1::PRECISION_UNSPECIFIED);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "precision");
  bad = good_;
  for (int i = 0; i < 70; ++i) bad.mutable_tables(1)->add_rows(i);  // More rows than the table.
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "72 rows for a table of 64");
}

TEST_P(BadDeltaTest, NonFiniteRow) {
  for (float poison :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    v1::DictionaryDelta bad = good_;
    std::string& data = *bad.mutable_tables(1)->mutable_data();
    // Second row sent, third element.
    const size_t at = (8 + 2) * elem();
    if (GetParam() == v1::PRECISION_BF16) {
      const bf16_t b = FloatToBf16(poison);
      std::memcpy(&data[at], &b, 2);
    } else {
      std::memcpy(&data[at], &poison, 4);
    }
    ExpectRejected(
        bad, absl::StatusCode::kInvalidArgument,
        "table 1 ('rvq') row " + std::to_string(good_.tables(1).rows(1)) + ": non-finite");
  }
}

TEST_P(BadDeltaTest, BadVersionsAndWrongDictionary) {
  v1::DictionaryDelta bad = good_;
  bad.set_new_version(2);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "expected one step");
  bad = good_;
  bad.set_new_version(0);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "carries rows");
  bad = good_;
  bad.set_boundary(kId.boundary + 1);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "boundary 4");
  bad = good_;
  bad.set_direction(v1::DIRECTION_BACKWARD);
  ExpectRejected(bad, absl::StatusCode::kInvalidArgument, "dictionary delta");
}

INSTANTIATE_TEST_SUITE_P(Precisions, BadDeltaTest,
                         ::testing::Values(v1::PRECISION_F32, v1::PRECISION_BF16),
                         [](const ::testing::TestParamInfo<v1::Precision>& info) {
                           return v1::Precision_Name(info.param);
                         });

// Snapshots are untrusted too; a failed Restore leaves the replica as it was.
TEST(DictionaryReplicaTest, BadSnapshotsAreRejected) {
  Pair p = MakePair(v1::PRECISION_F32, 13);
  std::mt19937 rng(3);
  Perturb(p.owner, rng);
  ASSERT_TRUE(p.owner.MakeDelta(1 << 20).ok());
  const v1::DictionarySnapshot good = p.owner.Snapshot();
  const Saved saved(*p.replica.current());
  const auto expect_rejected = [&](const v1::DictionarySnapshot& s, absl::StatusCode code) {
    EXPECT_EQ(p.replica.Restore(s).code(), code);
    EXPECT_TRUE(saved.Matches(*p.replica.current()));
    EXPECT_EQ(DictionaryReplica::FromSnapshot(kId, s).status().code(), code);
  };

  v1::DictionarySnapshot bad = good;
  (*bad.mutable_tables(0)->mutable_data())[4] ^= 1;
  expect_rejected(bad, absl::StatusCode::kDataLoss);
  bad = good;
  bad.set_version(good.version() + 1);
  expect_rejected(bad, absl::StatusCode::kDataLoss);
  bad = good;
  bad.mutable_tables(0)->mutable_data()->resize(10);
  expect_rejected(bad, absl::StatusCode::kInvalidArgument);
  bad = good;
  bad.mutable_tables(1)->set_rows(0);
  expect_rejected(bad, absl::StatusCode::kInvalidArgument);
  bad = good;
  bad.mutable_tables(1)->set_name("U");
  expect_rejected(bad, absl::StatusCode::kInvalidArgument);
  bad = good;
  bad.set_boundary(0);
  expect_rejected(bad, absl::StatusCode::kInvalidArgument);
  bad = good;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&(*bad.mutable_tables(0)->mutable_data())[0], &nan, 4);
  expect_rejected(bad, absl::StatusCode::kInvalidArgument);
  bad.Clear();
  expect_rejected(bad, absl::StatusCode::kInvalidArgument);
  bad = good;
  bad.mutable_tables(0)->set_rows(std::numeric_limits<uint32_t>::max());
  bad.mutable_tables(0)->set_cols(std::numeric_limits<uint32_t>::max());
  expect_rejected(bad, absl::StatusCode::kInvalidArgument);

  // A consistent snapshot of other tables: decodable on its own, but not for this replica.
  absl::StatusOr<PublishedDictionary> other = PublishedDictionary::Create(
      {{"U", 48, 8}, {"rvq", 32, 8}}, {}, v1::PRECISION_F32, good.version());
  ASSERT_TRUE(other.ok());
  const v1::DictionarySnapshot other_snapshot = other->ToSnapshot(kId);
  EXPECT_EQ(p.replica.Restore(other_snapshot).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(saved.Matches(*p.replica.current()));
  EXPECT_TRUE(DictionaryReplica::FromSnapshot(kId, other_snapshot).ok());

  ASSERT_TRUE(p.replica.Restore(good).ok());
  EXPECT_TRUE(Identical(*p.owner.published(), *p.replica.current()));
}

// (g): the replica and the owner keep the last `history` versions, and a version handed out stays
// valid after it leaves the history.
TEST(DictionaryHistoryTest, FindReturnsVersionsUpToTheLimit) {
  constexpr int kHistory = 3;
  Pair p = MakePair(v1::PRECISION_BF16, 17, kHistory);
  std::vector<std::shared_ptr<const PublishedDictionary>> published = {p.owner.published()};
  std::shared_ptr<const PublishedDictionary> v0 = p.replica.Find(0);
  ASSERT_NE(v0, nullptr);
  std::mt19937 rng(19);
  for (int round = 1; round <= 6; ++round) {
    p.owner.mutable_learner(0)[0] += 1.0f;  // Something to send in every round.
    Perturb(p.owner, rng);
    absl::StatusOr<v1::DictionaryDelta> delta = p.owner.MakeDelta(4 * p.owner.RowBytes(0));
    ASSERT_TRUE(delta.ok());
    ASSERT_EQ(delta->new_version(), static_cast<uint64_t>(round));
    ASSERT_TRUE(p.replica.Apply(*delta).ok());
    published.push_back(p.owner.published());
    for (uint64_t v = 0; v <= static_cast<uint64_t>(round); ++v) {
      const bool kept = v + kHistory > static_cast<uint64_t>(round);
      std::shared_ptr<const PublishedDictionary> r = p.replica.Find(v);
      std::shared_ptr<const PublishedDictionary> o = p.owner.Find(v);
      ASSERT_EQ(r != nullptr, kept) << "version " << v << " after round " << round;
      ASSERT_EQ(o != nullptr, kept) << "version " << v << " after round " << round;
      if (kept) {
        EXPECT_TRUE(Identical(*published[v], *r));
        EXPECT_EQ(o, published[v]);
      }
    }
    EXPECT_EQ(p.replica.Find(round + 1), nullptr);
  }
  EXPECT_TRUE(Identical(*published[0], *v0));  // Still alive, though no longer kept.

  // A no-op delta adds no version; a restore drops the old ones.
  absl::StatusOr<v1::DictionaryDelta> no_op = p.owner.MakeDelta(0);
  ASSERT_TRUE(no_op.ok());
  ASSERT_TRUE(p.replica.Apply(*no_op).ok());
  EXPECT_NE(p.replica.Find(4), nullptr);
  ASSERT_TRUE(p.replica.Restore(p.owner.Snapshot()).ok());
  EXPECT_NE(p.replica.Find(6), nullptr);
  EXPECT_EQ(p.replica.Find(5), nullptr);
}

}  // namespace
}  // namespace mapl
