"""One stage registry (gr2.pipeline.registry) builds every stage subcommand and the pipeline: the same
--run-dir/--config/--set/--force on each, --arm on the per-arm stages, one --set parser."""

from __future__ import annotations

import pytest

from gr2 import cli, pipeline
from gr2.pipeline import registry as stages
from gr2.arms import ARM_STAGES
from gr2.errors import ConfigError
from gr2.train.sft import SftConfig


@pytest.mark.parametrize("name", list(stages.STAGES))
def test_every_stage_takes_the_common_flags(name, tmp_path):
    extra = ["--stage", "sft"] if name == "rerank" else []
    args = cli.build_parser(name).parse_args([name, "--run-dir", str(tmp_path), "--set", "x=1", "--force", *extra])
    assert args.run_dir == str(tmp_path) and args.overrides == ["x=1"] and args.force
    assert hasattr(args, "arm") == (name in ARM_STAGES) == stages.STAGES[name].arms


def test_pipeline_uses_the_registry():
    assert pipeline.STAGE_ORDER == tuple(stages.STAGES)
    assert set(pipeline._configs()) == set(stages.STAGES)


def test_stage_config_from_file_flags_and_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[sft]\nlr = 0.5\nepochs = 2\n[rl]\nsteps = 9\n")
    stage = stages.STAGES["sft"]
    args = cli.build_parser("sft").parse_args(["sft", "--run-dir", "r", "--config", str(path), "--set", "sft.epochs=3",
                                                "--set", "seed=7"])
    config = stages.config_from_args(stage, args)
    assert isinstance(config, SftConfig) and (config.lr, config.epochs, config.seed) == (0.5, 3, 7)
    args = cli.build_parser("sft").parse_args(["sft", "--run-dir", "r", "--set", "epochz=3"])
    with pytest.raises(ConfigError, match="unknown key"):
        stages.config_from_args(stage, args)
    rl = cli.build_parser("rl").parse_args(["rl", "--run-dir", "r", "--config", str(path), "--unconditional"])
    config = stages.config_from_args(stages.STAGES["rl"], rl)
    assert config.steps == 9 and config.conditional is False


def test_a_bad_stage_flag_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["prompts", "--run-dir", str(tmp_path / "none"), "--set", "evidence=nope"]) == 2
    assert "prompts" in capsys.readouterr().err
