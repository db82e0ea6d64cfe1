//! The call budget of an account set, kept in PostgreSQL and shared by every fetcher that calls it.
//!
//! Calls are spaced evenly: each reserves the next free slot atomically, so that no 60 seconds ever
//! hold more calls than the rate in use, however many processes call. The rate in use adapts to what
//! the source allows (another client of the same app spends the same limit): each throttled call
//! cuts it by a tenth, and it climbs back by 2% of the configured budget a minute (additive increase,
//! multiplicative decrease). A throttled call also holds every caller back: until the time the source
//! said, or else for a pause that doubles while the source keeps refusing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use conveyor_base::source::RateBudget;
use conveyor_base::tls::error_chain;
use conveyor_postgres::Database;

use crate::state::failed;

/// Spacing is this much wider than the rate allows, as margin for network jitter between the
/// reservation and the call's arrival.
const MARGIN: f64 = 1.02;
/// A throttled call cuts the rate in use to this share of it.
const CUT: f64 = 0.9;
/// After a cut, the rate climbs back by this share of the configured budget each minute.
const CLIMB_PER_MINUTE: f64 = 0.02;
/// The rate is never cut below this share of the configured budget (nor below one call a minute).
const FLOOR: f64 = 0.02;
/// Throttled calls within this many call spacings of a cut are the same overshoot: no second cut.
const SPACINGS_PER_CUT: f64 = 4.0;
/// Without `Retry-After`, the first pause is this many call spacings; it doubles while calls keep
/// being refused, up to `LONGEST_PAUSE`.
const FIRST_PAUSE_SPACINGS: f64 = 2.0;
const LONGEST_PAUSE: f64 = 30.0;
/// A refusal that cuts the rate pauses at most this many spacings of the new rate.
const CUT_PAUSE_SPACINGS: f64 = 16.0;
/// A `Retry-After` beyond the gateway's 60-s rate window is not believed.
const LONGEST_RETRY_AFTER: f64 = 60.0;

/// The budget's adaptive state, as kept in its row; times are seconds before now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Adaptation {
    /// The rate the last cut set, and how long ago; `None`: never cut.
    cut: Option<(f64, f64)>,
    /// The last pause guessed without `Retry-After`, and how long ago a call was throttled.
    pause: f64,
    throttled_ago: Option<f64>,
}

/// What a throttled call changes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Throttling {
    /// The new rate, when this call cuts it.
    cut_to: Option<f64>,
    /// How long every caller holds off, from now.
    pause: f64,
    /// The guess to double next time; zero when the source said how long.
    guessed_pause: f64,
}

/// Calls per minute in use: the configured `limit`, or the last cut climbing back to it.
fn rate_in_use(limit: f64, cut: Option<(f64, f64)>) -> f64 {
    match cut {
        None => limit,
        Some((rate, ago)) => (rate + CLIMB_PER_MINUTE * limit * ago / 60.0).min(limit),
    }
}

fn spacing(rate: f64) -> f64 {
    60.0 / rate * MARGIN
}

fn throttling(limit: f64, state: Adaptation, retry_after: Option<Duration>) -> Throttling {
    let rate = rate_in_use(limit, state.cut);
    let same_overshoot = state
        .cut
        .is_some_and(|(_, ago)| ago <= SPACINGS_PER_CUT * spacing(rate));
    let cut_to = (!same_overshoot).then(|| (rate * CUT).max(limit * FLOOR).max(1.0));
    let spacing = spacing(cut_to.unwrap_or(rate));
    match retry_after {
        Some(wait) => Throttling {
            cut_to,
            pause: wait.as_secs_f64().min(LONGEST_RETRY_AFTER),
            guessed_pause: 0.0,
        },
        None => {
            // Refused again soon after the last pause ended: the source still has no room, so wait longer.
            let refused_again = state.pause > 0.0
                && state
                    .throttled_ago
                    .is_some_and(|ago| ago <= 2.0 * state.pause + 2.0 * spacing);
            let pause = if refused_again {
                let longest = match cut_to {
                    // A cut gives the new rate its chance soon: the pause is at most a few of its
                    // spacings, so that a rate far above the source's is cut again in seconds,
                    // not after half a minute.
                    Some(_) => LONGEST_PAUSE.min(CUT_PAUSE_SPACINGS * spacing),
                    None => LONGEST_PAUSE,
                };
                (state.pause * 2.0).min(longest)
            } else {
                FIRST_PAUSE_SPACINGS * spacing
            };
            Throttling {
                cut_to,
                pause,
                guessed_pause: pause,
            }
        }
    }
}

