//! A circuit breaker per backend: after `threshold` consecutive failures it opens and rejects
//! requests for `cooldown`; then one probe request is let through (half-open). The probe's success
//! closes the circuit, its failure opens it again for another cool-down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: CircuitState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    inner: Mutex<Inner>,
    threshold: u32,
    cooldown: Duration,
}

/// Permission to send one request. Report how it went; dropping it unreported (the client went
/// away mid-request) counts as neither success nor failure and frees the probe slot.
#[must_use]
pub struct Ticket<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl Ticket<'_> {
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.record(Some(true), self.probe);
    }
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.record(Some(false), self.probe);
    }
    /// Busy answers and client errors say nothing about the backend's health.
    pub fn neutral(mut self) {
        self.reported = true;
        self.breaker.record(None, self.probe);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.record(None, self.probe);
        }
    }
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                consecutive_failures: 0,
                opened_at: None,
                probe_in_flight: false,
            }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a few plain fields updated atomically under the lock; a panic elsewhere
        // cannot leave it half-written, so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ask to send a request. `Err(remaining)` while open (or while the half-open probe is out).
    pub fn admit(&self) -> Result<Ticket<'_>, Duration> {
        let mut s = self.lock();
        match s.state {
            CircuitState::Closed => Ok(Ticket {
                breaker: self,
                probe: false,
                reported: false,
            }),
            CircuitState::Open => {
                let elapsed = s.opened_at.map_or(self.cooldown, |t| t.elapsed());
                if elapsed >= self.cooldown {
                    s.state = CircuitState::HalfOpen;
                    s.probe_in_flight = true;
                    Ok(Ticket {
                        breaker: self,
                        probe: true,
                        reported: false,
                    })
                } else {
                    Err(self.cooldown - elapsed)
                }
            }
            CircuitState::HalfOpen if !s.probe_in_flight => {
                s.probe_in_flight = true;
                Ok(Ticket {
                    breaker: self,
                    probe: true,
                    reported: false,
                })
            }
            CircuitState::HalfOpen => Err(Duration::ZERO),
        }
    }

    fn record(&self, ok: Option<bool>, probe: bool) {
        let mut s = self.lock();
        if probe {
            s.probe_in_flight = false;
        }
        match ok {
            Some(true) => {
                s.state = CircuitState::Closed;
                s.consecutive_failures = 0;
                s.opened_at = None;
            }
            Some(false) => {
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                let reopen = s.state == CircuitState::HalfOpen && probe;
                if reopen || s.consecutive_failures >= self.threshold {
                    s.state = CircuitState::Open;
                    s.opened_at = Some(Instant::now());
                }
            }
            None => {}
        }
    }

    pub fn state(&self) -> CircuitState {
        self.lock().state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.lock().consecutive_failures
    }

    /// Time until an open circuit lets a probe through.
    pub fn retry_in(&self) -> Option<Duration> {
        let s = self.lock();
        match (s.state, s.opened_at) {
            (CircuitState::Open, Some(t)) => Some(self.cooldown.saturating_sub(t.elapsed())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_recovers_through_one_probe() {
        let b = CircuitBreaker::new(3, Duration::from_millis(40));
        b.admit().unwrap().failure();
        b.admit().unwrap().failure();
        b.admit().unwrap().neutral(); // busy does not count, nor reset
        assert_eq!(b.state(), CircuitState::Closed);
        b.admit().unwrap().failure();
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(50));
        let probe = b.admit().unwrap();
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.admit().is_err(), "only one probe at a time");
        probe.failure();
        assert_eq!(b.state(), CircuitState::Open);
        std::thread::sleep(Duration::from_millis(50));
        b.admit().unwrap().success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn a_dropped_probe_frees_the_slot() {
        let b = CircuitBreaker::new(1, Duration::ZERO);
        b.admit().unwrap().failure();
        drop(b.admit().unwrap());
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.admit().unwrap().success();
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn success_resets_the_count() {
        let b = CircuitBreaker::new(2, Duration::from_secs(60));
        b.admit().unwrap().failure();
        b.admit().unwrap().success();
        b.admit().unwrap().failure();
        assert_eq!(b.state(), CircuitState::Closed);
    }
}
