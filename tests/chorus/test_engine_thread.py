"""The bridge between an event loop and an engine's thread, with a toy engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from chorus.realtime.engine_thread import EngineDead, EngineStopped, EngineThread, State


class ToyEngine:
    """Adds the numbers posted to it; a posted "boom" raises inside a step."""

    def __init__(self) -> None:
        self.bridge: EngineThread | None = None
        self.work = False  # has_work's answer
        self.idle_s: float | None = None  # what a step returns: its wait for a command
        self.loop: asyncio.AbstractEventLoop | None = None
        self.received: list = []
        self.steps: list[list] = []
        self.failed: list[tuple[str, list]] = []
        self.listeners: list = []
        self.gate = threading.Event()
        self.gate.set()

    def step(self, commands):
        self.gate.wait()
        self.steps.append(list(commands))
        for command in commands:
            if command == "boom":
                raise RuntimeError("the toy engine broke")
            self.received.append(command)
            for listener in self.listeners:
                self.bridge.events.add(self.loop, listener, command)
        return self.idle_s

    def has_work(self):
        return self.work

    def has_pending(self):
        return False

    def fail_all(self, message, commands):
        self.failed.append((message, list(commands)))


def toy():
    engine = ToyEngine()
    engine.bridge = EngineThread("toy", engine)
    return engine


def test_commands_posted_together_reach_one_step_and_events_come_back_in_one_batch():
    async def scenario():
        engine = toy()
        engine.loop = asyncio.get_running_loop()
        got = []
        engine.listeners.append(got.append)
        for command in (1, 2, 3):  # posted before the thread starts: its first step takes them all
            engine.bridge.post(command)
        engine.bridge.start()
        for _ in range(200):
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.bridge.stop)
        return engine, got

    engine, got = asyncio.run(scenario())
    assert got == [1, 2, 3]
    assert [1, 2, 3] in engine.steps
    assert engine.bridge.state is State.STOPPED


def test_a_stopped_engine_refuses_work_at_once():
    engine = toy()
    engine.bridge.start()
    engine.bridge.stop()
    with pytest.raises(EngineStopped, match="shutting down"):
        engine.bridge.post(1)
    assert not engine.bridge.post_if_alive(2)
    assert engine.failed and engine.failed[-1][0] == "toy is shutting down"


def test_a_dead_engine_refuses_work_tells_its_listeners_and_fails_what_it_held():
    async def scenario():
        engine = toy()
        engine.loop = asyncio.get_running_loop()
        died = asyncio.Event()
        errors = []
        engine.bridge.on_death(lambda error: (errors.append(error), died.set()))
        engine.gate.clear()
        engine.bridge.start()
        engine.bridge.post("boom")
        engine.bridge.post(7)  # still in the inbox when the step breaks
        engine.gate.set()
        await asyncio.wait_for(died.wait(), 30)
        return engine, errors

    engine, errors = asyncio.run(scenario())
    assert engine.bridge.state is State.DEAD and not engine.bridge.alive
    assert isinstance(errors[0], RuntimeError)
    with pytest.raises(EngineDead, match="died"):
        engine.bridge.post(8)
    message, leftover = engine.failed[-1]
    assert "toy failed: the toy engine broke" in message
    # Never applied, and handed to fail_all whether it reached the dying step or not.
    assert 7 not in engine.received
    assert 7 in leftover


def test_wait_for_commands_inside_a_step_is_bounded():
    engine = toy()
    engine.bridge.start()
    got = engine.bridge.wait_for_commands(0.01)  # from the test thread: nothing arrives
    assert got == []
    engine.bridge.stop()


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_step_with_nothing_to_do_waits_for_a_command_instead_of_stepping_again():
    """has_work holds (streams in slots) but the step could run none of them: the bridge
    waits as long as the step said, and a command or a wake ends the wait early."""
    engine = toy()
    engine.work = True
    engine.idle_s = 60.0
    engine.bridge.start()
    try:
        assert wait_until(lambda: len(engine.steps) >= 1)
        time.sleep(0.3)
        assert len(engine.steps) == 1  # spinning, it ran thousands
        engine.bridge.post(5)
        assert wait_until(lambda: 5 in engine.received)
        assert len(engine.steps) == 2
        engine.bridge.wake()
        assert wait_until(lambda: len(engine.steps) == 3)
    finally:
        engine.bridge.stop()
    assert engine.bridge.state is State.STOPPED  # stop ends the wait too
