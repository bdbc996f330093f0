"""The floor: a plain FastAPI app with a small asyncio batcher, serving MiniLM as ``modelpress serve`` does.

What any team would write in an afternoon: ``POST /v1/embeddings`` with OpenAI's request and
response JSON (orjson), each request's text tokenized on the event loop by the task's own
encoder (the same tokenization as our server), rows queued, and one batcher task that hands
batches to the runner in a single worker thread. The batcher follows our server's rule with one
instance: a batch goes as soon as the model is free (a lone request never waits), taking up to
``max_batch`` queued rows; while a batch runs, the next one gathers rows for up to ``delay_ms``
from its first row or until it is full. Batches are padded to their longest row, in arrival
order. No metrics, no auth, no request ids, no limits: the floor our server must match with all
of them on.

    python benchmarks/_floor_server.py PORT --runtime torch --threads 2 --max-batch 32 --delay-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response  # at module level: FastAPI reads the handlers' annotations from here

JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


def build_app(model: str, runtime: str, threads: int, max_batch: int, delay_ms: float) -> Any:
    import modelpress as mp

    art = mp.load(model)
    task = mp.task_for(art)
    runner = mp.create_runner(art, runtime, threads=threads).load()
    encoder = task.encoder
    pool = ThreadPoolExecutor(1, thread_name_prefix="floor-model")
    queue: asyncio.Queue[tuple[Any, asyncio.Future, float]] = asyncio.Queue()  # (row, its request's future, queued at)

    def run(rows: list[Any]) -> list[Any]:
        batch = encoder.collate(rows)  # padded to the longest row
        return list(task.postprocess(runner.run(batch), batch))

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        running: asyncio.Future | None = None  # the batch in the model now
        while True:
            items = [await queue.get()]
            deadline = items[0][2] + delay_ms / 1000
            # while the model is busy, gather company for up to delay_ms from the first row, or until full
            while running is not None and not running.done() and len(items) < max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(queue.get(), left))  # Queue.get is safe to cancel: no row is lost
                except TimeoutError:
                    break
            if running is not None:
                await asyncio.wait({running})  # one batch at a time: the model has one instance
            while len(items) < max_batch and not queue.empty():
                items.append(queue.get_nowait())
            running = loop.run_in_executor(pool, run, [row for row, _fut, _t in items])
            running.add_done_callback(functools.partial(answer, items))

    def answer(items: list[tuple[Any, asyncio.Future, float]], done: asyncio.Future) -> None:
        exc = done.exception()
        for i, (_row, fut, _t) in enumerate(items):
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(done.result()[i])

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        runner.run(encoder.collate(encoder.encode(["warm up"])))
        task_ = asyncio.create_task(batcher())
        yield
        task_.cancel()
        pool.shutdown(wait=False)

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        doc = orjson.loads(await request.body())
        texts = [doc["input"]] if isinstance(doc["input"], str) else doc["input"]
        rows = encoder.encode(texts)
        futures = []
        for row in rows:
            fut = loop.create_future()
            queue.put_nowait((row, fut, loop.time()))
            futures.append(fut)
        vectors = await asyncio.gather(*futures)
        tokens = sum(len(ids) for ids, _types in rows)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        body = {
            "object": "list",
            "data": data,
            "model": doc.get("model", model),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(orjson.dumps(body, option=JSON_OPTS), media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", type=int)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--runtime", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--delay-ms", type=float, default=5.0)
    args = ap.parse_args()
    import uvicorn

    app = build_app(args.model, args.runtime, args.threads, args.max_batch, args.delay_ms)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
