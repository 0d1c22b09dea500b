//! Counters in Redis, shared by every gateway replica: one atomic Lua script per decision, on
//! the Redis server's clock, so replicas with skewed clocks still share one budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::gcra::{CellState, Gcra};
use super::{Cell, Decision};

/// Bumped whenever the script or the stored values change meaning, so that during a rolling
/// deploy old and new gateways never read each other's counters.
pub const SCRIPT_VERSION: &str = "v1";

/// The GCRA of `gcra.rs`, in microseconds of the Redis clock. ARGV[1] is "take" or "adjust";
/// then per key: interval (µs), capacity, cost (take) or delta (adjust). "take" admits all keys
/// or none; it returns {admitted, wait_us, remaining_1, reset_us_1, refused_1, remaining_2, ...}.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  return tat
end
local function store(key, tat)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
if mode == 'adjust' then
  for i = 1, #KEYS do
    local interval = tonumber(ARGV[i * 3 - 1])
    local delta = tonumber(ARGV[i * 3 + 1])
    local tat = tat_of(KEYS[i]) + delta * interval
    if tat < now then tat = now end
    store(KEYS[i], tat)
  end
  return {1}
end
local wait = 0
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[i * 3 - 1])
  local capacity = tonumber(ARGV[i * 3])
  local cost = tonumber(ARGV[i * 3 + 1])
  local tat = tat_of(KEYS[i])
  local new_tat = tat + cost * interval
  local allow_at = new_tat - capacity * interval
  if allow_at - now > wait then wait = allow_at - now end
    tats[i] = {tat, new_tat, interval, capacity, allow_at > now}
end
local admitted = wait <= 0
local result = {admitted and 1 or 0, math.ceil(wait)}
for i = 1, #KEYS do
  local tat = tats[i][1]
  if admitted then
    tat = tats[i][2]
    store(KEYS[i], tat)
  end
  local interval, capacity = tats[i][3], tats[i][4]
  table.insert(result, math.floor((now + capacity * interval - tat) / interval))
    table.insert(result, math.ceil(tat - now))
  table.insert(result, (not admitted and tats[i][5]) and 1 or 0)
end
return result
"#;

pub struct RedisStore {
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    /// When the last connection attempt failed: do not hammer a Redis that is down.
    last_failure: std::sync::Mutex<Option<Instant>>,
    script: redis::Script,
    timeout: Duration,
    degraded: AtomicBool,
}

/// Retry connecting at most this often while Redis is down.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

impl RedisStore {
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        // The error is not quoted: it may repeat the URL, password included.
        let client = redis::Client::open(url)
            .map_err(|_| "limits_store.url is not a valid Redis URL".to_owned())?;
        Ok(Self {
            client,
            connection: Mutex::new(None),
            last_failure: std::sync::Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            timeout,
            degraded: AtomicBool::new(false),
        })
    }

    /// Whether the last operation failed.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let recently_failed = self
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < RECONNECT_EVERY);
        if recently_failed {
            return Err("Redis is unreachable".to_owned());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        match tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        {
            Ok(Ok(connection)) => {
                *slot = Some(connection.clone());
                Ok(connection)
            }
            Ok(Err(e)) => Err(self.failed(e.to_string())),
            Err(_) => Err(self.failed("connecting timed out".to_owned())),
        }
    }

    fn failed(&self, why: String) -> String {
        *self
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        why
    }

    fn record(&self, ok: bool, why: &str) {
        let was_degraded = self.degraded.swap(!ok, Ordering::Relaxed);
        if !ok && !was_degraded {
            warn!(
                error = why,
                "rate limiter degraded: Redis is unreachable; applying limits_store.on_error"
            );
        } else if ok && was_degraded {
            info!("rate limiter recovered: Redis answers again");
        }
    }

    async fn run(
        &self,
        mode: &str,
        cells: &[(String, Gcra, i64, u64)],
    ) -> Result<Vec<i64>, String> {
        let result = async {
            let mut connection = self.connection().await?;
            let mut invocation = self.script.prepare_invoke();
            invocation.arg(mode);
            for (key, gcra, cost, capacity) in cells {
                invocation
                    .key(format!("switchyard:rl:{SCRIPT_VERSION}:{key}"))
                    .arg(gcra.interval_ns as f64 / 1000.0)
                    .arg(*capacity)
                    .arg(*cost);
            }
            match tokio::time::timeout(
                self.timeout,
                invocation.invoke_async::<Vec<i64>>(&mut connection),
            )
            .await
            {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
            }
        }
        .await;
        match &result {
            Ok(_) => self.record(true, ""),
            Err(why) => self.record(false, why),
        }
        result
    }

    pub async fn acquire(&self, cells: &[Cell]) -> Result<Decision, String> {
        let args: Vec<(String, Gcra, i64, u64)> = cells
            .iter()
            .map(|c| {
                (
                    c.key.clone(),
                    c.gcra,
                    i64::try_from(c.gcra.admissible(c.cost)).unwrap_or(i64::MAX),
                    c.gcra.capacity,
                )
            })
            .collect();
        let values = self.run("take", &args).await?;
        let number = |i: usize| values.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
        let states = cells
            .iter()
            .enumerate()
            .map(|(i, c)| CellState {
                capacity: c.gcra.capacity,
                remaining: number(2 + 3 * i),
                reset: Duration::from_micros(number(3 + 3 * i)),
                refused: number(4 + 3 * i) == 1,
            })
            .collect();
        if number(0) == 1 {
            Ok(Decision::Allowed(states))
        } else {
            Ok(Decision::Denied {
                retry_after: Duration::from_micros(number(1)),
                states,
            })
        }
    }

    pub async fn adjust(&self, key: &str, gcra: Gcra, delta: i64) -> Result<(), String> {
        self.run("adjust", &[(key.to_owned(), gcra, delta, gcra.capacity)])
            .await
            .map(|_| ())
    }
}
