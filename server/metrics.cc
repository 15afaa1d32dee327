// The stats record exported by reflection, and the codec histograms; the HTTP endpoint is
// prometheus-cpp's civetweb Exposer.
#include "server/metrics.h"

#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/reflection.h"

namespace mapl {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;
using google::protobuf::Reflection;
using Labels = std::vector<prometheus::ClientMetric::Label>;

// Encode and decode take tens of microseconds (small microbatches) to tens of milliseconds.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0};
}

double NumericValue(const Message& m, const FieldDescriptor* f) {
  const Reflection* r = m.GetReflection();
  switch (f->cpp_type()) {
    case FieldDescriptor::CPPTYPE_BOOL:
      return r->GetBool(m, f) ? 1.0 : 0.0;
    case FieldDescriptor::CPPTYPE_UINT64:
      // A fixed64 is a hash or an id: its low 53 bits are exact in a double, all 64 are not.
      if (f->type() == FieldDescriptor::TYPE_FIXED64) {
        return static_cast<double>(r->GetUInt64(m, f) & ((uint64_t{1} << 53) - 1));
      }
      return static_cast<double>(r->GetUInt64(m, f));
    case FieldDescriptor::CPPTYPE_UINT32:
      return r->GetUInt32(m, f);
    case FieldDescriptor::CPPTYPE_INT64:
      return static_cast<double>(r->GetInt64(m, f));
    case FieldDescriptor::CPPTYPE_INT32:
      return r->GetInt32(m, f);
    case FieldDescriptor::CPPTYPE_DOUBLE:
      return r->GetDouble(m, f);
    case FieldDescriptor::CPPTYPE_FLOAT:
      return r->GetFloat(m, f);
    default:
      MAPL_CHECK(false, absl::StrCat("local.proto: field ", f->full_name(),
                                     " has a (metric) option but is not a number"));
  }
  return 0.0;
}

// Collects families by name, so every record of the same field lands in one family.
class FamilyBuilder {
 public:
  void Add(const std::string& name, const std::string& help, v1::MetricKind kind,
           const Labels& labels, double value) {
    const bool counter = kind == v1::METRIC_COUNTER;
    const std::string full = counter ? name + "_total" : name;
    prometheus::MetricFamily& family = families_[full];
    if (family.name.empty()) {
      family.name = full;
      family.help = help;
      family.type = counter ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge;
    }
    prometheus::ClientMetric metric;
    metric.label = labels;
    if (counter) {
      metric.counter.value = value;
    } else {
      metric.gauge.value = value;
    }
    family.metric.push_back(std::move(metric));
  }

  // Every field of `m` that has a (metric) option, as <prefix>_<field>; nested message fields
  // (LinkStats) become their own prefix mapl_<field>; map<string, message> fields become
  // <prefix>_<field>_<subfield> with the key as label `body`.
  void AddRecord(const Message& m, const std::string& prefix, const Labels& labels) {
    const google::protobuf::Descriptor* d = m.GetDescriptor();
    const Reflection* r = m.GetReflection();
    for (int i = 0; i < d->field_count(); ++i) {
      const FieldDescriptor* f = d->field(i);
      if (f->is_map()) {
        const FieldDescriptor* key = f->message_type()->map_key();
        const FieldDescriptor* value = f->message_type()->map_value();
        if (value->cpp_type() != FieldDescriptor::CPPTYPE_MESSAGE) continue;
        for (int j = 0; j < r->FieldSize(m, f); ++j) {
          const Message& entry = r->GetRepeatedMessage(m, f, j);
          Labels with = labels;
          with.push_back({"body", entry.GetReflection()->GetString(entry, key)});
          AddRecord(entry.GetReflection()->GetMessage(entry, value),
                    absl::StrCat(prefix, "_", f->name()), with);
        }
        continue;
      }
      if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && !f->is_repeated()) {
        AddRecord(r->GetMessage(m, f), absl::StrCat("mapl_", f->name()), labels);
        continue;
      }
      const v1::MetricKind kind = f->options().GetExtension(v1::metric);
      if (kind == v1::METRIC_NONE) continue;
      const std::string help =
          absl::StrCat(d->name(), ".", f->name(), " (proto/mapl/v1/local.proto)");
      Add(absl::StrCat(prefix, "_", f->name()), help, kind, labels, NumericValue(m, f));
    }
  }

  std::vector<prometheus::MetricFamily> Take() {
    std::vector<prometheus::MetricFamily> out;
    for (auto& [name, family] : families_) out.push_back(std::move(family));
    return out;
  }

 private:
  std::map<std::string, prometheus::MetricFamily> families_;
};

}  // namespace

std::vector<prometheus::MetricFamily> StatsFamilies(const std::vector<v1::BoundaryStats>& records,
                                                    uint32_t stage,
                                                    const v1::PeerServerStats* server) {
  FamilyBuilder builder;
  if (server != nullptr) {
    builder.AddRecord(*server, "mapl_peer_server", {{"stage", absl::StrCat(stage)}});
  }
  for (const v1::BoundaryStats& s : records) {
    const Labels labels = {
        {"stage", absl::StrCat(stage)}, {"boundary", absl::StrCat(s.id())}, {"role", s.role()}};
    builder.AddRecord(s, "mapl_boundary", labels);
  }
  return builder.Take();
}

class Metrics::StatsCollector : public prometheus::Collectable {
 public:
  StatsCollector(uint32_t stage, StatsSource source) : stage_(stage), source_(std::move(source)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    if (!server_source_) return StatsFamilies(source_(), stage_);
    const v1::PeerServerStats server = server_source_();
    return StatsFamilies(source_(), stage_, &server);
  }
  // Set before the endpoint serves (Metrics::SetPeerServerSource), read only afterwards.
  std::function<v1::PeerServerStats()> server_source_;

 private:
  const uint32_t stage_;
  const StatsSource source_;
};

Metrics::Metrics(uint32_t stage, StatsSource source)
    : stage_(stage),
      registry_(std::make_shared<prometheus::Registry>()),
      latency_(prometheus::BuildHistogram()
                   .Name("mapl_codec_seconds")
                   .Help("Encode (send) and decode (receive) time of one microbatch")
                   .Register(*registry_)),
      stats_(std::make_shared<StatsCollector>(stage, std::move(source))) {}

CodecTimers Metrics::AddBoundary(uint32_t id, const std::string& role) {
  const std::map<std::string, std::string> base = {
      {"stage", absl::StrCat(stage_)}, {"boundary", absl::StrCat(id)}, {"role", role}};
  auto with = [&](const char* v) {
    auto l = base;
    l["op"] = v;
    return l;
  };
  CodecTimers t;
  t.encode_seconds = &latency_.Add(with("encode"), LatencyBuckets());
  t.decode_seconds = &latency_.Add(with("decode"), LatencyBuckets());
  return t;
}

void Metrics::SetPeerServerSource(std::function<v1::PeerServerStats()> source) {
  MAPL_CHECK(exposer_ == nullptr, "SetPeerServerSource after Serve");
  stats_->server_source_ = std::move(source);
}

absl::Status Metrics::Serve(const std::string& address) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {  // civetweb reports bind failures by throwing
    return absl::UnavailableError(
        absl::StrCat("metrics_address ", address, ": cannot listen (", e.what(),
                     "); pick another port or set metrics_address: \"off\""));
  }
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(stats_);
  const std::vector<int> ports = exposer_->GetListeningPorts();
  port_ = ports.empty() ? 0 : ports[0];
  return absl::OkStatus();
}

}  // namespace mapl
