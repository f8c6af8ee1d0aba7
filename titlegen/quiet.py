"""Keep third-party chatter out of the user's terminal; our own messages stay on the ``titlegen`` logger."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _DropMatching(logging.Filter):
    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.needles)


def quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes asks the Hub for an optional CPU kernel at import and warns when it cannot: harmless here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMatching("litlogger"))
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to ..." each run
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Deprecation notes addressed to library authors, printed at every model load and decoding step.
    warnings.filterwarnings("ignore", message=r".*(is_gradient_checkpointing|gradient_checkpointing_enable)"
                            r"` is deprecated.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated.*", category=FutureWarning)
    # predict batches carry their own row indices; Lightning's guess at them is not needed.
    warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices.*")
    # val/loss and val/ppl come from torchmetrics sums that are already reduced across ranks.
    warnings.filterwarnings("ignore", message=r".*self.log\('(val|test)/.*sync_dist=True.*")
    # transformers reads these when it first configures its logger; it is imported later, lazily, at the edges.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # already imported (tests, a notebook): tell it directly
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
