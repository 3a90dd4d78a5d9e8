"""trimkit.tools.viz: patch grids of trimmed models and their pictures."""

import pytest
import torch

import trimkit
from trimkit.tools.bench import build_model
from trimkit.tools.viz import draw, patch_groups, token_groups


def test_patch_groups_takes_the_last_tokens_as_the_grid():
    source = torch.tensor([[0, 1, 2, 2, -1, 3, 1]])  # one leading CLS, then a 2×3 grid
    g = patch_groups(source, (2, 3))
    assert g.tolist() == [[[1, 2, 2], [-1, 3, 1]]]
    with pytest.raises(ValueError, match="fewer"):
        patch_groups(source, (3, 3))


def test_draw_dims_dropped_outlines_merged_and_leaves_singletons():
    image = torch.full((3, 40, 40), 0.8)
    groups = torch.tensor([[0, 1, 1, 2], [3, -1, 1, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    out = draw(image, groups, dim=0.25, line=1)
    assert out.shape == (40, 40, 3) and out.dtype == torch.uint8
    base = round(0.8 * 255)
    # the dropped patch (row 1, col 1: pixels 10..19) is dimmed everywhere
    assert (out[10:20, 10:20] == round(0.8 * 0.25 * 255)).all()
    # a patch alone in its token is untouched, borders included
    assert (out[0:10, 0:10] == base).all() and (out[30:40, 30:40] == base).all()
    # group 1 (three patches) is outlined in one colour at its border, not inside
    colour = out[0, 15]
    assert not torch.equal(colour, torch.full((3,), base, dtype=torch.uint8))
    assert torch.equal(out[19, 29], colour)  # bottom edge of the lower patch
    assert (out[5, 20] == base).all()  # between two patches of the group: no line
    # uint8 and channel-last input give the same picture
    same = draw((image.permute(1, 2, 0) * 255).round().to(torch.uint8), groups, dim=0.25, line=1)
    assert (same.int() - out.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="RGB"):
        draw(torch.zeros(2, 8, 8), groups)


@pytest.mark.parametrize("spec,recipe,options", [
    ("timm:vit_tiny_patch16_224?depth=3&img_size=64", "tome", {"r": 3}),
    ("timm:vit_tiny_patch16_224?depth=3&img_size=64", "attn_prune", {"keep_ratio": 0.5}),
    ("meter-tiny", "pumer", {}),
])
def test_token_groups_match_the_state(spec, recipe, options):
    model, make_inputs = build_model(spec)
    model.train()
    trimkit.apply(model, recipe, **options)
    inputs = make_inputs(2)
    groups = token_groups(model, *inputs)
    assert model.training  # mode restored
    state = trimkit.last_states(model)["image"]
    rows, cols = trimkit.describe(model).streams["image"].grid
    assert groups.shape == (2, rows, cols)
    lead = state.source.shape[1] - rows * cols
    for b in range(2):
        g = groups[b][groups[b] >= 0]
        counts = torch.bincount(g, minlength=state.size.shape[1])
        # every live unprotected token covers exactly its size in patches
        live = state.live[b] & ~state.protected[b]
        assert torch.equal(counts[live].double(), state.size[b][live].double())
        assert (counts[~state.live[b]] == 0).all()
        assert lead <= trimkit.describe(model).streams["image"].num_protected
    if recipe == "tome":  # merged, nothing dropped
        assert (groups >= 0).all() and torch.bincount(groups[0].flatten()).max() > 1
    else:  # something dropped
        assert (groups < 0).any()
    # tracking is off again afterwards (the model was applied without it)
    model.eval()
    model(*inputs)
    assert trimkit.last_states(model)["image"].source is None


def test_token_groups_errors_name_the_fix():
    model, make_inputs = build_model("meter-tiny")
    with pytest.raises(ValueError, match="trimkit.apply"):
        token_groups(model, *make_inputs(1))
    trimkit.apply(model, "pumer")
    with pytest.raises(ValueError, match="streams are"):
        token_groups(model, *make_inputs(1), stream="audio")
    with pytest.raises(ValueError, match="no patch grid"):
        token_groups(model, *make_inputs(1), stream="text")
