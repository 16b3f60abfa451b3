"""A small Dockerfile parser and the rules our images follow (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions with line continuations joined; comments and parser directives dropped."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1].rstrip() + " "
            continue
        buffer += line
        keyword, _, value = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        buffer = ""
    if buffer:
        raise ValueError(f"line {start}: continuation runs past the end of the file")
    return instructions


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """Defaults of ARGs declared before the first FROM (the ones FROM lines may use)."""
    args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG" and "=" in instruction.value:
            name, default = instruction.value.split("=", 1)
            args[name] = default
    return args


def base_images(instructions: list[Instruction]) -> list[str]:
    """Each FROM's image with global ARGs substituted; stage aliases resolved to their image."""
    args, stages, images = build_args(instructions), {}, []
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        words = [w for w in instruction.value.split() if not w.startswith("--")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
        image = stages.get(image, image)
        if len(words) >= 3 and words[1].upper() == "AS":
            stages[words[2]] = image
        images.append(image)
    return images


def is_pinned(image: str) -> bool:
    """A digest, or an explicit tag that is not `latest` and names a version (has a digit)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def final_user(instructions: list[Instruction]) -> str | None:
    users = [ins.value for ins in final_stage(instructions) if ins.keyword == "USER"]
    return users[-1] if users else None


def is_non_root(user: str | None) -> bool:
    if not user:
        return False
    name = user.split(":")[0]
    return name not in ("root", "0")


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """Paths that COPY takes from the build context (not from another stage)."""
    sources: list[str] = []
    for instruction in instructions:
        if instruction.keyword != "COPY" or "--from=" in instruction.value:
            continue
        words = [w for w in shlex.split(instruction.value) if not w.startswith("--")]
        sources += words[:-1]
    return sources


def problems(path: Path) -> list[str]:
    """Every rule our Dockerfiles break, as readable messages (empty: clean)."""
    instructions = parse(path.read_text())
    found: list[str] = []
    images = base_images(instructions)
    if len(images) < 2:
        found.append("not multi-stage (one FROM)")
    found += [f"base image not pinned: {image}" for image in images if not is_pinned(image)]
    found += [f"line {ins.line}: HEALTHCHECK (Kubernetes probes do that)" for ins in instructions
              if ins.keyword == "HEALTHCHECK"]
    if not is_non_root(final_user(instructions)):
        found.append(f"final stage runs as root (USER {final_user(instructions)})")
    for ins in instructions:
        if ins.keyword == "ADD" and re.search(r"https?://", ins.value):
            found.append(f"line {ins.line}: ADD of a URL (use a RUN that checks what it downloads)")
        if ins.keyword == "RUN" and "pip install" in ins.value and "--no-cache-dir" not in ins.value:
            found.append(f"line {ins.line}: pip install without --no-cache-dir")
        if ins.keyword == "RUN" and "apt-get install" in ins.value and "rm -rf /var/lib/apt/lists" not in ins.value:
            found.append(f"line {ins.line}: apt-get install leaves its lists in the layer")
        if ins.keyword == "RUN" and "apt-get install" in ins.value and "--no-install-recommends" not in ins.value:
            found.append(f"line {ins.line}: apt-get install without --no-install-recommends")
    return found
