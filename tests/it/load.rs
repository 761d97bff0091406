//! The promise: no request fails while generations come and go.

use nix::sys::signal::Signal::{SIGHUP, SIGTERM};

use crate::support::*;

#[test]
fn zero_failed_requests_across_25_reloads_under_load() {
    let httpd = example("httpd").to_string_lossy().into_owned();
    let mut s =
        start(&["-l", "127.0.0.1:0", "--ready", "notify", "--stop-timeout", "10s", "--", &httpd]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();

    let load = Load::start(port, 4);
    load.wait_for(4);

    // SOCKHOLD_TEST_RELOADS raises the count for a longer soak; the suite's default stays quick.
    let reloads: u64 =
        std::env::var("SOCKHOLD_TEST_RELOADS").ok().and_then(|v| v.parse().ok()).unwrap_or(25);
    for generation in 2..=reloads + 1 {
        s.signal(SIGHUP);
        s.expect_manager("RELOADING=1", |m| m.starts_with("RELOADING=1"));
        let ready = s.expect_ready();
        assert!(ready.contains(&format!("generation {generation} ")), "{ready}");
        // Requests go through every generation's time, not only before and after the reloads.
        load.wait_for(4);
    }
    let (ok, failures, pids) = load.finish();
    eprintln!("{ok} requests succeeded across {reloads} reloads, answered by {} pids", pids.len());
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(ok >= 100, "the load ran ({ok} requests)");
    assert!(pids.len() >= 2, "several generations answered: {pids:?}");
    s.signal(SIGTERM);
    assert_eq!(s.exit_code(), 0);
}
