#!/usr/bin/env python3
"""Checks contrib/container's Dockerfile and Kubernetes manifest against each other and against
what sockhold does, where neither Docker nor a cluster can run them (tests/contrib.rs runs this).

Usage: check.py DOCKERFILE MANIFEST [--print-probes]

Exit 0 when both files are consistent, else 1 with one line per problem on stderr. With
--print-probes it also prints, as JSON, the readiness and liveness probes' commands and the
control socket path and sockhold path they use, so that a test can run them against a real
sockhold.

Dockerfile: the final stage's ENTRYPOINT is in exec form and runs sockhold (a path the stage
copies it to) with --control, --stop-timeout and "--" before the server (CMD); STOPSIGNAL is a
signal sockhold stops on; a USER runs it; the HEALTHCHECK runs `sockhold ctl ... status` on the
same control socket; no `docker run --init` (sockhold is the init); the documented `docker run
--stop-timeout` exceeds sockhold's. Manifest: a Deployment (apps/v1) and a Service (v1) whose
selectors match the pod's labels; the container has no `command` (it would replace sockhold);
readiness and liveness probes are exec probes running `sockhold ctl --control <the same path>
status` as the image's user, with a probe timeout above ctl's; the preStop hook only sleeps; and
terminationGracePeriodSeconds exceeds the preStop sleep plus --stop-timeout; the header shows
`kubectl exec ... -- sockhold ctl reload`.
"""

import json
import re
import shlex
import sys

import yaml

# Signals sockhold stops on (README, "Signals").
STOP_SIGNALS = {"SIGTERM", "TERM", "SIGINT", "INT", "15", "2"}


class Problems:
    def __init__(self):
        self.items = []

    def check(self, condition, message):
        if not condition:
            self.items.append(message)
        return condition


def seconds(text):
    """A sockhold duration as seconds: 20s, 1m30s, 500ms, 2h, or a bare number of seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)", text):
        if m.start() != pos:
            raise ValueError(f"not a duration: {text!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a duration: {text!r}")
    return total


def option(args, name):
    """The value of `name` in an argument list (`--name VALUE` or `--name=VALUE`), or None."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def dockerfile_instructions(text):
    """(INSTRUCTION, arguments, comment lines before it) for each instruction, continuations joined."""
    out, comments, current = [], [], None
    for line in text.splitlines():
        stripped = line.strip()
        if current is None and (not stripped or stripped.startswith("#")):
            if stripped.startswith("#"):
                comments.append(stripped)
            continue
        if current is not None and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        piece = stripped[:-1] if stripped.endswith("\\") else stripped
        current = piece if current is None else current + " " + piece
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip(), comments))
            comments, current = [], None
    return out


def exec_form(arguments, problems, what):
    """An instruction's exec form (a JSON array of strings), or None with a problem."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    problems.check(ok, f"Dockerfile: {what} is not in exec form (a JSON array): {arguments}")
    return value if ok else None


def sockhold_ctl_call(command, sockhold, problems, what):
    """The arguments after `sockhold ctl` in a probe's command (direct or through `sh -c`)."""
    if command[:2] in (["/bin/sh", "-c"], ["sh", "-c"]) and len(command) == 3:
        words = shlex.split(command[2])
        # The first pipeline element is what is asked of sockhold.
        words = words[: words.index("|")] if "|" in words else words
        command = words
    if not problems.check(
        len(command) >= 2 and command[0] in (sockhold, "sockhold") and command[1] == "ctl",
        f"{what} does not run {sockhold} ctl: {command}",
    ):
        return None
    return command[2:]


