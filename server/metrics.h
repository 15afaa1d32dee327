// Prometheus metrics of one daemon (prometheus-cpp), served at http://<metrics_address>/metrics.
// Every series carries the stage, the boundary and, where it applies, the direction.
//
//   mapl::Metrics metrics(/*stage=*/1);
//   mapl::BoundaryMetrics& m = metrics.AddBoundary(0, "downstream");
//   m.frames_received[mapl::kForward]->Increment();
//   MAPL_RETURN_IF_ERROR(metrics.Serve("127.0.0.1:0"));
#ifndef MAPL_SERVER_METRICS_H_
#define MAPL_SERVER_METRICS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace mapl {

enum DirectionIndex { kForward = 0, kBackward = 1 };

struct BoundaryMetrics {
  prometheus::Counter* raw_bytes[2];           // tensor bytes handed in (send) or out (recv)
  prometheus::Counter* wire_payload_bytes[2];  // frame payload bytes sent or received
  prometheus::Counter* wire_dictionary_bytes;  // dictionary delta and snapshot bytes
  prometheus::Counter* frames_sent[2];
  prometheus::Counter* frames_received[2];
  prometheus::Counter* bad_messages;  // rejected peer input (corrupt, out of range)
  prometheus::Histogram* encode_seconds[2];
  prometheus::Histogram* decode_seconds[2];
  prometheus::Gauge* orthogonality_error;  // max |U^T U - I| of the published U
  prometheus::Gauge* dictionary_version;
  prometheus::Gauge* dictionary_checksum;   // low 53 bits (exact in a double)
  prometheus::Gauge* compression_ratio[2];  // raw / wire payload, cumulative
};

class Metrics {
 public:
  explicit Metrics(uint32_t stage);
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Registers the series of one boundary; call before Serve.
  BoundaryMetrics& AddBoundary(uint32_t id, const std::string& role);
  // Starts the HTTP endpoint ("host:port", port 0 picks a free one).
  absl::Status Serve(const std::string& address);
  int port() const { return port_; }
  // Updates the compression ratio gauges from the counters.
  void Refresh();

 private:
  const std::string stage_;
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& raw_bytes_;
  prometheus::Family<prometheus::Counter>& wire_bytes_;
  prometheus::Family<prometheus::Counter>& frames_;
  prometheus::Family<prometheus::Counter>& bad_messages_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Family<prometheus::Gauge>& gauges_;
  std::map<uint32_t, BoundaryMetrics> boundaries_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace mapl

#endif  // MAPL_SERVER_METRICS_H_
