"""Soak and fault suite: the whole stack as processes on loopback, under a mixed load,
while a codec worker, a token server and the gateway are each SIGKILLed mid-stream
and started again.

    python benchmarks/soak.py [--requests 500] [--concurrency 8] [--out soak-out]
    python benchmarks/soak.py --quick      # the CI run (tests/system/test_soak.py): 48 requests

Bounded in count (--requests) and time (--max-seconds; past it nothing new starts),
loopback only. The stack is 2 codec workers, 2 token servers and a gateway
(tools.supervisor.Stack). The load is Synthesize and StreamingSynthesize calls with
random cancellations, short deadlines and bad requests mixed in. The faults come at
a quarter, half and three quarters of the requests: the victim is one with work in
flight (a codec worker with open streams, a token server with busy slots), killed
with SIGKILL, then launched again on its port.

It writes `soak.json` (every figure below, and each request's outcome) and
`rss.json` / `rss.png` (RSS of each service over time) to --out, prints a summary,
and exits 1 when a goal is missed:

- unexpected failures: 0. Expected are: a bad request's INVALID_ARGUMENT; a cancelled
  call's CANCELLED; a call with a short deadline ending DEADLINE_EXCEEDED; a refusal
  at capacity (RESOURCE_EXHAUSTED: real-time admission working as designed, counted
  apart); and UNAVAILABLE for a call that was in flight on the gateway when it was
  killed (while the gateway is down the soak's clients wait for it, as a client
  that retries would, instead of spending requests on a closed port). Everything else is unexpected, including
  any failure around a codec worker or token server kill (codec failover and the
  gateway's seeded replay must hide those).
- slots, queued requests and codec streams left open at the end: 0 (GetStatus,
  GetLoad).
- each killed process rejoined (served work again) and no other process restarted.
- RSS: a plateau (reported as the first and last thirds' medians of each service).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chorus.proto.tts.v1 import (  # noqa: E402
    codec_pb2,
    codec_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    token_server_pb2,
    token_server_pb2_grpc,
)
from tools.supervisor import Stack  # noqa: E402

TEXTS = [
    "Hello there.",
    "The soak keeps talking while processes come and go.",
    "One more sentence, with a comma. And a second one!",
    "Numbers like 42 and 1999 are spoken too.",
]
# Calls that share a channel: reconnect within a second after the gateway returns.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
KINDS = {"synthesize": 0.55, "streaming": 0.12, "cancel": 0.13, "deadline": 0.1, "bad": 0.1}
FAULTS = ("codec_worker", "token_server", "gateway")


@dataclass
class Outcome:
    index: int
    kind: str
    code: str
    details: str
    started: float
    ended: float
    chunks: int = 0
    expected: bool = False
    why: str = ""


@dataclass
class Fault:
    target: str
    name: str
    killed_at: float = 0.0
    ready_at: float = 0.0
    rejoined: bool = False
    others_untouched: bool = False
    failures_in_window: int = 0


@dataclass
class Report:
    requests: int
    concurrency: int
    wall_seconds: float = 0.0
    by_code: dict = field(default_factory=dict)
    unexpected: int = 0
    refused_at_capacity: int = 0
    left_open: dict = field(default_factory=dict)
    faults: list = field(default_factory=list)
    rss_mb: dict = field(default_factory=dict)
    outcomes: list = field(default_factory=list)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, stack: Stack, requests: int, concurrency: int, seed: int, max_seconds: float) -> None:
        self.stack = stack
        self.n = requests
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.max_seconds = max_seconds
        self.outcomes: list[Outcome] = []
        self.faults: list[Fault] = []
        self.rss: dict[str, list[tuple[float, float]]] = {}
        self.started = 0
        self.in_flight = 0
        # Cleared while the gateway is down: clients wait for it rather than burn requests.
        self.gateway_up = asyncio.Event()
        self.t0 = time.monotonic()
        self._channel: grpc.aio.Channel | None = None

    # -- load --------------------------------------------------------------------

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.stack.gateway_address, options=CHANNEL_OPTIONS)
        return self._channel

    async def one(self, index: int, kind: str) -> None:
        stub = gateway_pb2_grpc.SynthesisServiceStub(self.channel())
        text = self.rng.choice(TEXTS)
        frames = self.rng.randint(6, 40)
        sampling = common_pb2.SamplingParams(max_tokens=7 * frames)
        started = time.monotonic()
        chunks, code, details = 0, "OK", ""
        try:
            if kind == "bad":
                bad = self.rng.choice([
                    gateway_pb2.SynthesizeRequest(text=""),
                    gateway_pb2.SynthesizeRequest(text=text, voice="nobody"),
                    gateway_pb2.SynthesizeRequest(text=text, sampling=common_pb2.SamplingParams(top_p=0.0)),
                    gateway_pb2.SynthesizeRequest(text=text, sampling=common_pb2.SamplingParams(
                        temperature=float("nan"))),
                ])
                async for _ in stub.Synthesize(bad, timeout=60):
                    chunks += 1
            elif kind == "streaming":
                config = gateway_pb2.StreamingSynthesizeConfig(sampling=sampling)
                messages = [gateway_pb2.StreamingSynthesizeRequest(config=config)]
                messages += [gateway_pb2.StreamingSynthesizeRequest(text=w + " ") for w in text.split()]
                messages.append(gateway_pb2.StreamingSynthesizeRequest(end=gateway_pb2.EndOfInput()))
                async for _ in stub.StreamingSynthesize(iter(messages), timeout=120):
                    chunks += 1
            else:
                timeout = self.rng.uniform(0.3, 2.0) if kind == "deadline" else 120
                cancel_after = self.rng.randint(1, 6) if kind == "cancel" else None
                call = stub.Synthesize(gateway_pb2.SynthesizeRequest(text=text, sampling=sampling), timeout=timeout)
                async for _ in call:
                    chunks += 1
                    if cancel_after is not None and chunks >= cancel_after:
                        call.cancel()
                        code, details = "CANCELLED", "cancelled by the soak"
                        break
        except grpc.aio.AioRpcError as err:
            code, details = err.code().name, err.details() or ""
        except asyncio.CancelledError:
            code, details = "CANCELLED", "cancelled by the soak"
        self.outcomes.append(Outcome(index, kind, code, details, started - self.t0, time.monotonic() - self.t0,
                                     chunks))

    async def load(self) -> None:
        room = asyncio.Semaphore(self.concurrency)
        kinds, weights = list(KINDS), list(KINDS.values())
        tasks = []

        async def run(index: int, kind: str) -> None:
            self.in_flight += 1
            try:
                await self.one(index, kind)
            finally:
                self.in_flight -= 1
                room.release()

        for index in range(self.n):
            if time.monotonic() - self.t0 > self.max_seconds:
                break
            await room.acquire()
            await self.gateway_up.wait()
            self.started = index + 1
            tasks.append(asyncio.create_task(run(index, self.rng.choices(kinds, weights)[0])))
        await asyncio.gather(*tasks)

    # -- faults ------------------------------------------------------------------

    async def inject_faults(self) -> None:
        for number, target in enumerate(FAULTS, start=1):
            while self.started < self.n * number // (len(FAULTS) + 1):
                if self.started >= self.n:
                    return
                await asyncio.sleep(0.05)
            await self.fault(target)

    async def fault(self, target: str) -> None:
        victim = await self.busy(target)
        fault = Fault(target, victim.name)
        pids_before = {p.name: p.popen.pid for p in self.processes() if p is not victim}
        self.faults.append(fault)
        if target == "gateway":
            self.gateway_up.clear()
        self.stack.kill(victim)
        fault.killed_at = time.monotonic() - self.t0
        await asyncio.sleep(1.0)  # what was in flight on it fails over (or fails) meanwhile
        fresh = await asyncio.to_thread(self.stack.restart, victim)
        fault.ready_at = time.monotonic() - self.t0
        self.gateway_up.set()
        fault.rejoined = await self.rejoined(target, fresh)
        fault.others_untouched = all(
            p.popen.pid == pids_before.get(p.name) and p.alive for p in self.processes() if p is not fresh
        )

    def processes(self):
        return [*self.stack.codec_worker_processes, *self.stack.token_server_processes, self.stack.gateway_process]

    async def busy(self, target: str):
        """The process of `target`'s kind with work in flight (the first one, after a bounded wait)."""
        if target == "gateway":
            return self.stack.gateway_process
        group = self.stack.codec_worker_processes if target == "codec_worker" else self.stack.token_server_processes
        for _ in range(200):
            for process in group:
                if await self.work_on(target, process.address) > 0:
                    return process
            await asyncio.sleep(0.05)
        return group[0]

    async def own_request(self, frames: int = 6) -> bool:
        """Whether one request of the soak's own through the gateway completes (not an
        outcome of the load)."""
        stub = gateway_pb2_grpc.SynthesisServiceStub(self.channel())
        request = gateway_pb2.SynthesizeRequest(
            text=TEXTS[0], sampling=common_pb2.SamplingParams(max_tokens=7 * frames, ignore_end_of_speech=True))
        try:
            async for _ in stub.Synthesize(request, timeout=60):
                pass
        except grpc.aio.AioRpcError:
            return False
        return True

    async def serves_own_requests(self, target: str, process) -> bool:
        """Whether `process` takes work from requests of the soak's own: as many at once
        as there are processes of its kind and one more, long enough to overlap, so
        that least-loaded routing puts one on it whichever others are up."""
        if target == "gateway":
            return await self.own_request()
        group = self.stack.codec_worker_processes if target == "codec_worker" else self.stack.token_server_processes
        requests = [asyncio.create_task(self.own_request(frames=60)) for _ in range(len(group) + 1)]
        try:
            while not all(r.done() for r in requests):
                if await self.work_on(target, process.address) > 0:
                    return True
                await asyncio.sleep(0.05)
            return False
        finally:
            for r in requests:
                r.cancel()
            await asyncio.gather(*requests, return_exceptions=True)

    async def work_on(self, target: str, address: str) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                if target == "codec_worker":
                    load = await codec_pb2_grpc.CodecServiceStub(channel).GetLoad(codec_pb2.GetLoadRequest(), timeout=2)
                    return load.open_streams
                status = await token_server_pb2_grpc.TokenServiceStub(channel).GetStatus(
                    token_server_pb2.GetStatusRequest(), timeout=2)
                return status.slots_busy
            except grpc.aio.AioRpcError:
                return 0

    async def rejoined(self, target: str, process, limit_s: float = 90.0) -> bool:
        """Whether the restarted process serves work again within `limit_s` (while load lasts)."""
        deadline = time.monotonic() + limit_s
        since = time.monotonic() - self.t0
        while time.monotonic() < deadline:
            if target == "gateway":
                if any(o.code == "OK" and o.started >= since for o in self.outcomes):
                    return True
            elif await self.work_on(target, process.address) > 0:
                return True
            if self.started >= self.n and self.in_flight == 0:
                # No load left to show it: faults run one after another, and the load
                # can run out before a later fault's restart is ready (the faster the
                # decoder, the sooner). Requests of the soak's own then ask the
                # restarted process, round after round until the deadline: its peers
                # route to it only once their next poll has found it up.
                if await self.serves_own_requests(target, process):
                    return True
                continue
            await asyncio.sleep(0.1)
        return False

    # -- measurements --------------------------------------------------------------

    async def sample_rss(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.monotonic() - self.t0
            for process in self.processes():
                rss = rss_mb(process.popen.pid) if process.alive else None
                if rss is not None:
                    self.rss.setdefault(process.name, []).append((round(now, 2), round(rss, 1)))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass

    async def left_open(self, limit_s: float = 60.0) -> dict:
        """Slots, queue and codec streams once the load is over (a bounded wait for them to settle)."""
        deadline = time.monotonic() + limit_s
        while True:
            figures = {}
            for process in self.stack.token_server_processes:
                async with grpc.aio.insecure_channel(process.address) as channel:
                    status = await token_server_pb2_grpc.TokenServiceStub(channel).GetStatus(
                        token_server_pb2.GetStatusRequest(), timeout=5)
                figures[process.name] = {"slots_busy": status.slots_busy, "queue_depth": status.queue_depth,
                                         "active_streams": status.active_streams}
            for process in self.stack.codec_worker_processes:
                async with grpc.aio.insecure_channel(process.address) as channel:
                    load = await codec_pb2_grpc.CodecServiceStub(channel).GetLoad(codec_pb2.GetLoadRequest(), timeout=5)
                figures[process.name] = {"open_streams": load.open_streams}
            if not any(v for f in figures.values() for v in f.values()) or time.monotonic() > deadline:
                return figures
            await asyncio.sleep(0.2)

    def classify(self) -> None:
        for o in self.outcomes:
            gateway_down = any(f.target == "gateway" and o.started <= f.ready_at + 2.0 and o.ended >= f.killed_at
                               for f in self.faults)
            if o.code == "OK":
                o.expected, o.why = o.kind != "bad", "" if o.kind != "bad" else "a bad request was accepted"
            elif o.kind == "bad":
                o.expected, o.why = o.code == "INVALID_ARGUMENT", "refused as invalid"
            elif o.kind == "cancel" and o.code == "CANCELLED":
                o.expected, o.why = True, "cancelled by the client"
            elif o.kind == "deadline" and o.code == "DEADLINE_EXCEEDED":
                o.expected, o.why = True, "its short deadline passed"
            elif o.code == "RESOURCE_EXHAUSTED":
                o.expected, o.why = True, "refused at capacity"
            elif o.code == "UNAVAILABLE" and gateway_down:
                o.expected, o.why = True, "in flight on the killed gateway, or sent while it was down"
            else:
                o.why = "unexpected"
            for f in self.faults:
                if o.code != "OK" and o.started <= f.ready_at and o.ended >= f.killed_at:
                    f.failures_in_window += 1

    async def run(self) -> Report:
        self.gateway_up.set()
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample_rss(stop))
        await asyncio.gather(self.load(), self.inject_faults())
        report = Report(self.n, self.concurrency)
        report.wall_seconds = round(time.monotonic() - self.t0, 1)
        report.left_open = await self.left_open()
        await asyncio.sleep(3.0)  # the codec workers trim after their streams end
        stop.set()
        await sampler
        if self._channel is not None:
            await self._channel.close()
        self.classify()
        for o in self.outcomes:
            report.by_code[o.code] = report.by_code.get(o.code, 0) + 1
        report.unexpected = sum(not o.expected for o in self.outcomes)
        report.refused_at_capacity = sum(o.code == "RESOURCE_EXHAUSTED" for o in self.outcomes)
        report.faults = [asdict(f) for f in self.faults]
        report.rss_mb = {name: plateau(curve) for name, curve in self.rss.items()}
        report.outcomes = [asdict(o) for o in sorted(self.outcomes, key=lambda o: o.index)]
        return report


