"""Package list for setuptools: `engine/` and `operator/` become `kubeinfer.engine` and
`kubeinfer.operator` (package-dir in pyproject.toml); never a top-level `operator` module."""

from setuptools import find_packages, setup


def packages_under(prefix: str, folder: str) -> list[str]:
    return [prefix, *(f"{prefix}.{name}" for name in find_packages(folder))]


setup(
    packages=[
        "kubeinfer",
        *packages_under("kubeinfer.engine", "engine"),
        *packages_under("kubeinfer.operator", "operator"),
    ]
)
