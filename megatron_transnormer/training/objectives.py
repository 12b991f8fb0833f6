"""Training objectives: what a batch of samples asks the model, and how its answer is scored.

    objective = build_objective(cfg, info)
    inputs, labels = objective.prepare(batch)      # inputs: the model's inputs (spec.model_inputs)
    loss_sum = objective.loss_sum(model(*inputs), labels)
    count = label_count(labels)                    # labelled tokens (labels >= 0)

An objective returns a loss *sum* and the runtime divides by the number of labelled
tokens of the whole update (all micro-batches, all data-parallel ranks), counted before
the backward: the gradient is then that of the mean over every labelled token, however
the labels fall into micro-batches and ranks (a masked LM's do not fall evenly).

- `CausalLM` (model.head=lm): packed samples of seq_len + 1 ids; inputs are [:, :-1],
  labels [:, 1:].
- `MaskedLM` (model.head=masked_lm, RoBERTa): padded samples of seq_len ids; of each
  sample's real tokens, `mask_prob` (rounded randomly, as fairseq does) are predicted:
  80% of them replaced by <mask>, 10% by a random token, 10% left as they are. The
  choice comes from a generator seeded by (seed, epoch, sample index): the same masks in
  every parallel layout, with any number of loader workers, and after a resume.
- `Classification` (model.head=classification, the LRA tasks): batches of the LRA reader
  (data/lra), one label per sample; the count is of samples, so the loss is the mean
  cross-entropy over the global batch. Sequences are padded up to data.seq_len (a whole
  number of DiagAttention blocks); Retrieval's two documents go through the model as one
  batch of 2B rows (the two-tower head pairs them up). `correct` counts right answers
  (validation accuracy).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_transnormer.model import model_inputs

IGNORE = -1  # the label of a position that is not scored
_MASK_STREAM = 0x4D4C4D  # separates the masking generators from any other use of the seed


class ObjectiveError(ValueError):
    """The dataset cannot train this objective; the message names the setting and the file."""


def label_count(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE).sum()


def vocab_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ -log p(target) over targets >= 0, from vocabulary-parallel logits [..., vocab/tp], fp32."""
    scored = targets != IGNORE
    nll = vocab_parallel_cross_entropy(logits.float(), targets.clamp(min=0))
    return torch.where(scored, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)).sum()


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long).unsqueeze(0)  # the same for every sample: [1, N]


