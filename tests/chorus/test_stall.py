"""The stall watch (chorus.rpc.stall) over calls that are stand-ins for a peer's: when it
takes a peer for hung, when it never does, and whose time counts.

The real peers, stopped mid-stream, are in tests/system/test_failover_hung.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from chorus.rpc.stall import StallPolicy, watched

pytestmark = pytest.mark.serial  # judges real time: runs alone (pyproject.toml's markers)


async def responses(*items, then_hang: bool = False, gap_s: float = 0.0):
    """A peer's responses, `gap_s` apart; with then_hang, it then sends nothing, ever."""
    for item in items:
        await asyncio.sleep(gap_s)
        yield item
    if then_hang:
        await asyncio.Event().wait()


async def collect(stream) -> list:
    return [item async for item in stream]


def test_a_peer_silent_past_its_deadline_ends_unavailable_after_what_it_sent():
    async def scenario():
        got = []
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for item in watched(responses(1, 2, then_hang=True), lambda: start + 0.3, "codec worker w"):
                got.append(item)
        return got, err.value

    got, err = asyncio.run(scenario())
    assert got == [1, 2]
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details().startswith("codec worker w sent no audio")


def test_a_peer_that_owes_nothing_is_never_taken_for_hung():
    async def scenario():
        return await collect(watched(responses(1, 2, 3, gap_s=0.4), lambda: None, "peer"))

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_time_this_process_stood_still_is_not_held_against_the_peer():
    """This process stood still (its event loop blocked) from before the deadline to
    well past it, and the peer answered soon after: as soon as the peer would have
    had the time it was given. A process resumed from a stop must not take its peers
    for hung at once."""
    async def scenario():
        start = time.monotonic()
        asyncio.get_running_loop().call_later(0.2, time.sleep, 1.5)  # stands still from 0.2 s to 1.7 s
        return await collect(watched(responses(1, gap_s=1.8), lambda: start + 0.5, "peer"))

    assert asyncio.run(scenario()) == [1]


@pytest.mark.parametrize("floor, margin", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (4000.0, 1.0)])
def test_a_policy_out_of_range_is_refused(floor, margin):
    with pytest.raises(ValueError, match="stall"):
        StallPolicy(floor, margin)


def test_the_floor_holds_however_little_lead_is_left_and_the_lead_past_it():
    policy = StallPolicy(floor_s=2.0, margin_s=0.5)
    assert policy.hung_at(owed_since=10.0, next_sample_due_at=None) == 12.0
    assert policy.hung_at(owed_since=10.0, next_sample_due_at=9.0) == 12.0  # the listener already waits
    assert policy.hung_at(owed_since=10.0, next_sample_due_at=20.0) == 19.5  # far ahead: until the margin


def test_the_gateway_takes_its_stall_policy_from_flags_and_refuses_a_bad_one():
    from gateway.__main__ import build_config, parse_args

    config = build_config(parse_args(["--token-servers", "ts:50052", "--stall-floor", "5", "--stall-margin", "0.25"]))
    assert config.stall == StallPolicy(floor_s=5.0, margin_s=0.25)
    with pytest.raises(ValueError, match="stall floor"):
        build_config(parse_args(["--token-servers", "ts:50052", "--stall-floor", "0"]))
