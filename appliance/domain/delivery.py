"""Where a result's DICOM report stands on its way to the PACS: the journal's outbox records it, the API shows it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DeliveryState(Enum):
    PENDING = "pending"  # stored with the result, not yet acknowledged by the PACS (it may be retrying)
    DELIVERED = "delivered"  # the PACS answered success or a warning
    REFUSED = "refused"  # the PACS refused it for good: set aside with its status, never sent again by itself


@dataclass(frozen=True)
class Delivery:
    state: DeliveryState
    attempts: int  # sends tried that did not deliver it (failed associations included)
    status: int | None  # the last DIMSE status the PACS answered; None when it never answered one
    reason: str  # why it is still pending or was refused, in a sentence; empty once delivered
    sop_instance_uid: str  # of the DICOM object sent (the report), not of the scored image