def check_dockerfile(text, problems):
    """What the manifest needs from the image: sockhold's path and its ENTRYPOINT's options."""
    instructions = dockerfile_instructions(text)
    stages = [i for i, (word, _, _) in enumerate(instructions) if word == "FROM"]
    if not problems.check(stages, "Dockerfile: no FROM"):
        return None
    final = instructions[stages[-1] :]

    def last(word):
        found = [args for w, args, _ in final if w == word]
        return found[-1] if found else None

    entry = last("ENTRYPOINT")
    if not problems.check(entry, "Dockerfile: the final stage has no ENTRYPOINT"):
        return None
    entry = exec_form(entry, problems, "ENTRYPOINT")
    if entry is None:
        return None
    sockhold = entry[0]
    problems.check(
        sockhold.endswith("/sockhold"), f"Dockerfile: ENTRYPOINT runs {sockhold}, not sockhold"
    )
    copied = [
        args.split()[-1] for w, args, _ in final if w == "COPY" and args.split()[-1] == sockhold
    ]
    problems.check(copied, f"Dockerfile: the final stage does not COPY sockhold to {sockhold}")
    problems.check(entry[-1] == "--", 'Dockerfile: ENTRYPOINT does not end with "--" (CMD is the server)')
    problems.check(last("CMD"), "Dockerfile: no CMD (the server's command line)")
    control = option(entry, "--control")
    problems.check(control, "Dockerfile: ENTRYPOINT has no --control (the probes need it)")
    stop = option(entry, "--stop-timeout")
    stop_s = None
    if problems.check(stop, "Dockerfile: ENTRYPOINT has no --stop-timeout"):
        try:
            stop_s = seconds(stop)
        except ValueError as e:
            problems.check(False, f"Dockerfile: --stop-timeout: {e}")
    signal = last("STOPSIGNAL")
    problems.check(
        signal in STOP_SIGNALS, f"Dockerfile: STOPSIGNAL {signal} is not a signal sockhold stops on"
    )
    user = last("USER")
    problems.check(user, "Dockerfile: no USER (sockhold and its server would run as root)")
    runtime = re.search(r"RUNTIME_DIRECTORY=(\S+)", " ".join(a for w, a, _ in final if w == "ENV"))
    if control and problems.check(runtime, "Dockerfile: no ENV RUNTIME_DIRECTORY"):
        problems.check(
            control.rsplit("/", 1)[0] == runtime.group(1),
            f"Dockerfile: --control {control} is not in RUNTIME_DIRECTORY {runtime.group(1)}",
        )

    health = last("HEALTHCHECK")
    if problems.check(health, "Dockerfile: no HEALTHCHECK") and control:
        cmd = health.partition("CMD ")[2]
        cmd = exec_form(cmd, problems, "HEALTHCHECK CMD")
        if cmd:
            args = sockhold_ctl_call(cmd, sockhold, problems, "Dockerfile: HEALTHCHECK")
            if args is not None:
                problems.check(
                    option(args, "--control") == control and "status" in args,
                    f"Dockerfile: HEALTHCHECK does not ask `ctl --control {control} status`: {cmd}",
                )

    comments = [line.strip() for line in text.splitlines() if line.strip().startswith("#")]
    # sockhold is the init: the comments may say that no --init or tini is needed, never advise it.
    prose = " ".join(c.lstrip("#").strip() for c in comments)
    for m in re.finditer(r"--init\b|\btini\b", prose):
        before = prose[max(0, m.start() - 40) : m.start()].lower()
        problems.check(
            re.search(r"\b(no|not|without|nor)\b", before),
            f"Dockerfile: advises {m.group(0)}, but sockhold is the init: ...{before}{m.group(0)}",
        )
    runs = [re.search(r"docker run .*--stop-timeout (\d+)", c) for c in comments]
    runs = [int(m.group(1)) for m in runs if m]
    if problems.check(runs, "Dockerfile: no documented `docker run --stop-timeout N`") and stop_s:
        problems.check(
            min(runs) > stop_s,
            f"Dockerfile: docker run --stop-timeout {min(runs)} does not exceed sockhold's {stop}",
        )
    uid = user.split(":")[0] if user else None
    return {"sockhold": sockhold, "control": control, "stop": stop_s, "uid": uid}


