// Tests of the session registry (server/session_registry.h): the sealed memfd buffers a session
// gets, who may take their fds, when they go away, random session ids, the session limit, and
// every check of a TensorRef against what was attached.
#include "server/session_registry.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/registry.h"

namespace mapl {
namespace {

constexpr uint64_t kBytes = 8192;

// How the kernel names a memfd in /proc/self/fd and /proc/self/maps.
std::string MemfdPath(const std::string& name) {
  return absl::StrCat("/memfd:", name, " (deleted)");
}

// Open fds of this process that are the memfd `name`.
int OpenFdsOf(const std::string& name) {
  int n = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) {
    ADD_FAILURE() << "opendir(/proc/self/fd): " << std::strerror(errno);
    return -1;
  }
  while (dirent* e = ::readdir(dir)) {
    char target[512];
    const ssize_t len =
        ::readlink(absl::StrCat("/proc/self/fd/", e->d_name).c_str(), target, sizeof(target) - 1);
    if (len > 0 && std::string(target, len) == MemfdPath(name)) ++n;
  }
  ::closedir(dir);
  return n;
}

// Mappings of this process of the memfd `name` (the registry's own, in this test).
int MappingsOf(const std::string& name) {
  std::ifstream maps("/proc/self/maps");
  int n = 0;
  for (std::string line; std::getline(maps, line);) n += absl::EndsWith(line, MemfdPath(name));
  return n;
}

// Whether anything of the buffer is left in this process: an fd or a mapping.
bool Alive(const std::string& name) { return OpenFdsOf(name) + MappingsOf(name) > 0; }

// A second mapping of a buffer, as the trainer makes it from the fd it was handed.
class Mapping {
 public:
  Mapping(int fd, size_t bytes) : bytes_(bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ADD_FAILURE() << "mmap: " << std::strerror(errno);
      return;
    }
    data_ = static_cast<char*>(p);
  }
  ~Mapping() {
    if (data_ != nullptr) ::munmap(data_, bytes_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  char* data() const { return data_; }

 private:
  size_t bytes_;
  char* data_ = nullptr;
};

// Writes through the session's buffer and reads through a mapping of the handed-out fd, and back.
void ExpectSharedBytes(const SharedMemory& shm, int fd, uint8_t seed) {
  Mapping other(fd, shm.size());
  ASSERT_NE(other.data(), nullptr);
  char* mine = static_cast<char*>(shm.data());
  for (size_t i = 0; i < shm.size(); i += 509) mine[i] = static_cast<char>(seed + i);
  for (size_t i = 0; i < shm.size(); i += 509) {
    ASSERT_EQ(other.data()[i], static_cast<char>(seed + i)) << shm.name() << " byte " << i;
  }
  other.data()[shm.size() - 1] = static_cast<char>(seed ^ 0x5a);
  EXPECT_EQ(mine[shm.size() - 1], static_cast<char>(seed ^ 0x5a));
}

v1::AttachRequest Request(const std::string& client) {
  v1::AttachRequest r;
  r.set_client_name(client);
  r.set_pid(4242);
  return r;
}

absl::Span<const uint8_t> SecretOf(const v1::AttachEvent& event) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(event.buffer_secret().data()),
                                   event.buffer_secret().size());
}

// The fds of the event's buffers, taken as the trainer takes them.
std::vector<UniqueFd> TakeFds(SessionRegistry& registry, const v1::AttachEvent& event) {
  absl::StatusOr<std::vector<UniqueFd>> fds =
      registry.TakeBufferFds(event.session(), SecretOf(event));
  EXPECT_TRUE(fds.ok()) << fds.status();
  if (!fds.ok()) return {};
  return *std::move(fds);
}

