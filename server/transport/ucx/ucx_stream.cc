#include "server/transport/ucx/ucx_stream.h"

#include <poll.h>
#include <sys/random.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/check.h"
#include "common/log.h"
#include "server/transport/peer_link_internal.h"
#include "server/transport/ucx/ucx_context.h"

namespace mapl {
namespace {

constexpr unsigned kAmId = 7;             // Our one active-message handler.
constexpr uint32_t kMagic = 0x4d41504cu;  // "MAPL".
constexpr uint32_t kKindMessage = 1;      // A serialized PeerMessage.
constexpr uint32_t kKindBye = 2;          // The sender's last message (a clean close).
constexpr uint32_t kKindHello = 3;        // Connect's; outside the sequence (seq 0).
constexpr size_t kTokenBytes = 16;
constexpr size_t kMaxAddressBytes = 4096;       // peer.proto Hello.ucx_worker_address.
constexpr size_t kRendezvousBytes = 256 << 10;  // Larger messages go by rendezvous.
// A message may carry a little more than max_message_bytes of PeerMessage (peer_link.cc checks
// the serialized size without... nothing else); what is over this is refused unread.
constexpr size_t kSizeSlack = 64;
// How long Read waits, once the peer's control stream ended, for the bye still in flight.
constexpr absl::Duration kByeGrace = absl::Seconds(1);
// How long the teardown progresses the worker for requests to finish before giving up on them.
constexpr absl::Duration kTeardownBound = absl::Seconds(2);
constexpr int kPollMillis = 50;

struct ReceiveContext {
  UcxStream* stream;
  uint64_t seq;
};

}  // namespace

struct UcxStream::Header {
  uint32_t magic;
  uint32_t kind;
  uint64_t seq;
  char token[kTokenBytes];
};
static_assert(sizeof(uint32_t) * 2 + sizeof(uint64_t) + kTokenBytes == 32,
              "the UCX message header is 32 bytes on the wire");

struct UcxStream::SendOp {
  UcxStream* stream;
  Header header;
  std::string body;
  int64_t bytes;
};

UcxStream::UcxStream(PeerStream* control, bool dialer, const UcxLinkOptions& options,
                     int max_message_bytes, std::string describe)
    : control_(control),
      dialer_(dialer),
      options_(options),
      max_message_bytes_(max_message_bytes),
      describe_(std::move(describe)) {}

UcxStream::~UcxStream() { Shutdown(absl::ZeroDuration()); }

absl::Status UcxStream::Start() {
  absl::StatusOr<ucp_context_h> context = UcxContextFor(options_);
  if (!context.ok()) return context.status();
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // One progress thread makes every call.
  ucs_status_t status = ucp_worker_create(*context, &wp, &worker_);
  if (status != UCS_OK) {
    worker_ = nullptr;
    return absl::UnavailableError(
        absl::StrCat(describe_, ": UCX worker creation failed: ", ucs_status_string(status)));
  }
  // The handler is in place before the address is published: nothing can arrive unhandled.
  ucp_am_handler_param_t hp{};
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                  UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
  hp.id = kAmId;
  hp.flags = UCP_AM_FLAG_WHOLE_MSG;
  hp.cb = &UcxStream::OnActiveMessage;
  hp.arg = this;
  status = ucp_worker_set_am_recv_handler(worker_, &hp);
  if (status == UCS_OK) status = ucp_worker_get_efd(worker_, &event_fd_);
  ucp_address_t* address = nullptr;
  size_t address_length = 0;
  if (status == UCS_OK) status = ucp_worker_get_address(worker_, &address, &address_length);
  if (status != UCS_OK) {
    ucp_worker_destroy(worker_);
    worker_ = nullptr;
    return absl::UnavailableError(
        absl::StrCat(describe_, ": UCX worker setup failed: ", ucs_status_string(status)));
  }
  address_.assign(reinterpret_cast<const char*>(address), address_length);
  ucp_worker_release_address(worker_, address);
  // The token only keeps out blind injection (docs/operations.md): unguessable is enough.
  token_.resize(kTokenBytes);
  MAPL_CHECK(getrandom(token_.data(), kTokenBytes, 0) == static_cast<ssize_t>(kTokenBytes),
             "getrandom failed for a UCX token");
  progress_ = std::thread([this] { ProgressLoop(); });
  return absl::OkStatus();
}

absl::Status UcxStream::Connect(absl::string_view peer_address, absl::string_view peer_token) {
  MAPL_CHECK(worker_ != nullptr && !shut_down_, describe_ + ": UCX Connect before Start");
  if (peer_address.empty() || peer_address.size() > kMaxAddressBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(describe_, ": the peer's UCX worker address has ", peer_address.size(),
                     " bytes (1 to ", kMaxAddressBytes, " expected)"));
  }
  if (peer_token.size() != kTokenBytes) {
    return absl::InvalidArgumentError(absl::StrCat(describe_, ": the peer's UCX token has ",
                                                   peer_token.size(), " bytes, not ", kTokenBytes));
  }
  peer_token_ = std::string(peer_token);
  // From here the control stream's end (the peer gave up, or refused our Hello) ends the wait.
  watcher_ = std::thread([this] { WatchControl(); });
  // The listener connects only once the dialer's hello has arrived on its worker: the dialer
  // sends it after accepting the listener's Hello, so the listener never opens a connection to
  // a dialer that refused it and tore its worker down. (UCX 1.13's TCP transport aborts the
  // process when a connection it is opening is refused.)
  if (!dialer_) {
    const absl::Status heard = AwaitPeer(/*need_sent=*/false);
    if (!heard.ok()) return heard;
  }
  const std::string address(peer_address);
  absl::Notification done;
  ucs_status_t status = UCS_OK;
  Post([&] {
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
    // PEER mode: a peer that dies or goes away fails the endpoint (OnEndpointError) rather than
    // leaving sends hanging.
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &UcxStream::OnEndpointError;
    ep.err_handler.arg = this;
    status = ucp_ep_create(worker_, &ep, &ep_);
    if (status != UCS_OK) ep_ = nullptr;
    done.Notify();
  });
  done.WaitForNotification();
  if (status != UCS_OK) {
    return absl::UnavailableError(absl::StrCat(
        describe_, ": UCX could not connect to the peer: ", ucs_status_string(status)));
  }
  {
    absl::MutexLock lock(&mu_);
    connected_ = true;
  }
  // Both ends say hello on their endpoints and wait for each other's: the connection is then
  // wired up both ways before the session starts, and no connection is still being opened when
  // a session that breaks at once tears a worker down.
  if (!SendFrame(kKindHello, nullptr)) return ReadError();
  return AwaitPeer(/*need_sent=*/true);
}

