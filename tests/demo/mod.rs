//! `walhook demo`, as the README's first command runs it: the real binary, start to finish. Its summary is
//! what the README shows, line for line, so the README's sample cannot drift from what the demo prints; and
//! the lines that prove the two tenants isolated are checked by name, since they are the demo's point.

use std::process::Command;

/// The README's sample summary: the fenced block that starts with the summary's heading.
fn readme_summary() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```\nsummary (read back with SQL):\n")
        .expect("the README shows the demo's summary");
    let block = &readme[start + 4..];
    let end = block.find("```").expect("the block is closed");
    block[..end].lines().map(str::to_string).collect()
}

#[test]
fn the_demo_runs_and_proves_two_tenants_isolated() {
    let out = Command::new(env!("CARGO_BIN_EXE_walhook"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .expect("run walhook demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let summary = readme_summary();
    assert!(summary.len() > 10, "{summary:?}");
    for line in &summary {
        assert!(
            lines.contains(&line.as_str()),
            "the README's line {line:?} is not in the demo's output:\n{stdout}"
        );
    }
    for line in [
        "    acme   /acme    got 5 of its 5 events, 0 of globex's, 0 without a tenant",
        "    globex /globex  got 3 of its 3 events, 0 of acme's, 0 without a tenant",
        "    /orders, /all   (no tenant) got 0 of the tenants' events",
        "    walhook.deliveries: 5 for acme, 3 for globex, 0 to an endpoint of another tenant",
        "    acme   as walhook_tenant (row-level security) sees 1 endpoint, 5 events, 5 deliveries, 0 rows not its own",
        "    globex as walhook_tenant (row-level security) sees 1 endpoint, 3 events, 3 deliveries, 0 rows not its own",
        "    isolated: neither tenant saw the other's events",
    ] {
        assert!(lines.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("bug!"), "{stdout}");
    // the throwaway cluster is plaintext by design: the demo says so instead of warning about it
    assert!(!stderr.contains("without TLS"), "{stderr}");
}
