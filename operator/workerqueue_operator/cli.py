"""`workerqueue-operator run | dev | crds`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path

import pydantic


def cmd_run(args: argparse.Namespace) -> int:
    from workerqueue_operator import runner
    from workerqueue_operator.k8s import client as client_
    from workerqueue_operator.models.settings import Settings, SettingsError, problems

    overrides = {"http_port": args.port} if args.port is not None else {}
    try:
        settings = Settings.load(**overrides)
    except pydantic.ValidationError as exc:
        for line in problems(exc):
            print(line, file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    runner.configure_logging(args.verbose)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's own login reads it too
    unknown = Settings.unknown_env()
    if unknown:  # names only: a value may be a secret
        logging.getLogger(__name__).warning("environment variables ignored, no such setting: %s", ", ".join(unknown))
    for doubt in settings.doubts(in_cluster="KUBERNETES_SERVICE_HOST" in os.environ):
        logging.getLogger(__name__).warning("settings: %s", doubt)
    # Replicas need distinct priorities for kopf peering to pick one: a random one unless given.
    priority = args.priority if args.priority is not None else secrets.randbelow(1_000_000)
    try:
        asyncio.run(runner.run(settings, kubeconfig=args.kubeconfig, peering=args.peering, priority=priority))
    except (client_.ConfigurationError, runner.StartupError) as exc:
        logging.getLogger(__name__).error("cannot start: %s", exc, extra={"kind": "cannot_start"})
        return 1
    except runner.HandlersStopped as exc:
        logging.getLogger(__name__).error("stopped: its handlers (kopf) gave up: %s", exc,
                                            extra={"kind": "handlers_stopped"})
        return 1
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from workerqueue_operator.devcluster import dev

    return dev.main(state_dir=Path(args.state_dir) if args.state_dir else None, port=args.port,
                    verbose=args.verbose)


def cmd_crds(args: argparse.Namespace) -> int:
    from workerqueue_operator.models import crd

    if args.values_schema:
        from workerqueue_operator.models import values_schema

        path = Path(args.values_schema)
        path.write_text(values_schema.render(path.read_text()))
        return 0
    text = crd.render_chart_template() if args.chart else crd.render_crd_yaml()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workerqueue-operator", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator against the current kubeconfig or in-cluster config")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG, ~/.kube/config)")
    run.add_argument("--port", type=int, help="HTTP API port (default: WQ_HTTP_PORT or 8080)")
    run.add_argument("--peering", metavar="NAME",
                     help="coordinate replicas through this kopf peering object (needs the peering CRDs)")
    run.add_argument("--priority", type=int, help="kopf peering priority (default: random)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    dev = sub.add_parser("dev", help="a local control plane with the operator on it, until Ctrl-C")
    dev.add_argument("--state-dir", help="where the control plane keeps its state and kubeconfig "
                     "(default: a temporary folder, removed after a clean stop)")
    dev.add_argument("--port", type=int, help="HTTP API port on 127.0.0.1 (default: a free one, printed)")
    dev.add_argument("-v", "--verbose", action="store_true")
    dev.set_defaults(func=cmd_dev)

    crds = sub.add_parser("crds", help="print (or write) the CRD generated from the models")
    crds.add_argument("-o", "--output", help="file to write instead of stdout")
    crds.add_argument("--chart", action="store_true", help="as the Helm chart's template")
    crds.add_argument("--values-schema", metavar="FILE",
                      help="instead, rewrite the values.schema.json FILE with its extraConfig from the settings")
    crds.set_defaults(func=cmd_crds)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.captureWarnings(True)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
