"""The client API, declared once for both clients.

Theory of operation: every method ``Client`` and ``AsyncClient`` share is
declared here, once, by its builder: a function of the method's own
arguments that describes what the method does and does no I/O, a ``Call``
(one request, ``clientlib._calls``), a ``LockBlock`` or a ``Computation``
(``clientlib._flows``). ``ClientAPI`` holds those declarations; both clients
derive from it and supply the I/O, one runner per kind:

- ``_run(call)``: send one request, wait for its answer;
- ``_hold(block)``: a context manager around the caller's block;
- ``_compute(computation)``: the single-flight dance around ``fn``.

A declaration becomes a real method of each client the first time it is
looked up there: a function on ``Client``, a coroutine function on
``AsyncClient`` (whose ``_run`` and ``_compute`` are coroutine functions;
its ``_hold`` gives an async context manager). So a method's parameters,
defaults, docstring and result conversion are written once, the two clients
cannot drift apart, and type checkers see each client's own result types
(the ``__get__`` overloads).
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar, overload

from . import _calls, _flows
from ._calls import Call
from ._flows import Computation, LockBlock
from ._paths import resolve_socket_path
from ._types import LockResult
from .protocol import DEFAULT_MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from ._async import AsyncClient
    from ._sync import Client

__all__ = ["ClientAPI"]

P = ParamSpec("P")
T = TypeVar("T")
B = TypeVar("B")


class _Declared(Generic[P, B]):
    """A method of both clients, declared by its builder; a subclass per kind."""

    #: The client's method that does this kind's I/O.
    _runner: ClassVar[str]

    def __init__(self, build: Callable[P, B]) -> None:
        self._build = build
        self._name = build.__name__
        self._made: dict[type, Callable[..., Any]] = {}  # per client class

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def _bind(self, client: object | None, owner: type) -> Any:
        """The method of ``owner`` this declares, bound to ``client`` if given."""
        method = self._made.get(owner)
        if method is None:
            runner = getattr(owner, self._runner, None)
            if runner is None:  # looked up on ClientAPI itself: nothing runs it
                return self
            method = self._made[owner] = self._make(owner, inspect.iscoroutinefunction(runner))
        return method if client is None else types.MethodType(method, client)

    def _make(self, owner: type, asynchronous: bool) -> Callable[..., Any]:
        build, runner = self._build, self._runner
        method: Callable[..., Any]
        if asynchronous:

            async def method(client: Any, /, *args: Any, **kwargs: Any) -> Any:
                return await getattr(client, runner)(build(*args, **kwargs))
        else:

            def method(client: Any, /, *args: Any, **kwargs: Any) -> Any:
                return getattr(client, runner)(build(*args, **kwargs))

        method.__name__ = self._name
        method.__qualname__ = f"{owner.__qualname__}.{self._name}"
        method.__module__ = owner.__module__
        method.__doc__ = build.__doc__
        method.__signature__ = _with_self(inspect.signature(build))  # type: ignore[union-attr]
        return method


def _with_self(signature: inspect.Signature) -> inspect.Signature:
    """A builder's signature as its method's: ``self`` first, the result unsaid.

    What ``help()`` and ``inspect.signature`` show, on the class and (without
    ``self``) on an instance.
    """
    parameters = list(signature.parameters.values())
    kinds = {parameter.kind for parameter in parameters}
    positional_only = inspect.Parameter.POSITIONAL_ONLY in kinds  # e.g. call(method, /, ...)
    kind = (
        inspect.Parameter.POSITIONAL_ONLY
        if positional_only
        else inspect.Parameter.POSITIONAL_OR_KEYWORD
    )
    itself = inspect.Parameter("self", kind)
    return signature.replace(
        parameters=[itself, *parameters], return_annotation=inspect.Signature.empty
    )


class _Method(_Declared[P, Call[T]]):
    """One request: ``Client`` returns the result, ``AsyncClient`` awaits it."""

    _runner = "_run"

    @overload
    def __get__(self, client: None, owner: type) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: object | None, owner: type) -> Any:
        return self._bind(client, owner)


class _Block(_Declared[P, LockBlock]):
    """A lock held for a block: a context manager, an async one on ``AsyncClient``."""

    _runner = "_hold"

    @overload
    def __get__(self, client: None, owner: type) -> Callable[..., Any]: ...
    @overload
    def __get__(
        self, client: Client, owner: type
    ) -> Callable[P, AbstractContextManager[LockResult]]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type
    ) -> Callable[P, AbstractAsyncContextManager[LockResult]]: ...
    def __get__(self, client: object | None, owner: type) -> Any:
        return self._bind(client, owner)


class _Computed(_Declared[P, Computation]):
    """A single-flight computation: its value, awaited on ``AsyncClient``."""

    _runner = "_compute"

    @overload
    def __get__(self, client: None, owner: type) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, Any]: ...
    @overload
    def __get__(
        self, client: AsyncClient, owner: type
    ) -> Callable[P, Coroutine[Any, Any, Any]]: ...
    def __get__(self, client: object | None, owner: type) -> Any:
        return self._bind(client, owner)


class ClientAPI:
    """What ``Client`` and ``AsyncClient`` share: the socket path, the timeout,
    and every method of DESIGN section 3.4 under the seed's names.

    ``path``: the daemon's socket (default: ``resolve_socket_path``);
    ``timeout``: seconds each call may take (a blocking acquire or a cache
    lease adds its ``wait``); ``max_message_bytes``: the largest answer taken.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        timeout: float = 5.0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.path = resolve_socket_path(path)
        self.timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._prepare()

    def _prepare(self) -> None:
        """Set up the client's own state (its I/O); the last step of ``__init__``."""

    call = _Method(_calls.call)
    ping = _Method(_calls.ping)
    health = _Method(_calls.health)
    metrics = _Method(_calls.metrics)
    set_session = _Method(_calls.set_session)
    get_session = _Method(_calls.get_session)
    delete_session = _Method(_calls.delete_session)
    touch_session = _Method(_calls.touch_session)
    cache_api_response = _Method(_calls.cache_api_response)
    get_cached_api_response = _Method(_calls.get_cached_api_response)
    delete_cached_api_response = _Method(_calls.delete_cached_api_response)
    get_or_compute = _Computed(_flows.computation)
    start_workflow_tracking = _Method(_calls.start_workflow_tracking)
    update_workflow_progress = _Method(_calls.update_workflow_progress)
    complete_workflow_tracking = _Method(_calls.complete_workflow_tracking)
    fetch_workflow_state = _Method(_calls.fetch_workflow_state)
    active_workflows = _Method(_calls.active_workflows)
    active_workflows_detailed = _Method(_calls.active_workflows_detailed)
    workflow_stats = _Method(_calls.workflow_stats)
    workflow_events = _Method(_calls.workflow_events)
    cleanup_workflows = _Method(_calls.cleanup_workflows)
    acquire_lock = _Method(_calls.acquire_lock)
    lock_workflow_execution = _Method(_calls.lock_workflow_execution)
    unlock_workflow_execution = _Method(_calls.unlock_workflow_execution)
    extend_workflow_lock = _Method(_calls.extend_workflow_lock)
    is_workflow_locked = _Method(_calls.is_workflow_locked)
    execute_with_lock = _Block(_flows.lock_block)
