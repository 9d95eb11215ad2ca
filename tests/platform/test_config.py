"""The config loader: every shipped YAML loads; unknown keys, wrong types and bad combinations are
errors that name the full dotted path; configs are frozen and hashed per section."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sidforge.platform.config import Config, ConfigError, dump_config, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# shipped configs


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 4, f"expected the shipped configs under {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name == path.stem
    # each YAML begins with the command that runs it, naming the file itself
    first = path.read_text().splitlines()[0]
    assert first.startswith("# sidforge ") and f"configs/{path.name}" in first, first


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dumped_config_loads_back_equal(path: Path, tmp_path: Path):
    cfg = load_config(path)
    assert load_config(_write(tmp_path, dump_config(cfg))) == cfg


def test_no_path_gives_the_defaults():
    assert load_config() == Config()
    assert load_config().data.source == "synthetic"


# ----------------------------------------------------------------------------------------------
# overrides


def test_override_changes_a_nested_int():
    base = load_config(CONFIG_DIR / "tiny.yaml")
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["prepare.coclick.window=5"])
    assert base.prepare.coclick.window == 3
    assert cfg.prepare.coclick.window == 5 and type(cfg.prepare.coclick.window) is int
    # everything else is untouched
    assert dataclasses.replace(cfg.prepare, coclick=base.prepare.coclick) == base.prepare
    assert cfg.synthetic == base.synthetic


@pytest.mark.parametrize(
    "override, get, expected, typ",
    [
        ("prepare.coclick.holdout_fraction=0.3", lambda c: c.prepare.coclick.holdout_fraction, 0.3, float),
        ("prepare.coclick.pop_alpha=1", lambda c: c.prepare.coclick.pop_alpha, 1.0, float),  # int → float
        ("synthetic.num_users=77", lambda c: c.synthetic.num_users, 77, int),
        ("data.name=my-bench", lambda c: c.data.name, "my-bench", str),
        ("run_dir=runs/x", lambda c: c.run_dir, "runs/x", str),
        ("seed=7", lambda c: c.seed, 7, int),
    ],
)
def test_override_values_are_typed(override, get, expected, typ):
    value = get(load_config(CONFIG_DIR / "tiny.yaml", [override]))
    assert value == expected and type(value) is typ


def test_later_override_wins_and_can_create_a_section():
    cfg = load_config(None, ["prepare.coclick.window=4", "prepare.coclick.window=6"])
    assert cfg.prepare.coclick.window == 6


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["prepare.coclick.window"])


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="seed"):
        load_config(None, ["seed=1", "seed.x=2"])


# ----------------------------------------------------------------------------------------------
# unknown keys and wrong types


@pytest.mark.parametrize(
    "override, dotted",
    [
        ("prepare.coclick.windw=5", "prepare.coclick.windw"),
        ("prepare.min_seq=4", "prepare.min_seq"),
        ("bogus=1", "bogus"),
    ],
)
def test_unknown_override_key_names_the_full_path(override: str, dotted: str):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "tiny.yaml", [override])
    assert dotted in str(e.value)
    assert "valid keys" in str(e.value)


def test_unknown_yaml_key_names_the_full_path(tmp_path: Path):
    path = _write(tmp_path, "prepare:\n  coclick:\n    windw: 5\n")
    with pytest.raises(ConfigError, match=r"prepare\.coclick\.windw"):
        load_config(path)
    path = _write(tmp_path, "name: x\nexperiment: y\n")
    with pytest.raises(ConfigError, match="experiment"):
        load_config(path)


@pytest.mark.parametrize(
    "override, dotted, hint",
    [
        ("prepare.coclick.window=five", "prepare.coclick.window", "integer"),
        ("prepare.coclick.window=true", "prepare.coclick.window", "integer"),  # bool is not an int
        ("prepare.coclick.window=2.5", "prepare.coclick.window", "integer"),
        ("prepare.coclick.window=2.0", "prepare.coclick.window", "integer"),  # no silent float → int
        ("prepare.coclick.pop_alpha=high", "prepare.coclick.pop_alpha", "number"),
        ("prepare.coclick.pop_alpha=false", "prepare.coclick.pop_alpha", "number"),
        ("data.source=csv", "data.source", "not one of"),
        ("data.split=random", "data.split", "not one of"),
        ("data.name=[a, b]", "data.name", "string"),
        ("prepare=3", "prepare", "mapping"),
    ],
)
def test_wrong_type_names_the_path(override: str, dotted: str, hint: str):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "tiny.yaml", [override])
    msg = str(e.value)
    assert msg.startswith(dotted + ":"), msg
    assert hint in msg


def test_literal_error_lists_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=csv"])
    for choice in ("s3rec", "recbole", "recbole-mm", "table", "synthetic"):
        assert repr(choice) in str(e.value)


@pytest.mark.parametrize(
    "override, dotted",
    [
        ("prepare.coclick.window=0", "prepare.coclick.window"),
        ("prepare.coclick.holdout_fraction=1.0", "prepare.coclick.holdout_fraction"),
        ("prepare.min_seq_len=2", "prepare.min_seq_len"),
        ("prepare.cold_item_fraction=0.5", "prepare.cold_item_fraction"),
        ("synthetic.min_seq_len=2", "synthetic.min_seq_len"),
        ("synthetic.num_clusters=5000", "synthetic.num_clusters"),
        ("synthetic.stickiness=1.5", "synthetic.stickiness"),
    ],
)
def test_out_of_range_values_name_the_path(override: str, dotted: str):
    with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_files_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "prepare: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


# ----------------------------------------------------------------------------------------------
# cross-field checks


def test_table_source_needs_interactions():
    with pytest.raises(ConfigError, match=r"data\.interactions"):
        load_config(None, ["data.source=table"])
    cfg = load_config(None, ["data.source=table", "data.interactions=logs/"])
    assert cfg.data.interactions == "logs/"


def test_official_split_needs_a_source_that_ships_one():
    with pytest.raises(ConfigError, match=r"data\.split") as e:
        load_config(None, ["data.source=s3rec", "data.name=amazon-beauty-2014", "data.split=official"])
    assert "loo" in str(e.value)  # says how to fix it
    with pytest.raises(ConfigError, match=r"data\.split"):
        load_config(None, ["data.split=official"])  # synthetic
    cfg = load_config(None, ["data.source=recbole", "data.name=x", "data.split=official"])
    assert cfg.data.split == "official"


@pytest.mark.parametrize("source", ["s3rec", "recbole", "recbole-mm"])
def test_benchmark_sources_need_a_name_or_path(source: str):
    with pytest.raises(ConfigError, match=r"data\.name or data\.path"):
        load_config(None, [f"data.source={source}"])
    assert load_config(None, [f"data.source={source}", "data.path=/tmp/x"]).data.path == "/tmp/x"


# ----------------------------------------------------------------------------------------------
# frozen and hashed


def test_config_is_frozen():
    cfg = load_config(CONFIG_DIR / "tiny.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.prepare.coclick.window = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    assert cfg.prepare.coclick.window == 3


def test_section_hash_tracks_only_its_sections():
    base = load_config(CONFIG_DIR / "tiny.yaml")
    again = load_config(CONFIG_DIR / "tiny.yaml")
    changed_prepare = load_config(CONFIG_DIR / "tiny.yaml", ["prepare.coclick.window=5"])
    changed_synth = load_config(CONFIG_DIR / "tiny.yaml", ["synthetic.seed=9"])

    assert base.section_hash("data", "prepare") == again.section_hash("data", "prepare")
    assert changed_prepare.section_hash("prepare") != base.section_hash("prepare")
    assert changed_prepare.section_hash("data", "prepare") != base.section_hash("data", "prepare")
    assert changed_prepare.section_hash("data", "synthetic") == base.section_hash("data", "synthetic")
    assert changed_synth.section_hash("synthetic") != base.section_hash("synthetic")
    assert changed_synth.section_hash("prepare") == base.section_hash("prepare")
    # the hash of two sections is not the hash of one
    assert base.section_hash("prepare") != base.section_hash("data", "prepare")
