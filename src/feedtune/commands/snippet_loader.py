"""The training DataLoader of ``feedtune best --emit python``'s script, as source text.

Its sampler (``DistributedSampler``, or feedtune's ``DistributedWeightedSampler`` written out
under torchrun, as PyTorch has none), its worker seeding and, with a batch mix, its collate
function: each process fed as the tuned run fed it.
"""

from __future__ import annotations

import textwrap
from typing import Any

from feedtune.commands.snippet_code import Code, lit, recorded_mix
from feedtune.config import Config
from feedtune.feed import loader

__all__ = [
    "DISTRIBUTED_WEIGHTED_SOURCE",
    "RANK_SOURCE",
    "loader_source",
    "mix_collate_source",
    "seed_worker_source",
]


def seed_worker_source(cfg: Config) -> str:
    lines = [
        "def seed_worker(worker_id):",
        '    """One torch thread per worker: the workers already share the cores."""',
        "    torch.set_num_threads(1)",
    ]
    if cfg.augment.library == "albumentations":
        lines += [
            "    cv2.setNumThreads(0)",
            "    # Forked copies of one albumentations generator would repeat each other.",
            "    seed = torch.initial_seed()",
            "    transform = torch.utils.data.get_worker_info().dataset.transform",
            "    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))",
        ]
    return "\n".join(lines) + "\n"


def mix_collate_source(cfg: Config) -> str:
    head = textwrap.dedent('''
        class MixCollate:
            """collate_fn of the training loader: collates the samples (skipping any that came
            back None, as feedtune's loader does), then mixes the batch, whose labels become soft
            targets [B, num_classes]. Validation stays unmixed (a plain DataLoader, integer
            labels). A class, not a closure, so that workers started by spawn can unpickle it."""

            def __init__(self, num_classes):
        ''').lstrip("\n")
    lead = "        self.mix = "
    tail = textwrap.dedent("""
        def __call__(self, batch):
            batch = [sample for sample in batch if sample is not None]
            if not batch:
                return None
            return self.mix(*default_collate(batch))
        """)
    return head + lead + lit(recorded_mix(cfg), 8, len(lead)) + "\n" + textwrap.indent(tail, "    ")


RANK_SOURCE = textwrap.dedent('''
    def rank_and_world_size():
        """This process's rank and the number of processes: from torch.distributed once it is
        initialised, else from the RANK and WORLD_SIZE that torchrun sets."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ''')


# feedtune.feed.sampling.DistributedWeightedSampler, plus the per-epoch reseeding that
# feedtune's trainer does for it (generator 0: seed * 1_000_003 + epoch * 97).
DISTRIBUTED_WEIGHTED_SOURCE = textwrap.dedent('''
    class DistributedWeightedSampler(Sampler):
        """This process's share of one class-weighted draw made alike on every process: each
        keeps every num_replicas-th index from its rank, the draw padded with its own first
        indices to equal shares, so together they see the draw that one process would."""

        def __init__(self, weights, num_samples, replacement, seed, rank, num_replicas):
            self.weights, self.num_samples, self.replacement = weights, num_samples, replacement
            self.seed, self.rank, self.num_replicas = seed, rank, num_replicas
            self.generator = torch.Generator().manual_seed(seed)

        def set_epoch(self, epoch):
            """Reseed the draw, alike on every process, as feedtune does before each epoch."""
            self.generator.manual_seed(self.seed * 1_000_003 + epoch * 97)

        def __len__(self):
            return -(-self.num_samples // self.num_replicas)

        def __iter__(self):
            drawn = torch.multinomial(
                self.weights, self.num_samples, self.replacement, generator=self.generator
            ).tolist()
            drawn += drawn[: len(self) * self.num_replicas - len(drawn)]
            return iter(drawn[self.rank :: self.num_replicas])
    ''')


