"""LightningDataModule: cleaning and tokenization (cached once), splits, length-grouped batches, predict input."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from titlegen.data.batching import LengthGroupedBatchSampler, ResumableDataLoader
from titlegen.data.cache import SplitSettings, load_or_build, load_splits
from titlegen.data.encoding import Encoder, collate_train
from titlegen.data.files import check_readable
from titlegen.data.packing import collate_packed
from titlegen.data.predict_csv import PredictInput, read_predict_csv
from titlegen.data.prompts import PromptTemplate, load_prompt
from titlegen.errors import TitlegenError

log = logging.getLogger("titlegen")


def check_settings(val_fraction: float, test_fraction: float, num_val_samples: int, **sizes: int | None) -> None:
    """One clear line for a setting that cannot work, before anything is loaded."""
    if not 0 <= val_fraction + test_fraction < 1 or min(val_fraction, test_fraction) < 0:
        raise TitlegenError(f"data.val_fraction ({val_fraction}) + data.test_fraction ({test_fraction}): each >= 0 "
                            "and together below 1")
    if num_val_samples < 0:
        raise TitlegenError(f"data.num_val_samples: got {num_val_samples}, expected >= 0")
    least = {"max_length": 2}  # a prompt token and the EOS at the very least
    for name, value in sizes.items():
        if value is not None and value < least.get(name, 1):
            raise TitlegenError(f"data.{name}: got {value}, expected an integer >= {least.get(name, 1)}")


class TitleDataModule(L.LightningDataModule):
    """Product titles and descriptions, from a JSON Lines / .json.gz / CSV file, ready for a causal LM.

    Args:
        path: Training data: JSON Lines (``trn.json`` layout: ``title``, ``content``), ``.json.gz`` or CSV.
        predict_path: CSV with a ``title`` column, for ``predict``.
        eval_path: Rows (``title``, ``content``; any training format) for ``evaluate``, used whole; default: the
            test split of ``path``, or its validation split when there is no test split.
        tokenizer: Tokenizer directory or name; by default the model's (``model.backbone.name_or_path``).
        trust_remote_code: Run a tokenizer's own Python code; set by ``model.backbone.trust_remote_code``.
        prompt: The prompt template (saved beside the adapter and reloaded for predict).
        max_length: Longest training example in tokens; longer responses are cut, the EOS is kept.
        batch_size: Examples per training batch.
        eval_batch_size: Examples per validation/test/predict batch (default: ``batch_size``).
        max_records: Use only this many cleaned records, a seeded uniform sample (not the first N).
        seed: Seed of the sample, the split and the batch order.
        val_fraction: Share of titles (by a hash of the title) held out for validation.
        max_val_rows: At most this many validation rows (those of smallest title hash; the rest train), so each
            validation of a run on the full file takes minutes, not hours. None: no cap.
        test_fraction: Share of titles held out for ``test``.
        group_by_length: Batch examples of similar length together (less padding).
        num_val_samples: Validation titles whose generated descriptions are logged at every validation.
        skip_bad_lines: Count, report and skip lines that do not parse instead of stopping.
        num_workers: DataLoader worker processes.
        cache_dir: Where processed splits are kept.
        pad_to_multiple_of: Round padded lengths up to this multiple (8 suits GPU matrix units).
        packing: Train on rows of several whole examples, each attending only to itself: no padding at all.
            Needs ``model.backbone.attn_implementation: titlegen_varlen``.
        max_tokens: Token budget per training batch (instead of ``batch_size`` examples): rows x longest row
            when padded, the sum of example lengths when packed. Without it a batch is ``batch_size`` examples.
        predict_max_tokens: Token budget per predict batch, rows x longest prompt (at most ``eval_batch_size``
            rows): batches of short titles get more rows, batches of long ones fewer.
    """

    def __init__(self, path: str = "", predict_path: str | None = None, eval_path: str | None = None,
                 tokenizer: str = "", trust_remote_code: bool = False,
                 prompt: PromptTemplate = PromptTemplate(), max_length: int = 512, batch_size: int = 8,
                 eval_batch_size: int | None = None, max_records: int | None = None, seed: int = 0,
                 val_fraction: float = 0.05, test_fraction: float = 0.0, max_val_rows: int | None = 2000,
                 group_by_length: bool = True,
                 num_val_samples: int = 4, skip_bad_lines: bool = False, num_workers: int = 0,
                 cache_dir: str = "checkpoints/cache", pad_to_multiple_of: int = 8, packing: bool = False,
                 max_tokens: int | None = None, predict_max_tokens: int | None = None) -> None:
        super().__init__()
        check_settings(val_fraction=val_fraction, test_fraction=test_fraction, max_length=max_length,
                       batch_size=batch_size, eval_batch_size=eval_batch_size, max_records=max_records,
                       max_tokens=max_tokens, predict_max_tokens=predict_max_tokens, num_val_samples=num_val_samples,
                       max_val_rows=max_val_rows)
        self.path, self.predict_path, self.eval_path, self.tokenizer_name = path, predict_path, eval_path, tokenizer
        self.trust_remote_code = trust_remote_code
        self.prompt = prompt
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.split = SplitSettings(max_records, seed, val_fraction, test_fraction, skip_bad_lines, max_val_rows)
        self.group_by_length, self.num_val_samples = group_by_length, num_val_samples
        self.num_workers, self.cache_dir, self.pad_to = num_workers, Path(cache_dir), pad_to_multiple_of
        self.packing = packing
        self.max_tokens, self.predict_max_tokens = max_tokens, predict_max_tokens
        self.splits: dict = {}  # split name -> datasets.Dataset (title, content, input_ids, prompt_length, length)
        self.predict_input: PredictInput | None = None
        self.predict_skip: set[int] = set()  # rows a resumed predict already has
        self.max_prompt_tokens: int | None = None  # the model's context less max_new_tokens (set by the model)
        self._encoder: Encoder | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._loader_state: dict | None = None  # train-loader position restored from a checkpoint

    # ---- shared pieces -------------------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        """Built on first use, so that a prompt restored from a checkpoint or adapter is the one used."""
        if self._encoder is None or self._encoder.prompt is not self.prompt:
            from titlegen.model.backbone import load_tokenizer

            tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
            self._encoder = Encoder(tokenizer, self.prompt, self.max_length)
        return self._encoder

    def use_prompt_from(self, adapter_dir: str | Path) -> None:
        """Take the prompt an adapter was trained with (its ``prompt.yaml``)."""
        self.prompt = load_prompt(adapter_dir)

    def _stage(self) -> str:
        return self.trainer.state.fn.value if self.trainer is not None and self.trainer.state.fn else "fit"

    def _data_path(self) -> Path:
        if not self.path:
            raise TitlegenError("data.path is not set: name the training data file (JSON Lines, .json.gz or CSV)")
        return check_readable(self.path)

    # ---- Lightning hooks -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self._stage() != "predict":
            self.build_cache()

    def build_cache(self) -> Path:
        """The processed splits of ``path`` in ``cache_dir`` (built once; later runs find them by their key)."""
        return load_or_build(self._data_path(), self.split, self.encoder, self.cache_dir)

    def setup(self, stage: str) -> None:
        if stage == "predict":
            if not self.predict_path:
                raise TitlegenError("data.predict_path is not set: name a CSV file with a 'title' column")
            self.predict_input = read_predict_csv(self.predict_path)
            return

        self.splits = load_splits(load_or_build(self._data_path(), self.split, self.encoder, self.cache_dir))
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        for name in wanted:
            if name not in self.splits and not (name == "val" and stage == "fit"):
                raise TitlegenError(f"{self.path}: the {name} split is empty (raise data.{name}_fraction)")

    def state_dict(self) -> dict:
        # Stored in every .ckpt: the prompt it was trained with and where in the epoch training stood.
        from dataclasses import asdict

        state: dict = {"prompt": asdict(self.prompt)}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "prompt" in state:
            saved = PromptTemplate(**state["prompt"])
            if saved != self.prompt:
                log.warning("data.prompt differs from the checkpoint's; using the checkpoint's prompt")
            self.prompt = saved
        self._loader_state = state.get("train_loader")
        if self._loader_state and self._train_loader is not None:
            self._train_loader.load_state_dict(self._loader_state)

    # ---- loaders -------------------------------------------------------------------------------------------
    def _loader(self, name: str, train: bool) -> DataLoader:
        ds = self.splits[name].select_columns(["input_ids", "prompt_length"])
        size = self.batch_size if train else self.eval_batch_size
        packed = self.packing and train  # evaluation stays padded: no gradients, simpler
        # The lengths as one Arrow column: any other access formats 1.5M rows one by one (minutes at full size).
        lengths = self.splits[name].with_format("arrow")["length"].to_numpy()
        sampler = LengthGroupedBatchSampler(lengths, size, seed=self.split.seed, shuffle=train,
                                            group=64 if self.group_by_length else 1,
                                            max_tokens=self.max_tokens if train else None, packed=packed)
        collate = collate_packed if packed else collate_train
        cls = ResumableDataLoader if train else DataLoader
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG at every epoch,
        # which would shift the dropout masks of a resumed run.
        generator = torch.Generator().manual_seed(self.split.seed)
        return cls(ds, batch_sampler=sampler, num_workers=self.num_workers, generator=generator,
                   collate_fn=partial(collate, pad_id=self.encoder.pad_id, pad_to_multiple_of=self.pad_to))

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader("train", train=True)
        if self._loader_state:
            self._train_loader.load_state_dict(self._loader_state)
        return self._train_loader

    def longest_train_row(self) -> int | None:
        """Tokens in this epoch's longest packed training row (padding included), or None when not packing."""
        if not self.packing or self._train_loader is None:
            return None
        tokens = self._train_loader.batch_sampler.longest_batch_tokens()
        return -(-tokens // self.pad_to) * self.pad_to

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", train=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        assert self.predict_input is not None
        return self.predict_input.loader(self.encoder, self.eval_batch_size, skip=self.predict_skip,
                                         max_tokens=self.predict_max_tokens, max_prompt_tokens=self.max_prompt_tokens,
                                         shard=True)
