// Tests of the session registry (server/session_registry.h): the POSIX shared-memory buffers a
// session gets and when they go away, and every check of a TensorRef against what was attached.
#include "server/session_registry.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace mapl {
namespace {

constexpr uint64_t kBytes = 8192;

// Whether the shared-memory object `name` ("/mapld-...") exists, and its size.
bool ShmExists(const std::string& name, off_t* size = nullptr) {
  struct stat st;
  if (::stat(absl::StrCat("/dev/shm", name).c_str(), &st) != 0) {
    EXPECT_EQ(errno, ENOENT) << name;
    return false;
  }
  if (size != nullptr) *size = st.st_size;
  EXPECT_EQ(st.st_mode & 0777, 0600u) << name << ": the trainer's buffers are private";
  return true;
}

// A second mapping of a shared-memory object, as the trainer makes it.
class Mapping {
 public:
  Mapping(const std::string& name, size_t bytes) : bytes_(bytes) {
    const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
    if (fd < 0) {
      ADD_FAILURE() << "shm_open(" << name << "): " << std::strerror(errno);
      return;
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) {
      ADD_FAILURE() << "mmap(" << name << "): " << std::strerror(errno);
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

// Writes through the session's buffer and reads through a second mapping, and back.
void ExpectSharedBytes(const SharedMemory& shm, uint8_t seed) {
  Mapping other(shm.name(), shm.size());
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

TEST(SessionRegistryTest, AttachCreatesTheConfiguredBuffers) {
  SessionRegistry registry(/*stage=*/5, /*buffers=*/3, kBytes);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(Request("trainer"), &event);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_EQ((*s)->client_name, "trainer");
  EXPECT_EQ((*s)->pid, 4242u);
  EXPECT_EQ(event.session(), (*s)->id);
  ASSERT_EQ(event.buffers_size(), 3);
  ASSERT_EQ((*s)->buffers.size(), 3u);
  std::set<std::string> names;
  for (int i = 0; i < 3; ++i) {
    const v1::SharedBuffer& b = event.buffers(i);
    EXPECT_EQ(b.name(), (*s)->buffers[i]->name());
    EXPECT_EQ(b.bytes(), kBytes);
    EXPECT_EQ((*s)->buffers[i]->size(), kBytes);
    // The name says whose it is (daemon pid, stage, session, index): a glance at /dev/shm shows it.
    EXPECT_EQ(b.name(), absl::StrCat("/mapld-", ::getpid(), "-5-", (*s)->id, "-", i));
    off_t size = 0;
    ASSERT_TRUE(ShmExists(b.name(), &size)) << b.name();
    EXPECT_EQ(size, static_cast<off_t>(kBytes));
    ExpectSharedBytes(*(*s)->buffers[i], static_cast<uint8_t>(17 * i + 1));
    names.insert(b.name());
  }
  EXPECT_EQ(names.size(), 3u);
}

TEST(SessionRegistryTest, SessionsGetDistinctIdsAndBuffers) {
  SessionRegistry registry(/*stage=*/1, /*buffers=*/2, kBytes);
  std::set<uint64_t> ids;
  std::set<std::string> names;
  std::vector<std::shared_ptr<Session>> sessions;
  for (int i = 0; i < 4; ++i) {
    v1::AttachEvent event;
    absl::StatusOr<std::shared_ptr<Session>> s =
        registry.Attach(Request(absl::StrCat("t", i)), &event);
    ASSERT_TRUE(s.ok()) << s.status();
    ids.insert((*s)->id);
    for (const v1::SharedBuffer& b : event.buffers()) names.insert(b.name());
    sessions.push_back(*s);
  }
  EXPECT_EQ(ids.size(), 4u);
  EXPECT_EQ(names.size(), 8u);
  EXPECT_EQ(registry.size(), 4u);
  for (const std::shared_ptr<Session>& s : sessions) {
    absl::StatusOr<std::shared_ptr<Session>> found = registry.Find(s->id);
    ASSERT_TRUE(found.ok()) << found.status();
    EXPECT_EQ(found->get(), s.get());
  }
}

TEST(SessionRegistryTest, FindOfAnUnknownIdIsFailedPreconditionNamingIt) {
  SessionRegistry registry(/*stage=*/0, /*buffers=*/1, kBytes);
  v1::AttachEvent event;
  ASSERT_TRUE(registry.Attach(Request("t"), &event).ok());
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Find(event.session() + 41);
  ASSERT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition) << s.status();
  EXPECT_TRUE(
      absl::StrContains(s.status().message(), absl::StrCat("session ", event.session() + 41)))
      << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), "Attach")) << s.status();
}

TEST(SessionRegistryTest, DetachUnlinksTheBuffersWhenTheLastUserLetsGo) {
  SessionRegistry registry(/*stage=*/2, /*buffers=*/2, kBytes);
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
  // The in-flight call still reads and writes them, and so does the trainer.
  for (const v1::SharedBuffer& b : event.buffers()) EXPECT_TRUE(ShmExists(b.name())) << b.name();
  ExpectSharedBytes(*user->buffers[1], 99);

  user.reset();
  for (const v1::SharedBuffer& b : event.buffers()) {
    EXPECT_FALSE(ShmExists(b.name())) << b.name() << " outlived its last user";
    EXPECT_LT(::shm_open(b.name().c_str(), O_RDWR, 0), 0) << b.name();
  }
}

TEST(SessionRegistryTest, DetachOfAnUnknownIdIsIgnored) {
  SessionRegistry registry(/*stage=*/3, /*buffers=*/1, kBytes);
  v1::AttachEvent event;
  ASSERT_TRUE(registry.Attach(Request("t"), &event).ok());
  registry.Detach(event.session() + 1);
  EXPECT_EQ(registry.size(), 1u);
  EXPECT_TRUE(registry.Find(event.session()).ok());
  EXPECT_TRUE(ShmExists(event.buffers(0).name()));
}

TEST(SessionRegistryTest, ClearDetachesEverySession) {
  SessionRegistry registry(/*stage=*/4, /*buffers=*/2, kBytes);
  v1::AttachEvent a, b;
  ASSERT_TRUE(registry.Attach(Request("a"), &a).ok());
  ASSERT_TRUE(registry.Attach(Request("b"), &b).ok());
  absl::StatusOr<std::shared_ptr<Session>> held = registry.Find(b.session());
  ASSERT_TRUE(held.ok());
  registry.Clear();
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_FALSE(registry.Find(a.session()).ok());
  EXPECT_FALSE(registry.Find(b.session()).ok());
  for (const v1::SharedBuffer& buf : a.buffers()) EXPECT_FALSE(ShmExists(buf.name()));
  // b's buffers stay while `held` uses them.
  for (const v1::SharedBuffer& buf : b.buffers()) EXPECT_TRUE(ShmExists(buf.name()));
  held->reset();
  for (const v1::SharedBuffer& buf : b.buffers()) EXPECT_FALSE(ShmExists(buf.name()));
}

// A name already taken fails the Attach; the buffers it had created go away with it.
TEST(SessionRegistryTest, FailedAttachLeavesNothingBehind) {
  constexpr uint32_t kStage = 6;
  const std::string taken = absl::StrCat("/mapld-", ::getpid(), "-", kStage, "-1-1");
  const int fd = ::shm_open(taken.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  ASSERT_GE(fd, 0) << taken << ": " << std::strerror(errno);
  ::close(fd);

  SessionRegistry registry(kStage, /*buffers=*/2, kBytes);
  v1::AttachEvent event;
  absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(Request("t"), &event);
  ::shm_unlink(taken.c_str());
  ASSERT_EQ(s.status().code(), absl::StatusCode::kAlreadyExists) << s.status();
  EXPECT_TRUE(absl::StrContains(s.status().message(), taken)) << s.status();
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_FALSE(ShmExists(absl::StrCat("/mapld-", ::getpid(), "-", kStage, "-1-0")));

  v1::AttachEvent next;
  absl::StatusOr<std::shared_ptr<Session>> retry = registry.Attach(Request("t"), &next);
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(next.buffers_size(), 2);
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

  SessionRegistry registry_{/*stage=*/9, /*buffers=*/2, kBufferBytes};
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

}  // namespace
}  // namespace mapl
