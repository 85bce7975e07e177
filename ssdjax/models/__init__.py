"""Stateless Flax Linen models: ``SSD`` = backbone (``backbones``) + prediction head (``heads``).

Parameters are plain pytrees (``model.init`` -> ``{'params'[, 'batch_stats']}``), so they shard,
checkpoint and pass through ``jit`` / ``vmap`` / ``grad`` directly.
"""

from ssdjax.models import backbones, heads
from ssdjax.models import mobilenet_v3  # registers the "mobilenet_v3_large" backbone
from ssdjax.models.ssd import SSD, check_config, from_config

__all__ = ["SSD", "backbones", "check_config", "from_config", "heads", "mobilenet_v3"]
