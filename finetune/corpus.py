"""Continued pretraining (`finetune.kind: pretrain`): the parent's weights trained further on a new corpus.

The corpus is a dataset prepared by `ember data prepare` with the parent's tokenizer (`--set tokenizer=PARENT/hf`
or the checkpoint's tokenizer/), so its token ids mean what they meant in pretraining. Batches and evaluation are
pretraining's own: the token loader's windows, every position supervised, the validation split's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.errors import UserError


@dataclass
class Corpus:
    """A prepared dataset directory and its manifest."""

    dir: Path
    manifest: object

    def has_val(self, seq_len: int) -> bool:
        return self.manifest.num_tokens("val") > seq_len

    def loader(self, split: str, *, seq_len: int, global_batch_size: int, rank: int, world_size: int, seed: int):
        from ember.data.loader import build_loader

        return build_loader([self.dir], [1.0], split=split, seq_len=seq_len, global_batch_size=global_batch_size,
                            rank=rank, world_size=world_size, seed=seed)


def open_corpus(path: str | Path, tokenizer, vocab_size: int, seq_len: int) -> Corpus:
    """The prepared corpus at `path`, checked against the parent: same tokenizer, enough tokens for a window."""
    from ember.data.manifest import MANIFEST, read_manifest
    from ember.finetune.data import load_tokenizer

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError("continued pretraining needs a dataset prepared by `ember data prepare` with the parent's tokenizer "
                        f"(no {MANIFEST} here)", f"finetune.task={path}")
    manifest = read_manifest(path)
    if load_tokenizer(manifest.tokenizer_dir).get_vocab() != tokenizer.get_vocab():
        raise UserError("the corpus was tokenized with another tokenizer than the parent's: prepare it with "
                        "`--set tokenizer=PARENT_TOKENIZER_DIR`", str(manifest.tokenizer_dir))
    if manifest.vocab_size > vocab_size:
        raise UserError(f"the corpus vocabulary ({manifest.vocab_size}) exceeds the model's ({vocab_size})", str(path))
    if manifest.num_tokens("train") <= seq_len:
        raise UserError(f"the corpus's train split has {manifest.num_tokens('train')} tokens, not one window of "
                        f"train.seq_len {seq_len}", str(path))
    return Corpus(path, manifest)
