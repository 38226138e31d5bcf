"""Task examples: the built-in tasks on the stdlib corpus, and user files (jsonl / parquet).

Built-in tasks take their examples from the functions of the Python standard library source, the corpus ember
pretrains on by default. A file is held out when the pretraining split put it in `val` (the same hash of the same
bytes, `data.prepare.hash_fraction`): evaluation examples come only from held-out files, training examples only
from the others, so a pretrained model never saw an evaluation example. With `finetune.validation_fraction` the
evaluation examples come instead from the training files whose hash lies just above the held-out range (and those
files leave the training set): a validation split for choosing settings that never looks at the held-out files.

- `stdlib-topic`: classify a function's source into its top-level package, among the `num_labels` packages with
  the most functions (the `test` package, test suites rather than library code, is left out).
- `stdlib-docstring`: SFT, from the signature and docstring write the body.
- `stdlib-prefs`: DPO, prefer a function's real body to a corrupted one (its lines shuffled, or another
  function's body).
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ember.data.prepare import hash_fraction
from ember.data.sources import stdlib_files
from ember.errors import UserError
from ember.finetune.hf_records import is_dataset_task, read_dataset_records

BUILTIN_TASKS = {"stdlib-topic": "classification", "stdlib-docstring": "sft", "stdlib-prefs": "dpo"}
EXCLUDED_PACKAGES = {"test"}


@dataclass
class TaskData:
    """A task's examples: dicts with `text`/`label` (classification), `prompt`/`response` (sft) or
    `prompt`/`chosen`/`rejected` (dpo)."""

    kind: str
    train: list[dict]
    eval: list[dict]
    labels: list[str] = field(default_factory=list)  # classification: class names in id order


@dataclass
class StdlibFunction:
    package: str  # top-level package (first path component under the stdlib root)
    split: str  # "heldout" (the file is in the pretraining val split), "validation" or "train"
    source: str  # the whole function, from `def` to its last line, dedented
    header: str  # signature and docstring
    body: str  # the statements after the docstring
    has_docstring: bool


def file_fraction(data: bytes) -> float:
    """Where this document falls in [0, 1) by the hash `ember data prepare` splits on (blake2b-16 of its UTF-8
    bytes): below the pretraining split's val_fraction means held out."""
    return hash_fraction(hashlib.blake2b(data, digest_size=16).digest())


def file_split(data: bytes, val_fraction: float, validation_fraction: float = 0.0) -> str:
    fraction = file_fraction(data)
    if fraction < val_fraction:
        return "heldout"
    return "validation" if fraction < val_fraction + validation_fraction else "train"


def _functions_of(text: str) -> list[tuple[str, str, str, bool]]:
    """(source, header, body, has_docstring) of every function defined in `text`."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a few stdlib files are deliberately invalid (test data, Python 2)
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str)
        body_nodes = node.body[1:] if has_doc else node.body
        if not body_nodes:
            continue
        body_start = body_nodes[0].lineno - 1
        end = node.end_lineno
        indent = len(lines[start]) - len(lines[start].lstrip())
        dedent = lambda chunk: "".join(line[indent:] if line[:indent].isspace() else line.lstrip() for line in chunk)
        out.append((dedent(lines[start:end]), dedent(lines[start:body_start]), dedent(lines[body_start:end]), has_doc))
    return out


def stdlib_functions(val_fraction: float, packages: set[str] | None = None, validation_fraction: float = 0.0,
                     order_seed: int | None = None) -> Iterator[StdlibFunction]:
    """Functions of the stdlib's files (of `packages` only, when given: top-level modules are not packages), with
    their file's split; the files in path order, or in an order drawn from `order_seed` (so that a caller who needs
    a few examples can stop early instead of parsing the whole library)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = stdlib_files()
    if order_seed is not None:
        key = lambda p: hashlib.blake2b(f"{order_seed}:{p.relative_to(root).as_posix()}".encode(), digest_size=8).digest()
        paths = sorted(paths, key=key)
    for path in paths:
        parts = path.relative_to(root).parts
        if parts[0] in EXCLUDED_PACKAGES or (packages is not None and (len(parts) < 2 or parts[0] not in packages)):
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # dropped by prepare as well
            continue
        split = file_split(data, val_fraction, validation_fraction)
        for source, header, body, has_doc in _functions_of(text):
            yield StdlibFunction(parts[0], split, source, header, body, has_doc)


