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
    /// And on the first write after this time (ns of the store's clock): without it, the
    /// counters of a spike (a million users once) would stay until twice as many came.
    sweep_at: u64,
}

/// The fewest counters worth a sweep.
const SWEEP_ABOVE: usize = 10_000;
/// The longest time between two sweeps.
const SWEEP_EVERY_NS: u64 = 60_000_000_000;

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            counters: Mutex::new(Counters {
                tats: HashMap::default(),
                sweep_above: SWEEP_ABOVE,
                sweep_at: SWEEP_EVERY_NS,
            }),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn acquire(&self, cells: &[Cell]) -> Decision {
        self.acquire_at(self.now(), cells)
    }

    fn acquire_at(&self, now: u64, cells: &[Cell]) -> Decision {
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Counters {
            tats,
            sweep_above,
            sweep_at,
        } = &mut *counters;
        let inputs: Vec<(Gcra, u64, u64)> = cells
            .iter()
            .map(|c| (c.gcra, tats.get(&c.key).copied().unwrap_or(0), c.cost))
            .collect();
        match gcra::decide(now, &inputs) {
            Ok(admitted) => {
                if tats.len() > *sweep_above || now >= *sweep_at {
                    tats.retain(|_, tat| *tat > now);
                    *sweep_above = SWEEP_ABOVE.max(2 * tats.len());
                    *sweep_at = now.saturating_add(SWEEP_EVERY_NS);
                    // What a spike grew is given back once it has passed.
                    if tats.capacity() > 4 * *sweep_above {
                        tats.shrink_to(*sweep_above);
                    }
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

    #[test]
    fn the_counters_of_a_spike_go_within_a_minute_of_refilling() {
        let store = MemoryStore::new();
        let per_second = Gcra {
            interval_ns: 1_000_000_000,
            capacity: 1,
        };
        let cell = |user: usize| Cell {
            key: format!("user:{user}"),
            gcra: per_second,
            cost: 1,
        };
        // Many users within a second, then quiet: the sweep bar rose to twice the spike.
        let spike = 4 * SWEEP_ABOVE;
        for user in 0..spike {
            assert!(matches!(
                store.acquire_at(1, &[cell(user)]),
                Decision::Allowed(_)
            ));
        }
        let grown = store.counters.lock().unwrap().tats.capacity();
        assert!(grown >= spike);
        // A minute later one more request sweeps the refilled counters and gives the memory back.
        assert!(matches!(
            store.acquire_at(1 + SWEEP_EVERY_NS, &[cell(0)]),
            Decision::Allowed(_)
        ));
        let counters = store.counters.lock().unwrap();
        assert_eq!(counters.tats.len(), 1);
        assert_eq!(counters.sweep_above, SWEEP_ABOVE);
        assert!(
            counters.tats.capacity() < grown / 2,
            "{}",
            counters.tats.capacity()
        );
    }
}