def check_manifest(text, image, problems):
    """Returns the probes' commands, for --print-probes."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        problems.check(False, f"manifest: not YAML: {e}")
        return {}
    for d in docs:
        problems.check(
            isinstance(d, dict) and d.get("apiVersion") and d.get("kind"),
            "manifest: a document without apiVersion and kind",
        )
    docs = [d for d in docs if isinstance(d, dict)]
    kinds = {(d.get("apiVersion"), d.get("kind")): d for d in docs}
    deployment = kinds.get(("apps/v1", "Deployment"))
    if not problems.check(deployment, "manifest: no apps/v1 Deployment"):
        return {}
    spec = deployment.get("spec") or {}
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    problems.check(
        selector and all(labels.get(k) == v for k, v in selector.items()),
        "manifest: the Deployment's selector does not match its pod labels",
    )
    pod = template.get("spec") or {}
    containers = pod.get("containers") or []
    if not problems.check(len(containers) == 1, "manifest: expected one container"):
        return {}
    c = containers[0]
    for field in ("name", "image", "args"):
        problems.check(c.get(field), f"manifest: the container has no {field}")
    problems.check(
        "command" not in c,
        "manifest: the container sets command, which replaces the image's ENTRYPOINT (sockhold)",
    )
    port_names = {p.get("name") for p in c.get("ports") or []}

    service = kinds.get(("v1", "Service"))
    if problems.check(service, "manifest: no v1 Service"):
        sspec = service.get("spec") or {}
        problems.check(
            sspec.get("selector")
            and all(labels.get(k) == v for k, v in sspec["selector"].items()),
            "manifest: the Service's selector does not match the pod labels",
        )
        for p in sspec.get("ports") or []:
            target = p.get("targetPort")
            problems.check(
                not isinstance(target, str) or target in port_names,
                f"manifest: the Service's targetPort {target} names no container port",
            )

    if image is None:
        return {}
    control, sockhold = image["control"], image["sockhold"]
    user = (pod.get("securityContext") or {}).get("runAsUser")
    user = (c.get("securityContext") or {}).get("runAsUser", user)
    if image["uid"] is not None:
        problems.check(
            user is None or str(user) == image["uid"],
            f"manifest: runAsUser {user} is not the image's USER {image['uid']}: sockhold ctl "
            "in a probe would be refused by, or would refuse, sockhold",
        )
    probes = {}
    for name in ("readinessProbe", "livenessProbe"):
        probe = c.get(name)
        if not problems.check(probe, f"manifest: no {name}"):
            continue
        command = (probe.get("exec") or {}).get("command")
        if not problems.check(command, f"manifest: {name} is not an exec probe"):
            continue
        args = sockhold_ctl_call(command, sockhold, problems, f"manifest: {name}")
        if args is None:
            continue
        problems.check(
            option(args, "--control") == control,
            f"manifest: {name} asks --control {option(args, '--control')}, "
            f"but the image runs sockhold with --control {control}",
        )
        problems.check("status" in args, f"manifest: {name} does not run `ctl status`")
        ctl_timeout = option(args, "--timeout")
        ctl_s = seconds(ctl_timeout) if ctl_timeout else 5.0
        problems.check(
            probe.get("timeoutSeconds", 1) > ctl_s,
            f"manifest: {name} timeoutSeconds {probe.get('timeoutSeconds', 1)} does not exceed "
            f"ctl's --timeout of {ctl_s:g}s",
        )
        probes[name] = command
    problems.check(
        "status" in probes.get("readinessProbe", [""])[-1] and "serving" in probes.get("readinessProbe", [""])[-1],
        "manifest: the readinessProbe does not look for a serving generation",
    )

    pre_stop = ((c.get("lifecycle") or {}).get("preStop")) or {}
    sleep = None
    if "sleep" in pre_stop:
        sleep = (pre_stop["sleep"] or {}).get("seconds")
    elif "exec" in pre_stop:
        command = pre_stop["exec"].get("command") or []
        if problems.check(
            len(command) == 2 and command[0].rsplit("/", 1)[-1] == "sleep",
            f"manifest: preStop should only sleep (the kubelet's SIGTERM stops sockhold): {command}",
        ):
            sleep = float(command[1])
    problems.check(sleep is not None, "manifest: no preStop sleep (endpoints need time to go)")
    grace = pod.get("terminationGracePeriodSeconds")
    if problems.check(grace, "manifest: no terminationGracePeriodSeconds") and image["stop"]:
        problems.check(
            grace > (sleep or 0) + image["stop"],
            f"manifest: terminationGracePeriodSeconds {grace} does not exceed the preStop sleep "
            f"{sleep} plus sockhold's --stop-timeout {image['stop']:g}s",
        )
    problems.check(
        re.search(r"^#.*kubectl exec \S+ -- sockhold ctl reload", text, re.M),
        "manifest: the header does not show `kubectl exec ... -- sockhold ctl reload`",
    )
    return {"control": control, "sockhold": sockhold, **probes}


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    problems = Problems()
    with open(args[0], encoding="utf-8") as f:
        image = check_dockerfile(f.read(), problems)
    with open(args[1], encoding="utf-8") as f:
        probes = check_manifest(f.read(), image, problems)
    for p in problems.items:
        print(p, file=sys.stderr)
    if problems.items:
        return 1
    if "--print-probes" in argv:
        print(json.dumps(probes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
