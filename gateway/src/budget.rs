//! Daily spending budgets per client key.
//!
//! The client key is a request header (`budget.header`, `X-Kleingate-Client` by default); with
//! auth on, it is the API key's name. What a request cost (`X-Kleingate-Cost`) is added
//! to its key's spend for the current UTC day. A key at or over its budget is refused with 429, or
//! routed to the cheapest backend only (`on_exceed`). Requests without the header are not
//! budgeted. Spend is kept in memory, and with `[state] backend = "redis"` also in Redis, where
//! every replica adds to and reads one total; while Redis is down each replica goes by what it
//! has counted itself. A restart (of a memory-state gateway, or of a Redis without persistence)
//! forgives the day: budgets are a guard rail, not billing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExceed {
    /// 429 with a message naming the budget.
    Reject,
    /// Serve from the cheapest candidate only (no dearer fallbacks).
    Cheapest,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// The request header carrying the client key.
    pub header: String,
    /// USD per UTC day for keys not listed in `keys`; 0 = no budget for them.
    pub default_daily_usd: f64,
    /// USD per UTC day per client key.
    pub keys: BTreeMap<String, f64>,
    pub on_exceed: OnExceed,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            header: "x-kleingate-client".into(),
            default_daily_usd: 0.0,
            keys: BTreeMap::new(),
            on_exceed: OnExceed::Reject,
        }
    }
}

impl BudgetConfig {
    pub fn validate(&self) -> Result<(), String> {
        if axum::http::HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            return Err(format!(
                "budget.header `{}` is not a header name",
                self.header
            ));
        }
        for (k, v) in std::iter::once(("default_daily_usd", &self.default_daily_usd))
            .chain(self.keys.iter().map(|(k, v)| (k.as_str(), v)))
        {
            if !(v.is_finite() && *v >= 0.0) {
                return Err(format!("budget {k}: must be a finite amount >= 0; got {v}"));
            }
        }
        Ok(())
    }

    /// The daily budget of `key`, `None` when it has none.
    pub fn limit(&self, key: &str) -> Option<f64> {
        match self.keys.get(key) {
            Some(v) => Some(*v),
            None => (self.default_daily_usd > 0.0).then_some(self.default_daily_usd),
        }
    }
}

/// What the budget says about a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// No budget, or within it.
    Within,
    /// Spent `spent` of `limit` today.
    Exceeded { spent: f64, limit: f64 },
}

pub struct Budgets {
    cfg: BudgetConfig,
    shared: crate::shared::SharedState,
    /// The UTC day being counted, and key -> USD spent that day. Only keys with a budget are
    /// kept; a new day starts from an empty map, which also bounds it by one day's keys.
    spent: Mutex<(u64, HashMap<String, f64>)>,
}

fn today() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

impl Budgets {
    pub fn new(cfg: BudgetConfig, shared: crate::shared::SharedState) -> Self {
        Budgets {
            cfg,
            shared,
            spent: Mutex::new((0, HashMap::new())),
        }
    }

    pub fn header(&self) -> &str {
        &self.cfg.header
    }

    pub fn on_exceed(&self) -> OnExceed {
        self.cfg.on_exceed
    }

    /// The key's spend today across replicas when shared, else this replica's.
    pub async fn check(&self, key: &str) -> Verdict {
        let day = today();
        let Some(limit) = self.cfg.limit(key) else {
            return Verdict::Within;
        };
        let spent = match self.shared.spent(key, day).await {
            Some(spent) => spent,
            None => self.spent_here(key, day),
        };
        Self::verdict(spent, limit)
    }

    /// Counted here always (what this replica goes by while Redis is down), and in Redis when
    /// shared.
    pub async fn charge(&self, key: &str, usd: f64) {
        let day = today();
        if self.charge_on(key, usd, day) {
            self.shared.charge(key, usd, day).await;
        }
    }

    /// What this replica counted for `key` on `day`.
    fn spent_here(&self, key: &str, day: u64) -> f64 {
        match &*self.spent.lock().unwrap_or_else(|p| p.into_inner()) {
            (d, map) if *d == day => map.get(key).copied().unwrap_or(0.0),
            _ => 0.0,
        }
    }

    /// [`Budgets::check`] on this replica's count for a given day (the unit tests' clock).
    #[cfg(test)]
    fn check_on(&self, key: &str, day: u64) -> Verdict {
        match self.cfg.limit(key) {
            Some(limit) => Self::verdict(self.spent_here(key, day), limit),
            None => Verdict::Within,
        }
    }

    fn verdict(spent: f64, limit: f64) -> Verdict {
        if spent >= limit {
            Verdict::Exceeded { spent, limit }
        } else {
            Verdict::Within
        }
    }

    /// Count `usd` for a budgeted `key`; `false` when there was nothing to count.
    fn charge_on(&self, key: &str, usd: f64, day: u64) -> bool {
        if usd <= 0.0 || self.cfg.limit(key).is_none() {
            return false;
        }
        let mut guard = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        let (d, map) = &mut *guard;
        if *d != day {
            *d = day;
            map.clear();
        }
        *map.entry(key.to_owned()).or_insert(0.0) += usd;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Budgets {
        Budgets::new(
            BudgetConfig {
                default_daily_usd: 1.0,
                keys: BTreeMap::from([("team-a".to_owned(), 0.05), ("free".to_owned(), 0.0)]),
                ..BudgetConfig::default()
            },
            crate::shared::SharedState::memory(),
        )
    }

    #[test]
    fn spend_accumulates_per_key_and_day() {
        let b = budgets();
        b.charge_on("team-a", 0.03, 100);
        assert_eq!(b.check_on("team-a", 100), Verdict::Within);
        b.charge_on("team-a", 0.03, 100);
        assert!(
            matches!(b.check_on("team-a", 100), Verdict::Exceeded { limit, .. } if limit == 0.05)
        );
        // Another key, and the next day, start from nothing.
        assert_eq!(b.check_on("team-b", 100), Verdict::Within);
        assert_eq!(b.check_on("team-a", 101), Verdict::Within);
        b.charge_on("team-b", 0.5, 101);
        assert_eq!(
            b.spent.lock().unwrap().1.len(),
            1,
            "yesterday's entries are dropped"
        );
        // A budget of 0 is exceeded at once; a key with no budget never is.
        assert!(matches!(b.check_on("free", 101), Verdict::Exceeded { .. }));
        let none = Budgets::new(
            BudgetConfig::default(),
            crate::shared::SharedState::memory(),
        );
        none.charge_on("x", 100.0, 1);
        assert_eq!(none.check_on("x", 1), Verdict::Within);
        assert!(none.spent.lock().unwrap().1.is_empty());
    }

    #[test]
    fn bad_budgets_are_refused() {
        let mut c = BudgetConfig::default();
        c.keys.insert("k".into(), -1.0);
        assert!(c.validate().is_err());
        let c = BudgetConfig {
            header: "not a header".into(),
            ..BudgetConfig::default()
        };
        assert!(c.validate().is_err());
        assert!(BudgetConfig::default().validate().is_ok());
    }
}