def plateau(curve: list[tuple[float, float]]) -> dict:
    """Start, peak, end, and the medians of the first and last thirds of a curve."""
    values = [v for _, v in curve]
    third = max(1, len(values) // 3)
    return {"start": values[0], "peak": max(values), "end": values[-1],
            "first_third_median": statistics.median(values[:third]),
            "last_third_median": statistics.median(values[-third:])}


def plot(rss: dict[str, list[tuple[float, float]]], faults: list[Fault], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, curve in sorted(rss.items()):
        ax.plot([t for t, _ in curve], [v for _, v in curve], label=name)
    for fault in faults:
        ax.axvline(fault.killed_at, color="grey", linestyle="--", linewidth=0.8)
        ax.text(fault.killed_at, ax.get_ylim()[1] * 0.97, f" kill {fault.name}", fontsize=7, rotation=90,
                va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("RSS of each service during the soak")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def goals_met(report: Report) -> list[str]:
    """The goals the report misses, one sentence each."""
    missed = []
    if report.unexpected:
        missed.append(f"{report.unexpected} unexpected failures")
    open_now = {n: f for n, f in report.left_open.items() if any(f.values())}
    if open_now:
        missed.append(f"left open: {open_now}")
    for fault in report.faults:
        if not fault["rejoined"]:
            missed.append(f"{fault['name']} did not rejoin")
        if not fault["others_untouched"]:
            missed.append(f"another process restarted or died around the {fault['target']} fault")
    return missed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the CI run: 48 requests at 4 concurrent")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=3600.0, help="no new request after this")
    p.add_argument("--models", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--out", type=Path, default=Path("soak-out"))
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency = 48, 4
    args.out.mkdir(parents=True, exist_ok=True)
    # No die-with-parent hook: restarts fork while this process's gRPC threads are busy.
    with Stack(models_dir=args.models, demo_models=True, token_servers=2, codec_workers=2, slots=4,
               work_dir=args.out / "logs", on_progress=lambda m: print(m, file=sys.stderr, flush=True),
               die_with_parent=False) as stack:
        soak = Soak(stack, args.requests, args.concurrency, args.seed, args.max_seconds)
        report = asyncio.run(soak.run())
        faults = soak.faults
        rss = soak.rss
    (args.out / "soak.json").write_text(json.dumps(asdict(report), indent=1))
    (args.out / "rss.json").write_text(json.dumps(rss))
    plotted = plot(rss, faults, args.out / "rss.png")
    summary = {k: v for k, v in asdict(report).items() if k != "outcomes"}
    print(json.dumps(summary, indent=1))
    if not plotted:
        print("matplotlib is not installed: no rss.png", file=sys.stderr)
    missed = goals_met(report)
    for line in missed:
        print(f"MISSED: {line}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