TEST(SessionRegistryTest, AttachCreatesTheConfiguredBuffers) {
  SessionRegistry registry(/*stage=*/5, /*buffers=*/3, kBytes, /*max_sessions=*/4);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(Request("trainer"), &event);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_EQ((*s)->client_name, "trainer");
  EXPECT_EQ((*s)->pid, 4242u);
  EXPECT_EQ(event.session(), (*s)->id);
  EXPECT_EQ(event.buffer_secret().size(), kFdSecretBytes);
  ASSERT_EQ(event.buffers_size(), 3);
  ASSERT_EQ((*s)->buffers.size(), 3u);
  std::vector<UniqueFd> fds = TakeFds(registry, event);
  ASSERT_EQ(fds.size(), 3u);
  std::set<std::string> names;
  for (int i = 0; i < 3; ++i) {
    const v1::SharedBuffer& b = event.buffers(i);
    EXPECT_EQ(b.name(), (*s)->buffers[i]->name());
    EXPECT_EQ(b.bytes(), kBytes);
    EXPECT_EQ((*s)->buffers[i]->size(), kBytes);
    // The name says whose it is (daemon pid, stage, attach number, index): a glance at
    // /proc/<pid>/maps shows it. The session id stays out of it.
    EXPECT_TRUE(absl::StartsWith(b.name(), absl::StrCat("mapld-", ::getpid(), "-5-"))) << b.name();
    EXPECT_TRUE(absl::EndsWith(b.name(), absl::StrCat("-", i))) << b.name();
    EXPECT_FALSE(absl::StrContains(b.name(), absl::StrCat((*s)->id))) << b.name();
    EXPECT_EQ(MappingsOf(b.name()), 1) << b.name();
    struct stat st;
    ASSERT_EQ(::fstat(fds[i].get(), &st), 0);
    EXPECT_EQ(st.st_size, static_cast<off_t>(kBytes));
    EXPECT_EQ(::fcntl(fds[i].get(), F_GET_SEALS), F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    ExpectSharedBytes(*(*s)->buffers[i], fds[i].get(), static_cast<uint8_t>(17 * i + 1));
    names.insert(b.name());
  }
  EXPECT_EQ(names.size(), 3u);
}

// What made a trainer able to crash the daemon: an ftruncate of the shared memory to fewer bytes
// while the daemon copies out of it. The seals refuse it (and growing, and any new seal) for
// every fd of the buffer, however it was obtained.
TEST(SessionRegistryTest, ABufferCanNeitherShrinkNorGrow) {
  SessionRegistry registry(/*stage=*/1, /*buffers=*/1, kBytes, /*max_sessions=*/1);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(Request("t"), &event);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<UniqueFd> fds = TakeFds(registry, event);
  ASSERT_EQ(fds.size(), 1u);
  // A second open file of the same memfd, as /proc/<pid>/fd/<n> gives any process of the user.
  UniqueFd reopened(::open(absl::StrCat("/proc/self/fd/", fds[0].get()).c_str(), O_RDWR));
  ASSERT_TRUE(reopened.valid()) << std::strerror(errno);
  for (int fd : {fds[0].get(), reopened.get()}) {
    for (off_t size : {off_t{0}, off_t{1}, static_cast<off_t>(kBytes / 2),
                       static_cast<off_t>(kBytes - 1), static_cast<off_t>(kBytes + 4096)}) {
      errno = 0;
      EXPECT_EQ(::ftruncate(fd, size), -1) << "ftruncate to " << size;
      EXPECT_EQ(errno, EPERM) << "ftruncate to " << size << ": " << std::strerror(errno);
    }
    EXPECT_EQ(::posix_fallocate(fd, 0, static_cast<off_t>(2 * kBytes)), EPERM);
    errno = 0;
    EXPECT_EQ(::fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), -1);
    EXPECT_EQ(errno, EPERM) << std::strerror(errno);
    struct stat st;
    ASSERT_EQ(::fstat(fd, &st), 0);
    EXPECT_EQ(st.st_size, static_cast<off_t>(kBytes));
  }
  // The daemon reads its whole buffer, the last page included.
  const char* data = static_cast<const char*>((*s)->buffers[0]->data());
  volatile char sink = 0;
  for (size_t i = 0; i < kBytes; i += 512) sink = sink + data[i];
  sink = sink + data[kBytes - 1];
  (void)sink;
}

