"""KV tiers below device memory: host DRAM, local disk, Redis / Valkey, behind one contract (`Tier`),
one checksummed block format (`codec`), and one policy (`TierStack`)."""

from kvstrata.tiers.base import Tier, TierStats
from kvstrata.tiers.codec import CorruptBlockError, decode, encode, verify
from kvstrata.tiers.disk import DiskTier
from kvstrata.tiers.host import HostTier
from kvstrata.tiers.policy import TierPolicy
from kvstrata.tiers.remote import RedisTier
from kvstrata.tiers.stack import TierStack

__all__ = ["Tier", "TierStats", "HostTier", "DiskTier", "RedisTier", "TierStack", "TierPolicy",
           "CorruptBlockError", "encode", "decode", "verify"]