/// A call budget kept in PostgreSQL, shared by every fetcher of an account set (see the module's docs).
pub struct SharedBudget {
    database: Database,
    key: String,
    /// The configured calls per minute.
    limit: f64,
    /// The spacing (seconds, as f64 bits) of the rate in use, as the last reservation found it.
    spacing: AtomicU64,
    /// Counts this process's throttled calls: a caller that slept towards a slot reserved before one
    /// reserves again, behind the pause.
    throttles: AtomicU64,
    rate_gauge: Option<prometheus::Gauge>,
}

impl SharedBudget {
    /// `calls_per_minute` is the most the source allows this account set.
    pub fn new(database: Database, key: String, calls_per_minute: u32) -> Self {
        let limit = f64::from(calls_per_minute.max(1));
        Self {
            database,
            key,
            limit,
            spacing: AtomicU64::new(spacing(limit).to_bits()),
            throttles: AtomicU64::new(0),
            rate_gauge: None,
        }
    }

    /// Keeps `gauge` at the rate in use (calls per minute).
    pub fn with_rate_gauge(mut self, gauge: prometheus::Gauge) -> Self {
        gauge.set(self.limit);
        self.rate_gauge = Some(gauge);
        self
    }

    fn adopt(&self, cut: Option<(f64, f64)>) {
        let rate = rate_in_use(self.limit, cut);
        self.spacing
            .store(spacing(rate).to_bits(), Ordering::Relaxed);
        if let Some(gauge) = &self.rate_gauge {
            gauge.set(rate);
        }
    }

    /// Reserves the next slot at the spacing in use; returns the wait until it, and the last cut.
    async fn reserve(&self) -> Result<(Duration, Option<(f64, f64)>), String> {
        let client = self
            .database
            .client()
            .await
            .map_err(|err| error_chain(&err))?;
        let spacing = f64::from_bits(self.spacing.load(Ordering::Relaxed));
        // Prepared once per connection: a reservation precedes every call to the source.
        let reserve = client
            .prepare_cached(
                "INSERT INTO conveyor_rate_budget AS b (budget, next_slot) \
                 VALUES ($1, clock_timestamp() + make_interval(secs => $2)) \
                 ON CONFLICT (budget) DO UPDATE \
                   SET next_slot = GREATEST(b.next_slot, clock_timestamp()) + make_interval(secs => $2) \
                 RETURNING (extract(epoch FROM (next_slot - clock_timestamp())) - $2)::float8, \
                   rate_cut, extract(epoch FROM (clock_timestamp() - cut_at))::float8",
            )
            .await
            .map_err(failed("preparing the call slot reservation"))?;
        let row = client
            .query_one(&reserve, &[&self.key, &spacing])
            .await
            .map_err(failed("reserving a call slot"))?;
        let wait: f64 = row.get(0);
        let cut = row.get::<_, Option<f64>>(1).zip(row.get(2));
        Ok((Duration::from_secs_f64(wait.max(0.0)), cut))
    }

    async fn record_throttling(&self, retry_after: Option<Duration>) -> Result<Throttling, String> {
        let mut client = self
            .database
            .client()
            .await
            .map_err(|err| error_chain(&err))?;
        let transaction = client
            .transaction()
            .await
            .map_err(failed("starting a transaction"))?;
        let row = transaction
            .query_opt(
                "SELECT rate_cut, extract(epoch FROM (clock_timestamp() - cut_at))::float8, \
                   pause_secs, extract(epoch FROM (clock_timestamp() - throttled_at))::float8 \
                 FROM conveyor_rate_budget WHERE budget = $1 FOR UPDATE",
                &[&self.key],
            )
            .await
            .map_err(failed("reading the call budget"))?;
        let state = row
            .map(|row| Adaptation {
                cut: row.get::<_, Option<f64>>(0).zip(row.get(1)),
                pause: row.get(2),
                throttled_ago: row.get(3),
            })
            .unwrap_or_default();
        let change = throttling(self.limit, state, retry_after);
        transaction
            .execute(
                "UPDATE conveyor_rate_budget SET \
                   rate_cut = COALESCE($2, rate_cut), \
                   cut_at = CASE WHEN $2 IS NULL THEN cut_at ELSE clock_timestamp() END, \
                   pause_secs = $3, throttled_at = clock_timestamp(), \
                   next_slot = GREATEST(next_slot, clock_timestamp() + make_interval(secs => $4)) \
                 WHERE budget = $1",
                &[
                    &self.key,
                    &change.cut_to,
                    &change.guessed_pause,
                    &change.pause,
                ],
            )
            .await
            .map_err(failed("recording the throttling"))?;
        transaction
            .commit()
            .await
            .map_err(failed("committing the throttling"))?;
        Ok(change)
    }
}

