import pytest

from mars_viz.model.inputs import Query, clean_prompt
from mars_viz.model.media import neutral_images


def test_clean_prompt_strips_control_characters_keeps_newlines():
    assert clean_prompt("  hi\x00 there\x1b\nnext\t ") == "hi there\nnext"


@pytest.mark.parametrize("bad", ["", "   ", "\x00\x01"])
def test_empty_prompt_rejected(bad):
    with pytest.raises(ValueError, match="empty"):
        clean_prompt(bad)


def test_enormous_prompt_rejected():
    with pytest.raises(ValueError, match="limit"):
        clean_prompt("a" * 10_000)


def test_query_modality_and_validation():
    im = neutral_images(2, size=8)
    assert Query("x").modality == "text"
    assert Query("x", images=(im[0],)).modality == "image"
    assert Query("x", video=tuple(im)).modality == "video"
    with pytest.raises(ValueError):
        Query("x", images=(im[0],), video=tuple(im))
