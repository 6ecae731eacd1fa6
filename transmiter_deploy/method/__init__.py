"""The method: the paper's equations, logits in and adapters out.

This layer owns the adapter (:mod:`.adapter`), the three phases (:mod:`.extraction`,
:mod:`.transfer`, :mod:`.plus`), their shared training loop (:mod:`.training`),
base-to-novel metrics (:mod:`.evaluation`) and EFT logit arithmetic (:mod:`.eft`).
It works on tensors only: no files, no images, no models. It may import the ground
floor (``errors``) and nothing else of ours.
"""
