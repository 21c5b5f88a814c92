//! Tokens from a client's shared bucket, taken a few at a time. Asking Redis for every request
//! puts a round trip on each; a replica instead takes up to ~50 ms worth of the client's rate
//! (at most a tenth of its burst, at least one token) and spends them locally for up to
//! [`LEASE_TTL`], and remembers a refusal until the next token is due. This never admits more
//! than the shared bucket gave out; tokens a replica took but did not use within the lease are
//! lost (under-admission of at most one lease per replica and client). A client at the usual
//! tens of requests per second leases one token at a time, which is the exact behaviour.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long leased tokens stay usable.
pub(super) const LEASE_TTL: Duration = Duration::from_millis(100);
/// The share of a second of the client's rate one lease takes.
const LEASE_SECS: f64 = 0.05;
/// Clients tracked at once; past it (after dropping expired leases) a client is not leased to.
const MAX_LEASES: usize = 100_000;

/// What to do for one request.
#[derive(Debug, PartialEq)]
pub(super) enum Local {
    /// A leased token was spent.
    Taken,
    /// The shared bucket said no until then.
    Refused(Duration),
    /// Ask the shared bucket for this many tokens.
    Ask(u32),
}

#[derive(Default)]
struct Lease {
    tokens: u32,
    until: Option<Instant>,
    blocked_until: Option<Instant>,
}

#[derive(Default)]
pub(super) struct Leases {
    map: Mutex<HashMap<String, Lease>>,
}

/// Tokens one lease takes at `rate`/s with a bucket of `burst`.
pub(super) fn lease_size(rate: f64, burst: u32) -> u32 {
    let by_rate = (rate * LEASE_SECS).floor().min(f64::from(u32::MAX)) as u32;
    by_rate.clamp(1, (burst / 10).max(1))
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn local(&self, client: &str, rate: f64, burst: u32, now: Instant) -> Local {
        let mut map = self.map();
        if let Some(l) = map.get_mut(client) {
            if let Some(t) = l.blocked_until {
                if t > now {
                    return Local::Refused(t - now);
                }
                l.blocked_until = None;
            }
            if l.tokens > 0 && l.until.is_some_and(|u| u > now) {
                l.tokens -= 1;
                return Local::Taken;
            }
        }
        Local::Ask(lease_size(rate, burst))
    }

    /// The shared bucket gave `taken` tokens; one is this request's.
    pub(super) fn granted(&self, client: &str, taken: u32, now: Instant) {
        if taken <= 1 {
            return;
        }
        self.store(client, now, |l| {
            l.tokens = taken - 1;
            l.until = Some(now + LEASE_TTL);
        });
    }

    /// The shared bucket has no token for `wait`.
    pub(super) fn refused(&self, client: &str, wait: Duration, now: Instant) {
        self.store(client, now, |l| {
            l.tokens = 0;
            l.blocked_until = now.checked_add(wait);
        });
    }

    fn store(&self, client: &str, now: Instant, f: impl FnOnce(&mut Lease)) {
        let mut map = self.map();
        if !map.contains_key(client) && map.len() >= MAX_LEASES {
            map.retain(|_, l| {
                l.until.is_some_and(|u| u > now) || l.blocked_until.is_some_and(|b| b > now)
            });
            if map.len() >= MAX_LEASES {
                return;
            }
        }
        f(map.entry(client.to_owned()).or_default());
    }

    pub(super) fn clear(&self) {
        self.map().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_spent_locally_then_renewed_and_a_refusal_is_remembered() {
        // Tens of requests a second: one token at a time (exact); a fast client: ~50 ms worth,
        // at most a tenth of its burst.
        assert_eq!(lease_size(20.0, 40), 1);
        assert_eq!(lease_size(0.01, 4), 1);
        assert_eq!(lease_size(1000.0, 2000), 50);
        assert_eq!(lease_size(1000.0, 100), 10);
        assert_eq!(lease_size(1e12, u32::MAX), u32::MAX / 10);

        let l = Leases::default();
        let t0 = Instant::now();
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Ask(50));
        l.granted("a", 3, t0);
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Taken);
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Taken);
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Ask(50), "spent");
        // Unused leased tokens expire.
        l.granted("a", 5, t0);
        assert_eq!(l.local("a", 1000.0, 2000, t0 + LEASE_TTL), Local::Ask(50));
        // A refusal holds until the next token is due, for this client only.
        l.refused("b", Duration::from_secs(2), t0);
        assert_eq!(
            l.local("b", 1.0, 1, t0 + Duration::from_secs(1)),
            Local::Refused(Duration::from_secs(1))
        );
        assert_eq!(l.local("c", 1.0, 1, t0), Local::Ask(1));
        assert_eq!(
            l.local("b", 1.0, 1, t0 + Duration::from_secs(2)),
            Local::Ask(1)
        );
    }
}
