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
    /// A lease is being asked for: requests meanwhile ask for one token each, or many
    /// concurrent requests would each take a whole lease and drain the bucket between them.
    asking: bool,
}

/// Room for one more entry, after dropping the dead ones if the table is full.
fn make_room(map: &mut HashMap<String, Lease>, now: Instant) -> bool {
    if map.len() >= MAX_LEASES {
        map.retain(|_, l| l.live(now));
    }
    map.len() < MAX_LEASES
}

/// An ask to the shared bucket in flight (see [`Leases::asking`]).
pub(super) struct Asking<'a> {
    leases: &'a Leases,
    client: &'a str,
    asked: u32,
    answered: bool,
}

impl Asking<'_> {
    pub(super) fn answered(mut self, answer: Option<Result<u32, Duration>>, now: Instant) {
        self.answered = true;
        self.leases.answered(self.client, self.asked, answer, now);
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.leases.abandoned(self.client, self.asked);
        }
    }
}

impl Lease {
    /// Worth keeping: tokens still usable, a refusal still running, or an ask in flight.
    fn live(&self, now: Instant) -> bool {
        (self.tokens > 0 && self.until.is_some_and(|u| u > now))
            || self.blocked_until.is_some_and(|b| b > now)
            || self.asking
    }
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

    /// Spend a leased token, or say how many to ask the shared bucket for (a whole lease only
    /// when no other request is asking for one: then [`Leases::answered`] must follow).
    pub(super) fn local(&self, client: &str, rate: f64, burst: u32, now: Instant) -> Local {
        let size = lease_size(rate, burst);
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
            if l.asking {
                return Local::Ask(1);
            }
            if size > 1 {
                l.asking = true;
            }
            return Local::Ask(size);
        }
        if size == 1 {
            return Local::Ask(1);
        }
        if !make_room(&mut map, now) {
            // No room to remember an ask in flight: no lease (one token at a time is exact).
            return Local::Ask(1);
        }
        map.insert(
            client.to_owned(),
            Lease {
                asking: true,
                ..Lease::default()
            },
        );
        Local::Ask(size)
    }

    /// Hold while asking the shared bucket for `asked` tokens: answer it with
    /// [`Asking::answered`]; dropped unanswered (its request went away), it frees the next ask.
    pub(super) fn asking<'a>(&'a self, client: &'a str, asked: u32) -> Asking<'a> {
        Asking {
            leases: self,
            client,
            asked,
            answered: false,
        }
    }

    /// An ask for `asked` tokens that will not be answered (its request went away): the next
    /// request may ask for a lease again.
    pub(super) fn abandoned(&self, client: &str, asked: u32) {
        if asked > 1 {
            if let Some(l) = self.map().get_mut(client) {
                l.asking = false;
            }
        }
    }

    /// The shared bucket answered an ask for `asked` tokens: `Ok(taken)` (one is this
    /// request's), or no token for `wait`; `None` when it could not be asked.
    pub(super) fn answered(
        &self,
        client: &str,
        asked: u32,
        answer: Option<Result<u32, Duration>>,
        now: Instant,
    ) {
        self.store(client, now, |l| {
            if asked > 1 {
                l.asking = false;
            }
            match answer {
                Some(Ok(taken)) if taken > 1 => {
                    l.tokens = l.tokens.saturating_add(taken - 1);
                    l.until = Some(now + LEASE_TTL);
                }
                Some(Ok(_)) | None => {}
                Some(Err(wait)) => {
                    l.tokens = 0;
                    l.blocked_until = now.checked_add(wait);
                }
            }
        });
    }

    /// Change `client`'s entry; one is made only for what must be remembered (tokens left, a
    /// refusal), never for a plain one-token answer.
    fn store(&self, client: &str, now: Instant, f: impl FnOnce(&mut Lease)) {
        let mut map = self.map();
        if let Some(l) = map.get_mut(client) {
            return f(l);
        }
        let mut l = Lease::default();
        f(&mut l);
        if !l.live(now) {
            return;
        }
        if make_room(&mut map, now) {
            map.insert(client.to_owned(), l);
        }
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
        // While that lease is asked for, others ask for one token each.
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Ask(1));
        l.answered("a", 1, Some(Ok(1)), t0);
        l.answered("a", 50, Some(Ok(3)), t0);
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Taken);
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Taken);
        assert_eq!(l.local("a", 1000.0, 2000, t0), Local::Ask(50), "spent");
        // Unused leased tokens expire.
        l.answered("a", 50, Some(Ok(5)), t0);
        assert_eq!(l.local("a", 1000.0, 2000, t0 + LEASE_TTL), Local::Ask(50));
        // An ask that could not be made, or whose request went away, frees the next one.
        l.answered("a", 50, None, t0);
        assert_eq!(l.local("a", 1000.0, 2000, t0 + LEASE_TTL), Local::Ask(50));
        l.abandoned("a", 50);
        assert_eq!(l.local("a", 1000.0, 2000, t0 + LEASE_TTL), Local::Ask(50));
        // A refusal holds until the next token is due, for this client only.
        assert_eq!(l.local("b", 1.0, 1, t0), Local::Ask(1));
        l.answered("b", 1, Some(Err(Duration::from_secs(2))), t0);
        assert_eq!(
            l.local("b", 1.0, 1, t0 + Duration::from_secs(1)),
            Local::Refused(Duration::from_secs(1))
        );
        assert_eq!(l.local("c", 1.0, 1, t0), Local::Ask(1));
        l.answered("c", 1, Some(Ok(1)), t0);
        assert!(!l.map().contains_key("c"), "nothing to remember");
        assert_eq!(
            l.local("b", 1.0, 1, t0 + Duration::from_secs(2)),
            Local::Ask(1)
        );
    }
}
