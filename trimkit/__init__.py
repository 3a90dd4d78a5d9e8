"""trimkit: token pruning, token merging and attention-head trimming for the transformers
you already use, in one call: ``trimkit.apply(model, recipe="tome")``."""

from .adapter import Adapter, install_fx_sites
from .api import (
    ForwardStats,
    UnsupportedConfigError,
    UnsupportedModelError,
    apply,
    count_flops,
    describe,
    find_adapter,
    flop_counter,
    forward_stats,
    head_scores,
    is_applied,
    last_states,
    last_stats,
    list_adapters,
    list_recipes,
    recording_costs,
    remove,
    set_mode,
    trimming_disabled,
)
from .describe import HeadLayout, LayerDesc, ModelDescription, StreamDesc, TokenInput
from .heads import pruned_heads
from .recipe import Option, Recipe, SitePlan
from .registry import register_adapter, register_recipe
from .sites import CrossScores, Site, TokenOp, TrimContext
from .state import TokenState, fixed_shapes
from .tools import viz
from .tools.export import OnnxExport, OnnxExportError, export_onnx
from .tools.persist import (
    ArchitectureMismatchError,
    SaveFormatError,
    from_pretrained,
    load,
    save,
    save_pretrained,
)
from .tools.training import (
    CheckpointError,
    NonFiniteLossError,
    Objective,
    TaskObjective,
    TrainResult,
    train,
)
from .version import __version__

__all__ = [
    "__version__",
    "Adapter",
    "ArchitectureMismatchError",
    "CheckpointError",
    "CrossScores",
    "ForwardStats",
    "HeadLayout",
    "LayerDesc",
    "ModelDescription",
    "NonFiniteLossError",
    "Objective",
    "OnnxExport",
    "OnnxExportError",
    "Option",
    "Recipe",
    "SaveFormatError",
    "Site",
    "SitePlan",
    "StreamDesc",
    "TaskObjective",
    "TokenInput",
    "TokenOp",
    "TokenState",
    "TrainResult",
    "TrimContext",
    "UnsupportedConfigError",
    "UnsupportedModelError",
    "apply",
    "count_flops",
    "describe",
    "export_onnx",
    "find_adapter",
    "fixed_shapes",
    "flop_counter",
    "forward_stats",
    "from_pretrained",
    "head_scores",
    "install_fx_sites",
    "is_applied",
    "last_states",
    "last_stats",
    "list_adapters",
    "list_recipes",
    "load",
    "pruned_heads",
    "recording_costs",
    "register_adapter",
    "register_recipe",
    "remove",
    "save",
    "save_pretrained",
    "set_mode",
    "train",
    "trimming_disabled",
    "viz",
]
