"""Background prefetch that keeps checkpoints exact.

`produce(state) -> (item, next_state)` is a pure step function. A thread runs it ahead of the
consumer, putting (item, next_state) pairs into a bounded queue; the consumer adopts next_state
only when it takes the item. So the state a checkpoint saves is the one after the batches the
trainer has consumed, however far the thread has run ahead.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_END = object()


def prefetched(produce: Callable[[Any], tuple[Any, Any] | None], state: Any, depth: int,
               on_consume: Callable[[Any], None]) -> Iterator[Any]:
    """Yield items from state on; on_consume(next_state) runs as each item is handed out.
    produce returns None at the end of a finite stream. depth 0 = no thread."""
    if depth <= 0:
        while (out := produce(state)) is not None:
            item, state = out
            on_consume(state)
            yield item
        return

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run(state):
        try:
            while not stop.is_set():
                out = produce(state)
                payload = _END if out is None else out
                while not stop.is_set():
                    try:
                        q.put(payload, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if out is None:
                    return
                state = out[1]
        except BaseException as e:  # surfaces in the consumer, with its traceback
            q.put(e)

    thread = threading.Thread(target=run, args=(state,), name="data-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            out = q.get()
            if out is _END:
                return
            if isinstance(out, BaseException):
                raise out
            item, state = out
            on_consume(state)
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
