"""Review round 17, mistyped settings: values Lightning or our callbacks refused only after the model was built
(with a traceback, or a line without the setting), took as true whatever the text, or refused although valid, are
named by `musicflamingo.settings` before anything is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from train_fixtures import CONFIGS, compose_train

from musicflamingo.settings import SettingsError, check_eval_settings, check_train_settings


def _train(tmp_path: Path, overrides: list[str], yaml_text: str = "") -> dict:
    """train.yaml composed with `overrides` (and a user's YAML merged over it), resolved as train() resolves it."""
    cfg = compose_train(tmp_path, tmp_path / "m.jsonl", tmp_path / "proc", overrides)
    if yaml_text:  # as an experiment file's keys merge (composition is not struct)
        cfg = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(cfg)), OmegaConf.create(yaml_text))
    return OmegaConf.to_container(cfg, resolve=True)


def _eval(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["ckpt=x", "benchmark.root=x", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        # Lightning: "TypeError: '<' not supported between instances of 'int' and 'str'" after the model was built
        ("trainer.log_every_n_steps=ten", "trainer.log_every_n_steps='ten': expected an integer >= 0"),
        # a row at steps 5, 10, ... (step % 2.5); -1 logged every step
        ("trainer.log_every_n_steps=2.5", "trainer.log_every_n_steps=2.5: expected an integer >= 0"),
        ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps=-1: expected an integer >= 0"),
        (
            "trainer.num_sanity_val_steps=abc",
            "trainer.num_sanity_val_steps='abc': expected an integer >= 0, or -1",
        ),
        # any text was true
        (
            "trainer.use_distributed_sampler=maybe",
            "trainer.use_distributed_sampler='maybe': expected true or false",
        ),
        ("trainer.deterministic=maybe", "trainer.deterministic='maybe': expected true, false, warn or null"),
        # Lightning's Timer refused it after the model was built, naming no setting
        ("+trainer.max_time=abc", "trainer.max_time='abc': expected DD:HH:MM:SS"),
        # ProgressLog: "invalid literal for int() with base 10: 'ten'", after the model was built
        (
            "callbacks.progress_log.every_n_steps=ten",
            "callbacks.progress_log.every_n_steps='ten': expected an integer",
        ),
        (
            "callbacks.progress_log.on_terminal=maybe",
            "callbacks.progress_log.on_terminal='maybe': expected true",
        ),
        (
            "callbacks.model_checkpoint.save_last=maybe",
            "callbacks.model_checkpoint.save_last='maybe': expected true",
        ),
        (
            "callbacks.model_checkpoint.save_top_k=-2",
            "callbacks.model_checkpoint.save_top_k=-2: expected an integer",
        ),
        ("logger=wandb logger.wandb.offline=maybe", "logger.wandb.offline='maybe': expected true or false"),
        ("logger=wandb logger.wandb.rewind=maybe", "logger.wandb.rewind='maybe': expected true or false"),
        # "MusicFlamingoDataModule needs at least one train manifest", once the model was built
        ("data.train=null", "data.train=None: expected a manifest"),
    ],
)
def test_a_mistyped_trainer_callback_or_logger_value_is_named_before_the_model_is_built(
    tmp_path, override, line
):
    with pytest.raises(SettingsError) as e:
        check_train_settings(_train(tmp_path, override.split()))
    assert str(e.value).startswith(line), str(e.value)


def test_a_file_where_a_folder_is_expected_and_a_folder_where_a_file_is_named(tmp_path):
    """paths.output_dir=<file> said "<file>: File exists"; data.processor=<file> "processor directory not found"
    after the model was built; data.audio_root=<file> "audio file not found" at the first sample;
    callbacks.bad_samples.path=<folder> trained up to the first checkpoint, then stopped ("Is a directory")."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for key in ("paths.output_dir", "data.processor", "data.audio_root"):
        with pytest.raises(SettingsError, match=rf"^{key}='{a_file}': a file, where a folder is expected"):
            check_train_settings(_train(tmp_path, [f"{key}={a_file}"]))
    with pytest.raises(
        SettingsError, match=r"^callbacks.bad_samples.path='.*': a folder, where a file to write"
    ):
        check_train_settings(_train(tmp_path, [f"callbacks.bad_samples.path={tmp_path}"]))
    with pytest.raises(SettingsError, match=rf"^output_dir='{a_file}': a file, where a folder is expected"):
        check_eval_settings(_eval([f"output_dir={a_file}"]))


def test_a_max_time_in_a_yaml_file_read_as_a_base_60_number_says_to_quote_it(tmp_path):
    """A researcher's own YAML with `max_time: 1:12:00:00` unquoted: YAML 1.1 reads 259200 (base 60), and
    Lightning's Timer crashed after the model was built ('int' object has no attribute 'total_seconds')."""
    settings = _train(tmp_path, [], "trainer:\n  max_time: 1:12:00:00\n")
    assert settings["trainer"]["max_time"] == 259200  # why: YAML's sexagesimal integers
    with pytest.raises(SettingsError, match=r"trainer.max_time=259200: .*quote it \('1:12:00:00'\)"):
        check_train_settings(settings)
    for good in ("'1:12:00:00'", "00:12:00:00", "{hours: 12}"):
        check_train_settings(_train(tmp_path, [], f"trainer:\n  max_time: {good}\n"))


def test_valid_values_pass(tmp_path):
    """What Lightning takes: log_every_n_steps=0 (no logging), save_last=link, a sharded FSDP checkpoint folder as
    ckpt_path (refused as 'no such checkpoint file' although training.resolve_ckpt_path resumes from it)."""
    sharded = tmp_path / "step_000100.ckpt"
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"")
    check_train_settings(
        _train(
            tmp_path,
            [
                "trainer.log_every_n_steps=0",
                "trainer.deterministic=warn",
                "callbacks.model_checkpoint.save_last=link",
                "callbacks.model_checkpoint.every_n_train_steps=null",
                "logger=wandb",
                f"ckpt_path={sharded}",
            ],
        )
    )
    check_eval_settings(_eval(["benchmark=gtzan"]))


@pytest.mark.parametrize(
    ("override", "line"),
    [
        # the readers read them with bool(): any text, "false" too, was true
        (
            "benchmark.skip_missing_audio=maybe",
            "benchmark.skip_missing_audio='maybe': expected true or false",
        ),
        ("benchmark.include_captions=maybe", "benchmark.include_captions='maybe': expected true or false"),
        ("think=maybe", "think='maybe': expected true or false"),
    ],
)
def test_eval_flags_are_checked_with_the_settings(override, line):
    with pytest.raises(SettingsError) as e:
        check_eval_settings(_eval([override]))
    assert str(e.value).startswith(line), str(e.value)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("+max_batchs=16", "max_batchs=16: unknown setting (did you mean max_batch?)"),  # was ignored
        ("access_log=maybe", "access_log='maybe': expected true or false"),  # was true
        # serve.py's logging.basicConfig: "ValueError: Unknown level: 'LOUD'", a traceback
        ("log_level=LOUD", "log_level='LOUD': expected one of DEBUG"),
        ("threads=0", "threads=0: expected an integer >= 1"),
    ],
)
def test_serve_settings_are_checked_like_infer_settings(override, line):
    from hydra import compose, initialize_config_dir

    from musicflamingo.settings import check_serve_plan_settings

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=["ckpt=x", override])
    with pytest.raises(SettingsError) as e:
        check_serve_plan_settings(cfg)
    assert str(e.value).startswith(line), str(e.value)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        check_serve_plan_settings(compose(config_name="serve", overrides=["ckpt=x"]))
