"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

Type=notify units learn that a daemon serves from one ``READY=1`` datagram on
``$NOTIFY_SOCKET``, and with WatchdogSec= they expect ``WATCHDOG=1`` at least
every ``$WATCHDOG_USEC``. Both are plain AF_UNIX datagrams, so no extra
dependency is needed. Everything here is a no-op when systemd did not ask.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any


class Notifier:
    """systemd's notify protocol, spoken directly: one datagram per state change.

    ``$NOTIFY_SOCKET`` names an AF_UNIX datagram socket (``@`` for the abstract
    namespace). With no such variable every call is a no-op, so the daemon
    behaves the same under supervisord, ``shoal start`` or a test.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or ""
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr

    def send(self, *states: str) -> bool:
        """Send ``KEY=value`` lines; return whether the datagram went out."""
        if not self.address:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto("\n".join(states).encode(), self.address)
            return True
        except OSError:
            return False
        finally:
            s.close()


def notify_stopping() -> None:
    """Tell systemd a stop is under way, so a slow drain is not taken for a hang."""
    Notifier().send("STOPPING=1")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between keep-alives systemd asks for (half of WatchdogSec), or None.

    As sd_watchdog_enabled(3): WATCHDOG_USEC is the limit; WATCHDOG_PID, when
    set, says which process it is meant for (not a child that inherited it).
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or 0)
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2e6


class Watchdog:
    """Send WATCHDOG=1 every ``interval`` seconds while the main loop turns.

    A thread keeps time, but it pings only if ``last_turn()`` (the monotonic
    time of the main loop's latest turn) is recent. A wedged loop therefore
    stops the pings and systemd restarts the daemon, while a thread that
    pinged unconditionally would keep a dead daemon "alive".
    """

    def __init__(self, interval: float, last_turn: Callable[[], float], log: Any,
                 notifier: Notifier | None = None) -> None:
        self.interval = interval
        self.last_turn = last_turn
        self.log = log
        self.notifier = notifier or Notifier()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        stalled = False
        while not self._stop.wait(self.interval):
            age = time.monotonic() - self.last_turn()
            if age <= self.interval:
                self.notifier.send("WATCHDOG=1")
                if stalled:
                    self.log.info("watchdog_recovered")
                stalled = False
            elif not stalled:
                stalled = True
                self.log.error("watchdog_stalled", loop_age_s=round(age, 3))


def start_watchdog(last_turn: Callable[[], float], log: Any) -> Watchdog | None:
    """Start keep-alives if systemd asked for them (WatchdogSec=); else None."""
    interval = watchdog_interval()
    if interval is None:
        return None
    log.info("watchdog_enabled", interval_s=interval)
    return Watchdog(interval, last_turn, log).start()