absl::Status UcxStream::AwaitPeer(bool need_sent) {
  absl::MutexLock lock(&mu_);
  auto settled = [this, need_sent]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return (hello_received_ && (hello_sent_ || !need_sent)) || !failure_.ok() || cancelled_ ||
           control_ended_;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&settled), connect_timeout_)) {
    return absl::UnavailableError(absl::StrCat(
        describe_, ": the peer's UCX worker did not answer within ",
        absl::FormatDuration(connect_timeout_),
        " (can this host reach the peer's UCX devices? see ucx.net_devices and ucx.tls)"));
  }
  if (!failure_.ok()) return failure_;
  if (cancelled_) return absl::CancelledError(describe_ + ": cancelled while connecting");
  if (!(hello_received_ && (hello_sent_ || !need_sent))) {
    return absl::UnavailableError(
        describe_ + ": the peer ended the control stream before the UCX connection was up");
  }
  return absl::OkStatus();
}

// ---- the progress thread ----

void UcxStream::ProgressLoop() {
  while (true) {
    while (ucp_worker_progress(worker_) != 0) {
    }
    std::deque<std::function<void()>> ops;
    bool stop;
    {
      absl::MutexLock lock(&mu_);
      ops.swap(ops_);
      stop = stop_progress_;
    }
    for (std::function<void()>& op : ops) op();
    if (!ops.empty()) continue;
    if (stop) break;
    const ucs_status_t armed = ucp_worker_arm(worker_);
    if (armed == UCS_ERR_BUSY) continue;  // More to progress first.
    // Whatever else arm says, the poll's timeout keeps the loop turning.
    pollfd p{event_fd_, POLLIN, 0};
    poll(&p, 1, armed == UCS_OK ? kPollMillis : 1);
  }
  CloseEndpoint();
  // Requests still in flight finish (with an error) as the closed endpoint's are flushed out.
  const absl::Time bound = absl::Now() + kTeardownBound;
  while (absl::Now() < bound) {
    ucp_worker_progress(worker_);
    absl::MutexLock lock(&mu_);
    if (sends_pending_ == 0 && receives_pending_ == 0) break;
  }
  std::deque<std::function<void()>> ops;
  std::deque<Parked> parked;
  {
    absl::MutexLock lock(&mu_);
    if (sends_pending_ != 0 || receives_pending_ != 0) {
      Log(LogLevel::kError, "UCX requests did not finish at teardown; leaking them",
          {{"link", describe_},
           {"sends", absl::StrCat(sends_pending_)},
           {"receives", absl::StrCat(receives_pending_)}});
    }
    ops.swap(ops_);
    parked.swap(parked_);
    progress_done_ = true;  // No op is queued from here (Post drops them).
  }
  for (std::function<void()>& op : ops) op();  // With ep_ gone, sends end at once.
  for (const Parked& p : parked) ucp_am_data_release(worker_, p.desc);
}

