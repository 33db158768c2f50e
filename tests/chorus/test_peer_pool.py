"""PeerPool with fake peers: polling outlives any error, ranking follows the reported
load, and waiting for room ends with the peer that gained it or with None."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from chorus.rpc.discovery import EndpointSet
from chorus.rpc.peer_pool import NotServing, Peer, PeerPool

# Nothing listens on port 1: no channel to these ever becomes ready.
PEERS = ("127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1")


class FakePeers:
    """What each peer answers a poll with: its load (a number of streams held), or an
    exception to raise."""

    def __init__(self, answers: dict[str, int | BaseException]) -> None:
        self.answers = answers
        self.once: dict[str, BaseException] = {}  # raised at the next poll only
        self.polls = 0

    async def poll(self, address: str) -> int:
        self.polls += 1
        answer = self.once.pop(address, None) or self.answers[address]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def by_load(peer: Peer[int]) -> tuple[bool, int]:
    return not peer.reachable, peer.load or 0


@contextlib.asynccontextmanager
async def started(fake: FakePeers, interval_s: float = 3600.0, **options) -> AsyncIterator[PeerPool[int]]:
    pool = PeerPool(EndpointSet(list(fake.answers)), fake.poll, by_load, kind="fake peer", interval_s=interval_s,
                    **options)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")


def test_peers_are_ranked_by_reported_load_with_unreachable_ones_last_and_ties_rotated():
    async def scenario():
        fake = FakePeers({PEERS[0]: unavailable(), PEERS[1]: 5, PEERS[2]: 2})
        async with started(fake) as pool:
            ranked = [p.address for p in pool.ranked()]
            fake.answers.update({PEERS[0]: 1, PEERS[1]: 1, PEERS[2]: 1})
            await pool.poll()
            return ranked, [[p.address for p in pool.ranked(turn)] for turn in range(3)], pool.available()

    ranked, tied, available = asyncio.run(scenario())
    assert ranked == [PEERS[2], PEERS[1], PEERS[0]]
    assert tied == [list(PEERS), [*PEERS[1:], PEERS[0]], [PEERS[2], *PEERS[:2]]]
    assert available


def test_a_peer_that_is_not_serving_is_unreachable_and_the_set_unavailable():
    async def scenario():
        async with started(FakePeers({PEERS[0]: NotServing("draining"), PEERS[1]: unavailable()})) as pool:
            return pool.available(), [p.reachable for p in pool.peers()], pool.roomiest()

    assert asyncio.run(scenario()) == (False, [False, False], None)


def test_polling_goes_on_after_a_poll_raises_something_unexpected():
    async def scenario():
        fake = FakePeers({PEERS[0]: 1})
        after_polls: list[int] = []

        async def on_polled() -> None:
            after_polls.append(fake.polls)
            if len(after_polls) == 2:
                fake.once[PEERS[0]] = RuntimeError("a poll that fails in a way nobody planned for")

        async with started(fake, interval_s=0.01, on_polled=on_polled) as pool:
            while fake.polls < 6:
                await asyncio.sleep(0.01)
            return pool.available(), after_polls

    available, after_polls = asyncio.run(scenario())
    # The third poll raised before its end (no on_polled for it); later ones came and
    # found the peer again.
    assert 3 not in after_polls and after_polls[-1] >= 4
    assert available


def test_waiting_for_room_returns_the_peer_that_gains_it():
    async def scenario():
        fake = FakePeers({PEERS[0]: 9, PEERS[1]: unavailable()})
        async with started(fake, interval_s=0.02, has_room=lambda load: load < 4) as pool:
            assert pool.roomiest() is None
            fake.answers[PEERS[1]] = 3  # comes back with room at a later poll
            found = await pool.wait_for_room(30.0)
            return found.address if found else None

    assert asyncio.run(scenario()) == PEERS[1]


def test_waiting_for_room_is_none_once_the_time_is_up():
    async def scenario():
        fake = FakePeers({PEERS[0]: 9, PEERS[1]: unavailable()})
        async with started(fake, interval_s=0.02, has_room=lambda load: load < 4) as pool:
            found = await pool.wait_for_room(0.2)
            return found, pool.roomiest()

    found, roomiest = asyncio.run(scenario())
    assert found is None
    assert roomiest is None  # nothing had room: None is the answer, not a peer without room


@pytest.mark.parametrize("timeout_s", [0.0, -1.0])
def test_waiting_with_no_time_left_answers_at_once_from_the_last_poll(timeout_s):
    async def scenario():
        async with started(FakePeers({PEERS[0]: 2, PEERS[1]: 1})) as pool:
            found = await pool.wait_for_room(timeout_s)
            return found.address if found else None

    assert asyncio.run(scenario()) == PEERS[1]  # the least loaded, without waiting


def test_waiting_with_no_peer_resolved_is_none_without_waiting():
    async def scenario():
        async with started(FakePeers({})) as pool:
            # Waiting the hour would fail here long before it ended.
            return pool.peers(), await asyncio.wait_for(pool.wait_for_room(3600.0), 30)

    assert asyncio.run(scenario()) == ([], None)
