// A plain HTTP/1.0 GET on loopback, for the tests that read the metrics endpoint.
#ifndef MAPL_TESTS_SERVER_HTTP_GET_H_
#define MAPL_TESTS_SERVER_HTTP_GET_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace mapl {
namespace testing_internal {

// GET http://127.0.0.1:<port><path>: the body of a 200 reply, or an error.
inline absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to 127.0.0.1:", port));
  }
  // HTTP/1.0 without Accept-Encoding: a plain body, ended by the server closing.
  const std::string request = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  if (::write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return absl::InternalError("short write");
  }
  std::string reply;
  char buf[65536];
  for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) reply.append(buf, n);
  ::close(fd);
  const size_t head_end = reply.find("\r\n\r\n");
  if (head_end == std::string::npos) return absl::DataLossError("no HTTP header: " + reply);
  const std::string status_line = reply.substr(0, reply.find("\r\n"));
  if (status_line.find(" 200 ") == std::string::npos) {
    return absl::UnavailableError("HTTP status: " + status_line);
  }
  return reply.substr(head_end + 4);
}

}  // namespace testing_internal
}  // namespace mapl

#endif  // MAPL_TESTS_SERVER_HTTP_GET_H_
