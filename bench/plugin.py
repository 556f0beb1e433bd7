"""``python -m bench.plugin WORKERS serve ...``: the plugin with another gRPC pool size.

The benchmark's ``--server-workers N`` starts the plugin through this module, which sets
``pkg.deviceplugin.server.manager.SERVER_WORKERS`` before serving, to measure what a
smaller pool saves in memory and costs in latency without changing the plugin.
"""

from __future__ import annotations

import sys

# The CLI first: it sets the environment grpc reads when it is first imported.
from pkg.deviceplugin import cli
from pkg.deviceplugin.server import manager


def main(argv: list[str]) -> int:
    manager.SERVER_WORKERS = int(argv[0])
    return cli.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
