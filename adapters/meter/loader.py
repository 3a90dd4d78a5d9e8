"""Load an official METER checkpoint (github.com/zdou0830/METER) into `METER`.

Official checkpoints are PyTorch-Lightning files whose ``"state_dict"`` holds the keys of
``METERTransformerSS``. Our module keeps the official attribute names, so the key map is
short (``_map_key``):

renamed
    ``vit_model.visual.<rest>`` -> ``vit_model.<rest>``: the official ``vit_model`` is a
    ``clip_model.CLIP`` wrapper around ``.visual``; ours is the visual tower itself (an
    open_clip ``VisionTransformer`` with the same parameter names: ``conv1``,
    ``class_embedding``, ``positional_embedding``, ``ln_pre``,
    ``transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj.*,ln_2,mlp.c_fc.*,mlp.c_proj.*}``,
    ``ln_post``).
    In ``text_transformer.*`` only: ``gamma``/``beta`` -> ``weight``/``bias`` and
    ``LayerNorm`` <-> ``layer_norm`` when (and only when) the installed transformers names the
    parameter the other way. transformers 5's ``RobertaModel`` uses the official names
    (``embeddings.LayerNorm``, ``attention.output.LayerNorm``…), so nothing is renamed today.

dropped (``DROPPED_PREFIXES``; carried by official checkpoints but never used by METER)
    * ``vit_model.token_embedding.weight``, ``vit_model.positional_embedding``,
      ``vit_model.ln_final.{weight,bias}``: the CLIP text-tower pieces that METER's
      ``clip_model.CLIP`` still builds (``token_embedding`` only in the early revision of
      ``clip_model.py``);
    * ``vit_model.transformer.*``, ``vit_model.text_projection``, ``vit_model.logit_scale``,
      ``vit_model.visual.proj``: the rest of an OpenAI CLIP state dict (METER's CLIP wrapper
      does not build them, so they appear only in hand-made dicts; dropped all the same);
    * ``text_transformer.pooler.*``: RoBERTa's pooler (``RobertaModel.from_pretrained``
      builds it, METER never calls it; we build the model without it);
    * ``text_transformer.embeddings.position_ids`` / ``.token_type_ids``: buffers that older
      transformers saved and transformers 5 keeps non-persistent.

adapted (listed in `LoadReport.adapted`)
    * ``vit_model.positional_embedding`` from another grid (checkpoint resolution !=
      ``config.image_size``): the patch part is resized bicubically on its square grid, the
      CLS row kept, as the official ``clip_model.adapt_position_encoding`` does;
    * ``token_type_embeddings.weight`` with 2 rows into a model with 3 (NLVR2): row 2 is
      a copy of row 1, as the official NLVR2 set-up initialises it;
    * ``text_transformer.embeddings.position_embeddings.weight`` longer than the model's
      table (roberta-base has 514 rows): the first rows are kept;
    * ``rank_output.{weight,bias}`` absent while ``itm_score.fc.*`` is present: taken from
      ITM row 1, as the official IRTR set-up initialises it.

Anything else the model lacks is *unexpected* (e.g. ``mlm_score.*`` and ``itm_score.*`` of
a pre-training checkpoint loaded into a VQA-only model) and anything the checkpoint lacks is
*missing* (e.g. a task head that was never trained). With ``strict=True`` either, or a shape
that cannot be adapted, raises `ValueError` naming every key and nothing is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DROPPED_PREFIXES",
    "LoadReport",
    "interpolate_pos_embed",
    "load_meter_checkpoint",
    "map_official_state_dict",
]

#: Official keys (exact, or prefixes ending in ``.``) that are dropped, never loaded.
DROPPED_PREFIXES: tuple[str, ...] = (
    "vit_model.token_embedding.",
    "vit_model.positional_embedding",
    "vit_model.ln_final.",
    "vit_model.transformer.",
    "vit_model.text_projection",
    "vit_model.logit_scale",
    "vit_model.visual.proj",
    "text_transformer.pooler.",
    "text_transformer.embeddings.position_ids",
    "text_transformer.embeddings.token_type_ids",
)


@dataclass
class LoadReport:
    """What `load_meter_checkpoint` did.

    ``missing``: our keys the checkpoint does not provide (left as initialised).
    ``unexpected``: checkpoint keys (official names) that map to nothing in our model.
    ``mismatched``: ``"key: checkpoint shape -> model shape"`` that could not be adapted.
    ``dropped``: checkpoint keys skipped on purpose (`DROPPED_PREFIXES`).
    ``adapted``: human-readable notes on resized / synthesised tensors.
    ``loaded``: our keys that were written.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name} key(s): " + ", ".join(keys))
        return "; ".join(parts) if parts else "all keys matched"


def _is_dropped(key: str) -> bool:
    return any(key == p or (key.startswith(p) and (p.endswith(".") or key[len(p)] == "."))
               for p in DROPPED_PREFIXES)


def _map_key(key: str, ours: Mapping[str, torch.Tensor]) -> str:
    """The name of official ``key`` in our model (may not exist there)."""
    if key.startswith("vit_model.visual."):
        return "vit_model." + key[len("vit_model.visual."):]
    if key.startswith("text_transformer.") and key not in ours:
        cand = key
        if cand.endswith(".gamma"):
            cand = cand[: -len("gamma")] + "weight"
        elif cand.endswith(".beta"):
            cand = cand[: -len("beta")] + "bias"
        for a, b in ((".LayerNorm.", ".layer_norm."), (".layer_norm.", ".LayerNorm.")):
            if cand not in ours and a in cand and cand.replace(a, b) in ours:
                cand = cand.replace(a, b)
        return cand
    return key


