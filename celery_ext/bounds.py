"""Producer-side queue bounds (work in progress for issue 3).

Example::

    setup(app, settings)   # called by celery_ext.install(app)
"""

from __future__ import annotations

from celery import Celery

from ._settings import Settings

__all__ = ["setup"]


def setup(app: Celery, settings: Settings) -> None:
    """Wire producer-side queue bounds into ``app`` (nothing yet).

    Example::

        setup(app, settings_of(app))
    """
