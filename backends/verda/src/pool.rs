//! The endpoints behind one `verda`-kind backend: a fixed list, or every address a DNS name
//! resolves to (re-resolved periodically: a Kubernetes headless Service of GPU workers). Each
//! endpoint has its own connections, in-flight count, back-off (`Retry-After`) and ejection after
//! consecutive failures; a request goes to the less loaded of two eligible endpoints picked at
//! random (power of two choices), and a busy or unreachable endpoint hands the request to another
//! of the pool before the gateway moves to its next backend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use kleingate_backend::{BackendError, EndpointState, EndpointStatus};
use rand::Rng;

/// How the pool treats its endpoints.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Consecutive failures (connection, timeout, 5xx, unusable answer) after which an endpoint
    /// is left out for `eject_for` (pools of two or more: a single endpoint is the backend, and
    /// the gateway's circuit breaker judges it).
    pub eject_after_failures: u32,
    pub eject_for: Duration,
    /// How long an endpoint that answered 503/429 without `Retry-After` is left out.
    pub busy_default: Duration,
    /// The longest `Retry-After` honoured.
    pub max_retry_after: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            eject_after_failures: 3,
            eject_for: Duration::from_secs(10),
            busy_default: Duration::from_secs(1),
            max_retry_after: crate::MAX_RETRY_AFTER,
        }
    }
}

/// One upstream address with its own connections and bookkeeping.
pub(crate) struct Endpoint {
    /// The URL root requests go to (for a resolved address: the configured name, with the
    /// connection pinned to the address, so `Host` and TLS stay the name's).
    pub base: String,
    /// What `/v1/backends` and the metrics call it: `host:port` (no scheme, no credentials).
    pub label: String,
    pub client: reqwest::Client,
    inflight: AtomicUsize,
    state: Mutex<Standing>,
}

#[derive(Default)]
struct Standing {
    failures: u32,
    ejected_until: Option<Instant>,
    busy_until: Option<Instant>,
    last_error: Option<String>,
}

impl Endpoint {
    pub fn new(base: String, label: String, client: reqwest::Client) -> Self {
        Endpoint {
            base,
            label,
            client,
            inflight: AtomicUsize::new(0),
            state: Mutex::new(Standing::default()),
        }
    }

    fn standing(&self) -> std::sync::MutexGuard<'_, Standing> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Until when it is left out (ejected or backing off), if it is now.
    fn excluded_until(&self, now: Instant) -> Option<Instant> {
        let s = self.standing();
        [s.ejected_until, s.busy_until]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .max()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Count a request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn succeeded(&self) {
        let mut s = self.standing();
        s.failures = 0;
        s.ejected_until = None;
        s.busy_until = None;
    }

    /// Book an attempt's failure: a busy answer leaves it out for its `Retry-After`; a failure
    /// counts towards ejection (in a pool of `members` endpoints).
    fn failed(&self, e: &BackendError, settings: &PoolSettings, members: usize) {
        let now = Instant::now();
        let mut s = self.standing();
        match e {
            // The client's error: says nothing about the endpoint.
            BackendError::InvalidRequest { .. } => return,
            BackendError::Unavailable { retry_after, .. } => {
                let d = retry_after
                    .unwrap_or(settings.busy_default)
                    .min(settings.max_retry_after);
                s.busy_until = now.checked_add(d);
            }
            _ => {
                s.failures = s.failures.saturating_add(1);
                if members > 1 && s.failures >= settings.eject_after_failures.max(1) {
                    s.ejected_until = now.checked_add(settings.eject_for);
                }
            }
        }
        s.last_error = Some(e.to_string());
    }

    fn status(&self, now: Instant) -> EndpointStatus {
        let s = self.standing();
        let ejected = s.ejected_until.filter(|t| *t > now);
        let busy = s.busy_until.filter(|t| *t > now);
        let (state, until) = match (ejected, busy) {
            (Some(t), _) => (EndpointState::Ejected, Some(t)),
            (None, Some(t)) => (EndpointState::Busy, Some(t)),
            (None, None) => (EndpointState::Ready, None),
        };
        EndpointStatus {
            address: self.label.clone(),
            state,
            in_flight: self.inflight(),
            consecutive_failures: s.failures,
            retry_in_secs: until.map(|t| (t - now).as_secs_f64()),
            last_error: s.last_error.clone(),
        }
    }
}

/// An endpoint's request in flight.
pub(crate) struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One call to an endpoint: in flight until dropped, and booked on the endpoint by
/// [`Call::settle`]; a call dropped unsettled (the gateway's deadline cancelled it) is booked
/// as a timeout, so a hung endpoint is ejected like a failing one.
pub(crate) struct Call<'a> {
    pool: &'a Pool,
    _inflight: InFlight,
    settled: bool,
    timeout: Duration,
}

