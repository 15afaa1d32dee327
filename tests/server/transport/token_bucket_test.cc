// Exact tests of the send-rate cap (server/transport/token_bucket.h) on an injected clock. The
// rate and burst are powers of two, so every wait below is a binary fraction of a second that
// doubles and absl::Duration hold exactly: a bucket off by any factor fails EXPECT_EQ.
#include "server/transport/token_bucket.h"

#include <cstdint>

#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace mapl {
namespace {

constexpr double kRate = 1 << 20;    // Bytes a second.
constexpr int64_t kBurst = 1 << 16;  // 1/16 s of the rate.
const absl::Time kT0 = absl::FromUnixSeconds(1000000);

TEST(TokenBucketTest, AFullBucketLetsTheBurstGoAtOnce) {
  TokenBucket bucket(kRate, kBurst);
  EXPECT_EQ(bucket.tokens(), kBurst);
  EXPECT_EQ(bucket.Take(kBurst / 2, kT0), absl::ZeroDuration());
  EXPECT_EQ(bucket.Take(kBurst / 2, kT0), absl::ZeroDuration());
  EXPECT_EQ(bucket.tokens(), 0);
  // Empty: the next byte waits for the rate to produce it.
  EXPECT_EQ(bucket.Take(1, kT0), absl::Seconds(1.0 / kRate));
}

TEST(TokenBucketTest, DebtIsPaidAtTheRate) {
  TokenBucket bucket(kRate, kBurst);
  // A message of 4 bursts goes into debt of 3 bursts: 3/16 s at 2^20 bytes a second.
  EXPECT_EQ(bucket.Take(4 * kBurst, kT0), absl::Milliseconds(187.5));
  EXPECT_EQ(bucket.tokens(), -3 * kBurst);
  // Halfway through the debt another 1/4 s of bytes is due 3/32 s + 1/4 s later.
  EXPECT_EQ(bucket.Take(kRate / 4, kT0 + absl::Milliseconds(93.75)),
            absl::Milliseconds(93.75 + 250));
  // Once paid (at 3/16 s + 1/4 s), the bucket is empty: a byte waits 1/rate.
  EXPECT_EQ(bucket.Take(1, kT0 + absl::Milliseconds(187.5 + 250)), absl::Seconds(1.0 / kRate));
}

TEST(TokenBucketTest, ABusySenderAveragesExactlyTheRate) {
  // A writer that sends each 16 KiB message as soon as the bucket lets it: after the burst, one
  // message every 2^14 / 2^20 s = 15.625 ms, so N messages take (N * 2^14 - burst) / rate.
  TokenBucket bucket(kRate, kBurst);
  constexpr int64_t kMessage = 1 << 14;
  constexpr int kMessages = 1024;
  absl::Time now = kT0;
  int went_at_once = 0;
  for (int i = 0; i < kMessages; ++i) {
    const absl::Duration wait = bucket.Take(kMessage, now);
    if (wait == absl::ZeroDuration()) ++went_at_once;
    now += wait;
  }
  EXPECT_EQ(went_at_once, kBurst / kMessage);
  EXPECT_EQ(now - kT0, absl::Seconds((kMessages * kMessage - kBurst) / kRate));
  EXPECT_EQ(now - kT0, absl::Milliseconds(15937.5));
}

TEST(TokenBucketTest, IdleTimeFillsTheBucketOnlyUpToTheBurst) {
  TokenBucket bucket(kRate, kBurst);
  EXPECT_EQ(bucket.Take(kBurst, kT0), absl::ZeroDuration());
  // Half a burst's worth of time refills half a burst.
  const absl::Time half = kT0 + absl::Milliseconds(31.25);
  EXPECT_EQ(bucket.Take(kBurst / 2, half), absl::ZeroDuration());
  EXPECT_EQ(bucket.Take(kBurst / 2, half), absl::Milliseconds(31.25));
  // Ten idle seconds refill one burst, not ten seconds of the rate.
  const absl::Time later = half + absl::Milliseconds(31.25) + absl::Seconds(10);
  EXPECT_EQ(bucket.Take(kBurst, later), absl::ZeroDuration());
  EXPECT_EQ(bucket.Take(kBurst, later), absl::Milliseconds(62.5));
}

TEST(TokenBucketTest, AClockThatStepsBackRefillsNothing) {
  TokenBucket bucket(kRate, kBurst);
  EXPECT_EQ(bucket.Take(kBurst, kT0), absl::ZeroDuration());
  EXPECT_EQ(bucket.Take(kBurst, kT0 - absl::Seconds(5)), absl::Milliseconds(62.5));
  // Time counts again from the stepped-back reading.
  EXPECT_EQ(bucket.Take(kBurst, kT0 - absl::Seconds(5) + absl::Milliseconds(62.5)),
            absl::Milliseconds(62.5));
}

TEST(TokenBucketTest, ADecimalRateWaitsWithinANanosecond) {
  // The link tests' setting: 2 MB/s with a 64 KiB burst.
  TokenBucket bucket(2e6, 64 << 10);
  EXPECT_EQ(bucket.Take(64 << 10, kT0), absl::ZeroDuration());
  const absl::Duration wait = bucket.Take(25000, kT0);
  EXPECT_NEAR(absl::ToDoubleSeconds(wait), 25000 / 2e6, 1e-9);
  EXPECT_EQ(bucket.rate_bytes_per_second(), 2e6);
  EXPECT_EQ(bucket.burst_bytes(), 64 << 10);
}

}  // namespace
}  // namespace mapl
