"""The bridge between a service's asyncio loop and the one thread that owns its engine.

The token server's llama context and the codec worker's torch model each belong to one
dedicated thread (their calls block for milliseconds and must never run on the event
loop). Both need the same things from the bridge, so they get it from here, once:

- a typed inbox: the loop posts commands (submit, frames, cancel, ...) under a lock,
  and the engine takes all of them at once at the top of each step, so a step sees a
  consistent picture and the lock is held for a list swap, not for a step;
- one batch of events per step: what a step produces for the loop (frames, audio,
  ends) is collected and handed over in one `call_soon_threadsafe`, one wake-up of the
  loop per step instead of one per event;
- no spinning: a step that found nothing it could do (every stream waits on its
  listener or on codec room) says how long until it might, and the bridge waits that
  long for a command, which ends the wait, instead of stepping again at once (vLLM's
  engine core waits on its input queue the same way);
- a lifecycle that tells the truth: once stopping or dead the bridge refuses new work
  at once (EngineStopped / EngineDead) instead of queueing requests that nothing will
  ever run, and a thread that dies reports it (health goes NOT_SERVING) and fails
  every request it held, inbox included, under the lock.

The engine supplies `step(commands)`, `has_work()`, `has_pending()` and
`fail_all(message, commands)`;
it knows nothing of asyncio, and the bridge knows nothing of what a step does.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from typing import Callable, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

Command = TypeVar("Command")


class EngineStopped(RuntimeError):
    """The engine is stopping or stopped: it takes no new work."""


class EngineDead(RuntimeError):
    """The engine's thread died: it takes no new work and never will."""


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DEAD = "dead"


class Engine(Protocol[Command]):
    def step(self, commands: list[Command]) -> float | None:
        """Applies the commands, then runs one step if there is work. Engine thread only.
        Returns None, or, when the step could do nothing though `has_work` said there was
        work, the seconds to wait for a command (or `wake`) before the next step."""

    def has_work(self) -> bool:
        """Whether a step would do anything without new commands. Engine thread only."""

    def has_pending(self) -> bool:
        """Whether work waits on something the engine polls (capacity). Engine thread only."""

    def fail_all(self, message: str, commands: list[Command]) -> None:
        """Ends every request the engine holds, and those in `commands` (which a dying
        step may or may not have applied: fail each request once)."""