// Ids are drawn from getrandom: not 1, 2, 3, ..., not the same in two registries, unique.
TEST(SessionRegistryTest, SessionIdsAreRandomAndUnique) {
  constexpr int kSessions = 64;
  SessionRegistry registry(/*stage=*/1, /*buffers=*/1, 4096, kSessions);
  std::set<uint64_t> ids;
  std::set<std::string> secrets;
  std::vector<std::shared_ptr<Session>> sessions;
  for (int i = 0; i < kSessions; ++i) {
    v1::AttachEvent event;
    absl::StatusOr<std::shared_ptr<Session>> s =
        registry.Attach(Request(absl::StrCat("t", i)), &event);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_NE(event.session(), 0u);
    ids.insert(event.session());
    secrets.insert(event.buffer_secret());
    sessions.push_back(*s);
  }
  EXPECT_EQ(ids.size(), static_cast<size_t>(kSessions));
  EXPECT_EQ(secrets.size(), static_cast<size_t>(kSessions));
  // No id is next to another, and the high half of the bits is used: each fails for random
  // 64-bit ids with a probability below 2^-50.
  std::vector<uint64_t> sorted(ids.begin(), ids.end());
  for (size_t i = 1; i < sorted.size(); ++i) {
    EXPECT_GT(sorted[i] - sorted[i - 1], 1u) << sorted[i - 1] << ", " << sorted[i];
  }
  EXPECT_GT(sorted.back(), uint64_t{1} << 40);
  SessionRegistry other(/*stage=*/1, /*buffers=*/1, 4096, 1);
  v1::AttachEvent first;
  ASSERT_TRUE(other.Attach(Request("t"), &first).ok());
  EXPECT_EQ(ids.count(first.session()), 0u) << "a fresh registry repeats an id";
  for (const std::shared_ptr<Session>& s : sessions) {
    absl::StatusOr<std::shared_ptr<Session>> found = registry.Find(s->id);
    ASSERT_TRUE(found.ok()) << found.status();
    EXPECT_EQ(found->get(), s.get());
  }
}

TEST(SessionRegistryTest, MaxSessionsIsEnforced) {
  SessionRegistry registry(/*stage=*/1, /*buffers=*/2, kBytes, /*max_sessions=*/2);
  v1::AttachEvent a, b, c;
  ASSERT_TRUE(registry.Attach(Request("a"), &a).ok());
  ASSERT_TRUE(registry.Attach(Request("b"), &b).ok());
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(Request("c"), &c);
  ASSERT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted) << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), "max_sessions = 2")) << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), "raise max_sessions")) << s.status();
  EXPECT_EQ(c.buffers_size(), 0);
  EXPECT_EQ(c.session(), 0u);
  EXPECT_EQ(registry.size(), 2u);
  // A detached session frees its slot.
  registry.Detach(a.session());
  v1::AttachEvent d;
  ASSERT_TRUE(registry.Attach(Request("d"), &d).ok());
  EXPECT_EQ(registry.Attach(Request("e"), &c).status().code(),
            absl::StatusCode::kResourceExhausted);
}

// The fds go to whoever shows the session's secret, once; a wrong secret, an unknown session or
// a second request gets none, and a failed attempt does not use up the right one.
TEST(SessionRegistryTest, BufferFdsNeedTheSecretAndAreHandedOutOnce) {
  SessionRegistry registry(/*stage=*/1, /*buffers=*/2, kBytes, /*max_sessions=*/2);
  v1::AttachEvent event;
  ASSERT_TRUE(registry.Attach(Request("t"), &event).ok());
  std::string wrong = event.buffer_secret();
  wrong[kFdSecretBytes - 1] ^= 1;
  const auto bytes = [](const std::string& s) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  };
  const auto refused = [](const absl::StatusOr<std::vector<UniqueFd>>& r, const std::string& says) {
    ASSERT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), says)) << r.status();
  };
  refused(registry.TakeBufferFds(event.session(), bytes(wrong)), "wrong secret");
  refused(registry.TakeBufferFds(event.session(), bytes(event.buffer_secret().substr(0, 16))),
          "wrong secret");
  refused(registry.TakeBufferFds(event.session(), {}), "wrong secret");
  refused(registry.TakeBufferFds(event.session() ^ 1, SecretOf(event)), "is not attached");
  // Nothing was handed out: the daemon still holds one fd a buffer.
  for (const v1::SharedBuffer& b : event.buffers()) EXPECT_EQ(OpenFdsOf(b.name()), 1) << b.name();

  std::vector<UniqueFd> fds = TakeFds(registry, event);
  ASSERT_EQ(fds.size(), 2u);
  for (const UniqueFd& fd : fds) EXPECT_TRUE(fd.valid());
  refused(registry.TakeBufferFds(event.session(), SecretOf(event)), "already handed out");
  // The daemon kept no fds, only its mappings.
  fds.clear();
  for (const v1::SharedBuffer& b : event.buffers()) {
    EXPECT_EQ(OpenFdsOf(b.name()), 0) << b.name();
    EXPECT_EQ(MappingsOf(b.name()), 1) << b.name();
  }
}

