"""The `multi` reward: a weighted sum of other rewards, each z-scored over the epoch (`--reward aesthetic+clipscore`).

It lives in `ddpo.core.engine.multireward`, because the rollout and the trainer treat it specially (per-component
scores, combined per epoch over all processes, logged as `reward/<label>/mean`); this module registers it.
"""

from __future__ import annotations

import ddpo
from ddpo.core.engine.multireward import MultiReward


@ddpo.hookimpl
def register_rewards(register):
    register(MultiReward)
