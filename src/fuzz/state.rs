//! The self-upgrade state: arbitrary supervisor snapshots go through JSON unchanged, and a
//! state with one field more or one field less, anywhere, is refused.

use super::*;
use crate::signals::Signal;
use crate::supervisor::snapshot::{
    PurposeSnapshot, ReloadSnapshot, Snapshot, UnitSnapshot, UnitStateSnapshot,
};
use crate::upgrade::State;
use serde_json::Value;

fn unit_state() -> impl Strategy<Value = UnitStateSnapshot> {
    prop_oneof![
        (any::<i64>(), any::<Option<i64>>(), any::<Option<i64>>(), any::<Option<String>>())
            .prop_map(|(d, r, p, l)| UnitStateSnapshot::Starting {
                ready_deadline_ns: d,
                ready_at_ns: r,
                probe_at_ns: p,
                last_probe: l,
            }),
        any::<Option<i64>>().prop_map(|w| UnitStateSnapshot::Serving { watchdog_at_ns: w }),
        (any::<i64>(), prop::sample::select(Signal::all())).prop_map(|(k, signal)| {
            UnitStateSnapshot::Stopping { kill_at_ns: k, signal: signal.raw() }
        }),
        Just(UnitStateSnapshot::Killed {}),
    ]
}

fn unit() -> impl Strategy<Value = UnitSnapshot> {
    let purpose = prop::sample::select(vec![
        PurposeSnapshot::Initial,
        PurposeSnapshot::Reload,
        PurposeSnapshot::Restart,
    ]);
    (
        (any::<u64>(), any::<u64>(), 2..i32::MAX, purpose),
        (unit_state(), any::<i64>(), any::<Option<String>>()),
        (any::<Option<u64>>(), any::<bool>()),
    )
        .prop_map(
            |(
                (key, generation, pid, purpose),
                (state, since_ns, status),
                (watchdog_ns, crashed),
            )| {
                UnitSnapshot {
                    key,
                    generation,
                    pid,
                    purpose,
                    state,
                    since_ns,
                    status,
                    watchdog_ns,
                    crashed,
                }
            },
        )
}

/// Any supervisor snapshot: any units, any bookkeeping.
fn snapshot() -> impl Strategy<Value = Snapshot> {
    let reload = any::<Option<(u64, Option<u64>)>>().prop_map(|r| {
        r.map(|(generation, waiting_for)| ReloadSnapshot { generation, waiting_for })
    });
    (
        prop::collection::vec(unit(), 0..6),
        (any::<u64>(), any::<u64>(), reload, any::<bool>()),
        (any::<Option<i64>>(), any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                units,
                (next_unit, next_generation, reload, reload_pending),
                (restart_at_ns, backoff_ns, failed_starts, restarts, retired),
            )| Snapshot {
                units,
                next_unit,
                next_generation,
                reload,
                reload_pending,
                restart_at_ns,
                backoff_ns,
                failed_starts,
                restarts,
                retired,
            },
        )
}

/// A whole state around an arbitrary snapshot.
fn state() -> impl Strategy<Value = State> {
    (snapshot(), any::<i64>(), prop::collection::vec(any::<Vec<u8>>(), 0..4)).prop_map(
        |(supervisor, monotonic_ns, argv)| State {
            supervisor,
            monotonic_ns,
            argv,
            ..crate::upgrade::tests::sample()
        },
    )
}

/// The JSON pointer of every object in `value`, with its keys.
fn objects(value: &Value, at: String, out: &mut Vec<(String, Vec<String>)>) {
    match value {
        Value::Object(map) => {
            out.push((at.clone(), map.keys().cloned().collect()));
            for (k, v) in map {
                objects(v, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                objects(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

proptest! {
    #[test]
    fn every_state_reads_back_as_written(state in state()) {
        let json = state.to_json().map_err(TestCaseError::fail)?;
        prop_assert_eq!(State::parse(&json), Ok(state));
    }

    #[test]
    fn a_field_more_anywhere_is_refused(
        state in state(),
        pick in any::<prop::sample::Index>(),
        name in "[a-z_]{1,12}",
    ) {
        let mut value = serde_json::to_value(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut found = Vec::new();
        objects(&value, String::new(), &mut found);
        let (at, keys) = pick.get(&found).clone();
        prop_assume!(!keys.contains(&name));
        value.pointer_mut(&at).and_then(Value::as_object_mut).expect("an object")
            .insert(name.clone(), Value::Null);
        let err = State::parse(value.to_string().as_bytes()).err().unwrap_or_default();
        let want = format!("unknown field `{name}`");
        prop_assert!(err.contains(&want), "{} at {:?}: {}", name, at, err);
    }

    #[test]
    fn a_field_less_anywhere_is_refused(
        state in state(),
        pick in any::<prop::sample::Index>(),
        key in any::<prop::sample::Index>(),
    ) {
        let mut value = serde_json::to_value(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut found = Vec::new();
        objects(&value, String::new(), &mut found);
        let (at, keys) = pick.get(&found).clone();
        prop_assume!(!keys.is_empty());
        let name = key.get(&keys).clone();
        value.pointer_mut(&at).and_then(Value::as_object_mut).expect("an object").remove(&name);
        let err = State::parse(value.to_string().as_bytes()).err().unwrap_or_default();
        let want = format!("missing field `{name}`");
        prop_assert!(err.contains(&want), "{} at {:?}: {}", name, at, err);
    }
}
