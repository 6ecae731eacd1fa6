"""The offline demo world: procedurally rendered images with captions, and tasks over them.

No CLIP weights or image datasets can be downloaded on the project's machines,
so the project renders its own small world (:mod:`.world`), defines
classification tasks with domain shifts over it (:mod:`.tasks`), and tokenises
its captions with a word-level tokenizer (:mod:`.tokenizer`).
"""
