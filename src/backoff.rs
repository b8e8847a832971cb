//! Exponential backoff with jitter, shared by the relay and the inbox consumer.

use std::time::Duration;

use rand::Rng;

/// Randomisation of retry delays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Jitter {
    /// "Full jitter": a uniformly random delay between zero and the exponential delay, so
    /// relays that failed together do not retry together.
    #[default]
    Full,
    /// "Equal jitter": uniformly between half the exponential delay and all of it, so a
    /// retry never comes much sooner than planned.
    Equal,
    /// The exponential delay exactly.
    None,
}

/// Exponential backoff between attempts (the relay's deliveries, the inbox's handler runs):
/// `min(cap, base × 2^(attempt-1))`, jittered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Delay before the first retry (before jitter). Default 1 s.
    pub base: Duration,
    /// Longest delay. Default 5 min.
    pub cap: Duration,
    /// Jitter. Default [`Jitter::Full`].
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// A backoff from `base` up to `cap`, with full jitter.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            jitter: Jitter::Full,
        }
    }

    /// Sets the jitter.
    #[must_use]
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay after the `attempt`-th failure (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.cap);
        match self.jitter {
            Jitter::None => raw,
            Jitter::Full => {
                let max = u64::try_from(raw.as_micros()).unwrap_or(u64::MAX);
                Duration::from_micros(rand::rng().random_range(0..=max))
            }
            Jitter::Equal => raw.mul_f64(rand::rng().random_range(0.5..=1.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_to_the_cap() {
        let b =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).jitter(Jitter::None);
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(800));
        assert_eq!(b.delay(5), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
        let j = b.jitter(Jitter::Full);
        let e = b.jitter(Jitter::Equal);
        for attempt in 1..20 {
            assert!(j.delay(attempt) <= b.delay(attempt));
            assert!(e.delay(attempt) <= b.delay(attempt));
            assert!(e.delay(attempt) >= b.delay(attempt) / 2);
        }
    }
}
