//! A token bucket for byte rates (download and upload limits).

use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Limits the average rate to `rate` bytes per second with a one-second burst.
/// A rate of 0 means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    inner: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            rate,
            inner: Mutex::new((rate as f64, Instant::now())),
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
                .min(self.rate as f64);
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
        let r = RateLimiter::new(1000);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            r.acquire(1000).await;
        }
        // 1000 bytes of burst, then 4000 bytes at 1000 B/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(3900) && took <= Duration::from_millis(4100),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn zero_is_unlimited() {
        RateLimiter::new(0).acquire(u64::MAX).await;
    }
}
