// The metrics exporter (server/metrics.h): StatsFamilies() against records with known values, with
// the expected series derived from local.proto's descriptors (so a new (metric) field needs no
// change here), a few series checked by hand, and the Metrics endpoint scraped over real HTTP.
#include "server/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/reflection.h"
#include "gtest/gtest.h"
#include "prometheus/check_names.h"
#include "prometheus/histogram.h"
#include "tests/server/http_get.h"

namespace mapl {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;
using LabelMap = std::map<std::string, std::string>;

// ---- records with known values ----

// A distinct value per (boundary index, field number), exact in a double.
double KnownValue(const FieldDescriptor* f, int index) {
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_BOOL:
      return index == 0 ? 1.0 : 0.0;
    case FieldDescriptor::CPPTYPE_DOUBLE:
    case FieldDescriptor::CPPTYPE_FLOAT:
      return (index + 1) + f->number() / 8.0;
    default:
      return 1000.0 * (index + 1) + f->number();
  }
}

// Sets every singular scalar field of `m` (numbers to KnownValue, strings to their name).
void FillScalars(Message* m, int index) {
  const Reflection* r = m->GetReflection();
  const Descriptor* d = m->GetDescriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (f->is_repeated()) continue;
    const double v = KnownValue(f, index);
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_BOOL:
        r->SetBool(m, f, v != 0);
        break;
      case FieldDescriptor::CPPTYPE_DOUBLE:
        r->SetDouble(m, f, v);
        break;
      case FieldDescriptor::CPPTYPE_FLOAT:
        r->SetFloat(m, f, static_cast<float>(v));
        break;
      case FieldDescriptor::CPPTYPE_UINT64:
        r->SetUInt64(m, f, static_cast<uint64_t>(v));
        break;
      case FieldDescriptor::CPPTYPE_UINT32:
        r->SetUInt32(m, f, static_cast<uint32_t>(v));
        break;
      case FieldDescriptor::CPPTYPE_INT64:
        r->SetInt64(m, f, static_cast<int64_t>(v));
        break;
      case FieldDescriptor::CPPTYPE_INT32:
        r->SetInt32(m, f, static_cast<int32_t>(v));
        break;
      case FieldDescriptor::CPPTYPE_STRING:
        r->SetString(m, f, f->name());
        break;
      default:
        break;  // messages: filled by the caller
    }
  }
}

v1::Traffic KnownTraffic(int index, int body) {
  v1::Traffic t;
  FillScalars(&t, index);
  // Different per body, so a value landing on the wrong body label shows.
  t.set_messages(t.messages() + 100 * body);
  t.set_bytes(t.bytes() + 100 * body);
  return t;
}

// The record of boundary `id` with role `role`: every scalar field of BoundaryStats and LinkStats
// set, including those without a (metric) option, and two bodies in each per-body map.
v1::BoundaryStats KnownRecord(int index, uint32_t id, const std::string& role) {
  v1::BoundaryStats s;
  FillScalars(&s, index);
  s.set_id(id);
  s.set_role(role);
  s.set_dictionary_checksum(0xfeedfacecafebeefULL);  // exported as its low 53 bits
  FillScalars(s.mutable_link(), index);
  (*s.mutable_link()->mutable_sent())["frame"] = KnownTraffic(index, 1);
  (*s.mutable_link()->mutable_sent())["ack"] = KnownTraffic(index, 2);
  (*s.mutable_link()->mutable_received())["frame"] = KnownTraffic(index, 3);
  (*s.mutable_link()->mutable_received())["dictionary_delta"] = KnownTraffic(index, 4);
  return s;
}

// ---- the expected series, from the descriptors ----

struct ExpectedFamily {
  prometheus::MetricType type;
  std::map<LabelMap, double> series;  // labels -> value
};

