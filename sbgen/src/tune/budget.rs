//! The wall-time budget of a tuning run (`--budget-s`).

use std::time::{Duration, Instant};

/// A wall-time budget. `spent_after` is the whole rule, so it can be tested without a clock.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub limit: Option<Duration>,
    start: Instant,
}

impl Budget {
    pub fn start(limit: Option<Duration>) -> Self {
        Budget { limit, start: Instant::now() }
    }
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    /// Whether the budget is spent once `elapsed` has passed.
    pub fn spent_after(&self, elapsed: Duration) -> bool {
        self.limit.is_some_and(|limit| elapsed >= limit)
    }
    pub fn spent(&self) -> bool {
        self.spent_after(self.elapsed())
    }
    /// `12 s of 90 s` (or `12 s, no budget`), for progress lines.
    pub fn progress_after(&self, elapsed: Duration) -> String {
        match self.limit {
            Some(limit) => format!("{:.0} s of {:.0} s", elapsed.as_secs_f64(), limit.as_secs_f64()),
            None => format!("{:.0} s, no budget", elapsed.as_secs_f64()),
        }
    }
    /// [`Budget::progress_after`] now.
    pub fn progress(&self) -> String {
        self.progress_after(self.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_spent_at_its_limit_and_never_without_one() {
        assert!(!Budget::start(None).spent_after(Duration::from_secs(1_000_000)));
        assert!(Budget::start(Some(Duration::from_secs(1))).spent_after(Duration::from_secs(1)));
        assert!(!Budget::start(Some(Duration::from_secs(1))).spent_after(Duration::from_millis(999)));
    }

    #[test]
    fn progress_shows_the_time_spent_against_the_budget() {
        let b = Budget::start(Some(Duration::from_secs(90)));
        assert_eq!(b.progress_after(Duration::from_millis(12_400)), "12 s of 90 s");
        assert_eq!(Budget::start(None).progress_after(Duration::from_secs(3)), "3 s, no budget");
    }
}
