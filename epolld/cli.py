"""Command line: parse arguments, wire the pieces together, map errors to exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence

import structlog

from epolld import __version__, handoff
from epolld import config as config_mod
from epolld import takeover as takeover_mod
from epolld.config import Config
from epolld.errors import BindError, EpolldError
from epolld.listening import activation, sockets
from epolld.listening.listener_set import ListenerSet
from epolld.observability import journald, logsetup
from epolld.pidfile import PidFile
from epolld.service.echo import EchoService
from epolld.systemd import Notifier
from epolld.workers import handoff as handoff_workers

DEFAULT_CONFIG = "/etc/epolld.yaml"

log = structlog.get_logger("epolld")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="epolld",
        description="An RFC 862 echo daemon on select.epoll.",
        epilog="Signals: SIGTERM/SIGINT stop gracefully (a second SIGINT at once), "
        "SIGHUP reloads the configuration, SIGUSR1 logs statistics, SIGUSR2 hands every "
        "connection to a new process (systemd: the restart; else re-executes in place). "
        "Exit codes: 0 stopped cleanly, 69 cannot listen, 71 daemon mode failed, "
        "78 invalid configuration.",
    )
    parser.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print a summary and exit",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as YAML and exit",
    )
    parser.add_argument("--log-level", choices=list(logsetup.LEVELS), help="override logging.level")
    parser.add_argument(
        "--log-format",
        choices=logsetup.FORMATS,
        help="override logging.format (auto: journal entries under systemd, console on a "
        "terminal, else JSON)",
    )
    parser.add_argument(
        "--daemon",
        action="store_true",
        help="detach into the background (hosts without systemd only)",
    )
    parser.add_argument("--pidfile", metavar="PATH", help="with --daemon: override daemon.pidfile")
    operator = parser.add_mutually_exclusive_group()
    operator.add_argument(
        "--drain",
        action="store_true",
        help="ask the running daemon to drain: /readyz answers 503 and HAProxy's agent "
        "check `drain` until --undrain, through reloads and restarts (control.socket)",
    )
    operator.add_argument(
        "--undrain", action="store_true", help="cancel an operator's drain (--drain)"
    )
    operator.add_argument(
        "--drain-status",
        action="store_true",
        help="print whether the running daemon drains, and why",
    )
    parser.add_argument("--version", action="version", version=f"epolld {__version__}")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Config:
    """Load the file and apply the command line's overrides (again on every reload)."""
    config = config_mod.load_config(args.config)
    logging_ = config.logging
    if args.log_level:
        logging_ = dataclasses.replace(logging_, level=args.log_level)
    if args.log_format:
        logging_ = dataclasses.replace(logging_, format=args.log_format)
    daemon = config.daemon
    if args.pidfile:
        daemon = dataclasses.replace(daemon, pidfile=args.pidfile)
    return dataclasses.replace(config, logging=logging_, daemon=daemon)


def main(argv: Sequence[str] | None = None) -> int:
    # A watchdog kill (SIGABRT) then leaves the stuck loop's traceback in the journal.
    faulthandler.enable()
    started_at = time.monotonic()
    args = parse_args(argv)
    config: Config | None
    config_error: EpolldError | None = None
    try:
        config = load(args)
    except EpolldError as e:
        # A restart handoff in progress keeps its connections on the previous configuration
        # (serve() decides once it has read the state); anything else stops here.
        if args.check_config or args.print_config or not handoff.pending(os.environ):
            return report(e, None if args.check_config or args.print_config else Notifier())
        config, config_error = None, e
    if args.check_config and config is not None:
        print(f"configuration OK: {config_mod.describe(config)}")
        return 0
    if args.print_config and config is not None:
        print(config_mod.render_config(config), end="")
        return 0
    if (args.drain or args.undrain or args.drain_status) and config is not None:
        return operate(args, config)
    notifier = Notifier()
    try:
        return serve(args, config, notifier, config_error=config_error, started_at=started_at)
    except EpolldError as e:
        return report(e, notifier)