impl Call<'_> {
    pub fn settle(&mut self, result: Result<(), &BackendError>) {
        self.settled = true;
        self.pool.settle(&self._inflight.0, result);
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let e = BackendError::Timeout(self.timeout);
            self.pool.settle(&self._inflight.0, Err(&e));
        }
    }
}

/// Where the endpoints come from.
pub(crate) enum Source {
    Fixed,
    /// Re-resolved every `interval`; `error` holds the last resolution's failure.
    Dns {
        host: String,
        resolved: Mutex<Resolution>,
    },
}

#[derive(Default)]
pub(crate) struct Resolution {
    pub at: Option<Instant>,
    pub error: Option<String>,
    /// Failed lookups in a row.
    pub failures: u32,
}

/// Failed lookups in a row after which a resolved pool forgets its endpoints.
pub const FORGET_AFTER_FAILED_LOOKUPS: u32 = 3;

pub(crate) struct Pool {
    members: RwLock<Arc<[Arc<Endpoint>]>>,
    pub settings: PoolSettings,
    pub source: Source,
}

impl Pool {
    pub fn fixed(members: Vec<Endpoint>, settings: PoolSettings) -> Pool {
        Pool {
            members: RwLock::new(members.into_iter().map(Arc::new).collect()),
            settings,
            source: Source::Fixed,
        }
    }

    pub fn resolved(host: String, settings: PoolSettings) -> Pool {
        Pool {
            members: RwLock::new(Arc::from(Vec::new())),
            settings,
            source: Source::Dns {
                host,
                resolved: Mutex::new(Resolution::default()),
            },
        }
    }

    pub fn members(&self) -> Arc<[Arc<Endpoint>]> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the members by the endpoints of `addrs`: an address already in the pool keeps
    /// its endpoint (connections, counts, ejection); new ones are made by `make`.
    pub fn update(&self, addrs: &[SocketAddr], make: impl Fn(SocketAddr) -> Option<Endpoint>) {
        let old = self.members();
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(addrs.len());
        for a in addrs {
            let label = a.to_string();
            if next.iter().any(|e| e.label == label) {
                continue;
            }
            match old.iter().find(|e| e.label == label) {
                Some(e) => next.push(e.clone()),
                None => {
                    if let Some(e) = make(*a) {
                        next.push(Arc::new(e));
                    }
                }
            }
        }
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = next.into();
    }

    /// The endpoint for the next try, leaving out those `tried`: the less loaded of two
    /// eligible ones at random. When none is eligible on the first try, the one left out for the
    /// shortest time (a probe: the answer decides, as it would without a pool).
    pub fn pick(&self, tried: &[Arc<Endpoint>]) -> Option<Arc<Endpoint>> {
        let members = self.members();
        let now = Instant::now();
        let untried = |e: &&Arc<Endpoint>| !tried.iter().any(|t| Arc::ptr_eq(t, e));
        let eligible: Vec<&Arc<Endpoint>> = members
            .iter()
            .filter(untried)
            .filter(|e| e.excluded_until(now).is_none())
            .collect();
        match eligible.len() {
            0 if tried.is_empty() => members
                .iter()
                .min_by_key(|e| e.excluded_until(now))
                .cloned(),
            0 => None,
            1 => Some(eligible[0].clone()),
            n => {
                let mut rng = rand::rng();
                let i = rng.random_range(0..n);
                let mut j = rng.random_range(0..n - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (eligible[i], eligible[j]);
                Some(if b.inflight() < a.inflight() { b } else { a }.clone())
            }
        }
    }

    /// A call to `ep` (within an attempt of `timeout`).
    pub fn call(&self, ep: &Arc<Endpoint>, timeout: Duration) -> Call<'_> {
        Call {
            pool: self,
            _inflight: ep.begin(),
            settled: false,
            timeout,
        }
    }

    /// Apply one DNS lookup: its addresses become the members. A failed lookup keeps the known
    /// endpoints (a resolver hiccup must not empty the pool), but not for ever: after
    /// [`FORGET_AFTER_FAILED_LOOKUPS`] in a row they are dropped, since a name that no longer
    /// resolves (a headless Service without ready pods) leaves addresses that other pods may
    /// take next.
    pub fn apply_lookup(
        &self,
        found: Result<Vec<SocketAddr>, String>,
        make: impl Fn(SocketAddr) -> Option<Endpoint>,
    ) {
        let Source::Dns { host, resolved } = &self.source else {
            return;
        };
        let mut r = resolved.lock().unwrap_or_else(|p| p.into_inner());
        r.at = Some(Instant::now());
        match found {
            Ok(mut addrs) => {
                r.error = None;
                r.failures = 0;
                drop(r);
                addrs.sort();
                self.update(&addrs, make);
            }
            Err(e) => {
                r.failures = r.failures.saturating_add(1);
                let forget = r.failures >= FORGET_AFTER_FAILED_LOOKUPS;
                tracing::warn!(host = %host, error = %e, failures = r.failures, forget, "resolving the backend's endpoints failed");
                r.error = Some(e);
                drop(r);
                if forget {
                    self.update(&[], make);
                }
            }
        }
    }