def largest_packages(num: int) -> list[str]:
    """The `num` packages with the most function definitions (a quick count of `def` lines), largest first."""
    root = Path(sysconfig.get_paths()["stdlib"])
    counts: Counter = Counter()
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        if len(parts) >= 2 and parts[0] not in EXCLUDED_PACKAGES:
            counts[parts[0]] += sum(1 for line in path.read_bytes().splitlines() if line.lstrip().startswith((b"def ", b"async def ")))
    return [name for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num]]


def _sample(items: list, limit: int | None, seed: int) -> list:
    if limit is None or len(items) <= limit:
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def _balanced(examples: list[dict], labels: list[str], limit: int | None, seed: int) -> list[dict]:
    """At most `limit` examples, as equal a share per class as the classes allow, in a seeded order."""
    rng = random.Random(seed)
    by_label = {label: [e for e in examples if e["label"] == label] for label in labels}
    for items in by_label.values():
        rng.shuffle(items)
    if limit is None:
        chosen = [e for items in by_label.values() for e in items]
    else:
        chosen, share = [], max(1, limit // len(labels))
        for items in by_label.values():
            chosen += items[:share]
    rng.shuffle(chosen)
    return chosen


def eval_split(cfg) -> str:
    return "validation" if cfg.validation_fraction else "heldout"


def stdlib_topic(cfg, val_fraction: float, seed: int) -> TaskData:
    labels = sorted(largest_packages(cfg.num_labels))
    functions = list(stdlib_functions(val_fraction, set(labels), cfg.validation_fraction or 0.0))
    train = [{"text": f.source, "label": f.package} for f in functions if f.split == "train"]
    evaluation = [{"text": f.source, "label": f.package} for f in functions if f.split == eval_split(cfg)]
    return TaskData("classification", _balanced(train, labels, cfg.max_train_examples, seed),
                    _balanced(evaluation, labels, cfg.max_eval_examples, seed + 1), labels)


def _corrupt(body: str, other_body: str, rng: random.Random) -> str:
    """A wrong body: the lines shuffled (when that changes them), else another function's body."""
    lines = body.splitlines(keepends=True)
    if len(set(lines)) > 2 and rng.random() < 0.5:
        shuffled = lines[:]
        while shuffled == lines:
            rng.shuffle(shuffled)
        return "".join(shuffled)
    return other_body


def stdlib_generation(cfg, kind: str, val_fraction: float, seed: int) -> TaskData:
    """Functions with a docstring and a body, from files in a seeded order until both splits have enough (all
    files when a split has no limit), then a seeded sample of each."""
    limits = {"train": cfg.max_train_examples, eval_split(cfg): cfg.max_eval_examples}
    found: dict[str, list[StdlibFunction]] = {split: [] for split in limits}
    order = seed if None not in limits.values() else None
    for f in stdlib_functions(val_fraction, None, cfg.validation_fraction or 0.0, order_seed=order):
        if f.split in found and f.has_docstring and f.body.strip():
            found[f.split].append(f)
            if order is not None and all(len(found[s]) > limits[s] for s in limits):
                break
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {}
    for split, group in found.items():
        splits[split] = []
        # A rejected body from another function comes from the same split: no held-out text in training pairs.
        for i, f in enumerate(group):
            if kind == "sft":
                splits[split].append({"prompt": f.header, "response": f.body})
            elif len(group) > 1:
                other = group[(i + 1 + rng.randrange(len(group) - 1)) % len(group)].body
                splits[split].append({"prompt": f.header, "chosen": f.body, "rejected": _corrupt(f.body, other, rng)})
    return TaskData(kind, _sample(splits["train"], cfg.max_train_examples, seed),
                    _sample(splits[eval_split(cfg)], cfg.max_eval_examples, seed + 1))


# ---------------------------------------------------------------- user files

REQUIRED_FIELDS = {"classification": ("text_field", "label_field"), "sft": ("prompt", "response"),
                   "dpo": ("prompt", "chosen", "rejected")}


def read_records(path: Path) -> list[dict]:
    """Records of a .jsonl or .parquet file (a UserError naming the file and line for anything malformed)."""
    if not path.is_file():
        raise UserError("task file not found", str(path))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON line: {e.msg}", f"{path}:{line_no}") from None
        if not isinstance(record, dict):
            raise UserError("expected a JSON object per line", f"{path}:{line_no}")
        records.append(record)
    return records


def file_task(cfg, seed: int) -> TaskData:
    path = Path(cfg.task)
    if cfg.kind == "auto":
        raise UserError("a file task needs finetune.kind (classification, sft or dpo)", "finetune.kind")
    records = read_dataset_records(cfg.task, cfg.hub_split) if is_dataset_task(cfg.task) else read_records(path)
    if not records:
        raise UserError("the task file holds no examples", str(path))
    if cfg.kind == "classification":
        fields = {"text": cfg.text_field, "label": cfg.label_field}
    elif cfg.kind == "sft" and "messages" in records[0]:  # a chat: its turns instead of prompt and response
        fields = {"messages": "messages"}
    else:
        fields = {name: name for name in REQUIRED_FIELDS[cfg.kind]}
    examples = []
    for i, record in enumerate(records):
        for ours, theirs in fields.items():
            if record.get(theirs) is None:
                raise UserError(f"example has no field {theirs!r}", f"{path}: record {i + 1}")
        examples.append({ours: record[theirs] if ours != "label" else str(record[theirs]) for ours, theirs in fields.items()})
    labels: list[str] = []
    if cfg.kind == "classification":
        labels = list(cfg.labels) if cfg.labels else sorted({e["label"] for e in examples})
        for i, e in enumerate(examples):
            if e["label"] not in labels:
                raise UserError(f"label {e['label']!r} is not in the label set {labels}", f"{path}: record {i + 1}")
    is_eval = [hash_fraction(hashlib.blake2b(json.dumps(e, sort_keys=True).encode(), digest_size=16).digest()) < cfg.eval_fraction
               for e in examples]
    train = [e for e, ev in zip(examples, is_eval) if not ev]
    held = [e for e, ev in zip(examples, is_eval) if ev]
    if not train or not held:
        raise UserError(f"{len(train)} training and {len(held)} evaluation examples; both must be non-empty "
                        "(more examples, or another finetune.eval_fraction)", str(path))
    return TaskData(cfg.kind, _sample(train, cfg.max_train_examples, seed), _sample(held, cfg.max_eval_examples, seed + 1), labels)


def load_task(cfg, val_fraction: float, seed: int) -> TaskData:
    """The examples of `cfg.task` (a FinetuneConfig); `val_fraction` is the pretraining split's."""
    kind = BUILTIN_TASKS.get(cfg.task)
    if kind is None:
        if not cfg.task.endswith((".jsonl", ".parquet")) and not is_dataset_task(cfg.task):
            raise UserError(f"unknown task {cfg.task!r}: a built-in task ({', '.join(BUILTIN_TASKS)}), a .jsonl / .parquet file, "
                            "a save_to_disk dataset directory or hf:NAME", "finetune.task")
        return file_task(cfg, seed)
    if cfg.kind not in ("auto", kind):
        raise UserError(f"task {cfg.task} is a {kind} task, not {cfg.kind}", "finetune.kind")
    task = stdlib_topic(cfg, val_fraction, seed) if kind == "classification" else stdlib_generation(cfg, kind, val_fraction, seed)
    if not task.train or not task.eval:
        raise UserError(f"task {cfg.task} has {len(task.train)} training and {len(task.eval)} evaluation examples",
                        "finetune.task")
    return task