double Numeric(const Message& m, const FieldDescriptor* f) {
  const Reflection* r = m.GetReflection();
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_BOOL:
      return r->GetBool(m, f);
    case FieldDescriptor::CPPTYPE_DOUBLE:
      return r->GetDouble(m, f);
    case FieldDescriptor::CPPTYPE_FLOAT:
      return r->GetFloat(m, f);
    case FieldDescriptor::CPPTYPE_UINT64:
      // A fixed64 (a hash) is exported as its low 53 bits, exact in a double.
      if (f->type() == FieldDescriptor::TYPE_FIXED64) {
        return static_cast<double>(r->GetUInt64(m, f) % (uint64_t{1} << 53));
      }
      return static_cast<double>(r->GetUInt64(m, f));
    case FieldDescriptor::CPPTYPE_UINT32:
      return r->GetUInt32(m, f);
    case FieldDescriptor::CPPTYPE_INT64:
      return static_cast<double>(r->GetInt64(m, f));
    case FieldDescriptor::CPPTYPE_INT32:
      return r->GetInt32(m, f);
    default:
      ADD_FAILURE() << f->full_name() << " has a (metric) option but is not a number";
      return 0;
  }
}

// The documented mapping (server/metrics.h): <prefix>_<field>, _total for counters; a nested
// message field <f> is prefix mapl_<f>; a map<string, message> field <f> is <prefix>_<f>_<sub>
// with the key as label `body`.
void ExpectRecord(const Message& m, const std::string& prefix, const LabelMap& labels,
                  std::map<std::string, ExpectedFamily>* out) {
  const Descriptor* d = m.GetDescriptor();
  const Reflection* r = m.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const FieldDescriptor* f = d->field(i);
    if (f->is_map()) {
      const FieldDescriptor* key = f->message_type()->map_key();
      const FieldDescriptor* value = f->message_type()->map_value();
      ASSERT_EQ(value->cpp_type(), FieldDescriptor::CPPTYPE_MESSAGE) << f->full_name();
      for (int j = 0; j < r->FieldSize(m, f); ++j) {
        const Message& entry = r->GetRepeatedMessage(m, f, j);
        LabelMap with = labels;
        with["body"] = entry.GetReflection()->GetString(entry, key);
        ExpectRecord(entry.GetReflection()->GetMessage(entry, value), prefix + "_" + f->name(),
                     with, out);
      }
      continue;
    }
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
      ExpectRecord(r->GetMessage(m, f), "mapl_" + f->name(), labels, out);
      continue;
    }
    const v1::MetricKind kind = f->options().GetExtension(v1::metric);
    if (kind == v1::METRIC_NONE) continue;
    const bool counter = kind == v1::METRIC_COUNTER;
    ExpectedFamily& family = (*out)[absl::StrCat(prefix, "_", f->name(), counter ? "_total" : "")];
    family.type = counter ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge;
    EXPECT_TRUE(family.series.emplace(labels, Numeric(m, f)).second)
        << prefix << "_" << f->name() << " expected twice for the same labels";
  }
}

LabelMap Labels(const prometheus::ClientMetric& m) {
  LabelMap out;
  for (const auto& l : m.label) {
    EXPECT_TRUE(out.emplace(l.name, l.value).second) << "label " << l.name << " given twice";
  }
  return out;
}

double Value(const prometheus::MetricFamily& family, const prometheus::ClientMetric& m) {
  return family.type == prometheus::MetricType::Counter ? m.counter.value : m.gauge.value;
}

const prometheus::MetricFamily* FindFamily(const std::vector<prometheus::MetricFamily>& families,
                                           const std::string& name) {
  const prometheus::MetricFamily* found = nullptr;
  for (const prometheus::MetricFamily& f : families) {
    if (f.name != name) continue;
    EXPECT_EQ(found, nullptr) << "family " << name << " appears twice";
    found = &f;
  }
  return found;
}