def operate(args: argparse.Namespace, config: Config) -> int:
    """--drain, --undrain, --drain-status: ask the running daemon over its control socket
    (control.py) and print its answer."""
    from epolld import control

    command = "drain" if args.drain else "undrain" if args.undrain else "status"
    path = config_mod.control_socket_path(config)
    if path is None and config.control.socket == config_mod.CONTROL_AUTO:
        path = control.DEFAULT_SYSTEMD_PATH  # from outside the unit: its RuntimeDirectory
    if path is None:
        return report(control.ControlError("control.socket is null: no control socket"), None)
    try:
        reply = control.ask(path, command)
    except EpolldError as e:
        return report(e, None)
    state = "draining" if reply.get("operator_drain") or reply.get("stopping") else "serving"
    print(
        f"epolld {reply.get('pid')}: {state}; operator drain: "
        f"{'on' if reply.get('operator_drain') else 'off'}; ready: "
        f"{'yes' if reply.get('ready') else 'no (' + str(reply.get('reason')) + ')'}; "
        f"connections: {reply.get('connections')}"
    )
    return 0


def report(error: EpolldError, notifier: Notifier | None) -> int:
    """One line on stderr (with the journal's error priority when stderr is the journal),
    STATUS= for systemctl status, and the error's exit code.

    No notifier for --check-config: ExecReload runs it under NOTIFY_SOCKET, and with
    NotifyAccess=main systemd rejects messages from that process.
    """
    message = str(error)
    line = f"Error: {message}"
    if journald.stdout_is_journal(fd=2):
        # One entry, at error priority: each line would otherwise be an entry at info.
        line = journald.priority_prefix("error") + " ".join(line.splitlines())
    print(line, file=sys.stderr)
    if notifier is not None:
        notifier.fatal(message, errno=getattr(error, "errno", None))
    return error.exit_code


def serve(
    args: argparse.Namespace,
    config: Config | None,
    notifier: Notifier,
    *,
    config_error: EpolldError | None = None,
    started_at: float | None = None,
) -> int:
    """Bind (or adopt, or take over from the previous process) the listeners, then run the
    loop in the foreground or as a daemon."""
    passed = activation.passed_fds()
    received_at = time.monotonic()
    state, passed = handoff.take_state(passed)
    received_s = time.monotonic() - received_at
    previous = takeover_mod.previous_config(state, config)
    if config is None:
        if previous is None:  # nothing to fall back on: refuse as a fresh start would
            assert config_error is not None
            raise config_error
        config = previous
    # Configured before binding in daemon mode too: what is logged before the fork reaches
    # the terminal in the chosen format; the daemon configures again on its log file.
    logsetup.configure(config.logging.level, config.logging.format)
    if state is not None and state.problem is not None:
        log.warning("handoff_unreadable", reason=state.problem, closed=state.closed)
    if state is not None:
        takeover_mod.clear_leftovers(state, notifier)
    if config_error is not None:
        log.error(
            "config_invalid",
            error=str(config_error),
            action="kept the connections handed over; running the previous configuration",
        )
    takeover = None
    if state is not None and state.records:
        takeover = takeover_mod.Takeover(state, previous, config_error, started_at, received_s)
    workers = config_mod.worker_count(config)
    if takeover is not None and takeover.of_supervisor:
        return _resume_workers(args, config, notifier, passed, takeover)
    if takeover is not None and workers > 1:
        # The connections come into one process; workers apply at the next stop and start.
        log.warning(
            "workers_ignored",
            workers=workers,
            reason="a restart handoff carries its connections into one process",
        )
        workers = 1
    # A takeover brings its listeners along; the service reconciles them with the file.
    opened = ListenerSet.open(config, workers, passed, taking_over=takeover is not None)
    slots = opened.slots if workers > 1 else None
    bound, metrics_listener = opened.unique(), opened.metrics
    if not args.daemon:
        return run_loop(
            args, config, bound, notifier, metrics_listener, slots=slots, takeover=takeover
        )
    if takeover is not None:  # re-executed in place: a daemon already, same PID
        from epolld.daemonize import continued_daemon

        with continued_daemon(config.daemon.log_file) as (reopen_log, held):
            takeover.pidfiles = held
            return run_loop(
                args, config, bound, notifier, None, before_reload=reopen_log, takeover=takeover
            )
    from epolld.daemonize import daemon_context

    pidfiles: list[PidFile] = []
    owned = [*bound, *([metrics_listener] if metrics_listener else [])]
    try:
        context = daemon_context(
            config.daemon.pidfile,
            [lst.fd for lst in owned],
            config.daemon.log_file,
            configure_logging=lambda: logsetup.configure(
                config.logging.level, config.logging.format
            ),
            on_pidfile=pidfiles.append,
        )
        with context as reopen_log:
            return run_loop(
                args,
                config,
                bound,
                notifier,
                metrics_listener,
                before_reload=reopen_log,
                pidfiles=pidfiles,
                slots=slots,
            )
    except BaseException:
        for listener in owned:
            listener.sock.close()
        raise


