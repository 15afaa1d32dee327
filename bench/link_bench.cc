// Goodput of one peer link on this host, over either data plane: a PeerServer and a dialing
// PeerLink on loopback, one direction, frames of fixed sizes behind the daemon's window of
// unacknowledged bytes. Reports, per frame size, the goodput from the first Send to the end of
// Drain and the process's CPU seconds per GiB (both ends are in this process).
//
//   link_bench --data_plane=ucx --gib=2 --frame_mib=1,8,64,200
//
// On one host UCX runs over TCP loopback (tcp/lo): its shared-memory transports do not support
// the peer error handling the link needs.
#include <malloc.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "proto/mapl/v1/peer.pb.h"
#include "server/transport/peer_link.h"
#include "server/transport/peer_server.h"

ABSL_FLAG(std::string, data_plane, "grpc", "grpc or ucx");
ABSL_FLAG(double, gib, 2.0, "GiB sent per frame size");
ABSL_FLAG(std::string, frame_mib, "1,8,64,200", "frame sizes in MiB, comma-separated");
ABSL_FLAG(int64_t, window_mib, 256, "unacknowledged bytes the sender keeps in flight, in MiB");

namespace {

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

}  // namespace

int main(int argc, char** argv) {
  // As mapld's main does (server/main.cc): keep freed large buffers in the heap for reuse, and
  // one arena for every thread. With glibc's defaults every frame-sized buffer is a fresh mmap
  // whose pages fault in on first touch, and that, not the link, was most of this benchmark's
  // CPU time at 64 MiB frames.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_ARENA_MAX, 1);
  absl::ParseCommandLine(argc, argv);
  const std::string plane = absl::GetFlag(FLAGS_data_plane);
  if (plane != "grpc" && plane != "ucx") {
    std::fprintf(stderr, "link_bench: --data_plane must be grpc or ucx, not '%s'\n", plane.c_str());
    return 2;
  }
  std::vector<int64_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_frame_mib), ',')) {
    int64_t mib = 0;
    if (!absl::SimpleAtoi(s, &mib) || mib < 1 || mib > 255) {
      std::fprintf(stderr, "link_bench: frame sizes are 1 to 255 MiB, not '%s'\n",
                   std::string(s).c_str());
      return 2;
    }
    sizes.push_back(mib << 20);
  }
  const int64_t window = absl::GetFlag(FLAGS_window_mib) << 20;

  mapl::PeerLinkOptions down_options;
  down_options.boundary = 0;
  down_options.stage = 1;
  down_options.auth_token = "link_bench";
  down_options.data_plane = plane == "ucx" ? mapl::v1::DATA_PLANE_UCX : mapl::v1::DATA_PLANE_GRPC;
  mapl::PeerServerOptions server_options;
  server_options.listen_address = "127.0.0.1:0";
  auto server = mapl::PeerServer::Create(server_options);
  if (!server.ok()) {
    std::fprintf(stderr, "link_bench: %s\n", server.status().ToString().c_str());
    return 1;
  }
  auto down = (*server)->RegisterBoundary(down_options, [](mapl::v1::PeerMessage) {});
  if (!down.ok() || !(*server)->Start().ok()) {
    std::fprintf(stderr, "link_bench: the listener did not start\n");
    return 1;
  }
  mapl::PeerLinkOptions up_options = down_options;
  up_options.stage = 0;
  up_options.address = "127.0.0.1:" + std::to_string((*server)->port());
  auto up = mapl::PeerLink::Dial(up_options, [](mapl::v1::PeerMessage) {});
  if (!up.ok() || !(*up)->WaitConnected(absl::Seconds(30)).ok()) {
    std::fprintf(stderr, "link_bench: no connection: %s\n",
                 up.ok() ? (*up)->status().ToString().c_str() : up.status().ToString().c_str());
    return 1;
  }

  std::printf("data_plane  frame_MiB  GiB    seconds  Gbit/s  cpu_s/GiB\n");
  for (int64_t size : sizes) {
    const std::string payload(static_cast<size_t>(size) - 64, 'x');
    const int64_t count =
        std::max<int64_t>(1, static_cast<int64_t>(absl::GetFlag(FLAGS_gib) * (1 << 30)) / size);
    const double cpu0 = CpuSeconds();
    const absl::Time t0 = absl::Now();
    for (int64_t i = 0; i < count; ++i) {
      while (!(*up)->WaitQueueBelow(window, absl::Seconds(1))) {
      }
      mapl::v1::PeerMessage m;
      m.mutable_frame()->set_step(static_cast<uint64_t>(i));
      m.mutable_frame()->set_payload(payload);
      const absl::Status sent = (*up)->Send(std::move(m));
      if (!sent.ok()) {
        std::fprintf(stderr, "link_bench: %s\n", sent.ToString().c_str());
        return 1;
      }
    }
    const absl::Status drained = (*up)->Drain(absl::Minutes(10));
    if (!drained.ok()) {
      std::fprintf(stderr, "link_bench: %s\n", drained.ToString().c_str());
      return 1;
    }
    const double seconds = absl::ToDoubleSeconds(absl::Now() - t0);
    const double gib = static_cast<double>(count * size) / (1 << 30);
    std::printf("%-10s  %9lld  %5.2f  %7.2f  %6.2f  %9.2f\n", plane.c_str(),
                static_cast<long long>(size >> 20), gib, seconds, gib * 8.59 / seconds,
                (CpuSeconds() - cpu0) / gib);
  }
  const mapl::v1::LinkStats stats = (*up)->stats();
  std::printf("lanes: %s\n", stats.ucx_lanes().empty() ? "-" : stats.ucx_lanes().c_str());
  (*up)->Close();
  return 0;
}
