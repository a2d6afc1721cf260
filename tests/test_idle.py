"""`VTENSOR_IDLE_RELEASE_S` (vllm_vtensor.idle) against the engine core's idle loop as vLLM 0.32 runs it:
one thread takes client requests from the input queue and handles them; the watcher wakes it. The engine
itself is in tests/test_e2e_vtensor.py (the memory given back); here the timing rules."""
import queue
import threading
import time

from vllm.v1.engine import EngineCoreRequestType

from vllm_vtensor import idle


class IdleLoop:
    """vLLM's EngineCoreProc idle loop, reduced to what the watcher sees: a scheduler that has requests or
    not, an input queue whose requests one thread handles, and the prefix-cache reset it counts."""

    def __init__(self):
        self.input_queue = queue.Queue()
        self.busy = False
        self.scheduler = self
        self.resets = []
        self.handled = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def has_requests(self):
        return self.busy

    def reset_prefix_cache(self):
        self.resets.append((time.monotonic(), threading.current_thread()))
        return True

    def _handle_client_request(self, request_type, request):
        self.handled.append(request_type)

    def _loop(self):
        while True:
            req = self.input_queue.get()  # as vLLM's loop: the handler is looked up once a request came
            self._handle_client_request(*req)


def test_one_reset_per_idle_period_in_the_engines_thread():
    loop = IdleLoop()
    start = time.monotonic()
    release = idle.IdleRelease(loop, after_s=0.4)
    time.sleep(1.5)  # idle for nearly four times the delay: one reset, not one per delay
    assert len(loop.resets) == 1 and release.releases == 1
    at, thread = loop.resets[0]
    assert 0.4 <= at - start <= 0.4 + 0.5, at - start  # the delay, from the watcher's first look
    assert thread is loop._thread  # in the engine's own thread, woken by the watcher
    assert loop.handled == [EngineCoreRequestType.WAKEUP]
    loop.input_queue.put((EngineCoreRequestType.UTILITY, None))  # a utility call is no request: no new period
    time.sleep(1.0)
    assert len(loop.resets) == 1


def test_work_postpones_the_reset_and_rearms_it():
    loop = IdleLoop()
    release = idle.IdleRelease(loop, after_s=1.0)
    for _ in range(8):  # a request every 0.2 s, each shorter than the watcher's look: never idle 1 s
        loop.input_queue.put((EngineCoreRequestType.ADD, None))
        time.sleep(0.2)
    assert loop.resets == []
    loop.busy = True  # a long request
    time.sleep(1.5)
    assert loop.resets == []
    loop.busy = False
    time.sleep(2.0)
    assert len(loop.resets) == 1 and release.releases == 1


def test_work_arriving_with_the_wakeup_is_not_raced():
    """The watcher asked for a reset, but a request came before the engine's thread handled the wake-up (it
    may even have finished by then): the cache is kept for it, and the next idle period counts anew."""
    loop = IdleLoop()
    release = idle.IdleRelease(loop, after_s=60)  # its watcher stays out of the way
    release._due = release._requests
    loop._handle_client_request(EngineCoreRequestType.ADD, None)  # came first; finished at once
    loop._handle_client_request(EngineCoreRequestType.WAKEUP, None)
    assert loop.resets == [] and release._due is None and not release._done
    release._due, loop.busy = release._requests, True  # a request still running
    loop._handle_client_request(EngineCoreRequestType.WAKEUP, None)
    assert loop.resets == [] and release._due is None and not release._done
    release._due, loop.busy = release._requests, False
    loop._handle_client_request(EngineCoreRequestType.WAKEUP, None)
    assert len(loop.resets) == 1 and release._done
