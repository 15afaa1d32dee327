// Prometheus metrics of one daemon (prometheus-cpp), served at http://<metrics_address>/metrics.
//
// Statistics are not declared here: every field of the stats record (local.proto BoundaryStats,
// and its nested LinkStats) that carries a `(metric)` option is exported from the record itself
// at each scrape, by protobuf reflection:
//   BoundaryStats.<field>            -> mapl_boundary_<field>{stage, boundary, role}
//   BoundaryStats.link.<field>       -> mapl_link_<field>{stage, boundary, role}
//   BoundaryStats.link.sent[<body>]  -> mapl_link_sent_<field>{..., body="frame"}
//   PeerServerStats.<field>          -> mapl_peer_server_<field>{stage}
// with a _total suffix for counters. So a new statistic is one proto field plus the code that
// computes it. The encode and decode times are histograms kept here
// (mapl_codec_seconds{stage, boundary, role, op}).
//
//   mapl::Metrics metrics(/*stage=*/1, [&] { return AllBoundaryStats(); });
//   mapl::CodecTimers timers = metrics.AddBoundary(0, "downstream");
//   MAPL_RETURN_IF_ERROR(metrics.Serve("127.0.0.1:0"));
#ifndef MAPL_SERVER_METRICS_H_
#define MAPL_SERVER_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"
#include "prometheus/histogram.h"
#include "prometheus/metric_family.h"
#include "prometheus/registry.h"
#include "proto/mapl/v1/local.pb.h"
#include "server/boundary_worker.h"

namespace mapl {

// The metric families of `records` (one per boundary), as exported: for tests and for the
// endpoint. `stage` labels every series.
std::vector<prometheus::MetricFamily> StatsFamilies(const std::vector<v1::BoundaryStats>& records,
                                                    uint32_t stage,
                                                    const v1::PeerServerStats* server = nullptr);

class Metrics {
 public:
  using StatsSource = std::function<std::vector<v1::BoundaryStats>()>;
  // `source` gives the current records at each scrape (called on the HTTP server's thread).
  Metrics(uint32_t stage, StatsSource source);
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // Registers the codec timers of one boundary; call before Serve.
  CodecTimers AddBoundary(uint32_t id, const std::string& role);
  // Exports the peer server's record (local.proto PeerServerStats) as
  // mapl_peer_server_<field>{stage} at each scrape; call before Serve.
  void SetPeerServerSource(std::function<v1::PeerServerStats()> source);
  // Starts the HTTP endpoint ("host:port", port 0 picks a free one).
  absl::Status Serve(const std::string& address);
  int port() const { return port_; }

 private:
  class StatsCollector;
  const uint32_t stage_;
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Histogram>& latency_;
  std::shared_ptr<StatsCollector> stats_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace mapl

#endif  // MAPL_SERVER_METRICS_H_
