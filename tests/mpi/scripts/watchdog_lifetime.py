"""A Comm's watchdog thread lives exactly as long as the Comm (free or drop ends it)."""
import gc
import threading
import time

from hpcopt.comm import Comm


def watchdogs():
    return sum(t.name == "hpcopt-comm-watchdog" for t in threading.enumerate())


a = Comm(2, timeout=1.0, blocking_bytes=1 << 20)  # the thread wakes every 0.125 s
b = Comm(2, timeout=1.0, blocking_bytes=1 << 20)
assert watchdogs() == 2, watchdogs()
a.free()
del b
gc.collect()
time.sleep(0.5)
assert watchdogs() == 0, watchdogs()
polite = Comm(2, timeout=1.0, blocking_bytes=0)  # always polite: no blocking call, no thread
assert watchdogs() == 0 and polite.blocking_bytes < 0
print("ok", flush=True)
