"""The composition root: flags and env -> config -> NVML backend -> the running plugin.

This is the one module that picks concrete implementations (pynvml or the mock) and
turns every failure into one readable line and an exit code: 0 ok, 2 bad usage or bad
config, 1 anything else. Tracebacks go to the debug log only.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

# gRPC's C core logs connection chatter (GOAWAY on a peer's restart) straight to stderr;
# the plugin logs what matters itself. Must be set before grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from pkg.deviceplugin import logs, report
from pkg.deviceplugin.allocator.layout import LayoutError
from pkg.deviceplugin.config import flags as config_flags
from pkg.deviceplugin.config import loader as config_loader
from pkg.deviceplugin.config.model import Config
from pkg.deviceplugin.config.source import ConfigSource
from pkg.deviceplugin.nvml.backend import Backend, NvmlError
from pkg.deviceplugin.types import Topology

log = logging.getLogger("kyb-device-plugin")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
SUBCOMMANDS = ("serve", "plan", "status", "demo", "healthz", "codegen")


class UsageError(Exception):
    """Bad usage or bad config: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kyb-device-plugin",
        description="Kubernetes device plugin exporting GPU seats as kyb.ai/gpu-<N>x-seat.",
    )
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    helps = {
        "serve": "serve every profile to the kubelet (the default)",
        "plan": "print the topology, groups and seats the config yields, without serving",
        "status": "print the live seat map of a running plugin (from its state file)",
        "demo": "run against a mock GPU node and a built-in kubelet simulator",
        "healthz": "liveness check: every profile's socket answers gRPC (exit 1 otherwise)",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--config",
            help="config file (env KYB_CONFIG; default /etc/kyb/device-plugin/config.yaml, "
            "built-in default when that file does not exist)",
        )
        sub.add_argument(
            "--nvml-mock",
            metavar="NAME_OR_PATH",
            help="use a built-in mock topology or a topology file instead of NVML "
            "(env KYB_NVML_MOCK)",
        )
        sub.add_argument(
            "--nvml-library",
            metavar="PATH",
            help="load this NVML library instead of libnvidia-ml.so.1, e.g. a driver outside "
            "the loader path or the test suite's mock library (env KYB_NVML_LIBRARY)",
        )
        sub.add_argument(
            "--node-name",
            metavar="NAME",
            help="the node this runs on: the config's nodes.<NAME> override applies "
            "(env KYB_NODE_NAME, which the DaemonSet sets from spec.nodeName)",
        )
        sub.add_argument(
            "--output",
            choices=("text", "json"),
            default="text",
            help="output format of plan and status",
        )
        sub.add_argument("--dev-root", default="/", help=argparse.SUPPRESS)
        sub.add_argument("--debug", action="store_true", help="debug logs, with tracebacks")
        config_flags.add_arguments(sub)
    codegen = commands.add_parser(
        "codegen", help="regenerate or check generated files", add_help=False
    )
    codegen.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "serve")
    try:
        args = build_parser().parse_args(args_list)
        if args.command == "codegen":
            return _codegen(args.args)
        logs.setup("text", logging.DEBUG if args.debug else logging.INFO)
        config = _config_source(args).load()
        logs.setup(config.log_format, logging.DEBUG if args.debug else logging.INFO)
        command: Callable[[argparse.Namespace, Config], int] = {
            "serve": _serve,
            "plan": _plan,
            "status": _status,
            "demo": _demo,
            "healthz": _healthz,
        }[args.command]
        return command(args, config)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except config_loader.ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except LayoutError as exc:
        for problem in exc.located(_config_source(args).origin):
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except NvmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:
        log.debug("unexpected failure", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _config_source(args: argparse.Namespace) -> ConfigSource:
    path = args.config or os.environ.get("KYB_CONFIG")
    overrides = config_flags.overrides_from(args, os.environ)
    node = args.node_name or os.environ.get("KYB_NODE_NAME") or None
    return ConfigSource(Path(path) if path else None, overrides, node)


def open_backend(mock: str | None, library: str | None = None) -> Backend:
    """The mock when asked for, else real NVML through pynvml (from ``library`` if given)."""
    if mock:
        from pkg.deviceplugin.nvml import mock as mock_backend

        return mock_backend.MockBackend.from_name_or_path(mock)
    from pkg.deviceplugin.nvml import real

    try:
        pynvml = importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlError(f"pynvml (nvidia-ml-py) is not installed: {exc}") from exc
    if library:
        from pkg.deviceplugin.nvml import mocklib

        try:
            mocklib.install(pynvml, Path(library))
        except OSError as exc:
            raise NvmlError(f"cannot load NVML library {library}: {exc}") from exc
    from pkg.deviceplugin.nvml import smi

    return real.RealBackend(pynvml, smi_links=smi.run_topo_matrix)


def _mock_choice(args: argparse.Namespace) -> str | None:
    value = args.nvml_mock or os.environ.get("KYB_NVML_MOCK")
    return str(value) if value else None


def _discover(args: argparse.Namespace) -> tuple[Backend, Topology]:
    """The chosen backend and its first discovery; a node without a GPU is one line."""
    mock = _mock_choice(args)
    backend = open_backend(mock, args.nvml_library or os.environ.get("KYB_NVML_LIBRARY"))
    try:
        return backend, backend.discover()
    except NvmlError as exc:
        backend.close()
        if mock is not None:
            raise
        from pkg.deviceplugin.nvml import fixtures

        raise NvmlError(
            f"no usable NVIDIA GPU: {exc}; for a node without GPUs pass --nvml-mock "
            f"with a topology file or one of: {', '.join(fixtures.FIXTURES)}"
        ) from exc


def _cap_malloc_arenas() -> None:
    """At most two glibc malloc arenas, unless ``MALLOC_ARENA_MAX`` says otherwise.

    glibc gives each thread that allocates an arena of its own (up to eight per core)
    and keeps there what that thread freed: the gRPC worker threads would hold a few MB
    that way (bench/README.md). The GIL runs Python one thread at a time, so two arenas
    cost no contention worth measuring. A no-op where the C library is not glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, 2)


def _serve(args: argparse.Namespace, config: Config) -> int:
    from pkg.deviceplugin.runtime import Runtime

    _cap_malloc_arenas()
    backend, topology = _discover(args)
    runtime = Runtime(
        config,
        backend,
        topology=topology,
        source=_config_source(args),
        dev_root=Path(args.dev_root),
    )
    signals = _SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    runtime.start()
    # What start-up built (config models, topology, layout, board, gRPC objects) lives
    # as long as the process: frozen out of the collector's generations it is never
    # traversed again, so a full collection stays short on the Allocate path.
    gc.collect()
    gc.freeze()
    log.info(
        "kyb-device-plugin serving %s from %s",
        ", ".join(runtime.manager.resources),
        config.kubelet_dir,
    )
    while True:
        received = signals.wait()
        if received == signal.SIGHUP:
            log.info("received SIGHUP; reloading the config")
            runtime.request_reload()
        else:
            log.info("received %s; stopping", received.name)
            break
    signals.close()
    runtime.stop()
    return EXIT_OK


class _SignalPipe:
    """The signals the main thread acts on, read from a pipe (``signal.set_wakeup_fd``).

    CPython runs a signal's Python handler only in the main thread, once it is back in
    the interpreter: one that waited on a lock could sleep through a signal the C
    handler caught just before the wait (nothing woke it), and a handler that logs can
    interrupt the main thread inside logging. Here the handlers do nothing; the C
    handler writes each signal's number to the pipe, and the main thread blocks on
    reading it, so no signal is missed or handled late.
    """

    def __init__(self, signums: Sequence[signal.Signals]) -> None:
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._pending: list[signal.Signals] = []
        for signum in signums:
            signal.signal(signum, _noted)
        self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def wait(self) -> signal.Signals:
        """The next signal received, in order."""
        while not self._pending:
            self._pending.extend(signal.Signals(b) for b in os.read(self._read, 64))
        return self._pending.pop(0)

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)


def _noted(_signum: int, _frame: object) -> None:
    """A signal's Python handler: nothing to do (its number is in the wakeup pipe)."""


def _plan(args: argparse.Namespace, config: Config) -> int:
    backend, topology = _discover(args)
    backend.close()
    doc = report.plan_document(config, topology)
    _emit(args.output, doc, lambda out: report.print_plan(doc, topology, out))
    return EXIT_OK


def _status(args: argparse.Namespace, config: Config) -> int:
    from pkg.deviceplugin.allocator.store import StateStore

    path = StateStore(config.state_dir).path
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(
            f"error: no state file at {path}; is the plugin running with --state-dir "
            f"{config.state_dir}?",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    shown = report.status_view(doc)
    _emit(args.output, shown, lambda out: report.print_seat_map(shown, out))
    return EXIT_OK


def _demo(args: argparse.Namespace, config: Config) -> int:
    from pkg.deviceplugin import demo

    return demo.run(config, _mock_choice(args) or demo.DEFAULT_TOPOLOGY, sys.stdout)


def _healthz(args: argparse.Namespace, config: Config) -> int:
    from pkg.deviceplugin.server import liveness

    problems = liveness.check(config.kubelet_dir, config.resources)
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return EXIT_FAILURE if problems else EXIT_OK


def _codegen(rest: Sequence[str]) -> int:
    try:
        codegen_main = importlib.import_module("codegen.__main__")
    except ImportError:
        print(
            "error: codegen needs a source checkout; run it from the repository root",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return int(codegen_main.main(list(rest)))


def _emit(output: str, doc: Mapping[str, object], text: Callable[[TextIO], None]) -> None:
    if output == "json":
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        text(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
