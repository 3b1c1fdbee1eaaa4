"""Modality and band specs, default bandsets, tokenization config, mask codes."""

from enum import IntEnum


class MaskValue(IntEnum):
    """Per-token (and per-pixel) role codes, identical to the reference's MaskValue."""

    ONLINE_ENCODER = 0
    TARGET_ENCODER_ONLY = 1
    DECODER = 2
    MISSING = 3