void UcxStream::CloseEndpoint() {
  if (ep_ == nullptr) return;
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t request = ucp_ep_close_nbx(ep_, &param);
  ep_ = nullptr;
  if (request == nullptr || UCS_PTR_IS_ERR(request)) return;
  const absl::Time bound = absl::Now() + kTeardownBound;
  while (ucp_request_check_status(request) == UCS_INPROGRESS && absl::Now() < bound) {
    ucp_worker_progress(worker_);
  }
  ucp_request_free(request);
}

void UcxStream::Post(std::function<void()> op) {
  absl::MutexLock lock(&mu_);
  if (progress_done_) return;
  ops_.push_back(std::move(op));
  // Safe from any thread (ucp.h); under mu_ so that the worker outlives the call.
  ucp_worker_signal(worker_);
}

void UcxStream::OnEndpointError(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
  auto* self = static_cast<UcxStream*>(arg);
  {
    absl::MutexLock lock(&self->mu_);
    // After this side's bye or the peer's, the peer closing its endpoint is the close itself;
    // the control stream's end then ends Read.
    if (self->writes_done_ || self->bye_read_) return;
  }
  self->Fail(absl::UnavailableError(absl::StrCat(
      self->describe_, ": the UCX connection to the peer failed: ", ucs_status_string(status))));
}

void UcxStream::StartSend(SendOp* op) {
  bool dead;
  {
    absl::MutexLock lock(&mu_);
    dead = !failure_.ok();
  }
  if (ep_ == nullptr || dead) {
    OnSendDone(nullptr, UCS_ERR_CANCELED, op);
    return;
  }
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  param.cb.send = &UcxStream::OnSendDone;
  param.user_data = op;
  // Large messages by rendezvous: the receiver pulls them when it has room (backpressure).
  param.flags = op->body.size() >= kRendezvousBytes ? UCP_AM_SEND_FLAG_RNDV : 0;
  ucs_status_ptr_t request = ucp_am_send_nbx(ep_, kAmId, &op->header, sizeof(Header),
                                             op->body.data(), op->body.size(), &param);
  if (request == nullptr) {
    OnSendDone(nullptr, UCS_OK, op);
  } else if (UCS_PTR_IS_ERR(request)) {
    OnSendDone(nullptr, UCS_PTR_STATUS(request), op);
  }
  // Otherwise OnSendDone runs when it completes.
}

