"""What the ``rl`` stage starts from: the start model (sft, midtrain or a folder), the SID index,
the prompts, and the keys of those inputs. Shared by the stage (:mod:`gr2.pipeline.rl`) and
the reward ablation (:mod:`~gr2.train.dapo.ablation`), which both import it and not each other.
"""

from __future__ import annotations

from pathlib import Path

from gr2.errors import ConfigError, DataError
from gr2.rundir import read_stage
from gr2.train.devices import choose_dtype, local_device, param_dtype, seed_everything
from gr2.train.distributed import World
from gr2.train.dapo.config import DapoConfig
from gr2.train.dapo.data import RlData, load_rl_data
from gr2.train.dapo.trainer import DapoTrainer


def start_model_dir(run_dir: Path, base: str, arm: str = "think") -> tuple[Path, str]:
    from gr2 import arms

    if base in ("sft", "midtrain"):
        stage = arms.stage_dir(base, arm)
        path = run_dir / stage / "model"
        if not path.exists():
            raise DataError(f"{path} is missing; run the `{base}` stage first")
        return path, stage
    if base == "auto":
        for stage in (arms.stage_dir("sft", arm), "midtrain"):
            if (run_dir / stage / "model").exists():
                return run_dir / stage / "model", stage
        raise DataError(f"neither {run_dir}/{arms.stage_dir('sft', arm)}/model nor {run_dir}/midtrain/model exists; "
                        "run sft (or midtrain) first")
    path = Path(base)
    if not path.exists():
        raise ConfigError(f"rl.base {base!r} is neither sft, midtrain, auto nor an existing model folder")
    return path, ""


def _stage_input_key(run_dir: Path, stage: str) -> str:
    record = read_stage(run_dir / stage)
    return record["key"] if record else "missing"


def build_trainer(run_dir: Path, config: DapoConfig, world: World,
                  arm: str = "think") -> tuple[DapoTrainer, RlData | None, dict]:
    """Load start model, index and data for the stage (shared by run_rl and the ablation)."""
    from gr2 import SidIndex
    from gr2.models import load_pretrained, sid_tokens_of

    seed_everything(config.seed)
    model_dir, base_stage = start_model_dir(run_dir, config.base, arm)
    device = local_device(config.device)
    dtype = choose_dtype(device, config.dtype)
    model, tokenizer = load_pretrained(model_dir, dtype=param_dtype(dtype))  # float32 master weights
    index = SidIndex.load(run_dir / "sid" / "index.gr2sid")
    sid_tokens = sid_tokens_of(tokenizer, index.level_sizes)
    data = load_rl_data(run_dir, "train", tokenizer, index, config, config.max_train_prompts)
    eval_data = None
    if config.eval_every:
        eval_data = load_rl_data(run_dir, "valid", tokenizer, index, config, config.eval_prompts)
    ref_model = None
    if config.kl_coef > 0:
        ref_model, _ = load_pretrained(model_dir, dtype=dtype)
        ref_model.to(device).eval().requires_grad_(False)
    trainer = DapoTrainer(model, tokenizer, data, config, index=index, sid_tokens=sid_tokens, world=world,
                          ref_model=ref_model, device=device)
    info = {"start_model": str(model_dir), "base_stage": base_stage, "train_prompts": len(data.targets),
            "dropped_no_target": data.dropped_no_target, "k": int(data.candidates.shape[1])}
    return trainer, eval_data, info


def rl_inputs(run_dir: Path, config: DapoConfig, arm: str = "think") -> list[str]:
    """The keys of what the rl stage reads: SID index, candidates, prompts, start model."""
    model_dir, base_stage = start_model_dir(run_dir, config.base, arm)
    inputs = [_stage_input_key(run_dir, s) for s in ("sid", "candidates", "prompts")]
    inputs.append(_stage_input_key(run_dir, base_stage) if base_stage else str(model_dir))
    return inputs