// The type of family `name`; fails the test (and says Untyped) if there is no such family.
prometheus::MetricType FamilyType(const std::vector<prometheus::MetricFamily>& families,
                                  const std::string& name) {
  const prometheus::MetricFamily* family = FindFamily(families, name);
  if (family == nullptr) {
    ADD_FAILURE() << "no family " << name;
    return prometheus::MetricType::Untyped;
  }
  return family->type;
}

// The value of the one series of `name` with exactly `labels`; fails the test otherwise.
double SeriesValue(const std::vector<prometheus::MetricFamily>& families, const std::string& name,
                   const LabelMap& labels) {
  const prometheus::MetricFamily* family = FindFamily(families, name);
  if (family == nullptr) {
    ADD_FAILURE() << "no family " << name;
    return -1;
  }
  int matches = 0;
  double value = -1;
  for (const prometheus::ClientMetric& m : family->metric) {
    if (Labels(m) != labels) continue;
    ++matches;
    value = Value(*family, m);
  }
  EXPECT_EQ(matches, 1) << name;
  return value;
}

const LabelMap kDown = {{"stage", "3"}, {"boundary", "4"}, {"role", "downstream"}};
const LabelMap kUp = {{"stage", "3"}, {"boundary", "9"}, {"role", "upstream"}};

std::vector<v1::BoundaryStats> TwoRecords() {
  return {KnownRecord(0, 4, "downstream"), KnownRecord(1, 9, "upstream")};
}

TEST(StatsFamiliesTest, EveryMetricFieldAppearsOncePerBoundaryWithItsNameTypeValueAndLabels) {
  const std::vector<v1::BoundaryStats> records = TwoRecords();
  std::map<std::string, ExpectedFamily> expected;
  ExpectRecord(records[0], "mapl_boundary", kDown, &expected);
  ExpectRecord(records[1], "mapl_boundary", kUp, &expected);
  ASSERT_FALSE(expected.empty());

  const std::vector<prometheus::MetricFamily> families = StatsFamilies(records, 3);
  std::set<std::string> names;
  for (const prometheus::MetricFamily& family : families) {
    EXPECT_TRUE(names.insert(family.name).second) << "family " << family.name << " twice";
    EXPECT_TRUE(prometheus::CheckMetricName(family.name)) << family.name;
    EXPECT_FALSE(family.help.empty()) << family.name;
    auto it = expected.find(family.name);
    if (it == expected.end()) {
      ADD_FAILURE() << "unexpected family " << family.name;
      continue;
    }
    EXPECT_EQ(family.type, it->second.type) << family.name;
    std::map<LabelMap, double> got;
    for (const prometheus::ClientMetric& m : family.metric) {
      for (const auto& l : m.label) EXPECT_TRUE(prometheus::CheckLabelName(l.name)) << l.name;
      EXPECT_TRUE(got.emplace(Labels(m), Value(family, m)).second)
          << family.name << ": two series with the same labels";
    }
    EXPECT_EQ(got, it->second.series) << family.name;
  }
  for (const auto& [name, family] : expected) {
    EXPECT_EQ(names.count(name), 1u) << "missing " << name;
  }
}

