"""The training methods (the `method` setting), each a step function of one signature:
step(model, meta_net, state, batch, meta_batch, lr, hp, reduce) -> (new state, metrics).
A new method is a step function and one line here (the config's `method` values are its keys).
"""

from __future__ import annotations

from collections.abc import Callable

from mwn.baselines import class_balanced_step, focal_step, l2rw_step
from mwn.meta import erm_step, mwn_step, mwn_weighted_step

STEPS: dict[str, Callable[..., tuple[dict, dict]]] = {
    "mwn": mwn_step,
    "erm": erm_step,
    "focal": focal_step,
    "class_balanced": class_balanced_step,
    "l2rw": l2rw_step,
}
# what a method runs on the iterations between its meta updates (meta_interval > 1)
BETWEEN_META_STEPS = {"mwn": mwn_weighted_step}
NEEDS_META_BATCH = ("mwn", "l2rw")  # the methods that read the clean meta set