void UcxStream::OnSendDone(void* request, ucs_status_t status, void* user_data) {
  std::unique_ptr<SendOp> op(static_cast<SendOp*>(user_data));
  UcxStream* self = op->stream;
  if (request != nullptr) ucp_request_free(request);
  bool first = false;
  {
    absl::MutexLock lock(&self->mu_);
    self->send_inflight_bytes_ -= op->bytes;
    --self->sends_pending_;
    if (status != UCS_OK && status != UCS_ERR_CANCELED) {
      self->FailLocked(absl::UnavailableError(
          absl::StrCat(self->describe_, ": a UCX send failed: ", ucs_status_string(status))));
    }
    first = status == UCS_OK && self->stats_.lanes.empty();
    if (status == UCS_OK && op->header.kind == kKindHello) self->hello_sent_ = true;
  }
  if (first) self->NoteLanes();
}

void UcxStream::NoteLanes() {
  // ucp_ep_query names no transports in UCX 1.13; its printout does ("lane[0]: 2:tcp/lo.0 ...").
  if (ep_ == nullptr) return;
  char* text = nullptr;
  size_t size = 0;
  FILE* f = open_memstream(&text, &size);
  if (f == nullptr) return;
  ucp_ep_print_info(ep_, f);
  std::fclose(f);
  std::set<std::string> lanes;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text, size), '\n')) {
    if (line.find("lane[") == absl::string_view::npos) continue;
    for (absl::string_view word : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
      // "2:tcp/lo.0" (resource 2: transport tcp, device lo) -> "tcp/lo"; the remote side's
      // "md[1]/tcp/sysdev[255]" has no resource number.
      const size_t colon = word.find(':');
      const size_t slash = word.find('/');
      if (colon == absl::string_view::npos || colon == 0 || slash == absl::string_view::npos ||
          slash < colon || !absl::ascii_isdigit(static_cast<unsigned char>(word[0]))) {
        continue;
      }
      absl::string_view lane = word.substr(colon + 1);
      const size_t dot = lane.rfind('.');
      if (dot != absl::string_view::npos && dot > lane.find('/')) lane = lane.substr(0, dot);
      lanes.emplace(lane);
    }
  }
  Log(LogLevel::kDebug, "UCX endpoint", {{"link", describe_}, {"info", std::string(text, size)}});
  std::free(text);
  const std::string joined = absl::StrJoin(lanes, ",");
  Log(LogLevel::kInfo, "UCX lanes", {{"link", describe_}, {"lanes", joined}});
  absl::MutexLock lock(&mu_);
  stats_.lanes = joined.empty() ? "?" : joined;
}

ucs_status_t UcxStream::OnActiveMessage(void* arg, const void* header, size_t header_length,
                                        void* data, size_t length,
                                        const ucp_am_recv_param_t* param) {
  return static_cast<UcxStream*>(arg)->Receive(header, header_length, data, length, param);
}

ucs_status_t UcxStream::Receive(const void* header, size_t header_length, void* data, size_t length,
                                const ucp_am_recv_param_t* param) {
  uint64_t rendezvous_seq = 0;
  const ucs_status_t status = Accept(header, header_length, data, length, param, &rendezvous_seq);
  // Outside mu_: receiving may complete at once, and its callback takes mu_.
  if (rendezvous_seq != 0) ReceiveRendezvous(rendezvous_seq, data, length);
  return status;
}

