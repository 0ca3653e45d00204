//! A token bucket for byte rates (download and upload limits).

use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Limits the average rate to `rate` bytes per second with a burst of a tenth of a second
/// (at least [`MIN_BURST`]): a cap that behaves like a link, not like a quota refilled
/// once a second. A rate of 0 means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    burst: f64,
    inner: Mutex<(f64, Instant)>,
}

/// Smallest burst: one largest chunk (FastCDC's maximum), so a chunk never waits for
/// tokens that cannot accumulate.
pub const MIN_BURST: u64 = 256 * 1024;

impl RateLimiter {
    pub fn new(rate: u64) -> RateLimiter {
        let burst = (rate / 10).max(MIN_BURST) as f64;
        RateLimiter {
            rate,
            burst,
            inner: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until `bytes` may pass. Cancel-safe: dropping the future consumes nothing
    /// it had not already waited for.
    pub async fn acquire(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut g = self.inner.lock().await;
            let now = Instant::now();
            let (tokens, last) = &mut *g;
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate as f64)
                .min(self.burst);
            *last = now;
            *tokens -= bytes as f64;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-*tokens / self.rate as f64)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_average_rate() {
        let rate = 10 * MIN_BURST;
        let r = RateLimiter::new(rate);
        let start = tokio::time::Instant::now();
        for _ in 0..21 {
            r.acquire(MIN_BURST).await;
        }
        // One burst (a tenth of a second's worth), then 20 more at the rate: 2 s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1950) && took <= Duration::from_millis(2050),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn zero_is_unlimited() {
        RateLimiter::new(0).acquire(u64::MAX).await;
    }
}
