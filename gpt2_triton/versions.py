"""The torch and triton releases this package is tested with (CI, the static profile, the GPU machine).

The Triton kernels refuse a triton outside TESTED when they are imported, in one line naming the range, rather
than failing at a first launch deep in training; the torch kernels need only torch and never import triton.
"""
from importlib import metadata

# package -> (oldest, newest) tested minor release, inclusive
TESTED = {"torch": ((2, 11), (2, 14)), "triton": ((3, 6), (3, 9))}


def _minor(version: str) -> tuple:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def _span(package: str) -> str:
    (lo, hi) = TESTED[package]
    return f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"


def problem(package: str, version: str | None = None) -> str | None:
    """Why `package` (installed, or at `version`) is not usable here, or None."""
    if version is None:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            return f"{package} is not installed (tested: {_span(package)})"
    lo, hi = TESTED[package]
    try:
        minor = _minor(version)
    except ValueError:
        return None  # a source build without a release number: trust it
    if lo <= minor <= hi:
        return None
    return (f"gpt2_triton: {package} {version} is not a tested release ({_span(package)}); "
            f"install one, e.g. pip install '{package}>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}'")


def require(package: str) -> None:
    """Raise ImportError in one line when `package` is outside the tested range."""
    message = problem(package)
    if message is not None:
        raise ImportError(message)
