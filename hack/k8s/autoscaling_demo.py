"""`make autoscaling-demo`: the queue-depth autoscaling loop on a local control plane, for a human.

Starts the control plane (controlplane.py), Prometheus + prometheus-adapter (metrics_stack.py, the chart's
rule), the operator, an autoscaled InferenceModel (1..3 replicas, SmolLM2) with real engines behind its
kwok pods (engine_harness.py), then drives load, prints one line a second (replicas, queue depth per
pod, tok/s, what the HPA saw), stops the load, waits for the scale-down and writes
.kube/autoscaling-demo.json and .kube/autoscaling-demo.png. Everything it started stops at the end.

    python hack/k8s/autoscaling_demo.py [--load-seconds 120] [--concurrency 12] [--max-replicas 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane import REPO, ControlPlane, build_binaries, free_port
from engine_harness import EngineHarness
from loadgen import LoadGenerator
from metrics_stack import MetricsStack, build_metrics_binaries
from timeline import Timeline, plot

OUT = REPO / ".kube"


def line(sample: dict) -> str:
    if "error" in sample:
        return f"{sample['t']:6.1f}s  ({sample['error']})"
    queue = " ".join(f"{pod.rsplit('-', 1)[-1]}={int(v)}" for pod, v in sorted(sample["queue_by_pod"].items()))
    return (f"{sample['t']:6.1f}s  load={sample['load_workers']:2d}  replicas={sample['replicas']} "
            f"ready={sample['ready_replicas']}  hpa: metric={sample['hpa_metric']} desired={sample['hpa_desired']}  "
            f"tok/s={sample['tok_s']:6.1f}  queue[{queue}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-seconds", type=float, default=120)
    parser.add_argument("--concurrency", type=int, default=12,
                        help="closed-loop clients (12 keep 3 engines of 2 decode slots at the target queue)")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target", type=int, default=2, help="targetQueueDepth (waiting requests per pod)")
    args = parser.parse_args()

    from kubernetes import config
    from kubernetes.dynamic import DynamicClient

    build_binaries()
    build_metrics_binaries("prometheus", "prometheus-adapter")
    state = Path(tempfile.mkdtemp(prefix="kubeinfer-demo-"))
    plane = ControlPlane(state / "cp", die_with_parent=True)
    stack = MetricsStack(plane, state / "metrics")
    operator = harness = load = timeline = None
    try:
        print("starting the control plane ...", file=sys.stderr)
        plane.start(sorted((REPO / "crds").glob("*.yaml")))
        stack.start_prometheus()
        stack.start_prometheus_adapter()
        operator_log = open(state / "operator.log", "wb")  # noqa: SIM115
        operator = subprocess.Popen(
            [sys.executable, "-m", "kubeinfer.cli", "operator"], cwd=state, stdout=operator_log,
            stderr=subprocess.STDOUT, env={**os.environ, "KUBECONFIG": str(plane.kubeconfig),
                                           "KUBEINFER_LOG_FORMAT": "text", "KUBEINFER_LEADER_ELECTION": "false",
                                           "KUBEINFER_LIVENESS_PORT": str(free_port()),
                                           "KUBEINFER_RESYNC_SECONDS": "5"})
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        dynamic = DynamicClient(api)

        def get(api_version: str, kind: str, namespace: str, name: str):
            try:
                return dynamic.resources.get(api_version=api_version, kind=kind).get(
                    name=name, namespace=namespace).to_dict()
            except Exception:
                return None

        model = {"apiVersion": "kubeinfer.dev/v1alpha1", "kind": "InferenceModel",
                 "metadata": {"name": "demo", "namespace": "default"},
                 "spec": {"model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "servedName": "smol"},
                          "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": args.max_replicas,
                                          "targetQueueDepth": args.target,
                                          "scaleDown": {"stabilizationWindowSeconds": 30,
                                                        "podsPerPeriod": args.max_replicas, "periodSeconds": 5}}}}
        plane.kubectl("apply", "-f", "-", stdin=__import__("json").dumps(model))
        harness = EngineHarness(api, "default", "app.kubernetes.io/component=engine,kubeinfer.dev/model=demo",
                                "smol", stack.sd_file, state / "engines").start()
        load = LoadGenerator(harness.ready_urls, "smol", concurrency=args.concurrency, max_tokens=48)
        timeline = Timeline(get, stack.query, "default", "demo", "demo", load,
                            on_sample=lambda s: print(line(s), flush=True)).start()
        print("waiting for the first engine ...", file=sys.stderr)
        while not harness.ready_urls():
            time.sleep(1)
        print(f"load: {args.concurrency} workers for {args.load_seconds:.0f} s", file=sys.stderr)
        load.start()
        time.sleep(args.load_seconds)
        load.stop(wait=120)
        print("load stopped; waiting for the scale-down to 1 ...", file=sys.stderr)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            deployment = get("apps/v1", "Deployment", "default", "demo") or {}
            if (deployment.get("spec") or {}).get("replicas") == 1:
                break
            time.sleep(1)
        time.sleep(3)
    finally:
        for part in (timeline, load, harness):
            if part is not None:
                part.stop()
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        stack.stop()
        plane.stop()
    if timeline is not None:
        print(f"timeline: {timeline.write(OUT / 'autoscaling-demo.json')}")
        print(f"plot:     {plot(timeline.samples, OUT / 'autoscaling-demo.png', 'kubeinfer: HPA on queue depth')}")
    print(f"logs: {state}")


if __name__ == "__main__":
    main()
