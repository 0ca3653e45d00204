//! A token bucket for byte rates (download and upload limits).

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Limits the average rate to `rate` bytes per second with a burst of a tenth of a second
/// (at least [`MIN_BURST`]): a cap that behaves like a link, not like a quota refilled
/// once a second. A rate of 0 means unlimited. The arithmetic is [`Bucket`]'s.
#[derive(Debug)]
pub struct RateLimiter {
    inner: Mutex<Bucket>,
}

/// An uploader answers "busy" rather than start a transfer that would wait longer than
/// this for those before it: a quarter of an asker's request timeout.
pub const BUSY_BACKLOG: Duration = Duration::from_secs(5);

/// Smallest burst: one largest chunk (FastCDC's maximum), so a chunk never waits for
/// tokens that cannot accumulate.
pub const MIN_BURST: u64 = 256 * 1024;

impl RateLimiter {
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            inner: Mutex::new(Bucket::new(rate, now())),
        }
    }

    /// Waits until `bytes` may pass. The bytes are counted when first polled: a transfer
    /// given up while waiting still holds back those after it, as on a link.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.inner.lock().expect("not poisoned").take(bytes, now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// How long a transfer starting now would wait for the ones already admitted: an
    /// uploader answers "busy" rather than queue requests past their askers' patience.
    pub fn backlog(&self) -> Duration {
        self.inner.lock().expect("not poisoned").backlog(now())
    }

    /// More than [`BUSY_BACKLOG`] is owed: new uploads should be refused.
    pub fn saturated(&self) -> bool {
        self.backlog() > BUSY_BACKLOG
    }
}

/// tokio's clock (paused in tests), as the std instant [`Bucket`] takes.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The token bucket itself, with time passed in (the fleet simulator's links are these).
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    /// Full at `now`; a `rate` of 0 never makes anyone wait.
    pub fn new(rate: u64, now: std::time::Instant) -> Bucket {
        let burst = (rate / 10).max(MIN_BURST) as f64;
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Admits `bytes` at `now`: how long until they have passed the link.
    pub fn take(&mut self, bytes: u64, now: std::time::Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= bytes as f64;
        self.debt()
    }

    /// How long bytes admitted at `now` would wait for those already admitted.
    pub fn backlog(&mut self, now: std::time::Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.debt()
    }

    fn refill(&mut self, now: std::time::Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst);
        self.last = self.last.max(now);
    }

    fn debt(&self) -> Duration {
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
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
