//! Unit tests of the supervisor's state machine: each drives [`Supervisor::step`] with a
//! table of events and the actions it must return.

use super::*;

const SIGKILL: Signal = Signal::SIGKILL;
const SIGTERM: Signal = Signal::SIGTERM;
const SIGUSR1: Signal = Signal::SIGUSR1;

/// The policy every table starts from (the command line's defaults, `--stop-timeout 30s`); the
/// other machines' tests (`accept`, `snapshot`) start from it too.
pub(crate) fn policy(ready: ReadyMode) -> Policy {
    Policy {
        ready,
        ready_timeout: Duration::from_secs(60),
        stop_signal: SIGTERM,
        stop_timeout: Duration::from_secs(30),
        kill_mode: KillMode::Mixed,
        restart: RestartPolicy::OnFailure,
        notify_access: NotifyAccess::Group,
        probe_delay: Duration::ZERO,
        probe_interval: Duration::from_millis(100),
        watchdog: None,
        workers: 1,
        reload_strategy: ReloadStrategy::Rolling,
        max_draining: MAX_DRAINING,
        lazy: false,
        flow_steering: None,
    }
}

fn pid(n: i32) -> Pid {
    Pid::from_raw(n)
}

fn ready_from(generation: u64, sender: i32) -> Event {
    Event::Notify {
        unit: generation,
        sender: pid(sender),
        sender_pgid: Some(pid(sender)),
        message: NotifyMessage { ready: true, ..Default::default() },
    }
}

fn exited(p: i32, status: ChildStatus) -> Event {
    Event::Exited { pid: pid(p), status }
}

fn sig(p: i32, signal: Signal) -> Action {
    Action::Signal { pid: pid(p), signal }
}

fn group_kill(p: i32) -> Action {
    Action::SignalGroup { pgid: pid(p), signal: SIGKILL }
}

fn spawn(generation: u64) -> Action {
    // With one worker, every unit is a generation of its own: their numbers match.
    Action::Spawn { unit: generation, generation }
}

fn reload_started(generation: u64) -> Action {
    Action::ReloadStarted { generation }
}

fn done_ok(generation: u64) -> Action {
    Action::ReloadDone { generation: Some(generation), result: Ok(()) }
}

fn done_err(generation: u64, reason: &str) -> Action {
    Action::ReloadDone { generation: Some(generation), result: Err(reason.into()) }
}

/// Runs `steps` of (seconds since start, event, expected actions, ignoring manager messages
/// unless the row lists one) and checks every row.
fn run(policy: Policy, steps: &[(u64, Event, Vec<Action>)]) -> Supervisor {
    let t0 = Instant::now();
    let mut sup = Supervisor::new(policy);
    for (i, (at, event, want)) in steps.iter().enumerate() {
        let got = sup.step(event.clone(), t0 + Duration::from_millis(*at));
        let keep_manager = want.iter().any(|a| matches!(a, Action::Manager(_)));
        let got: Vec<_> =
            got.into_iter().filter(|a| keep_manager || !matches!(a, Action::Manager(_))).collect();
        assert_eq!(&got, want, "row {i}: {event:?} at {at}ms");
    }
    sup
}

