#include "server/transport/token_bucket.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/check.h"

namespace mapl {

TokenBucket::TokenBucket(double rate_bytes_per_second, int64_t burst_bytes)
    : rate_(rate_bytes_per_second), burst_(burst_bytes), tokens_(static_cast<double>(burst_bytes)) {
  // PeerLinkOptions validation refuses other settings, so only a caller's bug gets here.
  MAPL_CHECK(rate_bytes_per_second > 0 && burst_bytes >= 1,
             absl::StrCat("token bucket needs rate > 0 and burst >= 1, got rate ",
                          rate_bytes_per_second, " and burst ", burst_bytes));
}

absl::Duration TokenBucket::Take(int64_t bytes, absl::Time now) {
  if (refilled_ != absl::InfinitePast() && now > refilled_) {
    tokens_ = std::min(static_cast<double>(burst_),
                       tokens_ + rate_ * absl::ToDoubleSeconds(now - refilled_));
  }
  refilled_ = now;
  tokens_ -= static_cast<double>(bytes);
  if (tokens_ >= 0) return absl::ZeroDuration();
  return absl::Seconds(-tokens_ / rate_);
}

}  // namespace mapl
