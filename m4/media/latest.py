"""A live source read in a thread of its own, keeping only its newest frame: what `m4 run`
and the server's sessions read cameras and streams through, so that frames that come while
the model is busy are dropped, never queued, and a dropped stream is reopened."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

from m4.errors import M4Error
from m4.media.video import Frame, Source, open_source

RECONNECT_TRIES = 3  # reopens in a row before a dropped stream ends the run
RECONNECT_WAIT_S = 1.0
STABLE_S = 60.0  # a source that ran this long since it was opened has its tries back
CLOSE_WAIT_S = 2.0  # how long closing waits for the reader to finish its current frame


def say(message: str) -> None:
    """A notice on stderr, as m4's commands print them."""
    print(f"m4: {message}", file=sys.stderr, flush=True)


class Latest:
    """Reads a live source in a thread, keeping only the newest frame. A source that drops
    is reopened up to RECONNECT_TRIES times, then the stream ends. `wake`, where given, is set
    at each frame and at the end, for a reader of several sources."""

    def __init__(self, spec: str, source: Source, label: str | None = None, wake: threading.Event | None = None):
        self.spec, self.label, self.wake, self.done = spec, label or spec, wake, False
        self.frame: Frame | None = None
        self.received = self.dropped = 0
        self.start = time.monotonic()
        self.error: str | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(source,), daemon=True)
        self.thread.start()

    def _read(self, source: Source | None) -> None:
        tries = 0
        while source is not None and not self.done:
            opened = time.monotonic()
            self._pump(source)
            tries = 1 if time.monotonic() - opened > STABLE_S else tries + 1
            source = self._reopen(tries)
        with self.cond:
            self.done = True
            self.cond.notify()
        self._wake()

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake.set()

    def _pump(self, source: Source) -> None:
        """Read until the source ends or fails, keeping only the newest frame."""
        try:
            for f in source.frames():
                # stamped by arrival: a reopened stream restarts its own clock
                f = Frame(f.image, time.monotonic() - self.start, self.received)
                with self.cond:
                    if self.frame is not None:
                        self.dropped += 1
                    self.frame, self.received = f, self.received + 1
                    self.cond.notify()
                self._wake()
                if self.done:
                    return
            self.error = "stream ended"
        except M4Error as e:
            self.error = str(e)
        finally:
            source.close()

    def _reopen(self, tries: int) -> Source | None:
        while not self.done and tries <= RECONNECT_TRIES:
            say(f"{self.label}: {self.error}; reopening ({tries}/{RECONNECT_TRIES})")
            time.sleep(RECONNECT_WAIT_S)
            try:
                return open_source(self.spec)
            except M4Error as e:
                self.error = str(e)
                tries += 1
        return None

    def frames(self) -> Iterator[Frame]:
        while True:
            with self.cond:
                while self.frame is None and not self.done:
                    self.cond.wait()
                if self.frame is None:
                    return
                f, self.frame = self.frame, None
            yield f

    def take(self) -> Frame | None:
        """The newest frame, if one came since the last; never waits."""
        with self.cond:
            f, self.frame = self.frame, None
        return f

    def close(self) -> None:
        # The reader closes its source itself once it sees `done`: PyAV crashes (a segfault) when
        # a container is closed under a decode running in another thread. A read stalled on the
        # network outlasts the wait; the thread is a daemon and the process exits without it.
        self.done = True
        self.thread.join(CLOSE_WAIT_S)
