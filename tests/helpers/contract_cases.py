"""Cases a pytest plugin adds to the reward and algorithm contract suites, as ``TINY_PIPELINES``
(tests/helpers/tiny_pipelines.py) is for the adapter suite: a plugin's ``pytest_configure`` appends to
:data:`REWARD_CASES` / :data:`ALGORITHM_CASES`, and tests/contract/test_reward_contract.py /
test_algorithm_contract.py run them with their own (docs/extending.md)."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class RewardCase:
    """One reward of the reward contract suite."""

    name: str  # the registry name or dotted path
    build: Callable  # (assets, exit_stack, **extra_options) -> RewardModel; assets: the suite's tiny models
    toy_prompts: bool = False  # needs prompts of the toy world (shared.toy)
    text_prompts: bool = False  # needs prompts that quote text, and images that show it (ocr)
    videos: bool = False  # scores whole videos [N, F, 3, H, W] (video = "native" and refuses images)

    @property
    def id(self) -> str:
        return self.name


#: rewards a plugin adds to the reward contract suite
REWARD_CASES: list[RewardCase] = []
#: ``(trainer_type, dynamics_type, extra --set overrides)`` a plugin adds to the algorithm contract suite
ALGORITHM_CASES: list[tuple[str, str, list[str]]] = []
