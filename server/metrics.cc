// Metric families and their series; the HTTP endpoint is prometheus-cpp's civetweb Exposer.
#include "server/metrics.h"

#include "absl/strings/str_cat.h"

namespace mapl {
namespace {

const char* kDirections[2] = {"forward", "backward"};

// Encode and decode take tens of microseconds (small microbatches) to tens of milliseconds.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0};
}

}  // namespace

Metrics::Metrics(uint32_t stage)
    : stage_(absl::StrCat(stage)),
      registry_(std::make_shared<prometheus::Registry>()),
      raw_bytes_(prometheus::BuildCounter()
                     .Name("mapl_raw_bytes_total")
                     .Help("Tensor bytes sent or received, counted as dense bf16 (tokens x d x 2)")
                     .Register(*registry_)),
      wire_bytes_(prometheus::BuildCounter()
                      .Name("mapl_wire_bytes_total")
                      .Help("Bytes on the peer link, by kind: payload (frames) or dictionary")
                      .Register(*registry_)),
      frames_(prometheus::BuildCounter()
                  .Name("mapl_frames_total")
                  .Help("Frames sent and received on the peer link")
                  .Register(*registry_)),
      bad_messages_(prometheus::BuildCounter()
                        .Name("mapl_bad_peer_messages_total")
                        .Help("Peer messages rejected as corrupt or out of range")
                        .Register(*registry_)),
      latency_(prometheus::BuildHistogram()
                   .Name("mapl_codec_seconds")
                   .Help("Encode (send) and decode (receive) time of one microbatch")
                   .Register(*registry_)),
      gauges_(prometheus::BuildGauge()
                  .Name("mapl_boundary")
                  .Help("Per-boundary state: metric=orthogonality_error (max |U^T U - I|), "
                        "dictionary_version, dictionary_checksum (low 53 bits), compression_ratio")
                  .Register(*registry_)) {}

BoundaryMetrics& Metrics::AddBoundary(uint32_t id, const std::string& role) {
  BoundaryMetrics& m = boundaries_[id];
  const std::string b = absl::StrCat(id);
  for (int d = 0; d < 2; ++d) {
    const std::map<std::string, std::string> base = {
        {"stage", stage_}, {"boundary", b}, {"role", role}, {"direction", kDirections[d]}};
    auto with = [&](const char* k, const char* v) {
      auto l = base;
      l[k] = v;
      return l;
    };
    m.raw_bytes[d] = &raw_bytes_.Add(base);
    m.wire_payload_bytes[d] = &wire_bytes_.Add(with("kind", "payload"));
    m.frames_sent[d] = &frames_.Add(with("event", "sent"));
    m.frames_received[d] = &frames_.Add(with("event", "received"));
    m.encode_seconds[d] = &latency_.Add(with("op", "encode"), LatencyBuckets());
    m.decode_seconds[d] = &latency_.Add(with("op", "decode"), LatencyBuckets());
    m.compression_ratio[d] = &gauges_.Add(with("metric", "compression_ratio"));
  }
  const std::map<std::string, std::string> base = {
      {"stage", stage_}, {"boundary", b}, {"role", role}};
  auto with = [&](const char* k, const char* v) {
    auto l = base;
    l[k] = v;
    return l;
  };
  m.wire_dictionary_bytes = &wire_bytes_.Add(with("kind", "dictionary"));
  m.bad_messages = &bad_messages_.Add(base);
  m.orthogonality_error = &gauges_.Add(with("metric", "orthogonality_error"));
  m.dictionary_version = &gauges_.Add(with("metric", "dictionary_version"));
  m.dictionary_checksum = &gauges_.Add(with("metric", "dictionary_checksum"));
  return m;
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
  const std::vector<int> ports = exposer_->GetListeningPorts();
  port_ = ports.empty() ? 0 : ports[0];
  return absl::OkStatus();
}

void Metrics::Refresh() {
  for (auto& [id, m] : boundaries_) {
    for (int d = 0; d < 2; ++d) {
      const double wire = m.wire_payload_bytes[d]->Value();
      if (wire > 0) m.compression_ratio[d]->Set(m.raw_bytes[d]->Value() / wire);
    }
  }
}

}  // namespace mapl
