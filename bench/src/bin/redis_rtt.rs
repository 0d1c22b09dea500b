//! `redis-rtt`: paced round trips to Redis from a tokio current-thread runtime (the gateway's
//! kind of event loop), optionally touching memory between two calls the way a gateway's other
//! work per request does, to see what the round trip costs on cold caches.
//!
//! Sends `PING`, or `EVALSHA` of an already loaded script with the arguments of one
//! rate-limit decision (the gateway's limiter script takes `1 KEY take INTERVAL CAPACITY COST`),
//! once per tick, and prints the p50 and p90 of the send alone and of the whole exchange.
//!
//!   redis-rtt --port 6379                         # PING, hot loop
//!   redis-rtt --port 6379 --sha <SHA> --touch-mb 8  # the limiter's script, 8 MB touched per call

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(
    name = "redis-rtt",
    about = "Paced Redis round trips, hot or on cold caches"
)]
struct Args {
    /// Redis port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// SHA1 of a loaded script to call with one "take" decision; PING without it.
    #[arg(long)]
    sha: Option<String>,
    /// Round trips per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Round trips in all.
    #[arg(long, default_value_t = 3000)]
    count: usize,
    /// Megabytes written (one byte per cache line) before each round trip; 0: none.
    #[arg(long, default_value_t = 0)]
    touch_mb: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn command(parts: &[&str]) -> Vec<u8> {
    let mut packed = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        packed.extend(format!("${}\r\n{part}\r\n", part.len()).into_bytes());
    }
    packed
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut redis = tokio::net::TcpStream::connect(("127.0.0.1", args.port))
        .await
        .context("connecting to Redis")?;
    redis.set_nodelay(true)?;
    let packed = match &args.sha {
        Some(sha) => command(&[
            "EVALSHA",
            sha,
            "1",
            "switchyard:rl:redis-rtt",
            "take",
            "1",
            "100000000",
            "1",
        ]),
        None => command(&["PING"]),
    };
    let mut touched = vec![0u8; args.touch_mb << 20];
    let mut reply = vec![0u8; 512];
    let (mut sends, mut exchanges) = (Vec::new(), Vec::new());
    let mut next = tokio::time::Instant::now();
    let tick = Duration::from_secs(1) / args.rate.max(1);
    for _ in 0..args.count {
        next += tick;
        tokio::time::sleep_until(next).await;
        for byte in touched.iter_mut().step_by(64) {
            *byte = byte.wrapping_add(1);
        }
        std::hint::black_box(&touched);
        let start = Instant::now();
        redis.write_all(&packed).await?;
        sends.push(start.elapsed());
        let read = redis.read(&mut reply).await?;
        exchanges.push(start.elapsed());
        match &reply[..read] {
            [] => bail!("Redis closed the connection"),
            [b'-', ..] => bail!("Redis refused: {}", String::from_utf8_lossy(&reply[..read])),
            _ => {}
        }
    }
    if exchanges.is_empty() {
        bail!("--count 0: nothing measured");
    }
    let quantiles = |samples: &mut Vec<Duration>| {
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        format!("p50 {:.3} ms, p90 {:.3} ms", at(0.5), at(0.9))
    };
    println!(
        "{} round trips at {}/s, {} MB touched before each: send {}; whole exchange {}",
        exchanges.len(),
        args.rate,
        args.touch_mb,
        quantiles(&mut sends),
        quantiles(&mut exchanges),
    );
    Ok(())
}