TEST(SessionRegistryTest, SessionsGetDistinctBuffers) {
  SessionRegistry registry(/*stage=*/1, /*buffers=*/2, kBytes, /*max_sessions=*/4);
  std::set<std::string> names;
  std::vector<std::shared_ptr<Session>> sessions;
  for (int i = 0; i < 4; ++i) {
    v1::AttachEvent event;
    absl::StatusOr<std::shared_ptr<Session>> s =
        registry.Attach(Request(absl::StrCat("t", i)), &event);
    ASSERT_TRUE(s.ok()) << s.status();
    for (const v1::SharedBuffer& b : event.buffers()) names.insert(b.name());
    sessions.push_back(*s);
  }
  EXPECT_EQ(names.size(), 8u);
  EXPECT_EQ(registry.size(), 4u);
  // Each session's memory is its own.
  static_cast<char*>(sessions[0]->buffers[0]->data())[0] = 'a';
  static_cast<char*>(sessions[1]->buffers[0]->data())[0] = 'b';
  EXPECT_EQ(static_cast<char*>(sessions[0]->buffers[0]->data())[0], 'a');
}

TEST(SessionRegistryTest, FindOfAnUnknownIdIsFailedPreconditionNamingIt) {
  SessionRegistry registry(/*stage=*/0, /*buffers=*/1, kBytes, /*max_sessions=*/1);
  v1::AttachEvent event;
  ASSERT_TRUE(registry.Attach(Request("t"), &event).ok());
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Find(event.session() + 41);
  ASSERT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition) << s.status();
  EXPECT_TRUE(
      absl::StrContains(s.status().message(), absl::StrCat("session ", event.session() + 41)))
      << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), "Attach")) << s.status();
}

TEST(SessionRegistryTest, DetachFreesTheBuffersWhenTheLastUserLetsGo) {
  SessionRegistry registry(/*stage=*/2, /*buffers=*/2, kBytes, /*max_sessions=*/1);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> attached = registry.Attach(Request("t"), &event);
  ASSERT_TRUE(attached.ok()) << attached.status();
  attached->reset();  // the registry's reference is now the only one
  absl::StatusOr<std::shared_ptr<Session>> in_flight = registry.Find(event.session());
  ASSERT_TRUE(in_flight.ok()) << in_flight.status();
  std::shared_ptr<Session> user = *std::move(in_flight);  // a call still using the buffers

  registry.Detach(event.session());
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_EQ(registry.Find(event.session()).status().code(), absl::StatusCode::kFailedPrecondition);
  // A detached session's buffers are not handed out any more.
  EXPECT_EQ(registry.TakeBufferFds(event.session(), SecretOf(event)).status().code(),
            absl::StatusCode::kPermissionDenied);
  // The in-flight call still reads and writes them.
  for (const v1::SharedBuffer& b : event.buffers()) EXPECT_TRUE(Alive(b.name())) << b.name();
  static_cast<char*>(user->buffers[1]->data())[kBytes - 1] = 1;

  user.reset();
  // Nothing left: no mapping and no fd (these were never taken), so the kernel frees the memory.
  for (const v1::SharedBuffer& b : event.buffers()) {
    EXPECT_FALSE(Alive(b.name())) << b.name() << " outlived its last user";
  }
}

TEST(SessionRegistryTest, DetachOfAnUnknownIdIsIgnored) {
  SessionRegistry registry(/*stage=*/3, /*buffers=*/1, kBytes, /*max_sessions=*/1);
  v1::AttachEvent event;
  ASSERT_TRUE(registry.Attach(Request("t"), &event).ok());
  registry.Detach(event.session() + 1);
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_TRUE(registry.Find(event.session()).ok());
  EXPECT_TRUE(Alive(event.buffers(0).name()));
}

TEST(SessionRegistryTest, ClearDetachesEverySession) {
  SessionRegistry registry(/*stage=*/4, /*buffers=*/2, kBytes, /*max_sessions=*/2);
  v1::AttachEvent a, b;
  ASSERT_TRUE(registry.Attach(Request("a"), &a).ok());
  ASSERT_TRUE(registry.Attach(Request("b"), &b).ok());
  absl::StatusOr<std::shared_ptr<Session>> held = registry.Find(b.session());
  ASSERT_TRUE(held.ok());
  registry.Clear();
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_FALSE(registry.Find(a.session()).ok());
  EXPECT_FALSE(registry.Find(b.session()).ok());
  for (const v1::SharedBuffer& buf : a.buffers()) EXPECT_FALSE(Alive(buf.name()));
  // b's buffers stay while `held` uses them.
  for (const v1::SharedBuffer& buf : b.buffers()) EXPECT_TRUE(Alive(buf.name()));
  held->reset();
  for (const v1::SharedBuffer& buf : b.buffers()) EXPECT_FALSE(Alive(buf.name()));
}

