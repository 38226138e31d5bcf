"""Task records from Hugging Face datasets: a directory written by `save_to_disk`, or `hf:NAME` for any name
`datasets.load_dataset` resolves (a hub dataset in the local cache, a builder, a directory of data files).

The same spellings as a pretraining source (`data.sources`); the split is `finetune.hub_split`.
"""

from __future__ import annotations

from pathlib import Path

from ember.data.sources import dataset_split, is_saved_dataset
from ember.errors import UserError


def is_dataset_task(task: str) -> bool:
    return task.startswith("hf:") or is_saved_dataset(Path(task))


def read_dataset_records(task: str, split: str) -> list[dict]:
    """The records of `split` of the dataset `task` names, as dicts (a UserError naming it when it cannot load)."""
    import datasets

    try:
        if task.startswith("hf:"):
            ds = datasets.load_dataset(task[3:], split=split)
        else:
            ds = datasets.load_from_disk(task)
    except Exception as e:  # datasets raises many kinds (missing files, unknown names, offline hub)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the dataset: {first}", task) from None
    return dataset_split(ds, split, task, field="finetune.hub_split").to_list()
