import os

from hypothesis import HealthCheck, settings

# ci: bounded and derandomized (CI=1); dev: the default; fuzz: `make fuzz` (GR2_FUZZ=1), many
# more random examples per property (docs/fuzzing.md). Tests that pin max_examples themselves
# keep their count in every profile.
settings.register_profile(
    "ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("GR2_FUZZ_EXAMPLES", "2000")), deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile("fuzz" if os.environ.get("GR2_FUZZ") else "ci" if os.environ.get("CI") else "dev")