// The open-file limit lowered so that one more fd fits: the Attach's first buffer is made, its
// second is not. The Attach fails saying what to raise, the buffer it had made goes away with
// it, and its session slot is given back.
TEST(SessionRegistryTest, FailedAttachLeavesNothingBehind) {
  SessionRegistry registry(/*stage=*/6, /*buffers=*/3, kBytes, /*max_sessions=*/1);
  rlimit saved;
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  std::set<int> open;
  {
    DIR* dir = ::opendir("/proc/self/fd");
    ASSERT_NE(dir, nullptr);
    const int own = ::dirfd(dir);
    while (dirent* e = ::readdir(dir)) {
      if (e->d_name[0] != '.' && std::atoi(e->d_name) != own) open.insert(std::atoi(e->d_name));
    }
    ::closedir(dir);
  }
  // Fds take the lowest free number: with the limit just past it, one more fd fits.
  int lowest_free = 0;
  while (open.count(lowest_free) != 0) ++lowest_free;
  rlimit lowered = saved;
  lowered.rlim_cur = static_cast<rlim_t>(lowest_free) + 1;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &lowered), 0);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(Request("t"), &event);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);

  ASSERT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted) << s.status();
  // It failed at the second buffer, after making the first.
  EXPECT_TRUE(absl::StrContains(s.status().message(), absl::StrCat("mapld-", ::getpid(), "-6-1-1")))
      << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), "ulimit -n")) << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), "client_buffers")) << s.status();
  EXPECT_EQ(event.buffers_size(), 0);
  EXPECT_EQ(registry.size(), 0u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(Alive(absl::StrCat("mapld-", ::getpid(), "-6-1-", i))) << "buffer " << i;
  }

  v1::AttachEvent next;
  absl::StatusOr<std::shared_ptr<Session>> retry = registry.Attach(Request("t"), &next);
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(next.buffers_size(), 3);
}

// ---- TensorRef checks ----

class SessionRegistryTensorRefTest : public ::testing::Test {
 protected:
  static constexpr uint32_t kD = 64, kMaxTokens = 8;
  static constexpr uint64_t kBufferBytes = 4096;

  void SetUp() override {
    v1::AttachEvent event;
    absl::StatusOr<std::shared_ptr<Session>> s = registry_.Attach(Request("t"), &event);
    ASSERT_TRUE(s.ok()) << s.status();
    session_ = *std::move(s);
    config_.set_id(7);
    config_.set_d(kD);
    config_.set_max_tokens(kMaxTokens);
  }

  static v1::TensorRef Ref(uint32_t buffer, uint64_t offset, uint32_t rows, uint32_t cols,
                           v1::DType dtype) {
    v1::TensorRef r;
    r.set_buffer(buffer);
    r.set_offset(offset);
    r.set_rows(rows);
    r.set_cols(cols);
    r.set_dtype(dtype);
    return r;
  }
  char* Base(int buffer) const { return static_cast<char*>(session_->buffers[buffer]->data()); }

  // INVALID_ARGUMENT whose message contains `field`.
  template <typename T>
  static void ExpectRejected(const absl::StatusOr<T>& r, const std::string& field) {
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), field))
        << "'" << r.status().message() << "' does not name " << field;
  }

  SessionRegistry registry_{/*stage=*/9, /*buffers=*/2, kBufferBytes, /*max_sessions=*/1};
  std::shared_ptr<Session> session_;
  v1::BoundaryConfig config_;
};

TEST_F(SessionRegistryTensorRefTest, ResolveReturnsThePointerOfTheRegion) {
  absl::StatusOr<char*> p = ResolveTensorRef(*session_, Ref(1, 16, 2, 3, v1::DTYPE_F32), "h");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, Base(1) + 16);
  // A region that ends exactly at the end of the buffer fits.
  p = ResolveTensorRef(*session_, Ref(0, 0, 1, kBufferBytes / 4, v1::DTYPE_F32), "h");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, Base(0));
  p = ResolveTensorRef(*session_, Ref(0, kBufferBytes - 8, 2, 2, v1::DTYPE_BF16), "h");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, Base(0) + kBufferBytes - 8);
  p = ResolveTensorRef(*session_, Ref(1, 2, 1, 1, v1::DTYPE_BF16), "h");  // bf16: 2-aligned
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, Base(1) + 2);
}

TEST_F(SessionRegistryTensorRefTest, ResolveRejectsABufferNotAttached) {
  ExpectRejected(ResolveTensorRef(*session_, Ref(2, 0, 1, 1, v1::DTYPE_F32), "h"), "h.buffer");
}

