"""ssdjax: SSD-family single-shot detectors in JAX/Flax.

The core (``boxes``, ``anchors``, ``matching``, ``losses``, ``postprocess``) is pure functions that
work under ``jit``, ``vmap``, ``grad`` and sharding; ``models`` holds stateless Flax Linen modules.
Data loading, training and the CLIs live in their own modules and are imported on demand.
"""

from ssdjax import anchors, boxes, losses, matching, postprocess

__version__ = "0.1.0"
__all__ = ["anchors", "boxes", "losses", "matching", "postprocess"]
