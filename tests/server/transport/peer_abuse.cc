// peer_abuse: plays an unauthenticated crowd against a mapld peer port, for the abuse test
// (tests/python/test_peer_abuse.py), which watches the daemon's threads and memory meanwhile.
//
//   peer_abuse --target 127.0.0.1:7000 --silent 1000 --hold_ms 3000  # streams that never say Hello
//   peer_abuse --target 127.0.0.1:7000 --big_bytes 268435456           # one 256 MiB first message
//   peer_abuse --target 127.0.0.1:7000 --brute 2000                    # Hellos with guessed tokens
//
// Prints one JSON line: how each attempt ended, by gRPC status code name.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpcpp/grpcpp.h"
#include "proto/mapl/v1/peer.grpc.pb.h"

ABSL_FLAG(std::string, target, "", "host:port of the peer listener");
ABSL_FLAG(int, silent, 0, "connections, each with one Link stream that never sends anything");
ABSL_FLAG(int, hold_ms, 3000, "how long the silent streams stay open at most");
ABSL_FLAG(int64_t, big_bytes, 0, "size of one first message (a frame payload) to send");
ABSL_FLAG(int, brute, 0, "Hellos with random tokens, one after another on one connection");

namespace {

using mapl::v1::Peer;
using mapl::v1::PeerMessage;

// The protocol version mapld speaks (server/transport/peer_link.h kPeerProtocolVersion; this tool
// links only the protos).
constexpr uint32_t kPeerProtocolVersion = 2;

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK:
      return "OK";
    case grpc::CANCELLED:
      return "CANCELLED";
    case grpc::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    case grpc::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::INTERNAL:
      return "INTERNAL";
    default:
      return "OTHER";
  }
}

std::shared_ptr<grpc::Channel> OwnChannel(const std::string& target) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // A connection of its own.
  args.SetMaxSendMessageSize(-1);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

struct Stream {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<Peer::Stub> stub;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<PeerMessage, PeerMessage>> rw;
};

std::map<std::string, int> Silent(const std::string& target, int n, int hold_ms) {
  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < n; ++i) {
    auto s = std::make_unique<Stream>();
    s->channel = OwnChannel(target);
    s->stub = Peer::NewStub(s->channel);
    s->context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(hold_ms));
    s->rw = s->stub->Link(&s->context);
    streams.push_back(std::move(s));
  }
  std::map<std::string, int> ended;
  for (auto& s : streams) {
    PeerMessage ignored;
    while (s->rw->Read(&ignored)) {
    }
    ++ended[CodeName(s->rw->Finish().error_code())];
  }
  return ended;
}

std::map<std::string, int> Big(const std::string& target, int64_t bytes) {
  Stream s;
  s.channel = OwnChannel(target);
  s.stub = Peer::NewStub(s.channel);
  s.context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  s.rw = s.stub->Link(&s.context);
  PeerMessage m;
  m.set_protocol_version(kPeerProtocolVersion);
  m.mutable_frame()->mutable_payload()->assign(static_cast<size_t>(bytes), 'x');
  s.rw->Write(m);
  s.rw->WritesDone();
  PeerMessage ignored;
  while (s.rw->Read(&ignored)) {
  }
  return {{CodeName(s.rw->Finish().error_code()), 1}};
}

std::map<std::string, int> Brute(const std::string& target, int n) {
  std::shared_ptr<grpc::Channel> channel = OwnChannel(target);
  std::unique_ptr<Peer::Stub> stub = Peer::NewStub(channel);
  std::mt19937_64 rng(12345);
  std::map<std::string, int> ended;
  for (int i = 0; i < n; ++i) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    auto rw = stub->Link(&context);
    PeerMessage hello;
    hello.set_protocol_version(kPeerProtocolVersion);
    hello.mutable_hello()->set_protocol_version(kPeerProtocolVersion);
    hello.mutable_hello()->set_boundary(0);
    hello.mutable_hello()->set_stage(0);
    hello.mutable_hello()->set_instance_id(rng() | 1);
    hello.mutable_hello()->set_auth_token(absl::StrCat("guess-", rng()));
    rw->Write(hello);
    PeerMessage ignored;
    while (rw->Read(&ignored)) {
    }
    ++ended[CodeName(rw->Finish().error_code())];
  }
  return ended;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string target = absl::GetFlag(FLAGS_target);
  if (target.empty()) {
    std::fprintf(stderr, "peer_abuse: --target host:port is required\n");
    return 2;
  }
  // One descriptor per silent connection.
  struct rlimit files;
  if (getrlimit(RLIMIT_NOFILE, &files) == 0) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }
  std::map<std::string, int> ended;
  if (absl::GetFlag(FLAGS_silent) > 0) {
    ended = Silent(target, absl::GetFlag(FLAGS_silent), absl::GetFlag(FLAGS_hold_ms));
  } else if (absl::GetFlag(FLAGS_big_bytes) > 0) {
    ended = Big(target, absl::GetFlag(FLAGS_big_bytes));
  } else if (absl::GetFlag(FLAGS_brute) > 0) {
    ended = Brute(target, absl::GetFlag(FLAGS_brute));
  }
  std::vector<std::string> parts;
  for (const auto& [code, count] : ended) parts.push_back(absl::StrCat("\"", code, "\": ", count));
  std::printf("{%s}\n", absl::StrJoin(parts, ", ").c_str());
  return 0;
}