TEST_F(SessionRegistryTensorRefTest, ResolveRejectsAnUnsetDtype) {
  ExpectRejected(ResolveTensorRef(*session_, Ref(0, 0, 1, 1, v1::DTYPE_UNSPECIFIED), "h"),
                 "h.dtype");
  ExpectRejected(ResolveTensorRef(*session_, Ref(0, 0, 1, 1, static_cast<v1::DType>(17)), "h"),
                 "h.dtype");
}

TEST_F(SessionRegistryTensorRefTest, ResolveRejectsAMisalignedOffset) {
  ExpectRejected(ResolveTensorRef(*session_, Ref(0, 2, 1, 1, v1::DTYPE_F32), "h"), "h.offset");
  ExpectRejected(ResolveTensorRef(*session_, Ref(0, 6, 1, 1, v1::DTYPE_I32), "ids"), "ids.offset");
  ExpectRejected(ResolveTensorRef(*session_, Ref(0, 1, 1, 1, v1::DTYPE_BF16), "h"), "h.offset");
}

TEST_F(SessionRegistryTensorRefTest, ResolveRejectsARegionPastTheEnd) {
  ExpectRejected(ResolveTensorRef(*session_, Ref(0, kBufferBytes - 4, 1, 2, v1::DTYPE_F32), "h"),
                 "runs past the end of buffer 0");
  ExpectRejected(
      ResolveTensorRef(*session_, Ref(1, 0, 1, kBufferBytes / 4 + 1, v1::DTYPE_F32), "h"), "h:");
  ExpectRejected(ResolveTensorRef(*session_, Ref(1, kBufferBytes + 4, 0, 0, v1::DTYPE_F32), "h"),
                 "offset 4100");
}

// rows x cols x elem + offset computed in 64 bits would wrap around to a small number.
TEST_F(SessionRegistryTensorRefTest, ResolveRejectsRegionsWhoseSizeOverflows64Bits) {
  constexpr uint32_t kMax32 = std::numeric_limits<uint32_t>::max();
  // (2^32 - 1)^2 x 4 + (2^35 - 4) = 2^66: exactly 0 modulo 2^64.
  ExpectRejected(
      ResolveTensorRef(*session_, Ref(0, (uint64_t{1} << 35) - 4, kMax32, kMax32, v1::DTYPE_F32),
                       "h"),
      "runs past the end");
  // 1 x 1 x 4 + (2^64 - 4) = 2^64.
  ExpectRejected(
      ResolveTensorRef(*session_,
                       Ref(0, std::numeric_limits<uint64_t>::max() - 3, 1, 1, v1::DTYPE_F32), "h"),
      "runs past the end");
  // Through the boundary view: 1 x 64 x 4 + (2^64 - 256) = 2^64.
  ExpectRejected(
      BoundaryTensorView(*session_,
                         Ref(0, std::numeric_limits<uint64_t>::max() - 255, 1, kD, v1::DTYPE_F32),
                         config_, "tensor"),
      "runs past the end");
  ExpectRejected(
      TokenIdsView(*session_, Ref(0, std::numeric_limits<uint64_t>::max() - 7, 2, 1, v1::DTYPE_I32),
                   2),
      "runs past the end");
}

TEST_F(SessionRegistryTensorRefTest, BoundaryTensorViewReturnsTheTensor) {
  absl::StatusOr<Tensor> t =
      BoundaryTensorView(*session_, Ref(1, 512, 3, kD, v1::DTYPE_F32), config_, "tensor");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data, Base(1) + 512);
  EXPECT_EQ(t->rows, 3);
  EXPECT_EQ(t->cols, kD);
  EXPECT_EQ(t->dtype, DType::kF32);
  t = BoundaryTensorView(*session_, Ref(0, 2, kMaxTokens, kD, v1::DTYPE_BF16), config_, "tensor");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data, Base(0) + 2);
  EXPECT_EQ(t->rows, kMaxTokens);
  EXPECT_EQ(t->dtype, DType::kBF16);
}