class EventBatch:
    """What one step hands to the event loops: (callback, event) pairs, delivered in
    order, one hand-over per loop per step (a service has one loop; tests may run
    several `asyncio.run`s against one engine)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[object], None], object]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[object], None], event: object) -> None:
        self._items.setdefault(loop, []).append((deliver, event))

    def take(self) -> dict[asyncio.AbstractEventLoop, list[tuple[Callable[[object], None], object]]]:
        items, self._items = self._items, {}
        return items


def _deliver_all(items: list[tuple[Callable[[object], None], object]]) -> None:
    for deliver, event in items:
        try:
            deliver(event)
        except Exception:  # one listener's bug must not drop the others' events
            log.exception("delivering an engine event failed")


class EngineThread(Generic[Command]):
    """Runs an engine's steps on a dedicated thread, fed by `post` from the event loop."""

    def __init__(self, name: str, engine: Engine[Command], idle_poll_s: float | None = None) -> None:
        self.name = name
        self._engine = engine
        # With work the engine cannot start yet (requests waiting for capacity), look
        # again this often; None sleeps until a command or `wake`.
        self._idle_poll_s = idle_poll_s
        self._cond = threading.Condition()
        self._inbox: list[Command] = []
        self._state = State.NEW
        self._thread: threading.Thread | None = None
        self.events = EventBatch()  # filled by the engine during a step (engine thread only)
        self.error: BaseException | None = None
        self._death_listeners: list[tuple[asyncio.AbstractEventLoop, Callable[[BaseException], None]]] = []

    # -- the loop's side -------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def alive(self) -> bool:
        return self._state in (State.NEW, State.RUNNING)

    def on_death(self, listener: Callable[[BaseException], None]) -> None:
        """`listener(error)` runs on the calling event loop if the engine thread dies."""
        self._death_listeners.append((asyncio.get_running_loop(), listener))

    def start(self) -> None:
        with self._cond:
            if self._state is not State.NEW:
                raise RuntimeError(f"{self.name} already started")
            self._state = State.RUNNING
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def post(self, command: Command) -> None:
        """Hands a command to the engine thread; raises at once if it will never run."""
        with self._cond:
            self._refuse_if_closed()
            self._inbox.append(command)
            self._cond.notify()

    def post_if_alive(self, command: Command) -> bool:
        """Like `post`, for commands that may come after the end (a late cancel)."""
        with self._cond:
            if self._state not in (State.NEW, State.RUNNING, State.STOPPING):
                return False
            self._inbox.append(command)
            self._cond.notify()
            return True

    def wake(self) -> None:
        """Re-evaluates `has_work` and ends a step's idle wait (something the engine polls changed)."""
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """Refuses new work, lets the thread finish its step, fails what it still holds.
        Blocks until the thread has exited: call it off the event loop."""
        with self._cond:
            if self._state in (State.NEW, State.RUNNING):
                self._state = State.STOPPING
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _refuse_if_closed(self) -> None:
        if self._state is State.DEAD:
            raise EngineDead(f"{self.name} died ({self.error}); this server takes no more requests")
        if self._state not in (State.NEW, State.RUNNING):
            raise EngineStopped(f"{self.name} is shutting down; send the request to another server")

    # -- the engine thread -----------------------------------------------------

    def wait_for_commands(self, timeout: float) -> list[Command]:
        """Inside a step: up to `timeout` seconds for commands to arrive (a bounded wait
        for company in a batch); returns them, to be applied in this step."""
        with self._cond:
            if not self._inbox and self._state is State.RUNNING:
                self._cond.wait(timeout)
            commands, self._inbox = self._inbox, []
            return commands

    def _run(self) -> None:
        engine = self._engine
        commands: list[Command] = []
        try:
            while True:
                with self._cond:
                    while not self._inbox and self._state is State.RUNNING and not engine.has_work():
                        if not self._cond.wait(self._idle_poll_s) and engine.has_pending():
                            break  # time to look at the waiting requests again
                    if self._state is not State.RUNNING:
                        break
                    commands, self._inbox = self._inbox, []
                idle_s = engine.step(commands)
                commands = []
                self.flush_events()
                if idle_s:
                    with self._cond:
                        if not self._inbox and self._state is State.RUNNING:
                            self._cond.wait(idle_s)
        except BaseException as error:  # a bug or a library failure: the engine is gone
            log.exception("%s died", self.name)
            with self._cond:
                self._state = State.DEAD
                self.error = error
                # The dying step's commands too: it may have died before applying them.
                leftover, self._inbox = [*commands, *self._inbox], []
            self._fail_everything(f"{self.name} failed: {error}", leftover)
            self._report_death(error)
            return
        with self._cond:
            leftover, self._inbox = self._inbox, []
        self._fail_everything(f"{self.name} is shutting down", leftover)
        with self._cond:
            self._state = State.STOPPED

    def _fail_everything(self, message: str, leftover: list[Command]) -> None:
        try:
            self._engine.fail_all(message, leftover)
        except BaseException:
            log.exception("%s could not fail its requests cleanly", self.name)
        self.flush_events()

    def flush_events(self) -> None:
        """Hands what the step produced so far to the loops (the bridge does it after
        every step; an engine may do it mid-step for audio that should not wait)."""
        for loop, items in self.events.take().items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:
                pass  # that loop is closed: nobody is listening any more

    def _report_death(self, error: BaseException) -> None:
        for loop, listener in self._death_listeners:
            try:
                loop.call_soon_threadsafe(listener, error)
            except RuntimeError:
                pass
