"""Retry policy: exponential backoff with jitter, bounded in attempts and in time.

Only transient failures are retried: connection errors, timeouts, connections dropped
mid-body, ``429`` (after ``Retry-After`` when given) and ``5xx``. Every other ``4xx`` is the
caller's or the registry's final word, and so is a TLS certificate that does not verify. Sleeps
go through ``trio.sleep`` and time through ``trio.current_time()``, so tests under
``trio.testing.MockClock(autojump_threshold=0)`` run instantly.
"""

from __future__ import annotations

import email.utils
import random
import ssl
import time
from dataclasses import dataclass

import httpx
import trio

from ..errors import RegistryError

__all__ = [
    "Failure",
    "RetryBudget",
    "RetryPolicy",
    "Transient",
    "describe_transport_error",
    "is_transient",
    "parse_retry_after",
]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. ``max_total`` bounds the time spent in one streak of failures."""

    max_attempts: int = 6
    max_total: float = 120.0
    base_delay: float = 0.5
    max_delay: float = 15.0
    # A Retry-After beyond this (or beyond what is left of max_total) ends the retries now:
    # better a clear error than a mount that hangs for an hour.
    max_retry_after: float = 60.0


@dataclass(frozen=True)
class Failure:
    """One failed attempt: what happened, for the final error message."""

    detail: str
    status: int | None = None
    code: str | None = None
    retry_after: float | None = None


class Transient(Exception):
    """Raised inside an attempt for a failure worth retrying (429, 5xx, short body)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.detail)
        self.failure = failure


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error behind a transport error (under trio it hides two causes deep)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def describe_transport_error(exc: httpx.TransportError) -> str:
    """One line for a failed exchange; names the TLS reason, which trio's message lacks."""
    cause = _ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        try:
            host = f" of {exc.request.url.netloc.decode('ascii')}"
        except RuntimeError:  # no request attached
            host = ""
        return (
            f"TLS certificate{host} not trusted: {cause.verify_message or cause.reason} "
            "(for a private CA, set SSL_CERT_FILE or SSL_CERT_DIR)"
        )
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def is_transient(exc: httpx.TransportError) -> bool:
    """Network trouble worth another try (not our own protocol misuse, not an untrusted
    certificate: that one does not get better by asking again)."""
    if isinstance(_ssl_cause(exc), ssl.SSLCertVerificationError):
        return False
    return isinstance(
        exc,
        httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError,
    )


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    # An HTTP date is wall-clock time by definition, unlike every other timer here.
    return max(0.0, when.timestamp() - time.time())


class RetryBudget:
    """Counts attempts of one operation and sleeps between them."""

    def __init__(self, policy: RetryPolicy, what: str, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.what = what
        self.rng = rng or random.Random()
        self.retries = 0
        self._attempts = 0
        self._start = trio.current_time()

    def reset(self) -> None:
        """Progress was made (a body advanced): the next failure starts a fresh streak."""
        self._attempts = 0
        self._start = trio.current_time()

    def _give_up(self, failure: Failure, why: str) -> RegistryError:
        elapsed = trio.current_time() - self._start
        return RegistryError(
            f"{self.what}: {failure.detail} ({why}; {self._attempts} attempt"
            f"{'s' if self._attempts != 1 else ''} in {elapsed:.1f} s)",
            status=failure.status,
            code=failure.code,
        )

    async def wait(self, failure: Failure) -> None:
        """Sleep before the next attempt, or raise :class:`RegistryError` if out of budget."""
        self._attempts += 1
        p = self.policy
        if self._attempts >= p.max_attempts:
            raise self._give_up(failure, "giving up")
        remaining = p.max_total - (trio.current_time() - self._start)
        if failure.retry_after is not None:
            if failure.retry_after > min(p.max_retry_after, remaining):
                raise self._give_up(
                    failure, f"server asks to retry after {failure.retry_after:.0f} s"
                )
            delay = failure.retry_after
        else:
            # "Equal jitter": at least half the exponential step, so retries stay spaced,
            # plus a random half, so many clients do not retry in lockstep.
            step = min(p.max_delay, p.base_delay * 2 ** (self._attempts - 1))
            delay = step / 2 + self.rng.uniform(0, step / 2)
        if delay > remaining:
            raise self._give_up(failure, "retry time budget spent")
        self.retries += 1
        await trio.sleep(delay)
