"""The one error type the datapath raises."""

from __future__ import annotations


class DatapathError(Exception):
    """A datapath operation failed; the message says what happened and what to do.

    bcc and the bpf() syscall report failures as bare ``Exception``/``OSError``;
    everything that crosses the package boundary is turned into this type so the
    agent can tell "the datapath is broken" apart from its own bugs.
    """


class CapacityError(DatapathError):
    """The desired state does not fit in a map; nothing was written.

    ``need`` is what the map would have to hold (at its fullest during the
    update when ``during_update``), ``size`` what it holds, ``setting`` the
    knob that sizes it.
    """

    def __init__(self, map_name: str, need: int, size: int, setting: str, *, during_update: bool = False) -> None:
        self.map_name = map_name
        self.need = need
        self.size = size
        self.setting = setting
        self.during_update = during_update
        when = "while updating to the desired state" if during_update else "for the desired state"
        super().__init__(
            f"map {map_name} is too small: it needs {need:,} entries {when} and holds {size:,}. "
            f"Nothing was written (the maps keep the previous state). Raise {setting}; a pinned map keeps "
            "its size until `clustermesh datapath destroy` and a new load, during which global services "
            "fall back to kube-proxy."
        )