TEST(StatsFamiliesTest, KnownSeriesByHand) {
  std::vector<v1::BoundaryStats> records = TwoRecords();
  records[0].set_frames_sent(7);
  records[0].set_dictionary_version(12);
  records[1].set_orthogonality_error(2.5e-7);
  records[1].set_has_dictionary(true);
  records[0].set_inbox_bytes(3 << 20);
  records[0].set_inbox_tensors_dropped(2);
  records[0].mutable_link()->set_bytes_sent(123456789012ULL);
  records[0].mutable_link()->set_last_rtt_seconds(0.004);
  (*records[1].mutable_link()->mutable_sent())["frame"].set_messages(41);
  (*records[1].mutable_link()->mutable_received())["dictionary_delta"].set_bytes(5);
  const std::vector<prometheus::MetricFamily> f = StatsFamilies(records, 3);

  EXPECT_EQ(SeriesValue(f, "mapl_boundary_frames_sent_total", kDown), 7);
  EXPECT_EQ(FamilyType(f, "mapl_boundary_frames_sent_total"), prometheus::MetricType::Counter);
  EXPECT_EQ(SeriesValue(f, "mapl_boundary_dictionary_version", kDown), 12);
  EXPECT_EQ(FamilyType(f, "mapl_boundary_dictionary_version"), prometheus::MetricType::Gauge);
  // The worker's inbox.
  EXPECT_EQ(SeriesValue(f, "mapl_boundary_inbox_bytes", kDown), 3 << 20);
  EXPECT_EQ(FamilyType(f, "mapl_boundary_inbox_bytes"), prometheus::MetricType::Gauge);
  EXPECT_EQ(SeriesValue(f, "mapl_boundary_inbox_tensors_dropped_total", kDown), 2);
  EXPECT_EQ(SeriesValue(f, "mapl_boundary_orthogonality_error", kUp), 2.5e-7);
  EXPECT_EQ(SeriesValue(f, "mapl_boundary_has_dictionary", kUp), 1);
  EXPECT_EQ(SeriesValue(f, "mapl_link_bytes_sent_total", kDown), 123456789012.0);
  EXPECT_EQ(SeriesValue(f, "mapl_link_last_rtt_seconds", kDown), 0.004);
  EXPECT_EQ(FamilyType(f, "mapl_link_last_rtt_seconds"), prometheus::MetricType::Gauge);
  LabelMap frame = kUp;
  frame["body"] = "frame";
  EXPECT_EQ(SeriesValue(f, "mapl_link_sent_messages_total", frame), 41);
  LabelMap delta = kUp;
  delta["body"] = "dictionary_delta";
  EXPECT_EQ(SeriesValue(f, "mapl_link_received_bytes_total", delta), 5);
  // Four bodies a map over two boundaries: two sent and two received each.
  const prometheus::MetricFamily* sent = FindFamily(f, "mapl_link_sent_messages_total");
  ASSERT_NE(sent, nullptr);
  EXPECT_EQ(sent->metric.size(), 4u);

  // The checksum's low 53 bits, exact in a double.
  EXPECT_EQ(SeriesValue(f, "mapl_boundary_dictionary_checksum", kUp),
            static_cast<double>(0xfeedfacecafebeefULL & ((uint64_t{1} << 53) - 1)));
  // The records' identity is labels, not series.
  for (const prometheus::MetricFamily& family : f) {
    EXPECT_NE(family.name, "mapl_boundary_id");
    EXPECT_NE(family.name, "mapl_boundary_role");
    EXPECT_NE(family.name.rfind("mapl_boundary_link", 0), 0u) << family.name;
    EXPECT_NE(family.name, "mapl_link_sent_total");
  }
}

TEST(StatsFamiliesTest, NoRecordsNoFamiliesAndEmptyMapsNoBodySeries) {
  EXPECT_TRUE(StatsFamilies({}, 0).empty());
  v1::BoundaryStats plain;  // all zero: still exported, at 0
  plain.set_id(2);
  plain.set_role("upstream");
  const std::vector<prometheus::MetricFamily> f = StatsFamilies({plain}, 1);
  const LabelMap labels = {{"stage", "1"}, {"boundary", "2"}, {"role", "upstream"}};
  EXPECT_EQ(SeriesValue(f, "mapl_boundary_steps_total", labels), 0);
  EXPECT_EQ(SeriesValue(f, "mapl_link_connected", labels), 0);
  for (const prometheus::MetricFamily& family : f) {
    EXPECT_NE(family.name.rfind("mapl_link_sent_", 0), 0u) << family.name;
    EXPECT_NE(family.name.rfind("mapl_link_received_", 0), 0u) << family.name;
  }
}

// ---- the endpoint, over HTTP ----

using testing_internal::HttpGet;

