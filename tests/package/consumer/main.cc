// Attaches to a running mapld and prints its stage and, per boundary, the frames it sent and
// received: mapl_consumer SOCKET. Built against the installed package (find_package(mapl)).
#include <cstdio>
#include <memory>

#include "client/mapl_client.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
    return 2;
  }
  std::unique_ptr<mapl::client::Client> client;
  mapl::client::Status s =
      mapl::client::Client::Connect(argv[1], "consumer", /*timeout_ms=*/10000, &client);
  if (!s.ok()) {
    std::fprintf(stderr, "connect: %s: %s\n", mapl::client::StatusCodeName(s.code),
                 s.message.c_str());
    return 1;
  }
  mapl::client::StatsResult stats;
  s = client->Stats(&stats);
  if (!s.ok()) {
    std::fprintf(stderr, "stats: %s: %s\n", mapl::client::StatusCodeName(s.code),
                 s.message.c_str());
    return 1;
  }
  std::printf("stage %u\n", stats.stage());
  for (const mapl::v1::BoundaryStats& b : stats.boundaries()) {
    std::printf("boundary %u frames_sent %llu frames_received %llu\n", b.id(),
                static_cast<unsigned long long>(b.frames_sent()),
                static_cast<unsigned long long>(b.frames_received()));
  }
  return 0;
}
