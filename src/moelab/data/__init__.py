"""Data: synthetic memorization/reasoning corpus, tokenizers, token shards and the resumable loader.

Public entry points (import from the submodules or from here):

* :class:`DataConfig`, :class:`SyntheticConfig`, :class:`ShardSource` — configuration (``config``)
* :func:`load_tokenizer`, :class:`ByteTokenizer`, :class:`HFTokenizer`, :func:`train_bpe` (``tokenizer``)
* :func:`write_shards`, :func:`prepare`, :class:`ShardSet` (``shards``)
* :class:`TokenLoader`, :func:`eval_batches` (``loader``)
* :func:`iter_documents`, :func:`memorization_test_set`, :func:`reasoning_test_set`, :func:`materialize` (``synthetic``)
"""

from .config import DataConfig, ShardSource, SyntheticConfig
from .loader import TokenLoader, eval_batches
from .shards import ShardSet, prepare, write_shards
from .synthetic import (
    build_world,
    iter_documents,
    iter_validation_documents,
    materialize,
    memorization_test_set,
    reasoning_test_set,
)
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

__all__ = [
    "DataConfig", "ShardSource", "SyntheticConfig", "TokenLoader", "eval_batches", "ShardSet", "prepare",
    "write_shards", "build_world", "iter_documents", "iter_validation_documents", "materialize",
    "memorization_test_set", "reasoning_test_set", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "train_bpe",
]
