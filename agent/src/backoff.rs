//! Retry delays for everything that talks to the controllers: doubling from a minimum
//! to a maximum, each delay drawn at random from its upper half ("equal jitter"), so a
//! thousand agents that lost the same controller at the same moment do not all come
//! back at the same moment either.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), next: min }
    }

    /// The delay before the next attempt (in `[d/2, d]` for the current step `d`), and
    /// the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(fastrand::u64(0..=spread))
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_the_maximum() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut steps = Vec::new();
        for _ in 0..8 {
            steps.push(b.next_delay());
        }
        let bounds = [200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for (d, hi) in steps.iter().zip(bounds) {
            let hi = Duration::from_millis(hi);
            assert!(*d >= hi / 2 && *d <= hi, "{d:?} not in [{:?}, {hi:?}]", hi / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
        // Many agents spread out: not all draw the same delay.
        let draws: std::collections::BTreeSet<Duration> = (0..50)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay())
            .collect();
        assert!(draws.len() > 10);
    }
}
