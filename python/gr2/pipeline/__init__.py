"""The pipeline layer: ``gr2 run`` and the stage subcommands, over the library beneath it.

Two layers, the way torchtune keeps its recipes over its library:

* **the pipeline** (this package): the stage registry (:mod:`~gr2.pipeline.registry`), the runner
  (:mod:`~gr2.pipeline.run`), the run directory's shared inputs (:mod:`~gr2.pipeline.inputs`) and
  one module per stage (``data``, ``sid``, ``candidates``, ``prompts``, ``midtrain``, ``traces``,
  ``sft``, ``rl``, ``rerank``, ``eval``, ``report``). A stage
  module reads its inputs from the run directory, calls the library, writes its outputs and its
  ``stage.json``; it reads top to bottom.
* **the library** (everything else in :mod:`gr2`): semantic IDs, data formats, upstream rankers,
  prompts, teachers, trainers, decoding, rewards, metrics. It never imports this package
  (``tests/test_architecture.py`` checks it); only :mod:`gr2.cli` does.

This package's namespace is the runner's (``gr2.pipeline.build_run_config``, ``run_pipeline``,
``RunConfig``, ``preset_path`` ...), as when the runner was the module ``gr2.pipeline``.
"""

_RUNNER = frozenset({  # the runner's names, imported on first use so that `gr2 --help` (which reads the
    # registry) does not import the stage modules' dependencies
    "MODEL_STAGES", "PRESET_DIR", "STAGE_ORDER", "STAGES", "RerankConfig", "RunConfig", "_configs", "add_arguments",
    "apply_overrides", "build_run_config", "from_dict", "load_toml", "main", "parse_override", "pipeline_world",
    "preset_path", "run_pipeline",
})


def __getattr__(name: str):
    if name in _RUNNER:
        from gr2.pipeline import run

        return getattr(run, name)
    raise AttributeError(f"module 'gr2.pipeline' has no attribute {name!r}")
