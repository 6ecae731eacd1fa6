"""The offline demo world: procedurally rendered images with captions, and tasks over them.

No CLIP weights or image datasets can be downloaded on the project's machines,
so the project renders its own small world (:mod:`.world`), defines
classification tasks with domain shifts over it (:mod:`.tasks`), and tokenises
its captions with a word-level tokenizer (:mod:`.tokenizer`).

Layer: above ``features`` (it may import ``method``, ``features`` and the ground floor),
below ``pipeline`` and ``benchmark``, which offer it as data and models. Importing the
package registers its architectures and their tokenizer with the features layer.
"""

from pathlib import Path

from ..features.models import register_architectures
from .tokenizer import demo_tokenizer

# The demo world's architectures (TM-Demo-Source, TM-Demo-Target) read captions with the
# word-level tokenizer; registering both here keeps the features layer free of the demo.
register_architectures(Path(__file__).resolve().parent / "model_configs", tokenizer=demo_tokenizer)
