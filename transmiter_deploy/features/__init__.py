"""Features: images and text towers turned into cached features, zero-shot heads and
adapter artifacts.

This layer owns open_clip loading and exact model identities (:mod:`.models`), datasets
and image decoding (:mod:`.datasets`), the feature cache (:mod:`.cache`), zero-shot heads
with auxiliary classes (:mod:`.heads`, :mod:`.vocabulary`, :mod:`.templates`), and the
adapter on disk with the identities it applies to (:mod:`.adapter_artifact`; it names
models, so it lives here rather than in ``method``). It may import ``method`` and the
ground floor; architectures from above (the demo world) register themselves through
:func:`.models.register_architectures`.
"""
