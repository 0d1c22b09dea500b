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
    /// foldhash, seeded per process: SipHash of the keys was a tenth of the limiter's work.
    /// foldhash resists hash flooding less than SipHash, but clients cannot pick these keys:
    /// the only part they choose, the user, goes in as 8 bytes of its SHA-256, and the seed is
    /// random. (Endpoint and key id come from the config.)
    tats: Mutex<HashMap<String, u64, foldhash::fast::RandomState>>,
}

/// Above this many counters, refilled ones are swept out on the next write.
const SWEEP_ABOVE: usize = 10_000;

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::new(HashMap::default()),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn acquire(&self, cells: &[Cell]) -> Decision {
        let now = self.now();
        let mut tats = self
            .tats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let inputs: Vec<(Gcra, u64, u64)> = cells
            .iter()
            .map(|c| (c.gcra, tats.get(&c.key).copied().unwrap_or(0), c.cost))
            .collect();
        match gcra::decide(now, &inputs) {
            Ok(admitted) => {
                if tats.len() > SWEEP_ABOVE {
                    tats.retain(|_, tat| *tat > now);
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
        let mut tats = self
            .tats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stored = tats.get(key).copied().unwrap_or(0);
        tats.insert(key.to_owned(), gcra::adjust(now, stored, gcra, delta));
    }
}
