// A token bucket: the send-rate cap of a link. It admits bytes at `rate` bytes a second on average
// and lets up to `burst` bytes go at once after a quiet spell, so a long run averages the rate
// while a short burst is not delayed.
//
//   TokenBucket bucket(/*rate_bytes_per_second=*/2e6, /*burst_bytes=*/64 << 10);
//   const absl::Duration wait = bucket.Take(message_bytes, absl::Now());
//   ... sleep `wait` (or until stopped), then write the message ...
//
// A message larger than what the bucket holds still goes: the bucket goes into debt and the
// caller waits until the rate has paid the debt back, so a message of any size passes at the rate
// instead of blocking forever. The clock is passed in, so the class has no time source of its own
// and its tests are exact.
//
// Not thread-safe: the link's writer owns it (under the link's lock).
#ifndef MAPL_SERVER_TRANSPORT_TOKEN_BUCKET_H_
#define MAPL_SERVER_TRANSPORT_TOKEN_BUCKET_H_

#include <cstdint>

#include "absl/time/time.h"

namespace mapl {

class TokenBucket {
 public:
  // rate_bytes_per_second > 0 and burst_bytes >= 1 (callers validate user settings first). The
  // bucket starts full.
  TokenBucket(double rate_bytes_per_second, int64_t burst_bytes);

  // Refills the bucket for the time since the last call (never beyond the burst), takes `bytes`
  // out of it (possibly into debt) and returns how long after `now` those bytes may go out: zero
  // while the bucket covered them, else the time the rate needs to pay the debt back. The bytes
  // count as sent either way; call once per message. A `now` earlier than the previous call's
  // counts as no time passed.
  absl::Duration Take(int64_t bytes, absl::Time now);

  // Bytes that may go out at once as of the last Take (negative: debt); the burst before any.
  double tokens() const { return tokens_; }
  double rate_bytes_per_second() const { return rate_; }
  int64_t burst_bytes() const { return burst_; }

 private:
  const double rate_;
  const int64_t burst_;
  double tokens_;
  absl::Time refilled_ = absl::InfinitePast();  // Time of the last Take.
};

}  // namespace mapl

#endif  // MAPL_SERVER_TRANSPORT_TOKEN_BUCKET_H_
