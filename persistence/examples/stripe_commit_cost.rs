//! What one stripe transaction costs on this disk: `persist` and `apply_logged` of batches
//! of 1 KiB writes (a standby's job), time per transaction and bytes the process
//! wrote per transaction (`/proc/self/io`, so: write amplification). It prints
//! numbers and asserts nothing.
//!
//! `cargo run --release -p kiln-persistence --example stripe_commit_cost [log-only]`
//! (`log-only`: log appends without applying them to the key/value table).

use std::time::Instant;

use kiln_persistence::{KvTxn, StoreError, StripeStore};

const ROUNDS: usize = 300;

fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let apply = std::env::args().nth(1).as_deref() != Some("log-only");
    let dir = tempfile::tempdir()?;
    let store = StripeStore::open(dir.path(), true)?;
    store.set_stripe(0)?;
    let mut last = 0u64;
    println!("| writes per transaction | ms per transaction | KiB written per transaction | µs per write |");
    println!("|---|---|---|---|");
    for batch in [1usize, 4, 16, 32] {
        let started = Instant::now();
        let before = written_bytes();
        for round in 0..ROUNDS {
            let rows: Vec<(u64, Vec<u8>)> = (1..=batch as u64)
                .map(|k| (last + k, vec![b'x'; 1100]))
                .collect();
            let (from, upto) = (last + 1, last + batch as u64);
            let put = |tx: &mut dyn KvTxn, index: u64, data: &[u8]| -> Result<(), StoreError> {
                if apply {
                    // Keys spread like the KV benchmark's 16 clients.
                    let key = format!("c{}-{round}", index % 16);
                    tx.put("bench", &key, index, &data[..1024])?;
                }
                Ok(())
            };
            store.persist(None, &rows, None)?;
            store.apply_logged((from, upto), |b| b.to_vec(), put)?;
            last = upto;
        }
        let secs = started.elapsed().as_secs_f64();
        let written = written_bytes().saturating_sub(before);
        println!(
            "| {batch} | {:.3} | {:.0} | {:.1} |",
            secs * 1000.0 / ROUNDS as f64,
            written as f64 / 1024.0 / ROUNDS as f64,
            secs * 1e6 / (ROUNDS * batch) as f64
        );
    }
    Ok(())
}
