"""The one prompt: used for training, validation samples and predict, saved as ``prompt.yaml`` beside every
exported adapter and reloaded from there, so training and inference cannot drift apart."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from titlegen.errors import TitlegenError
from titlegen.io import atomic_write

ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nDESCRIBE THE TITLE BASED ON THE CONTENT\n\n### Input:\n{title}\n\n### Response:\n"
)


@dataclass(frozen=True)
class PromptTemplate:
    """How a title becomes the model's input.

    Attributes:
        template: The prompt text; ``{title}`` marks where the (cleaned) title goes. Other braces are literal.
        chat: Wrap the rendered text as a user turn in the tokenizer's chat template (instruct models).
        system: Optional system message, used only with ``chat``.
    """

    template: str = ALPACA
    chat: bool = False
    system: str | None = None

    def __post_init__(self) -> None:
        if "{title}" not in self.template:
            raise TitlegenError("data.prompt.template: must contain the placeholder {title}")

    def render(self, title: str) -> str:
        """The prompt text for ``title`` (before any chat template)."""
        return self.template.replace("{title}", title)

    def chat_messages(self, title: str) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": self.render(title)}]


def save_prompt(prompt: PromptTemplate, directory: str | Path) -> Path:
    """Write ``prompt.yaml`` into ``directory`` atomically."""
    path = Path(directory) / "prompt.yaml"
    atomic_write(path, lambda fh: yaml.safe_dump(asdict(prompt), fh, allow_unicode=True, sort_keys=False, width=1000))
    return path


def load_prompt(directory: str | Path) -> PromptTemplate:
    """Read ``prompt.yaml`` from an adapter directory."""
    path = Path(directory) / "prompt.yaml"
    if not path.is_file():
        raise TitlegenError(f"{path}: missing (every exported adapter holds the prompt it was trained with)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "template" not in data:
        raise TitlegenError(f"{path}: expected a mapping with a 'template' key")
    unknown = set(data) - {"template", "chat", "system"}
    if unknown:
        raise TitlegenError(f"{path}: unknown key(s) {sorted(unknown)}")
    return PromptTemplate(**data)
