"""How the federation reaches its clients: submit a call, wait for results within a deadline.

The round logic (:mod:`.rounds`) only sees this interface. :class:`InProcess` runs every call at
once in this process, on plain :class:`~fednano_ray.actors.client.ClientActor` objects, which is how
the round logic is unit-tested without Ray; the coordinator actor uses a Ray transport
(:class:`fednano_ray.actors.coordinator.RayTransport`) over actor handles and the object store.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["CallFailed", "InProcess", "Transport"]


class CallFailed(Exception):
    """A call that produced no result.

    Attributes:
        reason: one line a person can act on (``RayActorError: ...``, ``ValueError: ...``).
        timeout: True when the result did not come in time (retrying will not help).
    """

    def __init__(self, reason: str, *, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout


class Transport(Protocol):
    """The four things a round needs from the system that hosts the clients."""

    def put(self, value: Any) -> Any:
        """A shared reference to ``value`` to pass to many calls (Ray: the object store)."""

    def submit(self, actor: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``actor.method(*args, **kwargs)``; returns a pending call."""

    def wait(self, pending: Sequence[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        """At least one finished call of ``pending`` (or none after ``timeout`` s) and the rest."""

    def get(self, call: Any, timeout: float) -> Any:
        """The result of a finished call; raises :class:`CallFailed`."""

    def restart(self, actor: Any) -> None:
        """Restart an actor that is stuck (its queued calls are dropped)."""


@dataclass(eq=False)  # hashed by identity: rounds key their pending calls by them, as by Ray refs
class _Done:
    value: Any = None
    error: BaseException | None = None


@dataclass
class InProcess:
    """Every call runs to completion when submitted, in this process.

    Arguments and results are deep-copied, as Ray serialises them, so a client can never alias the
    coordinator's state. ``calls`` logs ``(method, args)`` of every call, for tests.
    """

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def put(self, value: Any) -> Any:
        return value

    def submit(self, actor: Any, method: str, *args: Any, **kwargs: Any) -> _Done:
        self.calls.append((method, args))
        args, kwargs = copy.deepcopy((args, kwargs))
        try:
            return _Done(value=copy.deepcopy(getattr(actor, method)(*args, **kwargs)))
        except Exception as e:  # noqa: BLE001 - a client's failure is data for the round, as over Ray
            return _Done(error=e)

    def wait(self, pending: Sequence[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        del timeout
        return list(pending[:1]), list(pending[1:])

    def get(self, call: _Done, timeout: float) -> Any:
        del timeout
        if call.error is not None:
            raise CallFailed(
                f"{type(call.error).__name__}: "
                f"{str(call.error).splitlines()[0][:300] if str(call.error) else ''}"
            )
        return call.value

    def restart(self, actor: Any) -> None:
        del actor  # nothing can be stuck: every call has already finished
