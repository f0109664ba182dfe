"""The one error type the datapath raises."""

from __future__ import annotations


class DatapathError(Exception):
    """A datapath operation failed; the message says what happened and what to do.

    bcc and the bpf() syscall report failures as bare ``Exception``/``OSError``;
    everything that crosses the package boundary is turned into this type so the
    agent can tell "the datapath is broken" apart from its own bugs.
    """