impl RateBudget for SharedBudget {
    async fn acquire(&self) -> Result<Duration, String> {
        let mut waited = Duration::ZERO;
        loop {
            let throttles = self.throttles.load(Ordering::Acquire);
            let (wait, cut) = self.reserve().await?;
            self.adopt(cut);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            waited += wait;
            if self.throttles.load(Ordering::Acquire) == throttles {
                return Ok(waited);
            }
        }
    }

    async fn throttled(&self, retry_after: Option<Duration>) -> bool {
        match self.record_throttling(retry_after).await {
            Ok(change) => {
                self.throttles.fetch_add(1, Ordering::AcqRel);
                if let Some(rate) = change.cut_to {
                    self.adopt(Some((rate, 0.0)));
                    tracing::info!(
                        calls_per_minute = format!("{rate:.1}"),
                        pause_secs = format!("{:.2}", change.pause),
                        "throttled by the source: the call rate is cut, and climbs back slowly"
                    );
                }
                true
            }
            Err(reason) => {
                // The call still waits, alone: the caller's own pause applies.
                tracing::warn!(
                    reason,
                    "the throttling could not be shared with other fetchers"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: f64 = 600.0;

    #[test]
    fn the_rate_climbs_back_slowly_to_the_budget_and_no_further() {
        assert_eq!(rate_in_use(LIMIT, None), LIMIT);
        assert_eq!(rate_in_use(LIMIT, Some((150.0, 0.0))), 150.0);
        // 2% of 600 a minute: 12 more calls a minute per minute.
        assert!((rate_in_use(LIMIT, Some((150.0, 300.0))) - 210.0).abs() < 1e-9);
        assert_eq!(rate_in_use(LIMIT, Some((150.0, 3600.0))), LIMIT);
    }

    #[test]
    fn a_throttled_call_cuts_the_rate_once_per_overshoot_and_never_below_the_floor() {
        let first = throttling(LIMIT, Adaptation::default(), None);
        assert_eq!(first.cut_to, Some(540.0));
        // Another refusal right after the cut is the same overshoot.
        let right_after = Adaptation {
            cut: Some((540.0, 0.1)),
            ..Adaptation::default()
        };
        assert_eq!(throttling(LIMIT, right_after, None).cut_to, None);
        let later = Adaptation {
            cut: Some((540.0, 5.0)),
            ..Adaptation::default()
        };
        // It climbed by 1 call a minute in those 5 s.
        let cut = throttling(LIMIT, later, None).cut_to.unwrap();
        assert!((cut - 0.9 * 541.0).abs() < 1e-9, "{cut}");
        let at_floor = Adaptation {
            cut: Some((5.0, 30.0)),
            ..Adaptation::default()
        };
        let floor = throttling(LIMIT, at_floor, None).cut_to.unwrap();
        assert_eq!(floor, LIMIT * FLOOR);
    }

    #[test]
    fn the_pause_is_what_the_source_said_or_a_guess_that_doubles_while_refused() {
        let told = throttling(LIMIT, Adaptation::default(), Some(Duration::from_secs(7)));
        assert_eq!((told.pause, told.guessed_pause), (7.0, 0.0));
        let unbelievable = throttling(
            LIMIT,
            Adaptation::default(),
            Some(Duration::from_secs(3600)),
        );
        assert_eq!(unbelievable.pause, LONGEST_RETRY_AFTER);

        let first = throttling(LIMIT, Adaptation::default(), None);
        assert!((first.pause - 2.0 * spacing(540.0)).abs() < 1e-9);
        let mut state = Adaptation {
            cut: Some((540.0, 0.0)),
            pause: first.pause,
            throttled_ago: Some(first.pause),
        };
        let mut pauses = vec![first.pause];
        for _ in 0..10 {
            let next = throttling(LIMIT, state, None);
            state.pause = next.guessed_pause;
            state.throttled_ago = Some(next.pause);
            pauses.push(next.pause);
        }
        assert!(pauses.windows(2).all(|pair| pair[1] >= pair[0]));
        assert_eq!(*pauses.last().unwrap(), LONGEST_PAUSE);
        // Long after, a refusal starts from a short pause again.
        state.throttled_ago = Some(600.0);
        assert!(throttling(LIMIT, state, None).pause < 1.0);
    }
}
