"""The Celery and kombu releases celery_ext is tested on, and a warning outside them.

tox runs the suite on each (``tox -e py310-celery57`` ... ``py313-celery57``); the
pins in ``pyproject.toml`` say the same. Celery 5.5 needs kombu < 5.6 and celery_ext
needs kombu 5.7 (its delay queues, Redis delivery); Celery 5.6 with kombu 5.7 fails
parts of the suite (``enqueue_many``, the local lane worker): both are left out.

Example::

    untested({"celery": "5.6.3", "kombu": "5.7.0"})   # ['celery 5.6.3']
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

__all__ = ["TESTED", "untested", "warn_if_untested"]

#: Package -> the (major, minor) releases the suite runs on, every patch release of them.
TESTED: Mapping[str, tuple[tuple[int, int], ...]] = {
    "celery": ((5, 7),),
    "kombu": ((5, 7),),
}


def _minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def untested(installed: Mapping[str, str]) -> list[str]:
    """``name version`` of each installed package outside :data:`TESTED`.

    Example::

        untested({"celery": "5.7.0", "kombu": "5.7.1"})   # []
    """
    return [
        f"{name} {version}"
        for name, version in installed.items()
        if name in TESTED and _minor(version) not in TESTED[name]
    ]


def warn_if_untested() -> None:
    """One ``RuntimeWarning`` (per place it is called from) when Celery or kombu is untested.

    Example::

        warn_if_untested()   # at install(app)
    """
    import celery
    import kombu

    outside = untested({"celery": celery.__version__, "kombu": kombu.__version__})
    if outside:
        tested = ", ".join(
            f"{name} " + " or ".join(f"{a}.{b}.x" for a, b in minors)
            for name, minors in TESTED.items()
        )
        warnings.warn(
            f"celery_ext is tested on {tested}; this process has {', '.join(outside)}: "
            "expect differences, and see the README's 'Supported versions'",
            RuntimeWarning,
            stacklevel=3,
        )
