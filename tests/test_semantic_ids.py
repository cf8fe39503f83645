"""task=semantic_ids: an index built (and cached), loaded or random; the figures; bad input."""

import json

import pytest

from conftest import SHARED_DATA
from recsys_compress.data.lcrec import colliding_groups, read_index
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.compose import compose_config
from recsys_compress.tasks.config import validate_semantic
from recsys_compress.tasks.runner import run_task

SMALL = ["task=semantic_ids", "semantic.levels=2", "semantic.codebook_size=8", "semantic.code_dim=16",
         "semantic.hidden=[64]", "semantic.epochs=20", "semantic.batch_size=256", "logger=none"]


def test_an_index_is_built_cached_by_its_inputs_and_written_in_lc_rec_format(ml100k_slice, tmp_path):
    common = [*SMALL, "dataset=ml_100k", f"dataset.path={ml100k_slice}", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = run_task(compose_config(common, tmp_path / "a"))
    index = read_index(tmp_path / "a" / "ml_100k.index.json")
    assert len(index) == first["semantic/items"] > 100 and all(len(t) == 2 for t in index.values())
    assert first["semantic/cache_hit"] == 0 and 0 < first["semantic/reconstruction_error"] < 1.5
    for level in (0, 1):
        assert 1 <= first[f"semantic/level_{level}/codes_used"] <= 8
        assert 1 <= first[f"semantic/level_{level}/perplexity"] <= first[f"semantic/level_{level}/codes_used"] + 1e-9
    assert first["semantic/colliding_groups"] <= first["semantic/colliding_groups_before"]
    assert first["semantic/colliding_groups"] == len(colliding_groups(index))
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["semantic/tuples"] == len(set(index.values()))
    # the same inputs: the cached index; another setting or other texts: built anew
    again = run_task(compose_config(common, tmp_path / "b"))
    assert again["semantic/cache_hit"] == 1 and read_index(tmp_path / "b" / "ml_100k.index.json") == index
    assert run_task(compose_config([*common, "semantic.code_dim=8"], tmp_path / "c"))["semantic/cache_hit"] == 0
    assert run_task(compose_config([*common, "representation.template='{title}'"], tmp_path / "d"))[
        "semantic/cache_hit"] == 0
    assert run_task(compose_config([*common, "representation=llama_tiny"], tmp_path / "e"))["semantic/cache_hit"] == 0


def test_the_published_index_is_loaded_and_made_unique_by_tigers_extra_code(tmp_path):
    index_path = SHARED_DATA / "instruments" / "Instruments.index.json"
    metrics = run_task(compose_config(["task=semantic_ids", "dataset=instruments", f"semantic.index_path={index_path}",
                                       "semantic.collisions=tiger", "logger=none"], tmp_path / "run"))
    assert (metrics["semantic/colliding_groups_before"], metrics["semantic/colliding_groups"]) == (23, 0)
    assert metrics["semantic/tuples"] == metrics["semantic/items"] == 9_922 and metrics["semantic/levels"] == 5
    written = read_index(tmp_path / "run" / "instruments.index.json")
    assert written["0"] == ("<a_137>", "<b_112>", "<c_79>", "<d_200>", "<e_0>")


def test_random_tuples_have_the_shape_of_the_semantic_ones(ml100k_slice, tmp_path):
    metrics = run_task(compose_config([*SMALL, "dataset=ml_100k", f"dataset.path={ml100k_slice}", "semantic.kind=random",
                                       "semantic.collisions=tiger"], tmp_path / "run"))
    assert metrics["semantic/levels"] == 3 and metrics["semantic/tuples"] == metrics["semantic/items"]
    assert metrics["semantic/level_0/codes_used"] == 8


def test_bad_settings_fail_at_start_naming_the_key(ml100k_slice, tmp_path):
    for override, message in [
        ("semantic.levels=0", r"semantic.levels=0 is out of range; allowed: >= 1"),
        ("semantic.codebook_size=1", r"semantic.codebook_size=1 is out of range; allowed: >= 2"),
        ("semantic.collisions=tiger2", r"semantic.collisions='tiger2' is not allowed; allowed: lcrec, tiger"),
        ("semantic.index_path=x.json", r"semantic.collisions=lcrec re-assigns codes with the RQ-VAE, but "
                                       r"semantic.index_path loads an index has none; allowed here: semantic.collisions=tiger"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_semantic(compose_config([*SMALL, override], tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"semantic.codebook_size=5000 is larger than the \d+ items of ml_100k"):
        run_task(compose_config([*SMALL, "dataset=ml_100k", f"dataset.path={ml100k_slice}",
                                 "semantic.codebook_size=5000"], tmp_path / "big"))
    with pytest.raises(ConfigError, match=r"dataset instruments .* has no item text to embed: its NAME.item.json is missing"):
        run_task(compose_config([*SMALL, "dataset=instruments"], tmp_path / "text"))
