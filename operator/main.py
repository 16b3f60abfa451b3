"""`kubeinfer operator`: settings from the environment, leader election, then kopf."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import signal
import threading
from collections.abc import Iterator

import kopf
from kubeinfer.operator import handlers  # noqa: F401  (registers the kopf handlers)
from kubeinfer.operator.kube import Kube
from kubeinfer.operator.leader import LeaseElector
from kubeinfer.operator.reconcile import Reconciler
from kubeinfer.operator.settings import OperatorSettings

log = logging.getLogger("kubeinfer.operator")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kubeinfer operator",
        description="Reconcile InferenceModel resources. Settings come from KUBEINFER_* environment variables "
                    "(KUBEINFER_OPERATOR_NAMESPACES, KUBEINFER_ENGINE_IMAGE, KUBEINFER_QUEUE_METRIC_NAME, "
                    "KUBEINFER_LOG_FORMAT, KUBEINFER_LEADER_ELECTION, ...).")
    parser.add_argument("--print-settings", action="store_true", help="print the effective settings and exit")
    return parser.parse_args(argv)


def _configure_logging(settings: OperatorSettings) -> None:
    kopf.configure(log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL)
    logging.getLogger().setLevel(settings.log_level)
    logging.getLogger("kopf").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # no line per liveness probe
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # no "Handler succeeded" per watch event


@contextlib.contextmanager
def standby_liveness(port: int) -> Iterator[None]:
    if not port:
        yield
        return

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Healthz)
    threading.Thread(target=server.serve_forever, name="standby-liveness", daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    settings = OperatorSettings()
    if args.print_settings:
        print(settings.model_dump_json(indent=2))
        return 0
    _configure_logging(settings)
    try:
        kube = Kube()
    except Exception as error:  # unreachable API or bad credentials: say so plainly; the pod restarts
        log.error("cannot reach the Kubernetes API: %s", error)
        return 1
    stop, lost = threading.Event(), threading.Event()

    def on_lost() -> None:
        # kopf's own SIGTERM handling stops it cleanly. (A threading stop_flag would leave kopf's executor
        # thread waiting on it, so that asyncio's shutdown hangs after a plain SIGTERM.)
        lost.set()
        os.kill(os.getpid(), signal.SIGTERM)

    elector = None
    if settings.leader_election:
        elector = LeaseElector(kube, settings.lease_namespace, settings.lease_name, settings.identity,
                               settings.lease_duration_seconds)
        # A standby is healthy too: answer the liveness probe until kopf (and its own endpoint) takes over.
        with standby_liveness(settings.liveness_port):
            if not elector.wait_until_leader(settings.lease_renew_seconds / 2, stop):
                return 1
        threading.Thread(target=elector.keep_renewing, args=(settings.lease_renew_seconds, stop, on_lost),
                         name="lease-renewal", daemon=True).start()
    log.info("starting: %s, engine image %s, queue metric %s",
             "cluster-wide" if settings.clusterwide else f"namespaces {settings.namespaces}",
             settings.engine_image, settings.queue_metric_name)
    try:
        kopf.run(
            standalone=True,
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None,
            memo=kopf.Memo(reconciler=Reconciler(kube, settings), settings=settings),
        )
    finally:
        stop.set()
        if elector is not None and not lost.is_set():
            elector.release()
    return 1 if lost.is_set() else 0
