//! GCRA (the generic cell rate algorithm) over one or more counters at once, all-or-nothing.
//!
//! A counter stores its theoretical arrival time (TAT). A rule of `count` per `period` with
//! `burst` extra has an emission interval `T = period / count` and a capacity of
//! `count + burst` cells: a request of cost `c` is admitted when
//! `max(TAT, now) + c·T - capacity·T <= now`, and then moves TAT to `max(TAT, now) + c·T`.
//! The Redis script (`redis.rs`) is the same arithmetic, in microseconds of the Redis clock.
//!
//! Why not `governor`: token limits must settle (give back or charge the difference between the
//! estimate and the real usage), several rules must admit all-or-nothing, and the in-memory and
//! Redis limiters must agree to the cell. governor offers none of those three, and the
//! algorithm itself is a dozen lines.

use std::time::Duration;

/// A counter's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gcra {
    /// Emission interval in nanoseconds.
    pub interval_ns: u64,
    /// How many cells the counter holds when full.
    pub capacity: u64,
}

impl Gcra {
    /// `count` per `period`, plus `burst` more at once.
    pub fn new(count: u64, period: Duration, burst: u64) -> Self {
        let period_ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        Self {
            interval_ns: (period_ns / count.max(1)).max(1),
            capacity: count.saturating_add(burst).max(1),
        }
    }

    /// A cost the counter can ever admit: a request larger than the whole capacity is admitted
    /// when the counter is full (its excess is charged when it settles).
    pub fn admissible(&self, cost: u64) -> u64 {
        cost.min(self.capacity)
    }
}

/// What a counter looks like after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellState {
    pub capacity: u64,
    pub remaining: u64,
    /// Until the counter is full again.
    pub reset: Duration,
    /// In a refusal: whether this counter is one that refused.
    pub refused: bool,
}

/// A refusal: how long until the request would be admitted, and the counters as they are.
pub type Refusal = (Duration, Vec<CellState>);

/// One step of the algorithm on `(counter, stored TAT, cost)` triples (nanoseconds on the
/// caller's clock). Returns the new TATs if all cells admit, else the wait until they would.
pub fn decide(now: u64, cells: &[(Gcra, u64, u64)]) -> Result<Vec<(u64, CellState)>, Refusal> {
    let mut wait = 0u64;
    let mut next = Vec::with_capacity(cells.len());
    for &(gcra, stored_tat, cost) in cells {
        let tat = stored_tat.max(now);
        let new_tat = tat.saturating_add(gcra.admissible(cost).saturating_mul(gcra.interval_ns));
        let allow_at = new_tat.saturating_sub(gcra.capacity.saturating_mul(gcra.interval_ns));
        wait = wait.max(allow_at.saturating_sub(now));
        next.push((tat, new_tat, gcra));
    }
    if wait > 0 {
        let states = next
            .iter()
            .map(|&(tat, new_tat, gcra)| CellState {
                refused: new_tat.saturating_sub(gcra.capacity.saturating_mul(gcra.interval_ns))
                    > now,
                ..state(now, tat, gcra)
            })
            .collect();
        return Err((Duration::from_nanos(wait), states));
    }
    Ok(next
        .into_iter()
        .map(|(_, new_tat, gcra)| (new_tat, state(now, new_tat, gcra)))
        .collect())
}

fn state(now: u64, tat: u64, gcra: Gcra) -> CellState {
    let full_at = now.saturating_add(gcra.capacity.saturating_mul(gcra.interval_ns));
    CellState {
        capacity: gcra.capacity,
        remaining: full_at.saturating_sub(tat) / gcra.interval_ns,
        reset: Duration::from_nanos(tat.saturating_sub(now)),
        refused: false,
    }
}

/// Moves a TAT by `delta` cells (a refund when negative), never into the past.
pub fn adjust(now: u64, stored_tat: u64, gcra: Gcra, delta: i64) -> u64 {
    let tat = stored_tat.max(now);
    let shift = delta.unsigned_abs().saturating_mul(gcra.interval_ns);
    if delta >= 0 {
        tat.saturating_add(shift)
    } else {
        tat.saturating_sub(shift).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn admits_count_plus_burst_at_once_then_one_per_interval() {
        let gcra = Gcra::new(5, Duration::from_secs(60), 2);
        assert_eq!(gcra.capacity, 7);
        let mut tat = 0;
        let now = 1000 * SECOND;
        for i in 0..7 {
            let admitted = decide(now, &[(gcra, tat, 1)]).unwrap();
            tat = admitted[0].0;
            assert_eq!(admitted[0].1.remaining, 6 - i);
        }
        let (wait, states) = decide(now, &[(gcra, tat, 1)]).unwrap_err();
        assert_eq!(wait, Duration::from_secs(12), "one cell every 60 s / 5");
        assert_eq!(states[0].remaining, 0);
        assert_eq!(states[0].reset, Duration::from_secs(84));
        assert!(decide(now + 12 * SECOND - 1, &[(gcra, tat, 1)]).is_err());
        assert!(decide(now + 12 * SECOND, &[(gcra, tat, 1)]).is_ok());
    }

    #[test]
    fn all_cells_must_admit() {
        let roomy = Gcra::new(100, Duration::from_secs(1), 0);
        let tight = Gcra::new(1, Duration::from_secs(1), 0);
        let now = 10 * SECOND;
        let first = decide(now, &[(roomy, 0, 1), (tight, 0, 1)]).unwrap();
        let (wait, _) = decide(now, &[(roomy, first[0].0, 1), (tight, first[1].0, 1)]).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
    }

    #[test]
    fn oversized_costs_wait_for_a_full_counter_and_settling_moves_the_tat() {
        let tokens = Gcra::new(1000, Duration::from_secs(60), 0);
        let now = 100 * SECOND;
        let admitted = decide(now, &[(tokens, 0, 5000)]).unwrap();
        assert_eq!(admitted[0].1.remaining, 0);
        // Settle: the call used 400 tokens fewer than reserved.
        let refunded = adjust(now, admitted[0].0, tokens, -400);
        assert_eq!(state(now, refunded, tokens).remaining, 400);
        // A refund never makes room beyond a full counter.
        assert_eq!(adjust(now, refunded, tokens, -100_000), now);
    }
}
