//! Counters in this process's memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::gcra::{self, CellState, Gcra};
use super::{Cell, Decision};

/// Counters keyed by rule and scope values; a counter that has refilled completely is the same
/// as no counter, so full ones are dropped now and then to bound memory.
pub struct MemoryStore {
    epoch: Instant,
    counters: Mutex<Counters>,
}

struct Counters {
    /// foldhash, seeded per process: SipHash of the keys was a tenth of the limiter's work.
    /// foldhash resists hash flooding less than SipHash, but clients cannot pick these keys:
    /// the only part they choose, the user, goes in as 8 bytes of its SHA-256, and the seed is
    /// random. (Endpoint and key id come from the config.)
    tats: HashMap<String, u64, foldhash::fast::RandomState>,
    /// Refilled counters are swept out on the write that finds more than this many: at least
    /// [`SWEEP_ABOVE`], and twice what the last sweep left, so that many live counters (one per
    /// user of a per-user rule) cost one sweep per doubling, not one per request.
    sweep_above: usize,
}

/// The fewest counters worth a sweep.
const SWEEP_ABOVE: usize = 10_000;

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            counters: Mutex::new(Counters {
                tats: HashMap::default(),
                sweep_above: SWEEP_ABOVE,
            }),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn acquire(&self, cells: &[Cell]) -> Decision {
        let now = self.now();
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Counters { tats, sweep_above } = &mut *counters;
        let inputs: Vec<(Gcra, u64, u64)> = cells
            .iter()
            .map(|c| (c.gcra, tats.get(&c.key).copied().unwrap_or(0), c.cost))
            .collect();
        match gcra::decide(now, &inputs) {
            Ok(admitted) => {
                if tats.len() > *sweep_above {
                    tats.retain(|_, tat| *tat > now);
                    *sweep_above = SWEEP_ABOVE.max(2 * tats.len());
                }
                let states: Vec<CellState> = admitted.iter().map(|(_, s)| *s).collect();
                for (cell, (tat, _)) in cells.iter().zip(admitted) {
                    match tats.get_mut(&cell.key) {
                        Some(stored) => *stored = tat,
                        None => {
                            tats.insert(cell.key.clone(), tat);
                        }
                    }
                }
                Decision::Allowed(states)
            }
            Err((retry_after, states)) => Decision::Denied {
                retry_after,
                states,
            },
        }
    }

    pub fn adjust(&self, key: &str, gcra: Gcra, delta: i64) {
        let now = self.now();
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stored = counters.tats.get(key).copied().unwrap_or(0);
        let tat = gcra::adjust(now, stored, gcra, delta);
        counters.tats.insert(key.to_owned(), tat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(store: &MemoryStore, key: String, gcra: Gcra) {
        let cell = Cell { key, gcra, cost: 1 };
        assert!(matches!(store.acquire(&[cell]), Decision::Allowed(_)));
    }

    #[test]
    fn live_counters_cost_one_sweep_per_doubling_and_refilled_ones_go() {
        let store = MemoryStore::new();
        // One request an hour per user: every user's counter stays live for an hour.
        let hourly = Gcra {
            interval_ns: 3_600_000_000_000,
            capacity: 1,
        };
        for user in 0..SWEEP_ABOVE + 2 {
            admit(&store, format!("hourly:{user}"), hourly);
        }
        {
            let counters = store.counters.lock().unwrap();
            // The write that found SWEEP_ABOVE + 1 swept, kept them all, and moved the bar.
            assert_eq!(counters.tats.len(), SWEEP_ABOVE + 2);
            assert_eq!(counters.sweep_above, 2 * (SWEEP_ABOVE + 1));
        }

        // Counters that refill within a nanosecond are gone at the next sweep.
        let store = MemoryStore::new();
        let instant = Gcra {
            interval_ns: 1,
            capacity: 1,
        };
        for user in 0..SWEEP_ABOVE + 2 {
            admit(&store, format!("instant:{user}"), instant);
        }
        let counters = store.counters.lock().unwrap();
        assert!(counters.tats.len() < SWEEP_ABOVE, "{}", counters.tats.len());
        assert_eq!(counters.sweep_above, SWEEP_ABOVE);
    }
}
