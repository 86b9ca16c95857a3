"""The row-failure policy shared by extraction and training (docs/errors.md).

A job may lose a few rows to bad files and still succeed, but only up to
`data.max_failed_fraction` of the rows it was asked to process; a job in which no row
succeeded is never a success. Failures are counted, and the first few are kept with their
reasons so that the message that ends the job names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wavflow.errors import ConfigError, RowsFailedError

POLICY_KEY = "data.max_failed_fraction"
LISTED = 5  # failed rows named in a message; the full list is in the job's log / errors file
REASON_CHARS = 240  # a decoder's reason can be long: the message stays readable in one line


@dataclass
class RowFailures:
    """How many rows failed, and the first `LISTED` of them as (id, reason)."""

    count: int = 0
    first: list[tuple[str, str]] = field(default_factory=list)

    def add(self, row_id: str, reason: str) -> None:
        self.count += 1
        if len(self.first) < LISTED:
            self.first.append((row_id, reason))

    def merge(self, other: "RowFailures") -> None:
        self.count += other.count
        self.first.extend(other.first[: LISTED - len(self.first)])

    def examples(self) -> str:
        shown = "; ".join(f"{row_id!r}: {_short(reason)}" for row_id, reason in self.first)
        more = self.count - len(self.first)
        return shown + (f"; and {more} more" if more > 0 else "")


def _short(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."


def max_failed_fraction(value: object) -> float:
    """The policy's limit, checked: a number in [0, 1)."""
    try:
        limit = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{POLICY_KEY} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= limit < 1.0:
        raise ConfigError(f"{POLICY_KEY} must be in [0, 1) (0 = no row may fail), got {value!r}")
    return limit


def policy_broken(failed: int, total: int, limit: float) -> bool:
    """More than `limit` of `total` rows failed, or none succeeded."""
    return total <= 0 or failed >= total or failed > limit * total


def check_rows(failures: RowFailures, total: int, limit: float, *, what: str, where: str) -> None:
    """Raise RowsFailedError when the policy is broken. `what` names the rows ("rows of the
    training CSV this epoch"), `where` the file that lists every failure."""
    if not policy_broken(failures.count, total, limit):
        return
    if total <= 0:
        raise RowsFailedError(f"no {what}: nothing to do")
    share = failures.count / total
    verdict = "every row failed" if failures.count >= total else (
        f"{share:.1%} failed, above {POLICY_KEY}={limit:g}")
    raise RowsFailedError(
        f"{failures.count} of {total} {what} failed ({verdict}); first: {failures.examples()}. "
        f"Every failure with its reason is in {where}; fix the rows (or raise {POLICY_KEY})"
    )