TEST_F(SessionRegistryTensorRefTest, BoundaryTensorViewRejections) {
  auto view = [&](const v1::TensorRef& r) {
    return BoundaryTensorView(*session_, r, config_, "tensor");
  };
  ExpectRejected(view(Ref(0, 0, 1, kD, v1::DTYPE_I32)), "tensor.dtype");
  ExpectRejected(view(Ref(0, 0, 1, kD, v1::DTYPE_UNSPECIFIED)), "tensor.dtype");
  ExpectRejected(view(Ref(0, 0, 1, kD - 1, v1::DTYPE_F32)), "tensor: 63 columns");
  ExpectRejected(view(Ref(0, 0, 1, kD - 1, v1::DTYPE_F32)), "d = 64");
  ExpectRejected(view(Ref(0, 0, 0, kD, v1::DTYPE_F32)), "tensor: 0 rows");
  ExpectRejected(view(Ref(0, 0, kMaxTokens + 1, kD, v1::DTYPE_F32)), "tensor: 9 rows");
  ExpectRejected(view(Ref(0, 0, kMaxTokens + 1, kD, v1::DTYPE_F32)), "max_tokens");
  // And what ResolveTensorRef checks, under the caller's name.
  ExpectRejected(view(Ref(2, 0, 1, kD, v1::DTYPE_F32)), "tensor.buffer");
  ExpectRejected(view(Ref(0, 2, 1, kD, v1::DTYPE_F32)), "tensor.offset");
  ExpectRejected(view(Ref(0, kBufferBytes - 4 * kD + 4, 1, kD, v1::DTYPE_F32)), "tensor:");
}

TEST_F(SessionRegistryTensorRefTest, TokenIdsViewReturnsTheIds) {
  int32_t* ids = reinterpret_cast<int32_t*>(Base(1) + 1024);
  for (int i = 0; i < 5; ++i) ids[i] = 100 + i;
  absl::StatusOr<const int32_t*> p = TokenIdsView(*session_, Ref(1, 1024, 5, 1, v1::DTYPE_I32), 5);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, ids);
  EXPECT_EQ((*p)[4], 104);
}

TEST_F(SessionRegistryTensorRefTest, TokenIdsViewRejections) {
  ExpectRejected(TokenIdsView(*session_, Ref(0, 0, 5, 1, v1::DTYPE_F32), 5), "token_ids");
  ExpectRejected(TokenIdsView(*session_, Ref(0, 0, 5, 1, v1::DTYPE_UNSPECIFIED), 5), "token_ids");
  ExpectRejected(TokenIdsView(*session_, Ref(0, 0, 5, 2, v1::DTYPE_I32), 5), "(5, 1) DTYPE_I32");
  ExpectRejected(TokenIdsView(*session_, Ref(0, 0, 4, 1, v1::DTYPE_I32), 5), "(5, 1) DTYPE_I32");
  ExpectRejected(TokenIdsView(*session_, Ref(0, 0, 6, 1, v1::DTYPE_I32), 5), "token_ids");
  ExpectRejected(TokenIdsView(*session_, Ref(2, 0, 5, 1, v1::DTYPE_I32), 5), "token_ids.buffer");
  ExpectRejected(TokenIdsView(*session_, Ref(0, 2, 5, 1, v1::DTYPE_I32), 5), "token_ids.offset");
  ExpectRejected(TokenIdsView(*session_, Ref(0, kBufferBytes - 16, 5, 1, v1::DTYPE_I32), 5),
                 "token_ids: offset");
}

TEST_F(SessionRegistryTensorRefTest, HostOnlyRefsRefuseDeviceMemory) {
  v1::TensorRef ids = Ref(1, 0, 5, 1, v1::DTYPE_I32);
  ids.set_memory(v1::MEMORY_CUDA);
  ExpectRejected(TokenIdsView(*session_, ids, 5), "token_ids.memory");
  ExpectRejected(ResolveTensorRef(*session_, ids, "token_ids_into"), "always in host memory");
  // An event belongs to device memory only.
  v1::TensorRef h = Ref(0, 0, 1, kD, v1::DTYPE_F32);
  h.set_event(2);
  ExpectRejected(ResolveTensorRef(*session_, h, "tensor"), "tensor.event: 2");
}

TEST_F(SessionRegistryTensorRefTest, AnUnknownMemoryIsNamedAsSuch) {
  v1::TensorRef h = Ref(0, 0, 1, kD, v1::DTYPE_F32);
  h.set_memory(static_cast<v1::Memory>(7));  // a newer client's kind of memory
  ExpectRejected(BoundaryTensorView(*session_, h, config_, "tensor"),
                 "tensor.memory: unknown value 7");
}