    /// Book an attempt's outcome on its endpoint.
    pub fn settle(&self, e: &Endpoint, result: Result<(), &BackendError>) {
        match result {
            Ok(()) => e.succeeded(),
            Err(err) => e.failed(err, &self.settings, self.members().len()),
        }
    }

    /// How long until some endpoint is eligible again, when none is now.
    pub fn soonest_eligible(&self) -> Option<Duration> {
        let now = Instant::now();
        let members = self.members();
        let mut soonest: Option<Duration> = None;
        for e in members.iter() {
            match e.excluded_until(now) {
                None => return None,
                Some(t) => {
                    let d = t - now;
                    soonest = Some(soonest.map_or(d, |s| s.min(d)));
                }
            }
        }
        soonest
    }

    pub fn statuses(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.members().iter().map(|e| e.status(now)).collect()
    }

    /// Ready unless every endpoint is ejected, or a resolved pool has no address.
    pub fn health(&self) -> kleingate_backend::Health {
        use kleingate_backend::Health;
        let members = self.members();
        if members.is_empty() {
            if let Source::Dns { host, resolved } = &self.source {
                let r = resolved.lock().unwrap_or_else(|p| p.into_inner());
                return match (&r.at, &r.error) {
                    (None, None) => Health::Loading {
                        message: format!("resolving `{host}`"),
                    },
                    (_, Some(e)) => Health::Down {
                        message: format!("`{host}` could not be resolved: {e}"),
                    },
                    (Some(_), None) => Health::Down {
                        message: format!("`{host}` resolves to no address"),
                    },
                };
            }
        }
        let now = Instant::now();
        let ejected = members
            .iter()
            .filter(|e| e.standing().ejected_until.is_some_and(|t| t > now))
            .count();
        if !members.is_empty() && ejected == members.len() {
            Health::Down {
                message: format!(
                    "all {} endpoints are ejected after consecutive failures",
                    members.len()
                ),
            }
        } else {
            Health::Ready
        }
    }
}