def loader_source(cfg: Config, *, world_size: int) -> str:
    distributed = world_size > 1
    mixed = cfg.augment.mix != "none"
    lines = _head_lines(cfg, distributed=distributed, mixed=mixed)
    dataset = Code("ImageDataset(paths, labels, train_transform)")
    sampling, dataset, kwargs = _sampler_lines(cfg, dataset, distributed=distributed)
    lines += sampling
    kwargs["generator"] = Code("generator")
    kwargs.update(_loader_settings(cfg))
    if mixed:
        lines += [
            "    # Mixed batches: soft targets [B, num_classes], for labels 0 .. num_classes - 1.",
            "    num_classes = int(np.max(labels)) + 1 if num_classes is None else num_classes",
        ]
        kwargs["collate_fn"] = Code("MixCollate(num_classes)")
    if cfg.loader.num_workers > 0:
        kwargs["worker_init_fn"] = Code("seed_worker")
    if distributed:
        batch = cfg.loader.batch_size
        lines.append(
            f"    # batch_size is per process: {world_size} processes take {world_size} x {batch} "
            "images a step."
        )
    lines.append(f"    return {lit(Code('DataLoader')(dataset, **kwargs), 4)}")
    return "\n".join(lines) + "\n"


def _head_lines(cfg: Config, *, distributed: bool, mixed: bool) -> list[str]:
    """make_loader's signature, docstring and the generator that seeds the workers."""
    lines = [
        f"def make_loader(paths, labels{', num_classes=None' if mixed else ''}):",
        '    """The training DataLoader over your files, fed as in the tuned run."""',
    ]
    if distributed:
        lines += [
            "    rank, world_size = rank_and_world_size()",
            f"    generator = torch.Generator().manual_seed({cfg.seed} + rank)  "
            "# workers' seeds, per process",
        ]
    else:
        lines.append(f"    generator = torch.Generator().manual_seed({cfg.seed})")
    return lines


def _epoch_note(kind: str) -> list[str]:
    """The comment above a distributed sampler: a drawing one needs set_epoch."""
    if kind == "sequential":
        return ["    # torchrun: this process's share of every epoch."]
    return [
        "    # torchrun: this process's share of every epoch. Call loader.sampler.set_epoch(epoch)",
        "    # before each epoch (as feedtune does), or every epoch repeats the first one's draw.",
    ]


def _sampler_lines(
    cfg: Config, dataset: Code, *, distributed: bool
) -> tuple[list[str], Code, dict[str, Any]]:
    """The lines that make the sampler, the dataset the DataLoader then takes, and the
    DataLoader's sampler or shuffle argument."""
    s = cfg.sampler
    if s.kind == "weighted":
        return _weighted_lines(cfg, distributed=distributed), dataset, {"sampler": Code("sampler")}
    if not distributed:
        return [], dataset, {"shuffle": s.kind == "random"}
    sampler = Code("DistributedSampler")(
        Code("train_set"),
        num_replicas=Code("world_size"),
        rank=Code("rank"),
        shuffle=s.kind == "random",
        seed=cfg.seed,
    )
    lines = [
        f"    train_set = {lit(dataset, 4, 16)}",
        *_epoch_note(s.kind),
        f"    sampler = {lit(sampler, 4, 14)}",
    ]
    return lines, Code("train_set"), {"sampler": Code("sampler")}


def _weighted_lines(cfg: Config, *, distributed: bool) -> list[str]:
    """The per-sample weights and the class-weighted sampler drawing from them."""
    s = cfg.sampler
    num = "len(labels)" if s.num_samples is None else str(s.num_samples)
    lines = [
        "    labels = np.asarray(labels)",
        "    # Per-sample weight count(label) ** -weight_power (0: random, 1: class-balanced).",
        f"    weights = np.bincount(labels)[labels].astype(np.float64) ** {-s.weight_power!r}",
    ]
    if distributed:
        sampler = Code("DistributedWeightedSampler")(
            Code("torch.as_tensor(weights)"),
            num_samples=Code(num),
            replacement=s.replacement,
            seed=cfg.seed,
            rank=Code("rank"),
            num_replicas=Code("world_size"),
        )
        return [*lines, *_epoch_note(s.kind), f"    sampler = {lit(sampler, 4, 14)}"]
    return [
        *lines,
        "    sampler = WeightedRandomSampler(",
        f"        torch.as_tensor(weights), num_samples={num}, "
        f"replacement={s.replacement}, generator=generator",
        "    )",
    ]


def _loader_settings(cfg: Config) -> dict[str, Any]:
    """The tuned DataLoader settings; those that hold only on a GPU are conditional on one."""
    kwargs: dict[str, Any] = {}
    cpu = loader.loader_kwargs(cfg.loader, cuda=False)
    for key, value in loader.loader_kwargs(cfg.loader, cuda=True).items():
        differs = key == "pin_memory" or cpu.get(key) != value
        kwargs[key] = Code(f"torch.cuda.is_available() and {value!r}") if differs else value
    return kwargs