TEST_F(SessionRegistryTensorRefTest, ADeviceRefOnAHostOnlySessionIsRefused) {
  v1::TensorRef h = Ref(0, 0, 1, kD, v1::DTYPE_F32);
  h.set_memory(v1::MEMORY_CUDA);
  h.set_event(1);
  ExpectRejected(ResolveCudaRef(*session_, h, "tensor"), "no device buffers");
  // The shape checks are the same for both kinds of memory.
  EXPECT_TRUE(CheckBoundaryTensor(h, config_, "tensor").ok());
  h.set_cols(kD + 1);
  EXPECT_EQ(CheckBoundaryTensor(h, config_, "tensor").code(), absl::StatusCode::kInvalidArgument);
}

// ---- device buffers (AttachRequest.cuda_*). A granted request needs a GPU: the gpu-labelled
// cuda_ipc_test covers it. These are the refusals, which hold everywhere.

v1::AttachRequest CudaRequest(uint32_t buffers, uint64_t bytes, uint32_t events) {
  v1::AttachRequest r = Request("gpu-trainer");
  r.set_cuda_buffers(buffers);
  r.set_cuda_buffer_bytes(bytes);
  r.set_cuda_events(events);
  return r;
}

// INVALID_ARGUMENT naming `field`, and nothing attached.
void ExpectAttachRefused(const v1::AttachRequest& request, absl::StatusCode code,
                         const std::string& field) {
  SessionRegistry registry(/*stage=*/1, /*buffers=*/1, kBytes, /*max_sessions=*/2);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(request, &event);
  ASSERT_EQ(s.status().code(), code) << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), field))
      << "'" << s.status().message() << "' does not name " << field;
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_EQ(event.buffers_size(), 0);
  EXPECT_FALSE(event.has_cuda());
  // The slot was given back: host-only sessions still attach.
  v1::AttachEvent next;
  EXPECT_TRUE(registry.Attach(Request("host"), &next).ok());
}

TEST(SessionRegistryCudaTest, RequestsOutOfTheLimitsAreRefusedBeforeTouchingCuda) {
  const auto invalid = absl::StatusCode::kInvalidArgument;
  ExpectAttachRefused(CudaRequest(65, 1 << 20, 8), invalid, "cuda_buffers: 65");
  ExpectAttachRefused(CudaRequest(2, 0, 8), invalid, "cuda_buffer_bytes: 0");
  ExpectAttachRefused(CudaRequest(2, (uint64_t{64} << 30) + 1, 8), invalid, "cuda_buffer_bytes");
  ExpectAttachRefused(CudaRequest(2, 1 << 20, 1025), invalid, "cuda_events: 1025");
  v1::AttachRequest uuid = CudaRequest(2, 1 << 20, 8);
  uuid.set_cuda_device_uuid("GPU-0");
  ExpectAttachRefused(uuid, invalid, "cuda_device_uuid: 5 bytes");
}

TEST(SessionRegistryCudaTest, DeviceFieldsWithoutDeviceBuffersAreRefused) {
  ExpectAttachRefused(CudaRequest(0, 1 << 20, 0), absl::StatusCode::kInvalidArgument,
                      "cuda_buffers = 0");
  ExpectAttachRefused(CudaRequest(0, 0, 4), absl::StatusCode::kInvalidArgument, "cuda_buffers = 0");
}

TEST(SessionRegistryCudaTest, DeviceBuffersAreRefusedWhereCudaCannotBeUsed) {
  if (MakeBackend("cuda").ok()) {
    GTEST_SKIP() << "CUDA works here: cuda_ipc_test (label gpu) covers a granted attach";
  }
  // Without MAPL_WITH_CUDA: "built without CUDA"; with it but no driver or device: "cannot use
  // CUDA" and the runtime's reason.
  ExpectAttachRefused(CudaRequest(2, 1 << 20, 8), absl::StatusCode::kFailedPrecondition, "CUDA");
  // Likewise for a device named by UUID, whatever MAPL_CUDA_DEVICE says: it names the default
  // device only, so even a malformed one plays no part here.
  const char* had = std::getenv("MAPL_CUDA_DEVICE");
  const std::string saved = had != nullptr ? had : "";
  ::setenv("MAPL_CUDA_DEVICE", "not-a-device", 1);
  v1::AttachRequest by_uuid = CudaRequest(2, 1 << 20, 8);
  by_uuid.set_cuda_device_uuid(std::string(16, '\x01'));
  ExpectAttachRefused(by_uuid, absl::StatusCode::kFailedPrecondition, "CUDA");
  if (had != nullptr) {
    ::setenv("MAPL_CUDA_DEVICE", saved.c_str(), 1);
  } else {
    ::unsetenv("MAPL_CUDA_DEVICE");
  }
}

}  // namespace
}  // namespace mapl