ucs_status_t UcxStream::Accept(const void* header, size_t header_length, void* data, size_t length,
                               const ucp_am_recv_param_t* param, uint64_t* rendezvous_seq) {
  static_assert(sizeof(Header) == 32, "no padding in the UCX message header");
  Header h{};
  bool ours = header_length == sizeof(Header);
  if (ours) {
    std::memcpy(&h, header, sizeof(Header));
    ours = h.magic == kMagic && ConstantTimeEquals(absl::string_view(h.token, kTokenBytes), token_);
  }
  const bool rendezvous = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  absl::MutexLock lock(&mu_);
  if (!ours) {
    // Not from this connection's peer (a stale or a stray sender): dropped unread. UCS_OK
    // releases a rendezvous descriptor without receiving it.
    ++stats_.foreign_dropped;
    return UCS_OK;
  }
  if (!failure_.ok()) return UCS_OK;
  if (h.kind == kKindHello) {
    hello_received_ = true;
    return UCS_OK;
  }
  if (h.kind != kKindMessage && h.kind != kKindBye) {
    FailLocked(
        absl::DataLossError(absl::StrCat(describe_, ": a UCX message of unknown kind ", h.kind)));
    return UCS_OK;
  }
  // Checked before anything is allocated for the message.
  if (length > static_cast<size_t>(max_message_bytes_) + kSizeSlack) {
    FailLocked(absl::InvalidArgumentError(
        absl::StrCat(describe_, ": the peer sent a UCX message of ", length,
                     " bytes, over max_message_bytes ", max_message_bytes_)));
    return UCS_OK;
  }
  if (h.seq < next_read_seq_ || incoming_.count(h.seq) != 0 ||
      std::any_of(parked_.begin(), parked_.end(),
                  [&h](const Parked& p) { return p.seq == h.seq; })) {
    FailLocked(absl::DataLossError(
        absl::StrCat(describe_, ": the peer sent UCX message ", h.seq, " twice")));
    return UCS_OK;
  }
  if (h.kind == kKindBye) {
    Incoming& in = incoming_[h.seq];
    in.complete = true;
    in.bye = true;
    return UCS_OK;
  }
  const int64_t bytes = static_cast<int64_t>(length);
  if (rendezvous) {
    // Beyond the cap the message waits for Read to catch up (the sender's send stays incomplete
    // meanwhile), unless Read needs it next.
    if (received_bytes_ > 0 && received_bytes_ + bytes > options_.max_inflight_bytes &&
        h.seq != next_read_seq_) {
      parked_.push_back(Parked{h.seq, data, length});
      ++stats_.rndv_deferred;
      return UCS_INPROGRESS;
    }
    received_bytes_ += bytes;
    incoming_[h.seq];  // Not complete yet.
    *rendezvous_seq = h.seq;
    return UCS_OK;
  }
  // Eager data arrives whether or not Read keeps up; a peer that sends far more than the cap
  // without waiting for acknowledgements is broken.
  if (received_bytes_ + bytes > 4 * options_.max_inflight_bytes) {
    FailLocked(absl::ResourceExhaustedError(
        absl::StrCat(describe_, ": the peer sent over ", 4 * options_.max_inflight_bytes,
                     " bytes of UCX messages that were not yet read (4 x ucx.max_inflight_mib)")));
    return UCS_OK;
  }
  Incoming& in = incoming_[h.seq];
  in.bytes.assign(static_cast<const char*>(data), length);
  in.complete = true;
  received_bytes_ += bytes;
  return UCS_OK;
}

void UcxStream::ReceiveRendezvous(uint64_t seq, void* desc, size_t length) {
  char* buffer;
  {
    absl::MutexLock lock(&mu_);
    std::string& bytes = incoming_[seq].bytes;
    bytes.resize(length);
    buffer = bytes.data();  // Stable: map nodes do not move, and nothing resizes it meanwhile.
    ++receives_pending_;
  }
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.recv_am = &UcxStream::OnReceiveDone;
  auto* context = new ReceiveContext{this, seq};
  param.user_data = context;
  ucs_status_ptr_t request = ucp_am_recv_data_nbx(worker_, desc, buffer, length, &param);
  if (request == nullptr) {
    OnReceiveDone(nullptr, UCS_OK, length, context);
  } else if (UCS_PTR_IS_ERR(request)) {
    OnReceiveDone(nullptr, UCS_PTR_STATUS(request), 0, context);
  }
}

