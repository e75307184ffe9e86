"""Quality metrics of next-token distributions, accumulated over many positions.

All sums are float64, so that millions of positions add up without drift:

* perplexity ``exp(mean NLL)`` of the text's own next tokens;
* ``KL(reference || candidate)`` of the next-token distributions, in nats, and the
  reference's own perplexity on the same positions;
* top-1 agreement: how often both distributions have the same most likely token;
* multiple-choice accuracy from the logits of the answer letters.
"""

import math

import torch


def log_softmax64(logits):
    return torch.log_softmax(logits.double(), dim=-1)


class TokenMetrics:
    """Running sums over positions: ``add(logits, targets[, reference_logits])`` with logits ``[n, vocab]``."""

    def __init__(self):
        self.positions = 0
        self.nll = 0.0
        self.reference_nll = 0.0
        self.kl = 0.0
        self.agreeing = 0
        self.compared = 0
        self.non_finite = 0

    def add(self, logits, targets, reference=None):
        finite = torch.isfinite(logits).all(dim=-1)
        self.non_finite += int((~finite).sum())
        log_probs = log_softmax64(logits)
        self.nll -= float(log_probs.gather(-1, targets.long().unsqueeze(-1)).sum())
        self.positions += targets.numel()
        if reference is not None:
            reference_log_probs = log_softmax64(reference)
            self.reference_nll -= float(reference_log_probs.gather(-1, targets.long().unsqueeze(-1)).sum())
            self.kl += float((reference_log_probs.exp() * (reference_log_probs - log_probs)).sum())
            self.agreeing += int((reference.argmax(-1) == logits.argmax(-1)).sum())
            self.compared += targets.numel()

    def figures(self):
        """The metrics; a value that is not finite (a broken variant's NaN logits) is None."""
        result = {
            "positions": self.positions,
            "non_finite_positions": self.non_finite,
            "perplexity": finite(math.exp(min(self.nll / self.positions, 700))) if self.positions else None,
        }
        if self.compared:
            result.update(
                kl_divergence=finite(self.kl / self.compared),
                top1_agreement=self.agreeing / self.compared,
                reference_perplexity=finite(math.exp(min(self.reference_nll / self.compared, 700))),
            )
        return result


def finite(value):
    return value if math.isfinite(value) else None


def choice_accuracy(letter_logits, answers):
    """``(correct, total)``: each row's highest letter logit against its answer index."""
    chosen = letter_logits.argmax(-1)
    return int((chosen == answers).sum()), int(answers.numel())