def _resume_workers(
    args: argparse.Namespace,
    config: Config,
    notifier: Notifier,
    passed: list[tuple[str, int]],
    takeover: takeover_mod.Takeover,
) -> int:
    """A supervisor's restart handoff: its slots back, then its loop (as a daemon already,
    when it was one: re-executed in place, same PID)."""
    held, resumed = takeover_mod.resume_supervisor(takeover, config, notifier, passed)
    loop = functools.partial(
        run_loop,
        args,
        config,
        held.unique(),
        notifier,
        held.metrics,
        slots=held.slots,
        resumed=resumed,
        operator_drain=takeover.operator_drain,
    )
    if not args.daemon:
        return loop()
    from epolld.daemonize import continued_daemon

    with continued_daemon(config.daemon.log_file) as (reopen_log, pidfiles):
        pidfiles += takeover.pidfiles  # released when the daemon finally stops
        return loop(before_reload=reopen_log, pidfiles=pidfiles)


def run_loop(
    args: argparse.Namespace,
    config: Config,
    bound: list[sockets.Listener],
    notifier: Notifier,
    metrics_listener: sockets.Listener | None = None,
    before_reload: Callable[[], None] = lambda: None,
    slots: list[list[sockets.Listener]] | None = None,
    *,
    takeover: takeover_mod.Takeover | None = None,
    resumed: handoff_workers.Resumed | None = None,
    pidfiles: list[PidFile] | None = None,
    operator_drain: bool = False,
) -> int:
    def reload() -> Config:
        # First, so that a rotated log file is let go even when the new config is invalid.
        before_reload()
        return load(args)

    if slots is not None:
        from epolld.workers.supervisor import Supervisor

        supervisor = Supervisor(
            config,
            slots,
            notifier,
            reload,
            metrics_listener,
            before_reload=before_reload,
            resumed=resumed,
            handoff_sources=list(pidfiles or []),
        )
        supervisor.readiness.operator_drain = operator_drain
        try:
            return supervisor.run()
        except EpolldError:  # agent.listen or control.socket: exit 69, as for listen
            raise
        except Exception:
            log.exception("loop_crashed")
            notifier.fatal("crashed: see the journal")
            return os.EX_SOFTWARE
    service = EchoService(config, bound, notifier, reload=reload, metrics_listener=metrics_listener)
    service.readiness.operator_drain = takeover.operator_drain if takeover else operator_drain
    try:
        if takeover is not None:
            try:
                takeover_mod.take_over(service, takeover, config, notifier)
            except BindError as e:  # without a listener: exit 69, never READY=1
                return report(e, notifier)
        for lock in takeover.pidfiles if takeover is not None else pidfiles or []:
            service.add_handoff_source(lock)
        return service.run()
    except EpolldError:  # agent.listen or control.socket: exit 69, as for listen
        raise
    except Exception:
        log.exception("loop_crashed")
        notifier.fatal("crashed: see the journal")
        return os.EX_SOFTWARE