def interpolate_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a CLIP ``(1+g²)×D`` position table to ``num_tokens = 1+G²`` rows: the patch
    rows bicubically on the square grid (``F.interpolate``, ``align_corners=False``, as the
    official ``adapt_position_encoding``), the CLS row unchanged."""
    squeeze = pos.dim() == 2
    table = pos if squeeze else pos[0]
    g_before = round((table.shape[0] - 1) ** 0.5)
    g_after = round((num_tokens - 1) ** 0.5)
    if g_before ** 2 + 1 != table.shape[0] or g_after ** 2 + 1 != num_tokens:
        raise ValueError(f"position table of {table.shape[0]} rows -> {num_tokens} rows: "
                         f"not CLS + a square grid")
    dim = table.shape[-1]
    grid = table[1:].float().reshape(g_before, g_before, dim).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(g_after, g_after), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(g_after * g_after, dim).to(table.dtype)
    out = torch.cat([table[:1], grid], dim=0)
    return out if squeeze else out[None]


def _unwrap(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (or a Lightning checkpoint with 'state_dict'), "
                        f"got {type(obj).__name__}")
    return dict(obj)


def map_official_state_dict(state_dict: Mapping, model: nn.Module
                            ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename / drop / adapt an official METER state dict for ``model``; nothing is loaded.

    Returns the dict in our names (only keys the model has, with the model's shapes) and the
    report (``loaded`` empty until `load_meter_checkpoint` writes them).
    """
    ours = model.state_dict()
    report = LoadReport()
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in _unwrap(state_dict).items():
        if _is_dropped(key):
            report.dropped.append(key)
            continue
        new = _map_key(key, ours)
        if new not in ours:
            report.unexpected.append(key)
            continue
        if new in mapped:
            raise ValueError(f"checkpoint keys {origin[new]!r} and {key!r} both map to {new!r}")
        mapped[new], origin[new] = value, key

    # adaptations
    pos_key = "vit_model.positional_embedding"
    if pos_key in mapped and mapped[pos_key].shape != ours[pos_key].shape:
        before = tuple(mapped[pos_key].shape)
        if mapped[pos_key].shape[-1] == ours[pos_key].shape[-1]:
            mapped[pos_key] = interpolate_pos_embed(mapped[pos_key], ours[pos_key].shape[0])
            report.adapted.append(f"{pos_key}: {before} -> {tuple(ours[pos_key].shape)} "
                                  f"(bicubic)")
    tt = "token_type_embeddings.weight"
    if (tt in mapped and mapped[tt].shape[0] == 2 and ours[tt].shape[0] == 3
            and mapped[tt].shape[1:] == ours[tt].shape[1:]):
        mapped[tt] = torch.cat([mapped[tt], mapped[tt][1:2]], dim=0)
        report.adapted.append(f"{tt}: 2 -> 3 rows (row 2 = row 1, official NLVR2 init)")
    tp = "text_transformer.embeddings.position_embeddings.weight"
    if (tp in mapped and mapped[tp].shape[0] > ours[tp].shape[0]
            and mapped[tp].shape[1:] == ours[tp].shape[1:]):
        report.adapted.append(f"{tp}: first {ours[tp].shape[0]} of {mapped[tp].shape[0]} rows")
        mapped[tp] = mapped[tp][: ours[tp].shape[0]]
    if ("rank_output.weight" in ours and "rank_output.weight" not in mapped
            and "rank_output.bias" not in mapped and "itm_score.fc.weight" in mapped
            and "itm_score.fc.bias" in mapped):
        mapped["rank_output.weight"] = mapped["itm_score.fc.weight"][1:]
        mapped["rank_output.bias"] = mapped["itm_score.fc.bias"][1:]
        report.adapted.append("rank_output.{weight,bias}: from itm_score.fc row 1 "
                              "(official IRTR init)")

    for new in list(mapped):
        if mapped[new].shape != ours[new].shape:
            report.mismatched.append(f"{origin.get(new, new)}: {tuple(mapped[new].shape)} -> "
                                     f"{tuple(ours[new].shape)}")
            del mapped[new]
    report.missing = [k for k in ours if k not in mapped]
    return mapped, report


def load_meter_checkpoint(model: nn.Module, state_dict_or_path, strict: bool = True, *,
                          weights_only: bool = True) -> LoadReport:
    """Load an official METER checkpoint (a path, a state dict, or a Lightning checkpoint
    dict with ``"state_dict"``) into ``model`` (a `METER`). See the module docstring for
    the key map.

    ``strict=True``: any missing, unexpected or shape-mismatched key raises `ValueError`
    naming them all, and the model is left untouched. ``strict=False``: loads what matches
    and returns the report. ``weights_only`` is passed to `torch.load` for paths (set it to
    False only for a checkpoint you trust whose pickled extras need it).
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path = torch.load(state_dict_or_path, map_location="cpu",
                                        weights_only=weights_only)
    mapped, report = map_official_state_dict(state_dict_or_path, model)
    if strict and not report.ok:
        raise ValueError(f"METER checkpoint does not match the model: {report.describe()}")
    with torch.no_grad():
        result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # mapped ⊆ model keys
    report.loaded = list(mapped)
    return report