void UcxStream::OnReceiveDone(void* request, ucs_status_t status, size_t /*length*/,
                              void* user_data) {
  std::unique_ptr<ReceiveContext> context(static_cast<ReceiveContext*>(user_data));
  UcxStream* self = context->stream;
  if (request != nullptr) ucp_request_free(request);
  absl::MutexLock lock(&self->mu_);
  --self->receives_pending_;
  if (status != UCS_OK) {
    self->FailLocked(absl::UnavailableError(absl::StrCat(
        self->describe_, ": receiving a large UCX message failed: ", ucs_status_string(status))));
    return;
  }
  auto it = self->incoming_.find(context->seq);
  MAPL_CHECK(it != self->incoming_.end(),
             absl::StrCat(self->describe_, ": UCX message ", context->seq,
                          " completed but is not awaited"));
  it->second.complete = true;
}

// ---- the control stream ----

void UcxStream::WatchControl() {
  v1::PeerMessage msg;
  const bool got = control_->Read(&msg);
  if (got) {
    // The control stream carries only the Hello exchange; anything more is a broken peer.
    Fail(absl::InvalidArgumentError(
        absl::StrCat(describe_, ": the peer sent a '", PeerBodyName(msg.body_case()),
                     "' on the control stream of a UCX link, where nothing follows the Hello")));
    control_->Cancel();
  }
  absl::MutexLock lock(&mu_);
  control_ended_ = true;
}

// ---- the PeerStream calls ----

void UcxStream::Fail(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  FailLocked(status);
}

void UcxStream::FailLocked(const absl::Status& status) {
  if (failure_.ok() && !cancelled_) {
    failure_ = status;
    Log(LogLevel::kWarning, "UCX data plane failed",
        {{"link", describe_}, {"status", status.ToString()}});
  }
}

bool UcxStream::SendFrame(uint32_t kind, const std::string* body) {
  auto op = std::make_unique<SendOp>();
  op->stream = this;
  op->header.magic = kMagic;
  op->header.kind = kind;
  std::memcpy(op->header.token, peer_token_.data(), kTokenBytes);
  if (body != nullptr) op->body = *body;
  op->bytes = static_cast<int64_t>(op->body.size());
  const int64_t bytes = op->bytes;
  absl::MutexLock lock(&mu_);
  // At most max_inflight_bytes in flight, except one message larger than that alone.
  auto room = [this, bytes]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !failure_.ok() || cancelled_ || progress_done_ || send_inflight_bytes_ == 0 ||
           send_inflight_bytes_ + bytes <= options_.max_inflight_bytes;
  };
  mu_.Await(absl::Condition(&room));
  if (!failure_.ok() || cancelled_ || progress_done_ || !connected_) return false;
  op->header.seq = kind == kKindHello ? 0 : next_send_seq_++;
  send_inflight_bytes_ += bytes;
  ++sends_pending_;
  SendOp* raw = op.release();
  ops_.push_back([this, raw] { StartSend(raw); });
  ucp_worker_signal(worker_);
  return true;
}

bool UcxStream::Write(const v1::PeerMessage& msg) {
  std::string body;
  if (!msg.SerializeToString(&body)) return false;
  return SendFrame(kKindMessage, &body);
}

void UcxStream::WritesDone() {
  if (SendFrame(kKindBye, nullptr)) {
    // Flushed before the control stream's half-close, which the peer may see first otherwise.
    absl::MutexLock lock(&mu_);
    auto flushed = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return sends_pending_ == 0 || !failure_.ok() || cancelled_;
    };
    mu_.AwaitWithTimeout(absl::Condition(&flushed), kByeGrace);
    writes_done_ = true;
  }
  control_->WritesDone();
}

