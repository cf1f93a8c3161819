"""Size limits the CAS services enforce before they buffer anything."""

from __future__ import annotations

from reexec.cas.store import Store
from reexec.errors import ResourceExhausted


def check_blob_size(cas: Store, size: int, what: str) -> None:
    """Raise RESOURCE_EXHAUSTED if a blob of `size` bytes is larger than `cas` could ever hold.

    Called with the size a client declares (in a digest or resource name), so an upload that can
    never be committed is refused before a byte of it is received or buffered.
    """
    limit = cas.max_blob_bytes()
    if limit is not None and size > limit:
        raise ResourceExhausted(
            f"{what} is {size} bytes, larger than the {limit} bytes this server's CAS accepts "
            "for one blob"
        )
