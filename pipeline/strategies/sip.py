"""`sip_s` / `sip_h`: SIP-AT, i.e. PGD-AT whose perturbation never touches salient elements.

The mask of each image is read from a store by sample index (synthetic from the teacher, or human from
segmentations) and handed to the shared PGD routine, which applies δ' = δ·(1−M) after every step.
"""

from pipeline.strategies import Batch
from pipeline.strategies.madry import Madry


class _SIP(Madry):
    def attack_mask(self, batch: Batch):
        if batch.mask is None:
            raise RuntimeError(f"strategy {self.name!r} needs masks but the batch has none")
        return batch.mask


class SIPSynthetic(_SIP, name="sip_s"):
    mask_kind = "synthetic"


class SIPHuman(_SIP, name="sip_h"):
    mask_kind = "human"
