"""A bounded load on a live Triton server while its models switch generations (docs/serving.md).

``clients`` threads, each with its own gRPC client, send one encoded image after another to the
given image models (in turn), recording for every request when it began and ended, which model
version answered and any error. :func:`switch_under_load` runs a switch while the load goes on and
reads from the record what a switch must be judged by: failed requests, the versions that answered
after it returned, how long until the last answer from the old version, and p99 latency during the
switch against the second before it. The live test (tests/test_triton_generations.py) and
benchmarks/serve_switch.py both measure with it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Answer:
    began: float
    ended: float
    model: str
    version: str | None
    error: str | None


class ImageLoad:
    """The load, as a context manager: started on entry, stopped (every client closed) on exit."""

    def __init__(self, grpc_url: str, models: list[str], image: bytes, clients: int = 4,
                 tensor_name: str = "image") -> None:
        self.url, self.models, self.image, self.tensor_name = grpc_url, list(models), image, tensor_name
        self.stop = threading.Event()
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._ask, args=(index,)) for index in range(clients)]

    def _ask(self, index: int) -> None:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.url) as client:  # closed: an open one holds the server's stop
            turn = index
            while not self.stop.is_set():
                model = self.models[turn % len(self.models)]
                turn += 1
                tensor = grpcclient.InferInput(self.tensor_name, [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[self.image]], dtype=object))
                began = time.monotonic()
                try:
                    version, error = client.infer(model, [tensor]).get_response().model_version, None
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    version, error = None, f"{model}: {' '.join(str(exc).split())}"
                with self.lock:
                    self.answers.append(Answer(began, time.monotonic(), model, version, error))

    def __enter__(self) -> "ImageLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def window(self, start: float, end: float) -> list[Answer]:
        """The requests that began in [start, end)."""
        with self.lock:
            return [a for a in self.answers if start <= a.began < end]

    def failures(self) -> list[str]:
        with self.lock:
            return [a.error for a in self.answers if a.error is not None]


def p99_ms(answers: list[Answer]) -> float | None:
    return float(np.percentile([(a.ended - a.began) * 1000 for a in answers], 99)) if answers else None


def switch_under_load(load: ImageLoad, switch: Callable[[], object], old: str, steady_s: float = 1.0,
                      after_s: float = 0.5) -> dict:
    """``switch()`` run while ``load`` goes on, after ``steady_s`` of steady state; what answered
    during and in the ``after_s`` after it returned."""
    time.sleep(steady_s)
    began = time.monotonic()
    switch()
    returned = time.monotonic()
    time.sleep(after_s)
    during, after = load.window(began, returned), load.window(returned, time.monotonic())
    last_old = max((a.ended for a in during if a.version == old), default=began)
    return {"switch_s": last_old - began, "call_s": returned - began, "requests": len(during),
            "p99_ms": p99_ms(during), "steady_p99_ms": p99_ms(load.window(began - steady_s, began)),
            "versions_after": sorted({str(a.version) for a in after}), "answers_after": len(after),
            "failed": [a.error for a in load.window(began - steady_s, time.monotonic()) if a.error is not None]}
