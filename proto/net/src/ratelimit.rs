//! A token bucket for byte rates (download and upload limits).

use std::sync::Mutex;
use std::time::Duration;
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

/// An uploader answers "busy" rather than start a transfer that would wait longer than
/// this for those before it: a quarter of an asker's request timeout.
pub const BUSY_BACKLOG: Duration = Duration::from_secs(5);

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

    /// Waits until `bytes` may pass. The bytes are counted when first polled: a transfer
    /// given up while waiting still holds back those after it, as on a link.
    pub async fn acquire(&self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let wait = {
            let mut g = self.inner.lock().expect("not poisoned");
            let tokens = self.refill(&mut g);
            *tokens -= bytes as f64;
            self.debt(*tokens)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// How long a transfer starting now would wait for the ones already admitted: an
    /// uploader answers "busy" rather than queue requests past their askers' patience.
    pub fn backlog(&self) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let mut g = self.inner.lock().expect("not poisoned");
        let tokens = *self.refill(&mut g);
        self.debt(tokens)
    }

    /// More than [`BUSY_BACKLOG`] is owed: new uploads should be refused.
    pub fn saturated(&self) -> bool {
        self.backlog() > BUSY_BACKLOG
    }

    fn refill<'a>(&self, g: &'a mut (f64, Instant)) -> &'a mut f64 {
        let now = Instant::now();
        let (tokens, last) = g;
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.rate as f64).min(self.burst);
        *last = now;
        tokens
    }

    fn debt(&self, tokens: f64) -> Duration {
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.rate as f64)
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

    #[tokio::test(start_paused = true)]
    async fn backlog_is_the_wait_for_what_was_admitted() {
        let rate = 10 * MIN_BURST;
        let r = RateLimiter::new(rate);
        assert_eq!(r.backlog(), Duration::ZERO);
        // The burst passes at once; five more bursts' worth are owed: half a second.
        let r = std::sync::Arc::new(r);
        for _ in 0..6 {
            let r = r.clone();
            tokio::spawn(async move { r.acquire(MIN_BURST).await });
        }
        // Let all six be admitted (first poll) on this single-threaded runtime.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let owed = r.backlog();
        assert!(
            owed >= Duration::from_millis(490) && owed <= Duration::from_millis(510),
            "{owed:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let owed = r.backlog();
        assert!(
            owed >= Duration::from_millis(240) && owed <= Duration::from_millis(260),
            "{owed:?}"
        );
    }

    #[tokio::test]
    async fn zero_is_unlimited() {
        RateLimiter::new(0).acquire(u64::MAX).await;
    }
}