void UcxStream::ResumeParked() {
  std::deque<Parked> start;
  {
    absl::MutexLock lock(&mu_);
    while (!parked_.empty()) {
      const uint64_t wanted = next_read_seq_;
      auto next = std::find_if(parked_.begin(), parked_.end(),
                               [wanted](const Parked& p) { return p.seq == wanted; });
      auto pick = next != parked_.end() ? next : parked_.begin();
      const int64_t size = static_cast<int64_t>(pick->length);
      if (next == parked_.end() && received_bytes_ > 0 &&
          received_bytes_ + size > options_.max_inflight_bytes) {
        break;
      }
      received_bytes_ += size;
      incoming_[pick->seq];  // Not complete yet.
      start.push_back(*pick);
      parked_.erase(pick);
    }
  }
  for (const Parked& p : start) ReceiveRendezvous(p.seq, p.desc, p.length);
}

bool UcxStream::Read(v1::PeerMessage* msg) {
  std::string bytes;
  bool resume_parked = false;
  {
    absl::MutexLock lock(&mu_);
    auto next_ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      auto it = incoming_.find(next_read_seq_);
      return it != incoming_.end() && it->second.complete;
    };
    auto ready = [this, &next_ready]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !failure_.ok() || cancelled_ || bye_read_ || control_ended_ || next_ready();
    };
    mu_.Await(absl::Condition(&ready));
    if (control_ended_ && !next_ready() && !dialer_) {
      // The dialer closed its control stream; its bye (and what precedes it) may still be on the
      // way on the other plane. (A listener ends the link by ending the control stream alone.)
      auto settled = [this, &next_ready]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return !failure_.ok() || cancelled_ || next_ready();
      };
      mu_.AwaitWithTimeout(absl::Condition(&settled), kByeGrace);
    }
    if (!failure_.ok() || cancelled_ || bye_read_ || !next_ready()) return false;
    auto it = incoming_.find(next_read_seq_);
    if (it->second.bye) {
      bye_read_ = true;
      return false;
    }
    bytes = std::move(it->second.bytes);
    incoming_.erase(it);
    ++next_read_seq_;
    received_bytes_ -= static_cast<int64_t>(bytes.size());
    resume_parked = !parked_.empty();
  }
  // Room again: receive the deferred messages that now fit, and whichever Read needs next.
  if (resume_parked) Post([this] { ResumeParked(); });
  if (!msg->ParseFromString(bytes)) {
    Fail(absl::DataLossError(absl::StrCat(describe_, ": a UCX message of ", bytes.size(),
                                          " bytes from the peer does not parse")));
    return false;
  }
  return true;
}

void UcxStream::Cancel() {
  {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
  }
  control_->Cancel();
}

absl::Status UcxStream::ReadError() const {
  absl::MutexLock lock(&mu_);
  return failure_;
}

void UcxStream::Shutdown(absl::Duration grace) {
  if (shut_down_) return;
  shut_down_ = true;
  if (watcher_.joinable()) {
    bool ended;
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&control_ended_), grace);
      ended = control_ended_;
    }
    if (!ended) control_->Cancel();
    watcher_.join();
  }
  if (progress_.joinable()) {
    {
      absl::MutexLock lock(&mu_);
      stop_progress_ = true;
      ucp_worker_signal(worker_);
    }
    progress_.join();
  }
  if (worker_ != nullptr) {
    ucp_worker_destroy(worker_);
    worker_ = nullptr;
  }
}

void UcxStream::AddStats(v1::LinkStats* stats) const {
  absl::MutexLock lock(&mu_);
  if (!stats_.lanes.empty()) stats->set_ucx_lanes(stats_.lanes);
  stats->set_ucx_foreign_dropped(stats->ucx_foreign_dropped() + stats_.foreign_dropped);
  stats->set_ucx_rndv_deferred(stats->ucx_rndv_deferred() + stats_.rndv_deferred);
}

UcxStream::Stats UcxStream::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace mapl