/// Start generation 1 (pid 100) and make it ready at 10ms.
fn started() -> Vec<(u64, Event, Vec<Action>)> {
    vec![
        (0, Event::Start, vec![spawn(1)]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (10, ready_from(1, 100), vec![]),
    ]
}

fn with(
    mut rows: Vec<(u64, Event, Vec<Action>)>,
    more: Vec<(u64, Event, Vec<Action>)>,
) -> Vec<(u64, Event, Vec<Action>)> {
    rows.extend(more);
    rows
}

#[test]
fn reload_promotes_new_and_stops_old() {
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (30, ready_from(2, 200), vec![sig(100, SIGTERM), done_ok(2)]),
            (40, exited(100, ChildStatus::Signaled(SIGTERM)), vec![Action::Release { unit: 1 }]),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn ready_from_the_old_generation_never_promotes_the_new_one() {
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (25, ready_from(1, 100), vec![]),
            // The old generation still serves: a forwarded signal goes to it.
            (26, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn notify_access_rules() {
    for (access, sender, sender_pgid, promoted) in [
        (NotifyAccess::Main, 100, Some(100), true),
        (NotifyAccess::Main, 101, Some(100), false),
        (NotifyAccess::Group, 101, Some(100), true),
        (NotifyAccess::Group, 101, Some(999), false),
        (NotifyAccess::Group, 101, None, false),
        (NotifyAccess::All, 555, None, true),
    ] {
        let mut p = policy(ReadyMode::Notify);
        p.notify_access = access;
        let t0 = Instant::now();
        let mut sup = Supervisor::new(p);
        sup.step(Event::Start, t0);
        sup.step(Event::Spawned { unit: 1, pid: pid(100) }, t0);
        // The event loop asks the same rule before it stores a message's fds.
        let allowed = sup.notify_allowed(1, pid(sender), sender_pgid.map(pid));
        assert_eq!(allowed, promoted.then_some(1), "{access:?} sender {sender}");
        assert_eq!(sup.notify_allowed(2, pid(sender), sender_pgid.map(pid)), None, "no unit 2");
        let message = NotifyMessage { ready: true, ..Default::default() };
        let event = Event::Notify {
            unit: 1,
            sender: pid(sender),
            sender_pgid: sender_pgid.map(pid),
            message,
        };
        let actions = sup.step(event, t0);
        let got = actions.iter().any(|a| matches!(a, Action::Manager(ManagerMessage::Ready(_))));
        assert_eq!(got, promoted, "{access:?} sender {sender} pgid {sender_pgid:?}");
    }
}

#[test]
fn reloads_during_a_reload_coalesce_into_one() {
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (21, Event::Reload, vec![]),
            (22, Event::Reload, vec![]),
            (23, Event::Reload, vec![]),
            (
                30,
                ready_from(2, 200),
                vec![sig(100, SIGTERM), done_ok(2), reload_started(3), spawn(3)],
            ),
            (30, Event::Spawned { unit: 3, pid: pid(300) }, vec![]),
            (40, ready_from(3, 300), vec![sig(200, SIGTERM), done_ok(3)]),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn a_new_generation_that_dies_before_ready_leaves_the_old_one_serving() {
    let reason = "generation 2 (pid 200) exited before it was ready: exit status 3".to_string();
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (
                25,
                exited(200, ChildStatus::Exited(3)),
                vec![
                    Action::Release { unit: 2 },
                    done_err(2, &reason),
                    Action::Manager(ManagerMessage::Ready(format!(
                        "serving: generation 1; last reload failed: {reason}"
                    ))),
                ],
            ),
            (26, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn a_new_generation_never_ready_is_killed_at_the_timeout() {
    let reason = "generation 2 (pid 200) was not ready within 1m".to_string();
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (60_019, Event::Timer, vec![]),
            (60_020, Event::Timer, vec![group_kill(200), done_err(2, &reason)]),
            (
                60_030,
                exited(200, ChildStatus::Signaled(SIGKILL)),
                vec![Action::Release { unit: 2 }],
            ),
            (60_040, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn an_old_generation_that_ignores_the_stop_signal_is_killed_at_the_deadline() {
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (30, ready_from(2, 200), vec![sig(100, SIGTERM), done_ok(2)]),
            (30_029, Event::Timer, vec![]),
            (30_030, Event::Timer, vec![group_kill(100)]),
            (
                30_040,
                exited(100, ChildStatus::Signaled(SIGKILL)),
                vec![Action::Release { unit: 1 }],
            ),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

/// `--kill-mode`: whom the stop signal, the SIGKILL at the deadline and the SIGKILL of a new
/// generation that is never ready reach, in each mode.
#[test]
fn the_kill_mode_says_whether_the_main_process_or_its_group_is_signalled() {
    let group = |p: i32, signal: Signal| Action::SignalGroup { pgid: pid(p), signal };
    let modes = [
        (KillMode::ControlGroup, group(100, SIGTERM), group_kill(100), group_kill(300)),
        (KillMode::Mixed, sig(100, SIGTERM), group_kill(100), group_kill(300)),
        (KillMode::Process, sig(100, SIGTERM), sig(100, SIGKILL), sig(300, SIGKILL)),
    ];
    for (mode, stop, kill, kill_new) in modes {
        let reason = "generation 3 (pid 300) was not ready within 1m".to_string();
        let rows = with(
            started(),
            vec![
                (20, Event::Reload, vec![reload_started(2), spawn(2)]),
                (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
                (30, ready_from(2, 200), vec![stop, done_ok(2)]),
                (30_030, Event::Timer, vec![kill]),
                (30_040, Event::Reload, vec![reload_started(3), spawn(3)]),
                (30_040, Event::Spawned { unit: 3, pid: pid(300) }, vec![]),
                (90_040, Event::Timer, vec![kill_new, done_err(3, &reason)]),
            ],
        );
        let mut policy = policy(ReadyMode::Notify);
        policy.kill_mode = mode;
        run(policy, &rows);
    }
}

#[test]
fn stop_during_a_reload_stops_both_and_exits_clean() {
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (
                25,
                Event::Stop("received SIGTERM".into()),
                vec![done_err(2, "sockhold is stopping"), sig(100, SIGTERM), sig(200, SIGTERM)],
            ),
            (26, ready_from(2, 200), vec![]),
            (27, exited(200, ChildStatus::Exited(0)), vec![Action::Release { unit: 2 }]),
            (
                28,
                exited(100, ChildStatus::Signaled(SIGTERM)),
                vec![Action::Release { unit: 1 }, Action::Exit(ExitCode::SUCCESS)],
            ),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn exit_code_after_stop_is_the_serving_childs_unless_clean() {
    for (status, want) in [
        (ChildStatus::Exited(0), 0),
        (ChildStatus::Signaled(SIGTERM), 0),
        (ChildStatus::Exited(3), 3),
        (ChildStatus::Signaled(SIGKILL), 137),
    ] {
        let rows = with(
            started(),
            vec![
                (20, Event::Stop("received SIGTERM".into()), vec![sig(100, SIGTERM)]),
                (
                    30,
                    exited(100, status),
                    vec![Action::Release { unit: 1 }, Action::Exit(ExitCode(want))],
                ),
            ],
        );
        run(policy(ReadyMode::Notify), &rows);
    }
}

#[test]
fn crash_restarts_with_doubling_backoff_and_gives_up_on_repeated_failed_starts() {
    let mut rows = with(
        started(),
        vec![
            (20, exited(100, ChildStatus::Exited(1)), vec![Action::Release { unit: 1 }]),
            (119, Event::Timer, vec![]),
            (120, Event::Timer, vec![spawn(2)]),
        ],
    );
    // Each start fails before ready; the delay doubles: 200ms, 400ms, 800ms, 1600ms.
    let mut t = 120;
    let mut delay = 200;
    for generation in 2..=5u64 {
        let p = generation as i32 * 100;
        rows.push((t, Event::Spawned { unit: generation, pid: pid(p) }, vec![]));
        rows.push((
            t + 1,
            exited(p, ChildStatus::Exited(1)),
            vec![Action::Release { unit: generation }],
        ));
        t += 1 + delay;
        rows.push((t - 1, Event::Timer, vec![]));
        rows.push((t, Event::Timer, vec![spawn(generation + 1)]));
        delay *= 2;
    }
    rows.push((t, Event::Spawned { unit: 6, pid: pid(600) }, vec![]));
    // The fifth failed start in a row ends sockhold with the child's status.
    rows.push((
        t + 1,
        exited(600, ChildStatus::Exited(4)),
        vec![Action::Release { unit: 6 }, Action::Exit(ExitCode(4))],
    ));
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn backoff_resets_after_a_long_stable_run() {
    let mut sup = run(policy(ReadyMode::Notify), &started());
    sup.backoff = Duration::from_secs(8);
    let t0 = Instant::now();
    sup.step(exited(100, ChildStatus::Exited(1)), t0 + STABLE_AFTER + Duration::from_secs(1));
    assert_eq!(sup.backoff, BACKOFF_START * 2, "reset to 100ms, then doubled for the next");
}

#[test]
fn restart_policies() {
    for (restart, status, want) in [
        (RestartPolicy::OnFailure, ChildStatus::Exited(0), Some(0)),
        (RestartPolicy::OnFailure, ChildStatus::Exited(2), None),
        (RestartPolicy::OnFailure, ChildStatus::Signaled(SIGKILL), None),
        (RestartPolicy::Always, ChildStatus::Exited(0), None),
        (RestartPolicy::Never, ChildStatus::Exited(2), Some(2)),
        (RestartPolicy::Never, ChildStatus::Signaled(SIGKILL), Some(137)),
    ] {
        let mut p = policy(ReadyMode::Notify);
        p.restart = restart;
        let mut sup = run(p, &started());
        let actions = sup.step(exited(100, status), Instant::now());
        let exit = actions.iter().find_map(|a| match a {
            Action::Exit(code) => Some(code.0),
            _ => None,
        });
        assert_eq!(exit, want, "{restart:?} {status}");
        assert_eq!(
            sup.restart_at.is_some(),
            want.is_none(),
            "{restart:?} {status}: restart scheduled"
        );
    }
}

#[test]
fn spawn_failure_at_start_exits_with_its_code_and_later_fails_the_reload() {
    run(
        policy(ReadyMode::Notify),
        &[
            (0, Event::Start, vec![spawn(1)]),
            (
                0,
                Event::SpawnFailed {
                    unit: 1,
                    error: "not found".into(),
                    code: ExitCode::NOT_FOUND,
                },
                vec![Action::Exit(ExitCode::NOT_FOUND)],
            ),
        ],
    );
    let rows = with(
        started(),
        vec![
            (20, Event::Reload, vec![reload_started(2), spawn(2)]),
            (
                20,
                Event::SpawnFailed {
                    unit: 2,
                    error: "not found".into(),
                    code: ExitCode::NOT_FOUND,
                },
                vec![done_err(2, "not found")],
            ),
            (21, Event::Forward(SIGUSR1), vec![sig(100, SIGUSR1)]),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

#[test]
fn delay_readiness_promotes_after_the_delay_only() {
    run(
        policy(ReadyMode::Delay(Duration::from_millis(500))),
        &[
            (0, Event::Start, vec![spawn(1)]),
            (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
            (100, ready_from(1, 100), vec![]),
            (499, Event::Timer, vec![]),
            (
                500,
                Event::Timer,
                vec![Action::Manager(ManagerMessage::Ready(
                    "serving: generation 1 (pid 100)".into(),
                ))],
            ),
        ],
    );
}

#[test]
fn manager_hears_reloading_then_ready() {
    let rows = with(
        started(),
        vec![
            (
                20,
                Event::Reload,
                vec![
                    reload_started(2),
                    Action::Manager(ManagerMessage::Reloading(
                        "reloading: starting generation 2".into(),
                    )),
                    spawn(2),
                ],
            ),
            (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
            (
                30,
                ready_from(2, 200),
                vec![
                    sig(100, SIGTERM),
                    done_ok(2),
                    Action::Manager(ManagerMessage::Ready(
                        "serving: generation 2 (pid 200)".into(),
                    )),
                ],
            ),
            (
                40,
                Event::Stop("received SIGTERM".into()),
                vec![
                    Action::Manager(ManagerMessage::Stopping("stopping".into())),
                    sig(200, SIGTERM),
                ],
            ),
        ],
    );
    run(policy(ReadyMode::Notify), &rows);
}

/// A reload at `at` ms that starts generation `id` (pid `id * 100`) and makes it ready,
/// stopping generation `id - 1`: the rows, with `more` actions expected on its promotion.
fn reload_rows(at: u64, id: u64, more: Vec<Action>) -> Vec<(u64, Event, Vec<Action>)> {
    let p = id as i32 * 100;
    let mut promoted = vec![sig(p - 100, SIGTERM)];
    promoted.extend(more);
    promoted.push(done_ok(id));
    vec![
        (at, Event::Reload, vec![reload_started(id), spawn(id)]),
        (at, Event::Spawned { unit: id, pid: pid(p) }, vec![]),
        (at + 1, ready_from(id, p), promoted),
    ]
}

fn capped(max_draining: usize) -> Policy {
    let mut p = policy(ReadyMode::Notify);
    p.max_draining = max_draining;
    p
}

#[test]
fn max_draining_kills_the_oldest_draining_generation_early() {
    let mut rows = started();
    // Generations 1 and 2 ignore the stop signal and drain: two may.
    rows.extend(reload_rows(20, 2, vec![]));
    rows.extend(reload_rows(30, 3, vec![]));
    // A third would drain: the oldest, generation 1, is killed with its group.
    rows.extend(reload_rows(40, 4, vec![group_kill(100)]));
    rows.push((45, exited(100, ChildStatus::Signaled(SIGKILL)), vec![Action::Release { unit: 1 }]));
    // Generation 2 finishes draining by itself: room for one more without a kill.
    rows.push((50, exited(200, ChildStatus::Exited(0)), vec![Action::Release { unit: 2 }]));
    rows.extend(reload_rows(60, 5, vec![]));
    rows.extend(reload_rows(70, 6, vec![group_kill(300)]));
    let sup = run(capped(2), &rows);
    let states: Vec<_> = sup.generations().iter().map(|g| (g.id, g.state)).collect();
    assert_eq!(
        states,
        [(3, "killed"), (4, "stopping"), (5, "stopping"), (6, "serving")],
        "at most two draining"
    );
}

#[test]
fn max_draining_one_keeps_only_the_last_generation_draining() {
    let mut rows = started();
    rows.extend(reload_rows(20, 2, vec![]));
    rows.extend(reload_rows(30, 3, vec![group_kill(100)]));
    rows.extend(reload_rows(40, 4, vec![group_kill(200)]));
    // A killed generation that is slow to be reaped does not count as draining.
    rows.extend(reload_rows(50, 5, vec![group_kill(300)]));
    run(capped(1), &rows);
}

#[test]
fn max_draining_does_not_apply_at_shutdown() {
    let mut rows = started();
    rows.extend(reload_rows(20, 2, vec![]));
    // Generation 3 is starting when the stop comes: all three stop, none is killed early.
    rows.push((30, Event::Reload, vec![reload_started(3), spawn(3)]));
    rows.push((30, Event::Spawned { unit: 3, pid: pid(300) }, vec![]));
    rows.push((
        40,
        Event::Stop("received SIGTERM".into()),
        vec![done_err(3, "sockhold is stopping"), sig(200, SIGTERM), sig(300, SIGTERM)],
    ));
    let sup = run(capped(1), &rows);
    let stopping = sup.generations().iter().filter(|g| g.state == "stopping").count();
    assert_eq!(stopping, 3, "{:?}", sup.generations());
}

#[test]
fn deadlines_are_the_nearest_pending_one() {
    let t0 = Instant::now();
    let mut sup = Supervisor::new(policy(ReadyMode::Delay(Duration::from_secs(2))));
    assert_eq!(sup.next_deadline(), None, "nothing running: no wakeup");
    sup.step(Event::Start, t0);
    sup.step(Event::Spawned { unit: 1, pid: pid(100) }, t0);
    assert_eq!(sup.next_deadline(), Some(t0 + Duration::from_secs(2)));
    sup.step(Event::Timer, t0 + Duration::from_secs(2));
    assert_eq!(sup.next_deadline(), None, "serving and idle: no wakeup");
}

fn notify(unit: u64, sender: i32, message: NotifyMessage) -> Event {
    Event::Notify { unit, sender: pid(sender), sender_pgid: Some(pid(sender)), message }
}

fn workers(n: usize, strategy: ReloadStrategy) -> Policy {
    let mut p = policy(ReadyMode::Notify);
    p.workers = n;
    p.reload_strategy = strategy;
    p
}

/// Drives a supervisor as the event loop would, with children that start at once, get
/// ready when told, and exit as soon as they are signalled; counts the children alive.
struct Sim {
    sup: Supervisor,
    t0: Instant,
    ms: u64,
    /// Live pid -> (unit, generation).
    alive: std::collections::BTreeMap<i32, (u64, u64)>,
    max_alive: usize,
    done: Vec<Result<(), String>>,
    /// Children that got the stop signal and exit at the next `settle`.
    signalled: Vec<i32>,
}

impl Sim {
    fn new(policy: Policy) -> Sim {
        let mut sim = Sim {
            sup: Supervisor::new(policy),
            t0: Instant::now(),
            ms: 0,
            alive: Default::default(),
            max_alive: 0,
            done: Vec::new(),
            signalled: Vec::new(),
        };
        sim.feed(Event::Start);
        sim
    }

    fn feed(&mut self, event: Event) {
        let mut queue = std::collections::VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            let now = self.t0 + Duration::from_millis(self.ms);
            for action in self.sup.step(event, now) {
                match action {
                    Action::Spawn { unit, generation } => {
                        let p = 1000 + unit as i32;
                        self.alive.insert(p, (unit, generation));
                        self.max_alive = self.max_alive.max(self.alive.len());
                        queue.push_front(Event::Spawned { unit, pid: pid(p) });
                    }
                    Action::Signal { pid: p, .. } | Action::SignalGroup { pgid: p, .. } => {
                        self.signalled.push(p.as_raw())
                    }
                    Action::ReloadDone { result, .. } => self.done.push(result),
                    _ => {}
                }
            }
        }
    }

    /// Every starting child of `generation` sends READY=1, one at a time, and every
    /// signalled child exits, until nothing changes.
    fn settle(&mut self, generation: u64) {
        loop {
            self.ms += 1;
            if let Some(p) = self.signalled.pop() {
                if self.alive.remove(&p).is_some() {
                    self.feed(exited(p, ChildStatus::Signaled(SIGTERM)));
                }
                continue;
            }
            let starting = self.sup.units.iter().find(|u| {
                u.generation == generation && matches!(u.state, UnitState::Starting { .. })
            });
            let Some(u) = starting.map(|u| (u.key, u.pid.expect("forked").as_raw())) else {
                break;
            };
            self.feed(ready_from(u.0, u.1));
        }
    }

    fn serving_generations(&self) -> Vec<u64> {
        self.sup.serving().map(|u| u.generation).collect()
    }
}

#[test]
fn workers_start_together_and_the_manager_hears_ready_once_all_serve() {
    let mut sup = Supervisor::new(workers(3, ReloadStrategy::Rolling));
    let t0 = Instant::now();
    let spawns = sup.step(Event::Start, t0);
    assert_eq!(
        spawns,
        (1..=3).map(|u| Action::Spawn { unit: u, generation: 1 }).collect::<Vec<_>>()
    );
    for u in 1..=3 {
        sup.step(Event::Spawned { unit: u, pid: pid(100 + u as i32) }, t0);
    }
    let ready =
        |a: &Vec<Action>| a.iter().any(|a| matches!(a, Action::Manager(ManagerMessage::Ready(_))));
    assert!(!ready(&sup.step(ready_from(1, 101), t0)));
    assert!(!ready(&sup.step(ready_from(2, 102), t0)));
    let last = sup.step(ready_from(3, 103), t0);
    assert!(ready(&last), "{last:?}");
    assert!(last.contains(&Action::Manager(ManagerMessage::Ready(
        "serving: generation 1 (pids 101,102,103)".into()
    ))));
    assert_eq!(sup.serving_pids(), vec![pid(101), pid(102), pid(103)]);
}

#[test]
fn a_rolling_reload_replaces_one_worker_at_a_time_with_at_most_n_plus_one_alive() {
    for n in [1, 2, 4] {
        let mut sim = Sim::new(workers(n, ReloadStrategy::Rolling));
        sim.settle(1);
        assert_eq!(sim.serving_generations(), vec![1; n]);
        for round in 0..3u64 {
            sim.max_alive = sim.alive.len();
            sim.feed(Event::Reload);
            sim.settle(2 + round);
            assert_eq!(sim.serving_generations(), vec![2 + round; n], "n={n}");
            assert_eq!(sim.alive.len(), n, "every old worker is gone");
            assert!(sim.max_alive <= n + 1, "n={n}: {} alive at once", sim.max_alive);
        }
        assert_eq!(sim.done, vec![Ok(()); 3]);
    }
}

#[test]
fn an_all_at_once_reload_stops_the_old_workers_only_when_every_new_one_is_ready() {
    let mut sim = Sim::new(workers(3, ReloadStrategy::AllAtOnce));
    sim.settle(1);
    sim.feed(Event::Reload);
    assert_eq!(sim.alive.len(), 6, "three new workers start together");
    for key in [4, 5] {
        sim.feed(ready_from(key, 1000 + key as i32));
        assert!(sim.signalled.is_empty(), "no old worker stops before all new are ready");
    }
    sim.feed(ready_from(6, 1006));
    let mut stopped = sim.signalled.clone();
    stopped.sort();
    assert_eq!(stopped, vec![1001, 1002, 1003]);
    assert_eq!(sim.done, vec![Ok(())]);
}

#[test]
fn a_failed_rolling_reload_keeps_what_it_replaced_and_the_old_workers_serve_on() {
    let mut sim = Sim::new(workers(3, ReloadStrategy::Rolling));
    sim.settle(1);
    sim.feed(Event::Reload);
    // The first new worker (unit 4) gets ready and replaces an old one.
    sim.feed(ready_from(4, 1004));
    let p = sim.signalled.pop().expect("one old worker stopped");
    sim.alive.remove(&p);
    sim.feed(exited(p, ChildStatus::Signaled(SIGTERM)));
    // The second new worker (unit 5) dies before it is ready.
    sim.alive.remove(&1005);
    sim.feed(exited(1005, ChildStatus::Exited(3)));
    assert_eq!(
        sim.done,
        vec![Err("generation 2 (pid 1005) exited before it was ready: exit status 3".into())]
    );
    let mut serving = sim.serving_generations();
    serving.sort();
    assert_eq!(serving, vec![1, 1, 2], "two old workers and the replaced one serve");
    assert!(sim.signalled.is_empty(), "nothing else is stopped");
    // The next reload replaces them all.
    sim.feed(Event::Reload);
    sim.settle(3);
    assert_eq!(sim.serving_generations(), vec![3, 3, 3]);
}

#[test]
fn a_failed_all_at_once_reload_kills_and_stops_every_new_worker() {
    let mut sim = Sim::new(workers(2, ReloadStrategy::AllAtOnce));
    sim.settle(1);
    sim.feed(Event::Reload);
    sim.feed(ready_from(3, 1003));
    sim.alive.remove(&1004);
    sim.feed(exited(1004, ChildStatus::Exited(1)));
    assert_eq!(sim.signalled, vec![1003], "the new worker that was ready stops too");
    assert!(matches!(sim.done.as_slice(), [Err(_)]));
    sim.settle(2);
    assert_eq!(sim.serving_generations(), vec![1, 1]);
}

#[test]
fn a_crashed_worker_is_replaced_alone_in_its_generation_after_the_backoff() {
    let rows = vec![
        (
            0,
            Event::Start,
            vec![
                Action::Spawn { unit: 1, generation: 1 },
                Action::Spawn { unit: 2, generation: 1 },
            ],
        ),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (0, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
        (10, ready_from(1, 100), vec![]),
        (10, ready_from(2, 200), vec![]),
        (20, exited(200, ChildStatus::Exited(1)), vec![Action::Release { unit: 2 }]),
        (119, Event::Timer, vec![]),
        (120, Event::Timer, vec![Action::Spawn { unit: 3, generation: 1 }]),
        (120, Event::Spawned { unit: 3, pid: pid(300) }, vec![]),
        (130, ready_from(3, 300), vec![]),
        // A reload now replaces both, as generation 2.
        (140, Event::Reload, vec![reload_started(2), Action::Spawn { unit: 4, generation: 2 }]),
    ];
    let sup = run(workers(2, ReloadStrategy::Rolling), &rows);
    assert_eq!(sup.restarts(), 1);
}

#[test]
fn http_and_exec_readiness_probe_until_one_succeeds() {
    let mut p = policy(ReadyMode::Http("/healthz".into()));
    p.probe_delay = Duration::from_millis(5);
    let probe =
        |unit: u64, p: i32, generation: u64| Action::Probe { unit, pid: pid(p), generation };
    let failed =
        |unit| Event::ProbeDone { unit, result: Err("the health check answered 500".into()) };
    let ok = |unit| Event::ProbeDone { unit, result: Ok(()) };
    let rows = vec![
        (0, Event::Start, vec![spawn(1)]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (4, Event::Timer, vec![]),
        (5, Event::Timer, vec![probe(1, 100, 1)]),
        // READY=1 does not count with http: readiness.
        (6, ready_from(1, 100), vec![]),
        (7, ok(1), vec![]),
        (20, Event::Reload, vec![reload_started(2), spawn(2)]),
        (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
        (25, Event::Timer, vec![probe(2, 200, 2)]),
        (26, failed(2), vec![]),
        (125, Event::Timer, vec![]),
        (126, Event::Timer, vec![probe(2, 200, 2)]),
        (127, ok(2), vec![sig(100, SIGTERM), done_ok(2)]),
    ];
    run(p.clone(), &rows);

    p.ready_timeout = Duration::from_secs(1);
    let rows = vec![
        (0, Event::Start, vec![spawn(1)]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (5, Event::Timer, vec![probe(1, 100, 1)]),
        (6, ok(1), vec![]),
        (20, Event::Reload, vec![reload_started(2), spawn(2)]),
        (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
        (25, Event::Timer, vec![probe(2, 200, 2)]),
        (26, failed(2), vec![]),
        (
            1020,
            Event::Timer,
            vec![
                group_kill(200),
                done_err(
                    2,
                    "generation 2 (pid 200) was not ready within 1s (last probe: the health check answered 500)",
                ),
            ],
        ),
    ];
    run(p, &rows);
}

#[test]
fn a_missed_watchdog_aborts_the_child_and_restarts_it_as_after_a_crash() {
    let mut p = policy(ReadyMode::Notify);
    p.watchdog = Some(Duration::from_secs(1));
    let fed = NotifyMessage { watchdog: true, ..Default::default() };
    let rows = with(
        started(),
        vec![
            (500, notify(1, 100, fed.clone()), vec![]),
            (1499, Event::Timer, vec![]),
            (1500, Event::Timer, vec![sig(100, Signal::SIGABRT)]),
            // Stopped (SIGSTOP) children do not die of SIGABRT: SIGKILL at --stop-timeout.
            (31_500, Event::Timer, vec![group_kill(100)]),
            (
                31_510,
                exited(100, ChildStatus::Signaled(SIGKILL)),
                vec![Action::Release { unit: 1 }],
            ),
            (31_610, Event::Timer, vec![spawn(2)]),
        ],
    );
    let sup = run(p.clone(), &rows);
    assert_eq!(sup.restarts(), 1);

    // WATCHDOG=trigger fires at once; WATCHDOG_USEC= changes the period.
    let rows = with(
        started(),
        vec![
            (
                20,
                notify(
                    1,
                    100,
                    NotifyMessage { watchdog_usec: Some(5_000_000), ..Default::default() },
                ),
                vec![],
            ),
            (1100, Event::Timer, vec![]),
            (5019, Event::Timer, vec![]),
            (5020, Event::Timer, vec![sig(100, Signal::SIGABRT)]),
        ],
    );
    run(p.clone(), &rows);
    let rows = with(
        started(),
        vec![(
            20,
            notify(1, 100, NotifyMessage { watchdog_trigger: true, ..Default::default() }),
            vec![sig(100, Signal::SIGABRT)],
        )],
    );
    run(p.clone(), &rows);
    // Before it is ready, a child has no watchdog: its ready timeout covers it.
    let rows = vec![
        (0, Event::Start, vec![spawn(1)]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (5000, Event::Timer, vec![]),
    ];
    run(p, &rows);
}

#[test]
fn extend_timeout_usec_pushes_the_ready_and_stop_deadlines() {
    let mut p = policy(ReadyMode::Notify);
    p.ready_timeout = Duration::from_secs(1);
    p.stop_timeout = Duration::from_secs(1);
    let extend = |usec| NotifyMessage { extend_timeout_usec: Some(usec), ..Default::default() };
    let rows = vec![
        (0, Event::Start, vec![spawn(1)]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (900, notify(1, 100, extend(3_000_000)), vec![]),
        (1000, Event::Timer, vec![]),
        (3899, Event::Timer, vec![]),
        (3900, ready_from(1, 100), vec![]),
        (4000, Event::Stop("test".into()), vec![sig(100, SIGTERM)]),
        (4500, notify(1, 100, extend(2_000_000)), vec![]),
        (5000, Event::Timer, vec![]),
        (6500, Event::Timer, vec![group_kill(100)]),
    ];
    run(p, &rows);
}

fn lazy() -> Policy {
    let mut p = policy(ReadyMode::Notify);
    p.lazy = true;
    p
}

#[test]
fn lazy_waits_for_the_first_connection_and_starts_generation_1_once() {
    let waiting = Action::Manager(ManagerMessage::Ready(
        "listening; waiting for the first connection".into(),
    ));
    let nothing_to_reload = Action::ReloadDone { generation: None, result: Ok(()) };
    let t0 = Instant::now();
    let mut sup = Supervisor::new(lazy());
    assert!(sup.wants_first_connection());
    let rows = [
        // The start only says it is listening.
        (0, Event::Start, vec![waiting]),
        // A reload (SIGHUP, ctl reload) before the first connection changes nothing: it is
        // answered at once, and nothing starts.
        (5, Event::Reload, vec![nothing_to_reload]),
        (6, Event::Timer, vec![]),
        (10, Event::FirstConnection, vec![spawn(1)]),
        (10, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        // Connections go on arriving before the listeners leave the poll: nothing more starts.
        (11, Event::FirstConnection, vec![]),
        (20, ready_from(1, 100), vec![]),
        (21, Event::FirstConnection, vec![]),
        // From now on a reload is a reload.
        (30, Event::Reload, vec![reload_started(2), spawn(2)]),
    ];
    for (i, (at, event, want)) in rows.into_iter().enumerate() {
        if i == 3 {
            assert!(sup.wants_first_connection(), "still waiting after the reload");
        }
        let got = sup.step(event.clone(), t0 + Duration::from_millis(at));
        let got: Vec<_> = if want.iter().any(|a| matches!(a, Action::Manager(_))) {
            got
        } else {
            got.into_iter().filter(|a| !matches!(a, Action::Manager(_))).collect()
        };
        assert_eq!(got, want, "row {i}: {event:?}");
    }
    assert!(!sup.wants_first_connection());
    assert_eq!(sup.generations().iter().map(|g| g.id).collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn without_lazy_the_start_starts_and_connections_mean_nothing() {
    let mut sup = Supervisor::new(policy(ReadyMode::Notify));
    assert!(!sup.wants_first_connection());
    let t0 = Instant::now();
    assert_eq!(sup.step(Event::FirstConnection, t0), vec![], "not lazy: nothing to start");
    assert_eq!(sup.step(Event::Start, t0), vec![spawn(1)]);
}

#[test]
fn a_stop_before_the_first_connection_exits_at_once() {
    run(
        lazy(),
        &[
            (0, Event::Start, vec![]),
            (5, Event::Stop("received SIGTERM".into()), vec![Action::Exit(ExitCode::SUCCESS)]),
        ],
    );
}

#[test]
fn upgrade_requests_become_upgrade_actions_whatever_the_state() {
    let sigusr2 = Event::Upgrade { asker: None };
    let ctl = |id| Event::Upgrade { asker: Some(id) };
    let upgrade = |asker| Action::Upgrade { asker };
    // Each request names its asker; the event loop gathers every one of a turn into the one
    // upgrade it carries out at the end of that turn.
    let mut rows = vec![(0, sigusr2.clone(), vec![upgrade(None)])];
    rows.extend(started());
    rows.push((20, ctl(7), vec![upgrade(Some(7))]));
    rows.push((20, sigusr2, vec![upgrade(None)]));
    // Mid-reload too: whether there is a state to hand over is decided at the end of the turn.
    rows.push((30, Event::Reload, vec![reload_started(2), spawn(2)]));
    rows.push((30, ctl(8), vec![upgrade(Some(8))]));
    let sup = run(policy(ReadyMode::Notify), &rows);
    assert_eq!(sup.generations().len(), 2, "an upgrade request changes no generation");
    // Before the first connection, too.
    run(lazy(), &[(0, Event::Start, vec![]), (1, ctl(9), vec![upgrade(Some(9))])]);
}

fn steered(workers: usize) -> Policy {
    let mut p = policy(ReadyMode::Notify);
    p.workers = workers;
    p.flow_steering = Some(Duration::from_secs(10));
    p
}

fn new_flows(units: &[u64]) -> Action {
    Action::NewFlowsTo { units: units.to_vec() }
}

fn watch(unit: u64, generation: u64, p: i32) -> Action {
    Action::WatchFlows { unit, generation, pid: pid(p) }
}

#[test]
fn steered_new_flows_go_to_the_newest_ready_generation_and_a_replaced_one_waits_for_its_flows() {
    let rows = vec![
        // Nothing is ready yet: new flows go to the newest started generation.
        (0, Event::Start, vec![spawn(1), new_flows(&[1])]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (10, ready_from(1, 100), vec![]),
        // A starting generation gets no new flows before it is ready.
        (20, Event::Reload, vec![reload_started(2), spawn(2)]),
        (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
        // Ready: it gets the new flows; the old one is not signalled but watched.
        (30, ready_from(2, 200), vec![watch(1, 1, 100), new_flows(&[2]), done_ok(2)]),
        (40, Event::Timer, vec![]),
        // A stale or repeated idle report for a unit not kept changes nothing.
        (45, Event::FlowsIdle { unit: 2, flows: 0 }, vec![]),
        // Its flows went quiet: now it gets the stop signal, and --stop-timeout runs.
        (50, Event::FlowsIdle { unit: 1, flows: 3 }, vec![sig(100, SIGTERM)]),
        (60, exited(100, ChildStatus::Signaled(SIGTERM)), vec![Action::Release { unit: 1 }]),
    ];
    let sup = run(steered(1), &rows);
    assert_eq!(sup.next_deadline(), None, "nothing left to wait for");
}

#[test]
fn a_kept_generation_counts_as_draining_and_is_stopped_at_once_at_shutdown() {
    let mut p = steered(1);
    p.max_draining = 1;
    let rows = vec![
        (0, Event::Start, vec![spawn(1), new_flows(&[1])]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (10, ready_from(1, 100), vec![]),
        (20, Event::Reload, vec![reload_started(2), spawn(2)]),
        (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
        (30, ready_from(2, 200), vec![watch(1, 1, 100), new_flows(&[2]), done_ok(2)]),
        (40, Event::Reload, vec![reload_started(3), spawn(3)]),
        (40, Event::Spawned { unit: 3, pid: pid(300) }, vec![]),
        // Two generations would be kept: the oldest is killed (--max-draining 1).
        (
            50,
            ready_from(3, 300),
            vec![watch(2, 2, 200), group_kill(100), new_flows(&[3]), done_ok(3)],
        ),
        (55, exited(100, ChildStatus::Signaled(SIGKILL)), vec![Action::Release { unit: 1 }]),
        // At shutdown the kept one gets its stop signal with the rest, at once.
        (60, Event::Stop("test".into()), vec![sig(200, SIGTERM), sig(300, SIGTERM)]),
    ];
    run(p, &rows);
}

#[test]
fn a_failed_new_generation_leaves_the_new_flows_with_the_old_one() {
    let rows = vec![
        (0, Event::Start, vec![spawn(1), new_flows(&[1])]),
        (0, Event::Spawned { unit: 1, pid: pid(100) }, vec![]),
        (10, ready_from(1, 100), vec![]),
        (20, Event::Reload, vec![reload_started(2), spawn(2)]),
        (20, Event::Spawned { unit: 2, pid: pid(200) }, vec![]),
    ];
    let t0 = Instant::now();
    let mut sup = Supervisor::new(steered(1));
    for (at, event, want) in &rows {
        let got: Vec<_> = sup
            .step(event.clone(), t0 + Duration::from_millis(*at))
            .into_iter()
            .filter(|a| !matches!(a, Action::Manager(_)))
            .collect();
        assert_eq!(&got, want, "{event:?}");
    }
    // It dies before it is ready: the old one keeps everything, new flows included.
    let got = sup.step(exited(200, ChildStatus::Exited(1)), t0 + Duration::from_millis(30));
    assert!(got.contains(&Action::Release { unit: 2 }), "{got:?}");
    assert!(!got.iter().any(|a| matches!(a, Action::Signal { .. })), "the old one serves on");
    assert!(!got.iter().any(|a| matches!(a, Action::NewFlowsTo { .. })), "{got:?}");
    assert_eq!(sup.serving_pids(), vec![pid(100)]);
}

#[test]
fn steered_workers_share_new_flows_and_a_rolling_reload_does_not_wait_for_kept_ones() {
    let p = steered(2);
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut sup = Supervisor::new(p);
    let quiet = |v: Vec<Action>| -> Vec<Action> {
        v.into_iter().filter(|a| !matches!(a, Action::Manager(_))).collect()
    };
    assert_eq!(
        quiet(sup.step(Event::Start, at(0))),
        vec![
            Action::Spawn { unit: 1, generation: 1 },
            Action::Spawn { unit: 2, generation: 1 },
            new_flows(&[1, 2])
        ]
    );
    sup.step(Event::Spawned { unit: 1, pid: pid(100) }, at(0));
    sup.step(Event::Spawned { unit: 2, pid: pid(101) }, at(0));
    // One ready worker takes the new flows until the other is ready too.
    assert_eq!(quiet(sup.step(notify_ready(1, 100), at(10))), vec![new_flows(&[1])]);
    assert_eq!(quiet(sup.step(notify_ready(2, 101), at(10))), vec![new_flows(&[1, 2])]);
    assert_eq!(
        quiet(sup.step(Event::Reload, at(20))),
        vec![reload_started(2), Action::Spawn { unit: 3, generation: 2 }]
    );
    sup.step(Event::Spawned { unit: 3, pid: pid(200) }, at(20));
    // The first new worker is ready: an old one is kept, and the next new one starts at once.
    assert_eq!(
        quiet(sup.step(notify_ready(3, 200), at(30))),
        vec![watch(1, 1, 100), Action::Spawn { unit: 4, generation: 2 }, new_flows(&[3])]
    );
    sup.step(Event::Spawned { unit: 4, pid: pid(201) }, at(30));
    assert_eq!(
        quiet(sup.step(notify_ready(4, 201), at(40))),
        vec![watch(2, 1, 101), new_flows(&[3, 4]), done_ok(2)]
    );
    assert_eq!(
        quiet(sup.step(Event::FlowsIdle { unit: 2, flows: 0 }, at(50))),
        vec![sig(101, SIGTERM)]
    );
    // A snapshot carries a kept unit; the restored machine names it for the loop to watch.
    let snapshot = sup.snapshot(at(60)).expect("snapshot");
    let restored = Supervisor::restore(steered(2), &snapshot, at(60), Duration::ZERO).unwrap();
    assert_eq!(restored.kept_units(), vec![(1, 1, pid(100))]);
}

fn notify_ready(unit: u64, sender: i32) -> Event {
    notify(unit, sender, NotifyMessage { ready: true, ..Default::default() })
}
