// tensor_ref_fuzzer: the TensorRefs of a trainer's request (local.proto SendRequest: tensor and
// token_ids) checked against a real session of a SessionRegistry, with real sealed memfd buffers
// (server/session_registry.h: ResolveTensorRef, BoundaryTensorView, TokenIdsView), then read and
// written where the daemon would.
//
// The buffers are mappings, where AddressSanitizer sees no bounds (and a buffer's last page runs
// past its size), so the fuzzer checks every accepted view against the buffer itself: inside
// it, aligned to its element, of the shape asked and of the boundary.
//
// Input: byte 0 picks the boundary's d (5, 32 or 4096) and max_tokens (1, 64 or 3000); the rest
// is a SendRequest.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

#include "server/session_registry.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using namespace mapl;

// 3 buffers of 3 pages and 100 bytes: the last page runs past the end of each.
constexpr uint64_t kBufferBytes = 3 * 4096 + 100;

const Session& TheSession() {
  static SessionRegistry registry(/*stage=*/0, /*buffers=*/3, kBufferBytes, /*max_sessions=*/2);
  static const std::shared_ptr<Session> session = [] {
    v1::AttachRequest request;
    request.set_client_name("fuzz");
    v1::AttachEvent event;
    absl::StatusOr<std::shared_ptr<Session>> s = registry.Attach(request, &event);
    if (!s.ok()) fuzz::Fail("Attach: " + s.status().ToString());
    return *std::move(s);
  }();
  return *session;
}

size_t ElementBytes(v1::DType t) { return t == v1::DTYPE_BF16 ? 2 : 4; }

// The view [p, p + bytes) lies in one of the session's buffers, aligned to `elem`.
void CheckInside(const Session& s, const void* p, uint64_t bytes, size_t elem, const char* what) {
  const char* c = static_cast<const char*>(p);
  for (const auto& buf : s.buffers) {
    const char* base = static_cast<const char*>(buf->data());
    if (c >= base && c <= base + buf->size()) {
      FUZZ_EXPECT(bytes <= static_cast<uint64_t>(base + buf->size() - c),
                  std::string(what) + " runs past its buffer");
      FUZZ_EXPECT((c - base) % elem == 0, std::string(what) + " is misaligned");
      return;
    }
  }
  fuzz::Fail(std::string(what) + " points outside every buffer");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const uint32_t kDs[] = {5, 32, 4096};
  static const uint32_t kMaxTokens[] = {1, 64, 3000};
  v1::BoundaryConfig b;
  b.set_id(1);
  b.set_d(kDs[data[0] % 3]);
  b.set_max_tokens(kMaxTokens[data[0] / 3 % 3]);
  v1::SendRequest request;
  if (!request.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;
  const Session& s = TheSession();

  for (const v1::TensorRef* ref : {&request.tensor(), &request.token_ids()}) {
    absl::StatusOr<char*> p = ResolveTensorRef(s, *ref, "ref");
    if (!p.ok()) continue;
    const size_t elem = ElementBytes(ref->dtype());
    const uint64_t bytes = uint64_t{ref->rows()} * ref->cols() * elem;
    CheckInside(s, *p, bytes, elem, "ResolveTensorRef");
    if (bytes > 0) {
      volatile char first = (*p)[0], last = (*p)[bytes - 1];
      (void)first;
      (void)last;
    }
  }

  absl::StatusOr<Tensor> t = BoundaryTensorView(s, request.tensor(), b, "tensor");
  int64_t rows = request.tensor().rows();
  if (t.ok()) {
    FUZZ_EXPECT(t->rows >= 1 && t->rows <= b.max_tokens() && t->cols == b.d(),
                "BoundaryTensorView: the boundary's shape");
    FUZZ_EXPECT(
        t->dtype == (request.tensor().dtype() == v1::DTYPE_F32 ? DType::kF32 : DType::kBF16),
        "BoundaryTensorView: the dtype asked");
    const size_t elem = t->dtype == DType::kF32 ? 4 : 2;
    const uint64_t bytes = uint64_t(t->rows) * t->cols * elem;
    CheckInside(s, t->data, bytes, elem, "BoundaryTensorView");
    // Recv writes the received tensor there; Send reads it.
    char* c = static_cast<char*>(t->data);
    std::memset(c + bytes - elem, 0, elem);
    volatile char first = c[0];
    (void)first;
    rows = t->rows;
  }
  absl::StatusOr<const int32_t*> ids = TokenIdsView(s, request.token_ids(), rows);
  if (ids.ok()) {
    CheckInside(s, *ids, uint64_t(rows) * 4, 4, "TokenIdsView");
    int64_t sum = 0;
    for (int64_t i = 0; i < rows; ++i) sum += (*ids)[i];  // the daemon checks each id
    volatile int64_t keep = sum;
    (void)keep;
  }
  return 0;
}
