"""METER (Dou et al., CVPR 2022): the model (`model`) and the official-checkpoint loader
(`loader`). No adapter is imported or registered here."""

from .loader import (
    DROPPED_PREFIXES,
    LoadReport,
    interpolate_pos_embed,
    load_meter_checkpoint,
    map_official_state_dict,
)
from .model import (
    METER,
    ROBERTA_PAD_ID,
    TASKS,
    BertAttention,
    BertCrossAttention,
    BertCrossAttentionCore,
    BertCrossLayer,
    BertIntermediate,
    BertOutput,
    BertSelfAttention,
    BertSelfOutput,
    ITMHead,
    MeterConfig,
    Pooler,
    init_weights,
    meter_base,
    meter_tiny,
)

__all__ = [
    "DROPPED_PREFIXES",
    "METER",
    "TASKS",
    "BertAttention",
    "BertCrossAttention",
    "BertCrossAttentionCore",
    "BertCrossLayer",
    "BertIntermediate",
    "BertOutput",
    "BertSelfAttention",
    "BertSelfOutput",
    "ITMHead",
    "LoadReport",
    "MeterConfig",
    "Pooler",
    "ROBERTA_PAD_ID",
    "init_weights",
    "interpolate_pos_embed",
    "load_meter_checkpoint",
    "map_official_state_dict",
    "meter_base",
    "meter_tiny",
]
