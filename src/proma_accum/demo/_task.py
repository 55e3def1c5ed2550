"""A small RL task with a verifiable reward: two-digit addition.

A prompt is ``"<bos>07+35="`` (operands zero-padded to a fixed width, so every prompt has
the same length and no left padding is needed); the response is the decimal sum without
leading zeros followed by ``<eos>``, e.g. ``"42<eos>"``. The reward is 1 for an exact
answer and 0 otherwise.

The tokenizer is built in-process with the ``tokenizers`` library (one token per character),
so nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
CHARACTERS = "0123456789+="


def build_tokenizer() -> Tokenizer:
    """Character-level tokenizer: 4 special tokens, 10 digits, ``+`` and ``=`` (16 ids)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


@dataclass
class AdditionTask:
    """Addition of two ``digits``-digit numbers with a held-out probe set.

    The pairs ``(a, b)`` with ``0 <= a, b < 10**digits`` are split once (by ``split_seed``)
    into ``holdout`` held-out pairs and the training pool; the probe prompts are the first
    ``probe_size`` held-out pairs, so the training pool does not depend on ``probe_size``.

    Attributes:
        digits: operand width.
        probe_size: number of held-out prompts used for the per-step probe metrics.
        holdout: number of pairs kept out of training (``>= probe_size``).
        split_seed: seed of the train/probe split (shared by all methods and seeds).
    """

    digits: int = 2
    probe_size: int = 64
    holdout: int = 256
    split_seed: int = 1234

    def __post_init__(self) -> None:
        self.tokenizer = build_tokenizer()
        self.pad_id = self.tokenizer.token_to_id(PAD)
        self.bos_id = self.tokenizer.token_to_id(BOS)
        self.eos_id = self.tokenizer.token_to_id(EOS)
        self.vocab_size = self.tokenizer.get_vocab_size()
        n = 10**self.digits
        pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))  # (n*n, 2)
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.split_seed))
        if not 0 < self.probe_size <= self.holdout < len(pairs):
            raise ValueError("need 0 < probe_size <= holdout < number of pairs")
        self.probe_pairs = pairs[perm[: self.probe_size]]  # (probe_size, 2)
        self.train_pairs = pairs[perm[self.holdout :]]  # (n*n - holdout, 2)

    @property
    def prompt_len(self) -> int:
        """Tokens per prompt: ``<bos>``, two operands, ``+`` and ``=``."""
        return 2 * self.digits + 3

    @property
    def max_response_len(self) -> int:
        """Longest correct response: ``digits + 1`` sum digits plus ``<eos>``."""
        return self.digits + 2

    def sample_pairs(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n`` training pairs with replacement. Returns (n, 2) int64."""
        idx = torch.randint(len(self.train_pairs), (n,), generator=generator)
        return self.train_pairs[idx]

    def prompt_text(self, a: int, b: int) -> str:
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    def encode_prompts(self, pairs: torch.Tensor) -> torch.Tensor:
        """(N, 2) operand pairs -> (N, prompt_len) token ids, starting with ``<bos>``."""
        rows = [
            [self.bos_id, *self.tokenizer.encode(self.prompt_text(int(a), int(b))).ids]
            for a, b in pairs.tolist()
        ]
        return torch.tensor(rows, dtype=torch.long)

    def encode_answers(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Correct responses for supervised warm start.

        Returns ``(tokens, mask)``, both (N, max_response_len): the sum's digits and
        ``<eos>``, right-padded with ``<pad>``; ``mask`` is 1 on response tokens.
        """
        n, width = len(pairs), self.max_response_len
        tokens = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width))
        for i, (a, b) in enumerate(pairs.tolist()):
            ids = [*self.tokenizer.encode(str(a + b)).ids, self.eos_id]
            tokens[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1.0
        return tokens, mask

    def decode_response(self, ids: list[int]) -> str:
        """Text of a response up to (not including) its first ``<eos>``."""
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def rewards(self, pairs: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Verifiable reward. pairs (N, 2), responses (N, L) token ids -> (N,) float in {0, 1}.

        A response earns 1 iff it is exactly the decimal sum (no leading zeros, no extra
        tokens) terminated by ``<eos>`` within ``L`` tokens.
        """
        out = torch.zeros(len(pairs))
        for i, ((a, b), ids) in enumerate(zip(pairs.tolist(), responses.tolist(), strict=True)):
            if self.eos_id not in ids:
                continue
            out[i] = float(self.decode_response(ids) == str(a + b))
        return out
