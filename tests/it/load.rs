//! The promise: no request fails while generations come and go.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::Signal::{SIGHUP, SIGTERM};

use crate::support::*;

#[test]
fn zero_failed_requests_across_25_reloads_under_load() {
    let httpd = example("httpd").to_string_lossy().into_owned();
    let mut s =
        start(&["-l", "127.0.0.1:0", "--ready", "notify", "--stop-timeout", "10s", "--", &httpd]);
    let port = s.listening_port("127.0.0.1:");
    s.expect_ready();

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (mut ok, mut failures, mut pids) = (0u64, Vec::new(), BTreeSet::new());
                while !stop.load(Ordering::Relaxed) {
                    match http_get(port) {
                        Ok(pid) => {
                            ok += 1;
                            pids.insert(pid);
                        }
                        Err(e) => failures.push(e),
                    }
                }
                (ok, failures, pids)
            })
        })
        .collect();

    // SOCKHOLD_TEST_RELOADS raises the count for a longer soak; the suite's default stays quick.
    let reloads: u64 =
        std::env::var("SOCKHOLD_TEST_RELOADS").ok().and_then(|v| v.parse().ok()).unwrap_or(25);
    for generation in 2..=reloads + 1 {
        s.signal(SIGHUP);
        s.expect_manager("RELOADING=1", |m| m.starts_with("RELOADING=1"));
        let ready = s.expect_ready();
        assert!(ready.contains(&format!("generation {generation} ")), "{ready}");
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failures, mut pids) = (0, Vec::new(), BTreeSet::new());
    for client in clients {
        let (o, f, p) = client.join().expect("client thread");
        ok += o;
        failures.extend(f);
        pids.extend(p);
    }
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