/// Re-resolve `host:port` every `interval` while the pool lives; `make` builds the endpoint of
/// a new address. The first resolution is immediate.
pub(crate) fn spawn_discovery(
    pool: Weak<Pool>,
    host: String,
    port: u16,
    interval: Duration,
    make: impl Fn(SocketAddr) -> Option<Endpoint> + Send + Sync + 'static,
) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::error!(host = %host, "no async runtime: the backend's name is never resolved");
        return;
    };
    rt.spawn(async move {
        loop {
            let found = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|a| a.collect::<Vec<_>>())
                .map_err(|e| e.to_string());
            let Some(pool) = pool.upgrade() else {
                return;
            };
            pool.apply_lookup(found, &make);
            drop(pool);
            tokio::time::sleep(interval).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(label: &str) -> Endpoint {
        Endpoint::new(
            format!("http://{label}"),
            label.to_owned(),
            reqwest::Client::new(),
        )
    }

    #[test]
    fn two_choices_take_the_less_loaded() {
        let pool = Pool::fixed(vec![ep("a:1"), ep("b:1")], PoolSettings::default());
        let m = pool.members();
        let _busy: Vec<InFlight> = (0..5).map(|_| m[0].begin()).collect();
        for _ in 0..50 {
            assert_eq!(pool.pick(&[]).unwrap().label, "b:1");
        }
        drop(_busy);
        assert_eq!(m[0].inflight(), 0);
    }

    #[test]
    fn busy_and_ejected_endpoints_are_left_out_and_come_back() {
        let settings = PoolSettings {
            eject_after_failures: 2,
            eject_for: Duration::from_millis(200),
            ..Default::default()
        };
        let pool = Pool::fixed(vec![ep("a:1"), ep("b:1"), ep("c:1")], settings);
        let m = pool.members();
        let busy = BackendError::Unavailable {
            message: "full".into(),
            retry_after: Some(Duration::from_secs(30)),
        };
        pool.settle(&m[0], Err(&busy));
        let down = BackendError::Connect("refused".into());
        pool.settle(&m[1], Err(&down));
        // One failure is not enough to eject.
        assert_eq!(pool.statuses()[1].state, EndpointState::Ready);
        pool.settle(&m[1], Err(&down));
        let s = pool.statuses();
        assert_eq!(s[0].state, EndpointState::Busy);
        assert!(s[0].retry_in_secs.unwrap() > 29.0);
        assert_eq!(s[1].state, EndpointState::Ejected);
        assert_eq!(s[1].consecutive_failures, 2);
        for _ in 0..20 {
            assert_eq!(pool.pick(&[]).unwrap().label, "c:1");
        }
        // Nothing else to try after c.
        assert!(pool.pick(&[m[2].clone()]).is_none());
        assert!(pool.soonest_eligible().is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(pool.statuses()[1].state, EndpointState::Ready);
        // A success clears the count.
        pool.settle(&m[1], Ok(()));
        assert_eq!(pool.statuses()[1].consecutive_failures, 0);
    }

    #[test]
    fn with_none_eligible_the_first_try_probes_the_soonest_back() {
        let pool = Pool::fixed(vec![ep("a:1"), ep("b:1")], PoolSettings::default());
        let m = pool.members();
        for (e, secs) in [(&m[0], 30), (&m[1], 5)] {
            pool.settle(
                e,
                Err(&BackendError::Unavailable {
                    message: "full".into(),
                    retry_after: Some(Duration::from_secs(secs)),
                }),
            );
        }
        assert_eq!(pool.pick(&[]).unwrap().label, "b:1");
        assert!(pool.pick(&[m[1].clone()]).is_none());
        let wait = pool.soonest_eligible().unwrap();
        assert!(wait > Duration::from_secs(4) && wait <= Duration::from_secs(5));
    }

    #[test]
    fn failed_lookups_keep_the_endpoints_for_a_while_then_forget_them() {
        let pool = Pool::resolved("workers".into(), PoolSettings::default());
        let make = |x: SocketAddr| Some(ep(&x.to_string()));
        let a: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        pool.apply_lookup(Ok(vec![a]), make);
        for _ in 1..FORGET_AFTER_FAILED_LOOKUPS {
            pool.apply_lookup(Err("no such host".into()), make);
            assert_eq!(pool.members().len(), 1);
        }
        pool.apply_lookup(Err("no such host".into()), make);
        assert!(pool.members().is_empty());
        match pool.health() {
            kleingate_backend::Health::Down { message } => {
                assert!(message.contains("could not be resolved"), "{message}")
            }
            h => panic!("{h:?}"),
        }
        // A lookup that works again brings them back, and clears the count.
        pool.apply_lookup(Ok(vec![a]), make);
        assert_eq!(pool.members().len(), 1);
        assert_eq!(pool.health(), kleingate_backend::Health::Ready);
    }

    #[test]
    fn a_cancelled_call_counts_as_a_timeout() {
        let pool = Pool::fixed(vec![ep("a:1"), ep("b:1")], PoolSettings::default());
        let m = pool.members();
        for _ in 0..3 {
            let call = pool.call(&m[0], Duration::from_secs(1));
            assert_eq!(m[0].inflight(), 1);
            drop(call);
        }
        assert_eq!(m[0].inflight(), 0);
        let s = &pool.statuses()[0];
        assert_eq!(s.state, EndpointState::Ejected);
        assert!(s.last_error.as_deref().unwrap().contains("did not answer"));
        // A settled call is booked once, as what it was.
        let mut call = pool.call(&m[1], Duration::from_secs(1));
        call.settle(Ok(()));
        drop(call);
        assert_eq!(pool.statuses()[1].consecutive_failures, 0);
    }

    #[test]
    fn a_single_endpoint_is_never_ejected() {
        let pool = Pool::fixed(vec![ep("a:1")], PoolSettings::default());
        let m = pool.members();
        for _ in 0..10 {
            pool.settle(&m[0], Err(&BackendError::Connect("refused".into())));
        }
        assert_eq!(pool.statuses()[0].state, EndpointState::Ready);
        assert_eq!(pool.health(), kleingate_backend::Health::Ready);
    }

    #[test]
    fn updates_keep_known_addresses_and_drop_gone_ones() {
        let pool = Pool::resolved("workers".into(), PoolSettings::default());
        assert!(matches!(
            pool.health(),
            kleingate_backend::Health::Loading { .. }
        ));
        let a: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:8080".parse().unwrap();
        let make = |x: SocketAddr| Some(ep(&x.to_string()));
        pool.update(&[a, b], make);
        let first = pool.members();
        pool.settle(&first[0], Err(&BackendError::Connect("refused".into())));
        pool.update(&[b, a, c, c], make);
        let next = pool.members();
        assert_eq!(next.len(), 3);
        let kept = next.iter().find(|e| e.label == "10.0.0.1:8080").unwrap();
        assert!(Arc::ptr_eq(kept, &first[0]));
        assert_eq!(kept.status(Instant::now()).consecutive_failures, 1);
        pool.update(&[c], make);
        let labels: Vec<String> = pool.members().iter().map(|e| e.label.clone()).collect();
        assert_eq!(labels, ["10.0.0.3:8080"]);
    }
}
