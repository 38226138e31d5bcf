"""Config sections of the data stage: the training-data mixture a run reads."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ember.config import Section


class DatasetEntry(Section):
    """One prepared dataset in a training mixture."""

    path: Path | None = Field(None, description="prepared dataset directory (holds manifest.json); default: the output_dir of `prepare`")
    prepare: str | None = Field(None, description="data-prepare preset or YAML (configs/data/) that builds `path` when it holds no dataset yet")
    weight: float = Field(1.0, gt=0, description="sampling weight in the mixture (normalised over all datasets)")

    @model_validator(mode="after")
    def _needs_a_source(self):
        if self.path is None and self.prepare is None:
            raise ValueError("give `path` (a prepared dataset) or `prepare` (a data-prepare config)")
        return self


class DataConfig(Section):
    """The training data: a weighted mixture of prepared token-shard datasets."""

    datasets: list[DatasetEntry] = Field(min_length=1, description="prepared datasets and their mixture weights")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank (0: read in the training process)")


# ---------------------------------------------------------------- `ember data prepare`


class TokenizerTrainConfig(Section):
    """How `prepare` (or `ember data tokenizer train`) trains a byte-level BPE when no tokenizer is given."""

    vocab_size: int = Field(8192, ge=300, le=4_294_967_295, description="vocabulary size including the special tokens (> 65535 stores shards as uint32)")
    special_tokens: list[str] = Field(["<|endoftext|>", "<|pad|>"], min_length=1, description="special tokens, ids 0.. in this order; the first is the end-of-document token")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="fraction of documents (chosen by document hash) the tokenizer is trained on")
    max_train_bytes: int | None = Field(None, gt=0, description="stop reading training text after this many bytes (None: no cap)")


class FilterConfig(Section):
    """Document filters applied before tokenisation; every drop is counted by reason in the manifest."""

    min_chars: int = Field(1, ge=0, description="drop documents shorter than this many characters")
    max_chars: int | None = Field(None, gt=0, description="drop documents longer than this many characters (None: no limit)")
    dedup: bool = Field(False, description="drop exact duplicates (same text hash), keeping the first occurrence")


class PrepareConfig(Section):
    """`ember data prepare`: read a source, tokenise it, write packed token shards and a manifest."""

    source: str = Field(description="`builtin:python-stdlib`, a file, a directory, a glob (.jsonl/.json[.gz|.zst], .parquet, .txt), a `save_to_disk` directory, or a hub dataset name (`hf:` prefix optional)")
    output_dir: Path = Field(description="dataset directory to create (relative to the working directory)")
    text_field: str = Field("text", min_length=1, description="record field that holds the document text (jsonl, json, parquet, datasets)")
    hub_config: str | None = Field(None, description="hub dataset configuration name")
    hub_split: str = Field("train", description="hub / save_to_disk split to read")
    streaming: bool = Field(False, description="stream a hub dataset instead of downloading it first")
    max_documents: int | None = Field(None, gt=0, description="read at most this many documents from the source (None: all)")
    tokenizer: str | None = Field(None, description="HF tokenizer directory, tokenizer.json file or hub name; None: train a byte-level BPE (see tokenizer_train)")
    tokenizer_train: TokenizerTrainConfig = Field(default_factory=TokenizerTrainConfig, description="BPE training settings, used when `tokenizer` is None")
    eos_token: str = Field("<|endoftext|>", description="end-of-document token appended after every document, used when the tokenizer defines no eos_token")
    shard_tokens: int = Field(1 << 27, ge=1024, description="tokens per shard file (documents are not split; a shard closes once it holds this many)")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="fraction of documents (by document hash) held out as the `val` split")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="document filters")
    num_proc: int = Field(0, ge=0, description="tokeniser processes (0: all cores available to this process)")
    batch_chars: int = Field(1 << 20, ge=1, description="characters of text sent to a tokeniser process per task")
