"""celery_ext's steps on one worker consumer, in one typed place.

The consumer steps read each other: the drain asks the backpressure step for the ETA
messages it holds and stops the probes, the leases count what the backpressure step
holds, ``inspect stats`` reads them all. Each step registers itself here when it
starts, instead of setting its own attribute on Celery's consumer.

Example::

    state_of(worker.consumer).backpressure.ready_window
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backpressure import Backpressure
    from .intake import Intake
    from .leases import Leases
    from .probes import Probes
    from .shutdown import Drain

__all__ = ["ConsumerState", "state_of"]

_ATTRIBUTE = "celery_ext"


@dataclass
class ConsumerState:
    """The celery_ext steps running on one consumer (None: not installed, or not started).

    Example::

        state = state_of(consumer)
        state.drain.state if state.drain else "running"
    """

    backpressure: Backpressure | None = None
    leases: Leases | None = None
    intake: Intake | None = None
    drain: Drain | None = None
    probes: Probes | None = None
    #: Wraps a task's strategy as the backpressure step does (tasks registered late).
    wrap_strategy: Callable[[Any], Any] | None = None


def state_of(c: Any) -> ConsumerState:
    """The :class:`ConsumerState` of consumer ``c``, created on first use.

    Example::

        state_of(worker.consumer).leases
    """
    state = c.__dict__.get(_ATTRIBUTE)
    if not isinstance(state, ConsumerState):
        state = ConsumerState()
        setattr(c, _ATTRIBUTE, state)
    return state