class CausalLM:
    name = "causal_lm"
    packing = "causal"
    word_perplexity = True  # its NLL also gives the paper's per-word perplexity
    predicted_fraction = 1.0  # of the positions, those the head projects (for FLOP counts)

    def __init__(self, model_cfg):
        self.input_names = model_inputs(model_cfg)

    def prepare(self, batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        tokens = batch.tokens
        return (tokens[:, :-1], _positions(tokens.shape[1] - 1)), tokens[:, 1:]

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_nll_sum(logits, labels)


class MaskedLM:
    name = "masked_lm"
    packing = "mlm"
    word_perplexity = False

    def __init__(self, model_cfg, objective_cfg, seed: int, *, vocab_size: int, pad_id: int, mask_id: int,
                 special_ids=()):
        self.input_names = model_inputs(model_cfg)
        self.seed, self.pad_id, self.mask_id = seed, pad_id, mask_id
        self.mask_prob = self.predicted_fraction = objective_cfg.mask_prob
        self.keep_prob = objective_cfg.leave_unmasked_prob
        self.random_prob = objective_cfg.random_token_prob
        # Random replacements are ordinary tokens, never a special symbol (as in fairseq).
        specials = {i for i in (pad_id, mask_id, *special_ids) if i >= 0}
        self.replacements = np.array([i for i in range(vocab_size) if i not in specials], dtype=np.int64)

    def mask_sample(self, tokens: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one sample; labels are IGNORE where nothing is predicted."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, index, _MASK_STREAM])))
        real = np.flatnonzero(tokens != self.pad_id)
        n = min(len(real), int(self.mask_prob * len(real) + rng.random()))
        chosen = np.sort(rng.choice(real, size=n, replace=False))
        labels = np.full_like(tokens, IGNORE)
        labels[chosen] = tokens[chosen]
        inputs = tokens.copy()
        u = rng.random(n)
        replaced = u >= self.keep_prob  # the rest is left unchanged
        randomised = replaced & (u < self.keep_prob + self.random_prob)
        inputs[chosen[replaced & ~randomised]] = self.mask_id
        inputs[chosen[randomised]] = self.replacements[rng.integers(len(self.replacements), size=int(randomised.sum()))]
        return inputs, labels

    def prepare(self, batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        tokens = batch.tokens.numpy()
        pairs = [self.mask_sample(row, int(e), int(i)) for row, (e, i) in zip(tokens, batch.keys.tolist())]
        inputs = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        valid = batch.tokens != self.pad_id
        return (inputs, _positions(inputs.shape[1]), valid, labels != IGNORE), labels

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The head projected only the predicted positions, in row-major order (heads.py).
        return vocab_nll_sum(logits, labels[labels != IGNORE])


class Classification:
    name = "classification"
    packing = "mlm"  # what data/lra/writer.py records: one padded sequence (or two) per sample
    word_perplexity = False
    predicted_fraction = 0.0  # the head runs on pooled states, not on positions

    def __init__(self, model_cfg, seq_len: int, pad_id: int):
        self.input_names = model_inputs(model_cfg)
        self.two_tower = model_cfg.classifier == "two_tower"
        self.seq_len, self.pad_id = seq_len, pad_id

    def _padded(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids padded up to seq_len, valid [B, seq_len]): padding after `lengths` real ids."""
        extra = self.seq_len - tokens.shape[1]
        if extra > 0:
            tokens = F.pad(tokens, (0, extra), value=max(self.pad_id, 0))
        valid = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return tokens, valid

    def prepare(self, batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        tokens, valid = self._padded(batch.tokens, batch.lengths)
        if self.two_tower:
            if batch.tokens2 is None:
                raise ObjectiveError("model.classifier=two_tower needs two documents per sample (LRA Retrieval); "
                                     "the batch holds one")
            tokens2, valid2 = self._padded(batch.tokens2, batch.lengths2)
            tokens, valid = torch.cat([tokens, tokens2]), torch.cat([valid, valid2])
        labels = torch.where(batch.labels >= 0, batch.labels, torch.full_like(batch.labels, IGNORE))  # filler rows
        return (tokens, _positions(tokens.shape[1]), valid), labels

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Samples whose arg-max class is their label (filler rows never count)."""
        return ((logits.argmax(dim=-1) == labels) & (labels != IGNORE)).sum()


def build_objective(cfg, info=None):
    """The objective `cfg.model.head` trains, checked against the dataset `info` (a DatasetInfo)."""
    m = cfg.model
    if info is not None:
        check_dataset(cfg, info)
    if m.head == "lm":
        return CausalLM(m)
    if m.head == "masked_lm":
        if info is None:
            raise ObjectiveError("the masked LM needs the dataset's special ids (pad, mask): pass its DatasetInfo")
        special = info.manifest["special"]
        return MaskedLM(m, cfg.objective, cfg.train.seed, vocab_size=info.vocab_size, pad_id=special["pad_id"],
                        mask_id=special["mask_id"],
                        special_ids=(special.get("bos_id", -1), special.get("eod_id", -1), special.get("unk_id", -1)))
    if m.head == "classification":
        if info is None:
            raise ObjectiveError("the classifier reads an LRA dataset: pass its DatasetInfo")
        return Classification(m, cfg.data.seq_len or info.seq_len, info.pad_id)
    raise ObjectiveError(f"model.head={m.head!r}: no training objective for it yet")


def check_dataset(cfg, info) -> None:
    """Refuse a dataset the objective cannot train on, naming the setting and the manifest."""
    head = cfg.model.head
    section = info.manifest.get("classification")
    if head == "classification" or section is not None:
        check_classification_dataset(cfg, info)
        return
    wanted = {"lm": "causal", "masked_lm": "mlm"}.get(head)
    if wanted and info.packing != wanted:
        flag = {"causal": "--packing causal", "mlm": "--packing mlm"}[wanted]
        raise ObjectiveError(f"data.path: {info.path} is packed for {info.packing!r} samples, but model.head={head} "
                             f"trains on {wanted!r} ones; prepare the data with tools/prepare_data.py {flag} or "
                             f"choose the model that matches the data")
    if head == "masked_lm":
        special = info.manifest["special"]
        for key in ("mask_id", "pad_id"):
            if special.get(key, -1) < 0:
                raise ObjectiveError(f"data.path: {info.path} has no {key.split('_')[0]} token (special.{key} = "
                                     f"{special.get(key)}); the masked LM needs one: prepare the data with "
                                     f"--packing mlm")


def check_classification_dataset(cfg, info) -> None:
    """An LRA dataset (a manifest with a `classification` section, tools/prepare_lra.py) for a
    classifier whose classes, input kind, number of documents and length fit it."""
    m, section = cfg.model, info.manifest.get("classification")
    where = f"data.path: {info.path}"
    if m.head != "classification":
        raise ObjectiveError(f"{where} is an LRA classification dataset (task {section.get('task')!r}), but "
                             f"model.head={m.head} trains on text; use an LRA config (configs/lra/) or "
                             f"model.head=classification")
    if section is None:
        raise ObjectiveError(f"{where} has no 'classification' section, but model.head=classification trains on "
                             f"labelled samples; prepare an LRA task with tools/prepare_lra.py")
    task = section.get("task")
    if section.get("num_classes") != m.num_classes:
        raise ObjectiveError(f"model.num_classes: {m.num_classes}, but {info.path} (task {task!r}) has "
                             f"{section.get('num_classes')} classes")
    kind = section.get("input_kind", "tokens")
    if kind != m.input:
        raise ObjectiveError(f"model.input: {m.input!r}, but {info.path} (task {task!r}) holds {kind}; "
                             f"set model.input={kind}")
    two = section.get("inputs") == 2
    if two != (m.classifier == "two_tower"):
        raise ObjectiveError(f"model.classifier: {m.classifier!r}, but {info.path} (task {task!r}) has "
                             f"{section.get('inputs')} document(s) per sample; "
                             + ("set model.classifier=two_tower" if two else "two_tower needs two (Retrieval)"))
    test = cfg.data.test_split
    if test not in info.manifest["splits"]:
        raise ObjectiveError(f"data.test_split={test!r}: {info.path} has no split {test!r} (it has "
                             f"{', '.join(info.manifest['splits'])}); the end of training scores the best "
                             f"validation checkpoint on it")
    seq_len = cfg.data.seq_len or info.seq_len
    if seq_len < info.seq_len:
        raise ObjectiveError(f"data.seq_len: {seq_len} is shorter than the {info.seq_len} ids per sequence of "
                             f"{info.path}; set data.seq_len=0 or a length >= {info.seq_len}")
