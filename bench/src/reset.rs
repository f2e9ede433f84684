//! The fast-reset table (issue 12, docs/protocol-extensions.md §7): resets
//! per second of the `fuzz-reset` harness, jailed, for a guest dirtying 1,
//! 16 and 256 pages per run. Each reset is verified by the plugin (its
//! registers, the scratch pages, the input page) and one input is hashed
//! between resets: the rate is the whole fuzzing loop's. Median of `runs`.

use std::path::Path;
use std::process::{Command, Stdio};

/// Resets per row run.
const RESETS: u32 = 20_000;

fn rate(dir: &Path, pages: u32) -> f64 {
    let out = Command::new(dir.join("vmm"))
        .arg("--plugin")
        .arg(dir.join("fuzz-reset"))
        .arg("--plugin-args")
        .arg((RESETS + 1).to_string())
        .arg(pages.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run vmm with fuzz-reset");
    assert!(out.status.success(), "fuzz-reset {pages} failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    super::field(&stdout, "resets_per_s").unwrap_or_else(|| panic!("no resets_per_s in {stdout:?}"))
}

/// Prints the table.
pub fn run(dir: &Path, runs: usize) {
    println!(
        "\nFast reset (fuzz-reset, jailed, {RESETS} verified resets per run, median of {runs})\n"
    );
    println!("| pages dirtied by the guest per run | resets/s |");
    println!("|---:|---:|");
    for pages in [1u32, 16, 256] {
        let v: Vec<f64> = (0..runs.max(1)).map(|_| rate(dir, pages)).collect();
        let r = super::median(v);
        eprintln!("fast reset, {pages} pages: {r:.0}/s");
        println!("| {pages} | {r:.0} |");
    }
}