// Finds the sample line `series` (name{labels} exactly as the text format writes them) and reads
// its value; false if there is no such line.
bool FindSample(const std::string& body, const std::string& series, double* value) {
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (line.size() > series.size() && line.substr(0, series.size()) == series &&
        line[series.size()] == ' ') {
      *value = std::strtod(std::string(line.substr(series.size() + 1)).c_str(), nullptr);
      return true;
    }
  }
  return false;
}

TEST(MetricsTest, ServesTheRecordsAtEachScrapeAndTheCodecHistograms) {
  std::atomic<uint64_t> frames{7};
  Metrics metrics(2, [&] {
    v1::BoundaryStats s;
    s.set_id(4);
    s.set_role("upstream");
    s.set_frames_sent(frames.load());
    return std::vector<v1::BoundaryStats>{s};
  });
  CodecTimers timers = metrics.AddBoundary(4, "upstream");
  ASSERT_NE(timers.encode_seconds, nullptr);
  ASSERT_NE(timers.decode_seconds, nullptr);
  for (int i = 0; i < 3; ++i) timers.encode_seconds->Observe(0.002);
  timers.decode_seconds->Observe(0.5);
  ASSERT_TRUE(metrics.Serve("127.0.0.1:0").ok());
  ASSERT_GT(metrics.port(), 0);

  absl::StatusOr<std::string> body = HttpGet(metrics.port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  const std::string labels = R"(stage="2",boundary="4",role="upstream")";
  double v = -1;
  ASSERT_TRUE(FindSample(*body, "mapl_boundary_frames_sent_total{" + labels + "}", &v)) << *body;
  EXPECT_EQ(v, 7);
  EXPECT_NE(body->find("# TYPE mapl_boundary_frames_sent_total counter"), std::string::npos);
  EXPECT_NE(body->find("# TYPE mapl_codec_seconds histogram"), std::string::npos);
  // Histogram labels come sorted by name.
  const std::string encode = R"(boundary="4",op="encode",role="upstream",stage="2")";
  const std::string decode = R"(boundary="4",op="decode",role="upstream",stage="2")";
  ASSERT_TRUE(FindSample(*body, "mapl_codec_seconds_count{" + encode + "}", &v)) << *body;
  EXPECT_EQ(v, 3);
  ASSERT_TRUE(FindSample(*body, "mapl_codec_seconds_bucket{" + encode + ",le=\"0.001\"}", &v));
  EXPECT_EQ(v, 0);
  ASSERT_TRUE(FindSample(*body, "mapl_codec_seconds_bucket{" + encode + ",le=\"0.003\"}", &v));
  EXPECT_EQ(v, 3);
  ASSERT_TRUE(FindSample(*body, "mapl_codec_seconds_bucket{" + decode + ",le=\"0.3\"}", &v));
  EXPECT_EQ(v, 0);
  ASSERT_TRUE(FindSample(*body, "mapl_codec_seconds_bucket{" + decode + ",le=\"1\"}", &v));
  EXPECT_EQ(v, 1);
  ASSERT_TRUE(FindSample(*body, "mapl_codec_seconds_sum{" + decode + "}", &v));
  EXPECT_DOUBLE_EQ(v, 0.5);

  // The record is read again at every scrape.
  frames = 8;
  body = HttpGet(metrics.port(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  ASSERT_TRUE(FindSample(*body, "mapl_boundary_frames_sent_total{" + labels + "}", &v));
  EXPECT_EQ(v, 8);
}

TEST(MetricsTest, APortInUseIsUnavailableAndSaysWhatToDo) {
  Metrics first(0, [] { return std::vector<v1::BoundaryStats>{}; });
  ASSERT_TRUE(first.Serve("127.0.0.1:0").ok());
  Metrics second(0, [] { return std::vector<v1::BoundaryStats>{}; });
  const absl::Status s = second.Serve(absl::StrCat("127.0.0.1:", first.port()));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("metrics_address"), std::string::npos) << s;
  EXPECT_NE(s.message().find("off"), std::string::npos) << s;
}

}  // namespace
}  // namespace mapl
