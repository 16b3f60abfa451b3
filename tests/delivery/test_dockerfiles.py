"""Our Dockerfiles, checked without a Docker engine: pinned multi-stage bases, non-root, no HEALTHCHECK."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.delivery.dockerfile_lint import base_images, copy_sources, final_stage, parse, problems
from tests.delivery.tools import REPO

DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def test_the_three_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["engine-cpu.Dockerfile", "engine-cuda.Dockerfile", "operator.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_follows_the_rules(dockerfile: Path) -> None:
    assert problems(dockerfile) == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_not_dockerignored(dockerfile: Path) -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for source in copy_sources(parse(dockerfile.read_text())):
        assert (REPO / source).exists(), source
        assert source.rstrip("/") not in ignored, f"{source} is excluded by .dockerignore"


def test_build_context_leaves_out_the_heavy_and_the_private() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "tests", "e2e"):
        assert path in ignored


def test_engine_images_run_the_server_with_a_cache_volume() -> None:
    from kubeinfer.operator.render.deployment import CACHE_MOUNT, RUN_AS

    for name in ("engine-cuda", "engine-cpu"):
        final = final_stage(parse((REPO / "docker" / f"{name}.Dockerfile").read_text()))
        keywords = {ins.keyword: ins.value for ins in final}
        assert keywords["ENTRYPOINT"] == '["kubeinfer", "serve"]'
        assert keywords["VOLUME"] == f'["{CACHE_MOUNT}"]', "the operator mounts the model cache there"
        assert keywords["USER"] == f"{RUN_AS}:{RUN_AS}", "the operator's pods run as the image's uid"
    cuda = base_images(parse((REPO / "docker" / "engine-cuda.Dockerfile").read_text()))
    assert all(image.startswith("nvidia/cuda:") and "runtime" in image for image in cuda)


def test_cpu_engine_image_can_build_the_cpu_kernels() -> None:
    """The C++ CPU kernels compile on the node at first start: the runtime stage needs a compiler."""
    final = final_stage(parse((REPO / "docker" / "engine-cpu.Dockerfile").read_text()))
    assert any(ins.keyword == "RUN" and "g++" in ins.value for ins in final)


def test_operator_image_has_no_torch() -> None:
    text = (REPO / "docker" / "operator.Dockerfile").read_text()
    assert ".[operator]" in text and "torch" not in text.replace("no torch", "")
    assert parse(text)[-1].value == '["kubeinfer", "operator"]'


BROKEN = """
FROM python:latest
RUN pip install torch
HEALTHCHECK CMD curl -f http://localhost/health
ADD https://example.com/x.tar.gz /x
RUN apt-get update && apt-get install -y curl
"""


def test_the_linter_catches_each_mistake(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(BROKEN)
    found = "\n".join(problems(path))
    for expected in ("not multi-stage", "not pinned: python:latest", "HEALTHCHECK", "runs as root",
                     "ADD of a URL", "--no-cache-dir", "lists in the layer", "--no-install-recommends"):
        assert expected in found


def test_parser_joins_continuations_and_resolves_args() -> None:
    instructions = parse("ARG BASE=python:3.11-slim\nFROM ${BASE} AS b\nRUN a \\\n  # note\n  && b\nFROM b\nUSER 0\n")
    assert [i.keyword for i in instructions] == ["ARG", "FROM", "RUN", "FROM", "USER"]
    assert instructions[2].value == "a && b"
    assert base_images(instructions) == ["python:3.11-slim", "python:3.11-slim"]


def test_images_script_says_why_it_cannot_build(tmp_path: Path) -> None:
    """`make images` without Docker: a clear message and a failing exit code, nothing built."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "head", "dirname"):
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    script = str(REPO / "hack" / "images.sh")
    no_cli = subprocess.run(["bash", script], env={**os.environ, "PATH": str(bin_dir)}, capture_output=True,
                            text=True, timeout=30)
    assert no_cli.returncode == 1 and "docker CLI is not installed" in no_cli.stderr
    (bin_dir / "docker").write_text("#!/bin/sh\necho \"$@\" >> \"$0.calls\"\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    no_engine = subprocess.run(["bash", script], env={**os.environ, "PATH": str(bin_dir)}, capture_output=True,
                               text=True, timeout=30)
    assert no_engine.returncode == 1 and "no Docker engine is reachable" in no_engine.stderr
    assert (bin_dir / "docker.calls").read_text().split() == ["info"], "no build is attempted"


def test_images_script_builds_each_image_with_its_dockerfile(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "docker"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "hack" / "images.sh")], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TAG": "t"})
    assert result.returncode == 0, result.stderr
    builds = [line for line in calls.read_text().splitlines() if line.startswith("build")]
    assert builds == [
        "build --file docker/engine-cuda.Dockerfile --tag ghcr.io/kubeinfer/engine:t .",
        "build --file docker/engine-cpu.Dockerfile --tag ghcr.io/kubeinfer/engine:t-cpu .",
        "build --file docker/operator.Dockerfile --tag ghcr.io/kubeinfer/operator:t .",
    ]


ENGINE_ONLY = ("torch", "triton", "transformers", "tokenizers", "safetensors", "gguf", "fastapi", "uvicorn",
               "prometheus_client", "numpy", "jinja2", "huggingface_hub")
BLOCK_ENGINE_PACKAGES = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ENGINE_ONLY!r}:
            raise ImportError(f"{{name}} is not in the operator image")
sys.meta_path.insert(0, Block())
from kubeinfer.cli import main
sys.exit(main(["operator", "--print-settings"]))
"""


def test_operator_image_dependencies_are_enough_to_start_the_operator() -> None:
    """`kubeinfer operator` imports nothing of the engine extra (the image installs .[operator] only)."""
    result = subprocess.run([sys.executable, "-c", BLOCK_ENGINE_PACKAGES], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "KUBEINFER_ENGINE_IMAGE": "x/engine:1"})
    assert result.returncode == 0, result.stderr
    assert '"engine_image": "x/engine:1"' in result.stdout
